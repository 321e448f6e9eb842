"""Typed configs: one dataclass per command, filled from YAML, overridden by CLI flags.

Every field carries its ``--help`` text in ``field(metadata={"help": ...})``. A YAML file
in ``configs/`` holds the same keys as the dataclass (unknown keys are an error, so a typo
never passes silently); a flag given on the command line wins over the file; the resolved
config is saved next to the outputs.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _base_type(tp: Any) -> tuple[Any, bool]:
    """``(inner type, is_list)`` for annotations like ``int``, ``float | None``, ``list[str]``."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return _base_type(args[0]) if len(args) == 1 else (str, False)
    if origin in (list, tuple):
        args = typing.get_args(tp)
        return (args[0] if args else str), True
    return tp, False


def add_config_arguments(parser: argparse.ArgumentParser, cls: type, exclude: tuple[str, ...] = ()) -> None:
    """Add one ``--flag`` per field of dataclass ``cls``; unset flags stay ``None``."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in exclude or not f.init:
            continue
        tp, is_list = _base_type(hints[f.name])
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)  # type: ignore[misc]
        help_text = f"{f.metadata.get('help', '')} (default: {default})"
        if tp is bool and not is_list:
            parser.add_argument(_flag(f.name), dest=f.name, action=argparse.BooleanOptionalAction,
                                default=None, help=help_text)
        else:
            parser.add_argument(_flag(f.name), dest=f.name, type=tp, nargs="+" if is_list else None,
                                default=None, metavar=f.metadata.get("metavar", f.name.upper()), help=help_text)


def load_config(cls: type[T], path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> T:
    """Build ``cls`` from its defaults, then the YAML file at ``path``, then ``overrides``.

    ``overrides`` may be ``vars(args)`` from argparse: ``None`` values (flags not given)
    and keys that are not fields are ignored.
    """
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    values: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"{path}: config file not found")
        loaded = yaml.safe_load(path.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"{path}: expected a mapping of keys to values, found {type(loaded).__name__}")
        unknown = sorted(set(loaded) - names)
        if unknown:
            raise ValueError(f"{path}: unknown key(s) {unknown}; valid keys: {sorted(names)}")
        values.update(loaded)
    for key, value in (overrides or {}).items():
        if key in names and value is not None:
            values[key] = value
    return cls(**values)


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """Plain, YAML-safe dict of a config dataclass (paths and tuples become str and lists)."""

    def plain(v: Any) -> Any:
        if isinstance(v, Path):
            return str(v)
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return {k: plain(v) for k, v in dataclasses.asdict(cfg).items()}


def save_config(cfg: Any, path: str | Path) -> None:
    """Write the resolved config as YAML, atomically."""
    from cemcurate.atomic import atomic_path

    with atomic_path(path) as tmp:
        tmp.write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))

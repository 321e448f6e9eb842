"""Typed configs: one dataclass per command, filled from YAML, overridden by CLI flags.

Every field carries its ``--help`` text in ``field(metadata={"help": ...})``. A config may
group its fields into *sections*: a field whose type is itself a dataclass (e.g.
``TrainConfig.data``, ``TrainConfig.model``), in the manner of nnU-Net's plans. Field
names are unique across all sections, so each one has exactly one ``--flag`` named after
it (``--crop`` stays ``--crop`` wherever ``crop`` lives) and can be given flat.

A YAML file in ``configs/`` holds the same keys: a section name holding a mapping of its
fields, or a field name at the top level (so ``crop: 256`` and ``augment: {crop: 256}`` mean
the same). Unknown keys are an error, so a typo never passes silently; a flag given on the
command line wins over the file; the resolved config is saved next to the outputs, nested
by section.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Iterator, Mapping, TypeVar

import yaml

from cemcurate.common.atomic import atomic_path

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


def _is_section(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _leaves(cls: type, path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], dataclasses.Field, Any]]:
    """``(section path, field, type)`` of every non-section field of ``cls``, depth first."""
    for section_path, _, f, tp in _leaves_with_sections(cls, path):
        yield section_path, f, tp


def _leaves_with_sections(cls: type, path: tuple[str, ...] = ()):
    """As :func:`_leaves`, with the dataclass that holds each field."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        if _is_section(hints[f.name]):
            yield from _leaves_with_sections(hints[f.name], path + (f.name,))
        else:
            yield path, cls, f, hints[f.name]


def leaf_paths(cls: type) -> dict[str, tuple[str, ...]]:
    """``{field name: section path}`` of every field of ``cls`` (``()`` for top-level fields).

    Raises:
        TypeError: two sections hold a field of the same name (flags would be ambiguous).
    """
    paths: dict[str, tuple[str, ...]] = {}
    for path, f, _ in _leaves(cls):
        if f.name in paths:
            raise TypeError(f"{cls.__name__}: field {f.name!r} appears in sections {paths[f.name]} and {path}")
        paths[f.name] = path
    return paths


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return None


def add_config_arguments(parser: argparse.ArgumentParser, cls: type, exclude: tuple[str, ...] = ()) -> None:
    """Add one ``--flag`` per field of dataclass ``cls`` (every section's fields, grouped in ``--help``);
    unset flags stay ``None``."""
    leaf_paths(cls)  # fail early on ambiguous names
    groups: dict[tuple[str, ...], Any] = {}
    for path, section, f, tp in _leaves_with_sections(cls):
        if f.name in exclude:
            continue
        if path not in groups:
            summary = (section.__doc__ or "").strip().splitlines()[0] if path else ""
            groups[path] = parser.add_argument_group(f"{'.'.join(path)} settings", summary) if path else parser
        target = groups[path]
        inner, is_list = _base_type(tp)
        help_text = f"{f.metadata.get('help', '')} (default: {_default(f)})"
        if inner is bool and not is_list:
            target.add_argument(
                _flag(f.name), dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=help_text
            )
        else:
            target.add_argument(
                _flag(f.name),
                dest=f.name,
                type=inner,
                nargs="+" if is_list else None,
                default=None,
                metavar=f.metadata.get("metavar", f.name.upper()),
                help=help_text,
            )


def _place(values: dict, path: tuple[str, ...], name: str, value: Any) -> None:
    for section in path:
        values = values.setdefault(section, {})
    values[name] = value


def _read_yaml_values(cls: type, path: Path) -> dict:
    """The YAML file's values, nested by section, with every key checked against ``cls``."""
    if not path.is_file():
        raise ValueError(f"{path}: config file not found")
    loaded = yaml.safe_load(path.read_text()) or {}
    if not isinstance(loaded, dict):
        raise ValueError(f"{path}: expected a mapping of keys to values, found {type(loaded).__name__}")
    paths = leaf_paths(cls)
    sections = {p[: i + 1] for p in paths.values() for i in range(len(p))}
    values: dict = {}
    seen: dict[str, str] = {}

    def take(mapping: dict, prefix: tuple[str, ...]) -> None:
        where = f" in section {'.'.join(prefix)!r}" if prefix else ""
        valid = sorted(
            {k for k, p in paths.items() if p[: len(prefix)] == prefix}
            | {s[len(prefix)] for s in sections if len(s) > len(prefix) and s[: len(prefix)] == prefix}
        )
        unknown = []
        for key, value in mapping.items():
            if prefix + (key,) in sections:
                if not isinstance(value, dict):
                    raise ValueError(f"{path}: section {key!r} must be a mapping of its keys, got {value!r}")
                take(value, prefix + (key,))
            elif key in paths and paths[key][: len(prefix)] == prefix:
                if key in seen:
                    raise ValueError(
                        f"{path}: key {key!r} is given twice ({seen[key]} and{where or ' at the top level'})"
                    )
                seen[key] = where.strip() or "at the top level"
                _place(values, paths[key], key, value)
            else:
                unknown.append(key)
        if unknown:
            raise ValueError(f"{path}: unknown key(s) {sorted(unknown)}{where}; valid keys: {valid}")

    take(loaded, ())
    return values


def _build(cls: type[T], values: Mapping[str, Any]) -> T:
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in values and not _is_section(hints[f.name]):
            continue
        kwargs[f.name] = _build(hints[f.name], values.get(f.name, {})) if _is_section(hints[f.name]) else values[f.name]
    return cls(**kwargs)


def load_config(cls: type[T], path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> T:
    """Build ``cls`` from its defaults, then the YAML file at ``path``, then ``overrides``.

    ``overrides`` maps field names (of any section) to values; it may be ``vars(args)``
    from argparse: ``None`` values (flags not given) and keys that are not fields are
    ignored.
    """
    values = _read_yaml_values(cls, Path(path)) if path is not None else {}
    paths = leaf_paths(cls)
    for key, value in (overrides or {}).items():
        if key in paths and value is not None:
            _place(values, paths[key], key, value)
    return _build(cls, values)


def build_config(cls: type[T], **fields: Any) -> T:
    """``cls`` from its defaults and ``fields`` given by name (of any section), e.g.
    ``build_config(TrainConfig, images=[...], masks=[...], iters=10)``.

    Raises:
        ValueError: a name that is not a field of ``cls`` (so a typo never passes silently).
    """
    unknown = sorted(set(fields) - set(leaf_paths(cls)))
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown field(s) {unknown}; valid: {sorted(leaf_paths(cls))}")
    return load_config(cls, None, fields)


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """Plain, YAML-safe dict of a config dataclass, nested by section (paths and tuples become
    str and lists)."""

    def plain(v: Any) -> Any:
        if isinstance(v, Path):
            return str(v)
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return {k: plain(v) for k, v in dataclasses.asdict(cfg).items()}


def flat_config(values: Mapping[str, Any]) -> dict[str, Any]:
    """``{field: value}`` of a (possibly nested) config dict such as :func:`config_to_dict` gives;
    section names disappear, as field names are unique."""
    out: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, Mapping):
            out.update(flat_config(value))
        else:
            out[key] = value
    return out


def save_config(cfg: Any, path: str | Path) -> None:
    """Write the resolved config as YAML, atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))

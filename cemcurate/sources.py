"""Finding the sources in a RAW folder and the per-source options of its sidecar.

The optional sidecar ``cemcurate.yaml`` in RAW (or a file given with ``--sources``) is a
list of entries, or a mapping with key ``sources`` holding that list::

    sources:
      - path: "stack1/raw/*.tif"     # glob relative to RAW ('**' crosses folders)
        stack: true                  # numbered 2D images in one folder form one volume
        voxel_size: [50, 4.6, 4.6]   # (z, y, x) in nm; overrides file metadata
        invert: false                # flip intensities (bright membranes -> dark)
        dataset: null                # key inside an h5/zarr container
      - path: "**/labels/*"
        exclude: true                # not EM data: skip

Later entries override earlier ones for the files both match.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field, replace
from pathlib import Path

import yaml

from cemcurate.io import Volume, is_supported, natural_sort_key, open_file, open_series

SIDECAR_NAME = "cemcurate.yaml"
_ENTRY_KEYS = {"path", "voxel_size", "invert", "stack", "dataset", "exclude"}


@dataclass(frozen=True)
class SourceOptions:
    """Per-source settings from the sidecar (``None`` = not given, use the file's metadata)."""

    voxel_size: tuple[float, float, float] | None = None
    invert: bool = False
    stack: bool = False
    dataset: str | None = None
    exclude: bool = False


@dataclass
class SourceSpec:
    """One unit of work: a single file, or a folder of numbered 2D images read as a stack.

    ``name`` is the path relative to RAW (of the file, or of the folder for a stack);
    ``key`` is a filesystem-safe unique id used for shard and part file names.
    """

    name: str
    files: list[Path]
    options: SourceOptions = field(default_factory=SourceOptions)

    @property
    def key(self) -> str:
        slug = re.sub(r"[^A-Za-z0-9._-]+", "_", self.name)[-48:].strip("_.") or "source"
        return f"{slug}-{hashlib.sha1(self.name.encode()).hexdigest()[:8]}"


def open_volumes(spec: SourceSpec) -> list[Volume]:
    """Open the volume(s) of one source (only metadata are read), with the sidecar's voxel size applied.

    A stack is one volume of its files in order; a file gives one volume per array it holds
    (only the ``dataset`` one when the sidecar names it).
    """
    if spec.options.stack:
        volumes = [open_series(spec.files)]
    else:
        volumes = open_file(spec.files[0], dataset=spec.options.dataset)
    if spec.options.voxel_size is not None:
        for vol in volumes:
            vol.voxel_size, vol.voxel_size_from = spec.options.voxel_size, "sidecar"
    return volumes


@dataclass
class Skipped:
    """A file in RAW that is not read, and why."""

    name: str
    reason: str


def glob_to_regex(pattern: str) -> re.Pattern[str]:
    """Compile a RAW-relative glob: ``*`` and ``?`` stay inside a folder, ``**`` crosses folders."""
    out, i = [], 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
        elif pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif pattern[i] == "*":
            out.append("[^/]*")
            i += 1
        elif pattern[i] == "?":
            out.append("[^/]")
            i += 1
        elif pattern[i] == "[":
            end = pattern.find("]", i + 1)
            if end < 0:
                out.append(re.escape("["))
                i += 1
            else:
                body = pattern[i + 1 : end]
                out.append("[" + ("^" + body[1:] if body.startswith("!") else body) + "]")
                i = end + 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    return re.compile("".join(out) + r"\Z")


def load_sidecar(path: str | Path) -> list[tuple[re.Pattern[str], dict]]:
    """Parse a sidecar file into ``(compiled glob, options)`` pairs, validating every entry."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ValueError(f"{path}: cannot read sidecar ({exc})") from exc
    if isinstance(data, dict):
        data = data.get("sources")
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a list of entries (or 'sources:' holding one)")
    rules = []
    for n, entry in enumerate(data, 1):
        if not isinstance(entry, dict) or "path" not in entry:
            raise ValueError(f"{path}: entry {n} must be a mapping with a 'path' glob")
        unknown = set(entry) - _ENTRY_KEYS
        if unknown:
            raise ValueError(f"{path}: entry {n} has unknown key(s) {sorted(unknown)}; valid: {sorted(_ENTRY_KEYS)}")
        options = {k: v for k, v in entry.items() if k != "path"}
        if options.get("voxel_size") is not None:
            vs = options["voxel_size"]
            if not (
                isinstance(vs, (list, tuple))
                and len(vs) == 3
                and all(isinstance(v, (int, float)) and v > 0 for v in vs)
            ):
                raise ValueError(
                    f"{path}: entry {n}: voxel_size must be three positive numbers [z, y, x] in nm, got {vs!r}"
                )
            options["voxel_size"] = tuple(float(v) for v in vs)
        rules.append((glob_to_regex(str(entry["path"])), options))
    return rules


def _list_files(raw: Path) -> list[Path]:
    """Every file below ``raw`` (a ``.zarr`` folder counts as one file), hidden ones excluded."""
    found: list[Path] = []

    def walk(folder: Path) -> None:
        for entry in sorted(folder.iterdir(), key=natural_sort_key):
            if entry.name.startswith("."):
                continue
            if entry.is_dir() and not entry.name.lower().endswith(".zarr"):
                walk(entry)
            else:
                found.append(entry)

    walk(raw)
    return found


def discover_sources(raw: str | Path, sidecar: str | Path | None = None) -> tuple[list[SourceSpec], list[Skipped]]:
    """List the sources in ``raw``.

    Args:
        raw: the RAW folder (or a single file).
        sidecar: a sidecar file; default ``raw/cemcurate.yaml`` when present.

    Returns:
        ``(specs, skipped)``: sources to read, in a stable order, and files that are not
        read (excluded by the sidecar or of an unsupported type) with the reason.
    """
    raw = Path(raw)
    if not raw.exists():
        raise ValueError(f"{raw}: input folder not found")
    if raw.is_file() or raw.name.lower().endswith(".zarr"):
        return [SourceSpec(raw.name, [raw])], []
    if sidecar is None and (raw / SIDECAR_NAME).is_file():
        sidecar = raw / SIDECAR_NAME
    rules = load_sidecar(sidecar) if sidecar is not None else []

    specs: list[SourceSpec] = []
    stacks: dict[str, SourceSpec] = {}
    skipped: list[Skipped] = []
    for path in _list_files(raw):
        rel = path.relative_to(raw).as_posix()
        if rel == SIDECAR_NAME:
            continue
        merged: dict = {}
        for regex, options in rules:
            if regex.match(rel):
                merged.update(options)
        options = SourceOptions(**merged)
        if options.exclude:
            skipped.append(Skipped(rel, "excluded by the sidecar"))
        elif not is_supported(path):
            skipped.append(Skipped(rel, f"unsupported file type '{path.suffix or path.name}'"))
        elif options.stack:
            folder = path.parent.relative_to(raw).as_posix()
            spec = stacks.get(folder)
            if spec is None:
                spec = stacks[folder] = SourceSpec(
                    folder if folder != "." else raw.name, [], replace(options, stack=True)
                )
                specs.append(spec)
            spec.files.append(path)
        else:
            specs.append(SourceSpec(rel, [path], options))
    return specs, skipped

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

Later entries override earlier ones for the files both match. The sidecar is checked
before any work (:func:`load_sidecar`): every key and type (``stack: "no"`` is an error,
not a truthy string), and every entry must match at least one file. A ``path`` that names
an existing file is matched literally (so ``scan[1].tif`` is that file, not a character
class); one that names a folder means the files directly in it; anything else is a glob.
Folders holding a ``cemcurate`` output (:data:`cemcurate.layout.OUTPUT_MARKER`) are never read as input.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field, replace
from pathlib import Path

import yaml

from cemcurate.io import Volume, is_supported, natural_sort_key, open_file, open_series
from cemcurate.layout import BuildLayout

SIDECAR_NAME = "cemcurate.yaml"
# Entry keys and the types their values must have (YAML: unquoted true/false for booleans).
_ENTRY_TYPES = {
    "path": "a path or glob (text)",
    "voxel_size": "three positive numbers [z, y, x] in nm or null",
    "invert": "true or false",
    "stack": "true or false",
    "dataset": "a key (text) or null",
    "exclude": "true or false",
}
_GLOB_CHARS = set("*?[")


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
    ``key`` is a filesystem-safe unique id used for shard and part file names; ``entries``
    are the sidecar entries that matched its files.
    """

    name: str
    files: list[Path]
    options: SourceOptions = field(default_factory=SourceOptions)
    entries: tuple[int, ...] = ()  # the sidecar entries that matched its files (1-based), for the record

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


@dataclass(frozen=True)
class SidecarEntry:
    """One validated sidecar entry: its 1-based ``number``, ``path`` and the options it sets."""

    number: int
    path: str
    options: dict
    regex: re.Pattern[str]

    def describe(self) -> str:
        return f"entry {self.number} (path {self.path!r})"


def _check_entry(n: int, entry: object, where: str) -> dict:
    """The options of sidecar entry ``n`` after checking every key's type; errors name entry, key and type."""
    if not isinstance(entry, dict) or "path" not in entry:
        raise ValueError(f"{where}: entry {n} must be a mapping with a 'path' glob, got {entry!r}")
    unknown = set(entry) - set(_ENTRY_TYPES)
    if unknown:
        raise ValueError(f"{where}: entry {n} has unknown key(s) {sorted(unknown)}; valid: {sorted(_ENTRY_TYPES)}")
    label = f"{where}: entry {n} (path {entry['path']!r})"
    for key, value in entry.items():
        expected = _ENTRY_TYPES[key]
        if key in ("invert", "stack", "exclude"):
            good = isinstance(value, bool)
        elif key == "path":
            good = isinstance(value, str) and value.strip() != ""
        elif key == "dataset":
            good = value is None or isinstance(value, str)
        else:  # voxel_size
            good = value is None or (
                isinstance(value, (list, tuple))
                and len(value) == 3
                and all(isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 for v in value)
            )
        if not good:
            hint = (
                " (write it unquoted: the quoted string is read as text, not as a boolean)"
                if (expected == "true or false" and isinstance(value, str))
                else ""
            )
            raise ValueError(f"{label}: '{key}' must be {expected}, got {type(value).__name__} {value!r}{hint}")
    options = {k: v for k, v in entry.items() if k != "path"}
    if options.get("voxel_size") is not None:
        options["voxel_size"] = tuple(float(v) for v in options["voxel_size"])
    return options


def _entry_regex(pattern: str, raw: Path | None) -> re.Pattern[str]:
    """How an entry's ``path`` matches RAW-relative file names (see the module docstring)."""
    pattern = pattern.strip().strip("/")
    if raw is not None and (raw / pattern).is_dir() and not pattern.lower().endswith(".zarr"):
        return re.compile(re.escape(pattern) + r"/[^/]+\Z")
    if (raw is not None and (raw / pattern).exists()) or not _GLOB_CHARS & set(pattern):
        return re.compile(re.escape(pattern) + r"\Z")
    return glob_to_regex(pattern)


def load_sidecar(path: str | Path, raw: str | Path | None = None) -> list[SidecarEntry]:
    """Parse and check a sidecar file; ``raw`` (the RAW folder) resolves literal files and bare folders.

    Raises:
        ValueError: unreadable YAML, a key that is not allowed, or a value of the wrong type,
            naming the file, the entry, the key and the expected type.
    """
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ValueError(f"{path}: cannot read sidecar ({exc})") from exc
    if isinstance(data, dict):
        data = data.get("sources")
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a list of entries (or 'sources:' holding one)")
    root = Path(raw) if raw is not None else None
    entries = []
    for n, entry in enumerate(data, 1):
        options = _check_entry(n, entry, str(path))
        entries.append(SidecarEntry(n, entry["path"], options, _entry_regex(entry["path"], root)))
    return entries


def is_output_folder(folder: Path) -> bool:
    """A folder cemcurate wrote (a build OUT or a patch export): it holds the marker, or (built
    before the marker existed) a store and its parts."""
    layout = BuildLayout(folder)
    return layout.marker.exists() or (layout.store_info.is_file() and layout.parts_dir.is_dir())


def _list_files(raw: Path) -> tuple[list[Path], list[Path]]:
    """``(files, output folders)`` below ``raw``: every file (a ``.zarr`` folder counts as one),
    hidden ones excluded, and the cemcurate output folders that were not looked into."""
    found: list[Path] = []
    outputs: list[Path] = []

    def walk(folder: Path) -> None:
        for entry in sorted(folder.iterdir(), key=natural_sort_key):
            if entry.name.startswith("."):
                continue
            if entry.is_dir() and not entry.name.lower().endswith(".zarr"):
                if is_output_folder(entry):
                    outputs.append(entry)
                else:
                    walk(entry)
            else:
                found.append(entry)

    walk(raw)
    return found, outputs


@dataclass
class Discovery:
    """What :func:`discover_sources` found.

    Attributes:
        specs: the sources to read, in a stable order.
        skipped: files not read (excluded, unsupported, or inside a cemcurate output folder).
        warnings: what a person should know (unmatched sidecar entries with ``allow_unmatched``).
        sidecar: the sidecar file that was read, or None.
    """

    specs: list[SourceSpec]
    skipped: list[Skipped]
    warnings: list[str]
    sidecar: Path | None = None


def discover_sources(
    raw: str | Path, sidecar: str | Path | None = None, allow_unmatched: bool = False, out_dir: str | Path | None = None
) -> Discovery:
    """List the sources in ``raw``.

    Args:
        raw: the RAW folder (or a single file).
        sidecar: a sidecar file; default ``raw/cemcurate.yaml`` when present.
        allow_unmatched: a sidecar entry that matches no file is a warning, not an error.
        out_dir: the build's output folder; when it lies inside ``raw`` it is not read.

    Raises:
        ValueError: ``raw`` missing, a bad sidecar, or sidecar entries that match no file
            (each named; a typo must not let label images in or drop a voxel size).
    """
    raw = Path(raw)
    if not raw.exists():
        raise ValueError(f"{raw}: input folder not found")
    if raw.is_file() or raw.name.lower().endswith(".zarr"):
        return Discovery([SourceSpec(raw.name, [raw])], [], [])
    if sidecar is None and (raw / SIDECAR_NAME).is_file():
        sidecar = raw / SIDECAR_NAME
    entries = load_sidecar(sidecar, raw) if sidecar is not None else []

    specs: list[SourceSpec] = []
    stacks: dict[str, SourceSpec] = {}
    skipped: list[Skipped] = []
    matched: set[int] = set()
    files, outputs = _list_files(raw)
    out = Path(out_dir).resolve() if out_dir is not None else None
    for path in files:
        rel = path.relative_to(raw).as_posix()
        if rel == SIDECAR_NAME:
            continue
        if out is not None and path.resolve().is_relative_to(out):
            skipped.append(Skipped(rel, "inside the build's output folder"))
            continue
        merged: dict = {}
        hits = []
        for entry in entries:
            if entry.regex.match(rel):
                merged.update(entry.options)
                hits.append(entry.number)
        matched.update(hits)
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
            spec.entries = tuple(sorted(set(spec.entries) | set(hits)))
        else:
            specs.append(SourceSpec(rel, [path], options, tuple(hits)))
    skipped += [Skipped(p.relative_to(raw).as_posix() + "/", "a cemcurate output folder (not input)") for p in outputs]
    unmatched = [e for e in entries if e.number not in matched]
    warnings = []
    if unmatched:
        listed = "; ".join(e.describe() for e in unmatched)
        count = f"{len(unmatched)} sidecar entr{'y' if len(unmatched) == 1 else 'ies'}"
        message = f"{sidecar}: {count} match no file under {raw}: {listed}"
        if not allow_unmatched:
            raise ValueError(
                f"{message}. Fix the path (relative to RAW; a folder means the files in it, a name "
                "that exists is matched literally, else a glob), or pass --allow-unmatched"
            )
        warnings.append(message)
    return Discovery(specs, skipped, warnings, Path(sidecar) if sidecar is not None else None)

"""``cemcurate build``: RAW files in, curated patch store + manifest out.

Each source (a file, or a folder read as a stack) is processed on its own, in parallel:
read -> standardise -> slice -> tile -> hash -> group near-duplicates -> write its shard
and a *part* (its manifest rows and source-table rows) under ``OUT/parts``. A finished
part is never redone unless its files or the settings that shape its patches change, so
re-running the same command resumes, and files added to RAW are added. The merge step
then assigns stable ``patch_id`` values and writes ``manifest.parquet``,
``sources.parquet``, ``store.json`` and ``report.html``, each atomically.
"""

from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import hashlib
import json
import os
import shutil
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import pandas as pd
from tqdm import tqdm

from cemcurate.common.atomic import atomic_path
from cemcurate.common.config import config_to_dict
from cemcurate.io import ReadError, Volume, open_file, open_series
from cemcurate.manifest import write_manifest
from cemcurate.patch_grid import crop_patches, tile_grid
from cemcurate.slicing import iter_planes, planes_for_spacing
from cemcurate.sources import SourceSpec, discover_sources
from cemcurate.standardize import IntensityWindow, compute_window, sample_slice_indices
from cemcurate.store import ShardWriter, open_shard, write_store_info

PART_FORMAT = 1


@dataclass
class BuildConfig:
    """Settings of ``cemcurate build``; the defaults are the CEM500K paper's."""

    patch_size: int = field(default=224, metadata={"help": "edge of the square patches in pixels"})
    min_edge: int = field(default=112, metadata={"help": "an edge crop is kept only if both its sides are at least this many pixels (it is then resized to patch-size)"})
    low_percentile: float = field(default=0.1, metadata={"help": "percentile mapped to 0 when converting non-uint8 data to uint8"})
    high_percentile: float = field(default=99.9, metadata={"help": "percentile mapped to 255 when converting non-uint8 data to uint8"})
    window_sample_slices: int = field(default=32, metadata={"help": "number of z slices, spread over the volume, sampled to compute the intensity window"})
    isotropy_tolerance: float = field(default=0.2, metadata={"help": "cut xz and yz planes too when |z - xy| / xy spacing is at most this (0.2 = within 20%%)"})
    dedup: bool = field(default=True, metadata={"help": "remove near-duplicate patches (difference hash + greedy grouping)"})
    dedup_scope: str = field(default="source", metadata={"help": "'source': group near-duplicates inside each source (the paper); 'corpus': also across sources"})
    max_hamming: int = field(default=11, metadata={"help": "patches whose 64-bit dHashes differ in at most this many bits are near-duplicates (inclusive: 11 is the paper's '< 12'; the released CEM500K code used <= 12)"})
    seed: int = field(default=0, metadata={"help": "seed of the random order in which near-duplicate groups pick their exemplar"})
    filter: str = field(default="stats", metadata={"help": "uninformative-patch filter: 'stats' (label-free rules), 'none', a classifier.pth or stats_forest.pkl from `cemcurate filter train`, or the released CEM500K filter weights", "metavar": "stats|none|PATH"})
    filter_threshold: float = field(default=0.5, metadata={"help": "keep a patch when its informative probability is at least this"})
    filter_batch_size: int = field(default=256, metadata={"help": "patches per batch for classifier inference"})
    workers: int = field(default=0, metadata={"help": "sources processed in parallel (0 = all CPU cores)"})
    sources: str | None = field(default=None, metadata={"help": "sidecar YAML with per-source options (default: RAW/cemcurate.yaml if present)", "metavar": "FILE"})
    montage_patches: int = field(default=48, metadata={"help": "random kept patches shown in report.html"})

    def __post_init__(self) -> None:
        if self.patch_size < 16:
            raise ValueError(f"patch_size must be at least 16, got {self.patch_size}")
        if not 1 <= self.min_edge <= self.patch_size:
            raise ValueError(f"min_edge must be between 1 and patch_size ({self.patch_size}), got {self.min_edge}")
        if not 0 <= self.low_percentile < self.high_percentile <= 100:
            raise ValueError(f"need 0 <= low_percentile < high_percentile <= 100, got {self.low_percentile}, {self.high_percentile}")
        if self.dedup_scope not in ("source", "corpus"):
            raise ValueError(f"dedup_scope must be 'source' or 'corpus', got {self.dedup_scope!r}")
        if not 0 <= self.max_hamming <= 64:
            raise ValueError(f"max_hamming must be between 0 and 64, got {self.max_hamming}")
        if self.workers < 0:
            raise ValueError(f"workers must be >= 0, got {self.workers}")
        if not 0.0 <= self.filter_threshold <= 1.0:
            raise ValueError(f"filter_threshold must be in [0, 1], got {self.filter_threshold}")
        if self.window_sample_slices < 1:
            raise ValueError(f"window_sample_slices must be >= 1, got {self.window_sample_slices}")

    def patch_settings(self) -> dict:
        """The settings that change which pixels a source's part holds."""
        keys = ("patch_size", "min_edge", "low_percentile", "high_percentile", "window_sample_slices",
                "isotropy_tolerance", "dedup", "max_hamming", "seed")
        return {k: getattr(self, k) for k in keys}


@dataclass
class BuildSummary:
    """What a build did: counts and the sources that failed (name -> error)."""

    out_dir: Path
    n_sources: int
    n_raw: int
    n_kept: int
    failed: dict[str, str]
    skipped: int
    reused: int


# ----------------------------------------------------------------------------- reading

def open_volumes(spec: SourceSpec) -> list[Volume]:
    """Open the volume(s) of one source, with the sidecar's voxel size applied."""
    volumes = [open_series(spec.files)] if spec.options.stack else open_file(spec.files[0], dataset=spec.options.dataset)
    if spec.options.voxel_size is not None:
        for vol in volumes:
            vol.voxel_size, vol.voxel_size_from = spec.options.voxel_size, "sidecar"
    return volumes


def volume_window(vol: Volume, cfg: BuildConfig, invert: bool) -> IntensityWindow:
    """The uint8 mapping of a volume, from evenly spread sample slices (subsampled in-plane)."""
    if vol.dtype == np.uint8:
        return IntensityWindow(None, None, invert)
    # Every k-th pixel of up to N slices: ~1e6 values are plenty for 0.1/99.9 percentiles.
    indices = sample_slice_indices(vol.shape[0], cfg.window_sample_slices)
    step = max(1, int(np.sqrt(vol.shape[1] * vol.shape[2] * len(indices) / 2e6)))
    sample = np.concatenate([vol.read_slices(int(z), int(z) + 1)[0, ::step, ::step].ravel() for z in indices])
    return compute_window(sample, cfg.low_percentile, cfg.high_percentile, invert)


def iter_standard_planes(vol: Volume, window: IntensityWindow, planes: tuple[str, ...],
                         scratch: Path) -> Iterator[tuple[str, int, np.ndarray]]:
    """Yield ``(plane, slice_index, uint8 image)`` for every cross-section to tile.

    xy-only volumes are streamed a slab at a time. Volumes cut in three planes are first
    standardised into a uint8 memory map at ``scratch`` (removed afterwards), from which
    xz and yz sections are read in bounded blocks.
    """
    z, y, x = vol.shape
    # ~8 M voxels per slab: the float copy made while windowing stays near 64 MB.
    slab = max(1, (8 << 20) // max(1, y * x))
    if planes == ("xy",):
        for z0 in range(0, z, slab):
            block = window.apply(vol.read_slices(z0, min(z, z0 + slab)))
            for k in range(block.shape[0]):
                yield "xy", z0 + k, block[k]
        return
    scratch.parent.mkdir(parents=True, exist_ok=True)
    try:
        std = np.lib.format.open_memmap(scratch, mode="w+", dtype=np.uint8, shape=(z, y, x))
        for z0 in range(0, z, slab):
            std[z0:z0 + slab] = window.apply(vol.read_slices(z0, min(z, z0 + slab)))
        std.flush()
        del std
        std = np.load(scratch, mmap_mode="r")
        for plane in planes:
            for index, image in iter_planes(std, plane, block_bytes=64 << 20):
                yield plane, index, image
        del std
    finally:
        scratch.unlink(missing_ok=True)


# ----------------------------------------------------------------------------- one source

def _file_stamps(spec: SourceSpec) -> list[list]:
    """``[name, size, mtime_ns]`` of each file: what tells a changed file from an unchanged one."""
    return [[f.name, f.stat().st_size, f.stat().st_mtime_ns] if f.is_file() else [f.name, 0, 0] for f in spec.files]


def _settings_hash(spec: SourceSpec, cfg: BuildConfig) -> str:
    blob = json.dumps([spec.name, dataclasses.asdict(spec.options), cfg.patch_settings()], default=str)
    return hashlib.sha1(blob.encode()).hexdigest()


def _fingerprint(spec: SourceSpec, cfg: BuildConfig) -> str:
    blob = json.dumps([_settings_hash(spec, cfg), _file_stamps(spec)])
    return hashlib.sha1(blob.encode()).hexdigest()


def _part_paths(out_dir: Path, key: str) -> tuple[Path, Path]:
    return out_dir / "parts" / f"{key}.json", out_dir / "parts" / f"{key}.parquet"


def _source_row(spec: SourceSpec, name: str, **values) -> dict:
    row = {"source": name, "files": json.dumps([str(p) for p in spec.files]) if len(spec.files) > 1 else str(spec.files[0]),
           "reader": "", "shape": "", "dtype": "", "voxel_size": "", "voxel_size_from": "", "planes": "",
           "window_low": np.nan, "window_high": np.nan, "invert": spec.options.invert,
           "stack": spec.options.stack, "dataset": "",
           "n_raw": 0, "n_unique": 0, "status": "ok", "error": "", "notes": ""}
    row.update(values)
    return row


def _cut_patches(images: Iterator[tuple[str, int, np.ndarray]], writer: ShardWriter, cfg: BuildConfig) -> dict:
    """Tile every ``(plane, index, uint8 image)``, append the patches to ``writer`` and
    return their ``grid`` (int64 (n, 4): y, x, h, w), ``plane``/``slice`` columns, dHashes
    (uint64 (n,)) and per-patch ``mean``/``std`` (float32 (n,), in [0, 1])."""
    from cemcurate.dhash import dhash64

    grids, planes, slices, hashes, stats = [], [], [], [], []
    for plane, index, image in images:
        grid = tile_grid(*image.shape, cfg.patch_size, cfg.min_edge)
        if len(grid) == 0:
            continue
        patches = crop_patches(image, grid, cfg.patch_size)
        writer.append(patches)
        grids.append(grid)
        planes += [plane] * len(grid)
        slices += [index] * len(grid)
        hashes.append(dhash64(patches))
        flat = patches.reshape(len(patches), -1).astype(np.float32) / 255.0
        stats.append(np.stack([flat.mean(1), flat.std(1)], 1))
    return {"grid": np.concatenate(grids) if grids else np.zeros((0, 4), np.int64),
            "plane": np.array(planes, object), "slice": np.array(slices, np.int64),
            "hashes": np.concatenate(hashes) if hashes else np.zeros(0, np.uint64),
            "stats": np.concatenate(stats).astype(np.float32) if stats else np.zeros((0, 2), np.float32)}


def _manifest_rows(cut: dict, name: str, file: str, shard: str, shard_row: np.ndarray,
                   group_local: np.ndarray, duplicate: np.ndarray) -> pd.DataFrame:
    """A part's manifest rows for the patches of ``cut`` (see :func:`_cut_patches`)."""
    from cemcurate.dhash import dhash_hex

    n, grid = len(cut["hashes"]), cut["grid"]
    return pd.DataFrame({
        "local_id": np.arange(n, dtype=np.int64), "source": name, "file": file,
        "plane": cut["plane"], "slice": cut["slice"],
        "y": grid[:, 0], "x": grid[:, 1], "h": grid[:, 2], "w": grid[:, 3],
        "shard": shard, "shard_row": shard_row, "dhash": dhash_hex(cut["hashes"]) if n else [],
        "group_local": group_local, "duplicate": duplicate,
        "pixel_mean": cut["stats"][:, 0], "pixel_std": cut["stats"][:, 1],
    })


def _process_volume(vol: Volume, name: str, shard_name: str, spec: SourceSpec, cfg: BuildConfig,
                    raw_rel: str, out_dir: Path) -> tuple[dict, pd.DataFrame]:
    """Cut, hash and deduplicate one volume; write its shard; return its source row and manifest rows."""
    from cemcurate.dedup import group_near_duplicates

    notes = list(vol.notes)
    planes, note = planes_for_spacing(vol.voxel_size, vol.shape[0], cfg.isotropy_tolerance, vol.xy_only)
    if note:
        notes.append(note)
    window = volume_window(vol, cfg, spec.options.invert)
    work = out_dir / "parts" / "work"
    all_path = work / f"{shard_name}.all.u8"
    with ShardWriter(all_path, cfg.patch_size) as writer:
        cut = _cut_patches(iter_standard_planes(vol, window, planes, work / f"{shard_name}.std.npy"), writer, cfg)
    n = writer.count
    if n == 0:
        all_path.unlink(missing_ok=True)
        if min(vol.shape[1:]) < cfg.min_edge:
            notes.append(f"slices of {vol.shape[1]}x{vol.shape[2]} px are smaller than min-edge {cfg.min_edge}: no patches")
    hash_arr = cut["hashes"]
    exemplar = (group_near_duplicates(hash_arr, cfg.max_hamming, seed=cfg.seed)
                if cfg.dedup and n else np.arange(n, dtype=np.int64))
    unique = exemplar == np.arange(n)
    shard_row = np.full(n, -1, np.int64)
    if n:
        shard_path = out_dir / "store" / f"{shard_name}.u8"
        if unique.all():
            os.replace(all_path, shard_path)
            shard_row[:] = np.arange(n)
        else:
            source_patches = open_shard(all_path, cfg.patch_size)
            with ShardWriter(shard_path, cfg.patch_size) as final:
                keep = np.flatnonzero(unique)
                for start in range(0, len(keep), 512):  # 512 patches = 25 MB at a time
                    chunk = keep[start:start + 512]
                    shard_row[chunk] = final.append(np.asarray(source_patches[chunk]))
            del source_patches
            all_path.unlink()
    manifest = _manifest_rows(cut, name, raw_rel, shard_name, shard_row, exemplar, ~unique)
    row = _source_row(
        spec, name, reader=vol.reader, shape=str(tuple(vol.shape)), dtype=str(vol.dtype),
        voxel_size=str(tuple(vol.voxel_size)) if vol.voxel_size else "", voxel_size_from=vol.voxel_size_from,
        planes=",".join(planes), window_low=np.nan if window.low is None else window.low,
        window_high=np.nan if window.high is None else window.high, n_raw=n, n_unique=int(unique.sum()),
        dataset=vol.dataset or "", notes="; ".join(notes))
    return row, manifest


def _copy_shard(src: Path, writer: ShardWriter, patch_size: int) -> None:
    patches = open_shard(src, patch_size)
    for start in range(0, len(patches), 512):
        writer.append(np.asarray(patches[start:start + 512]))


def _extendable_part(out_dir: Path, spec: SourceSpec, cfg: BuildConfig) -> tuple[dict, pd.DataFrame] | None:
    """The previous part of a stack that only gained files, if it can be extended in place.

    That holds for a stack cut in xy only (its old patches do not change when slices are
    added) whose settings are unchanged and whose old files are all still there, unchanged.
    """
    json_path, parquet_path = _part_paths(out_dir, spec.key)
    if not (spec.options.stack and json_path.is_file() and parquet_path.is_file()):
        return None
    try:
        record = json.loads(json_path.read_text())
    except json.JSONDecodeError:
        return None
    if (record.get("format") != PART_FORMAT or record.get("status") != "ok" or len(record.get("sources", [])) != 1
            or record["sources"][0].get("planes") != "xy" or record.get("settings") != _settings_hash(spec, cfg)):
        return None
    old, new = record.get("files", []), _file_stamps(spec)
    if len(new) <= len(old) or not all(stamp in new for stamp in old):
        return None
    return record, pd.read_parquet(parquet_path)


def _extend_stack(spec: SourceSpec, cfg: BuildConfig, out_dir: Path, shard_name: str, old_record: dict,
                  old: pd.DataFrame) -> tuple[dict, pd.DataFrame]:
    """Add the patches of a stack's new files, deduplicated against the exemplars it keeps.

    Old rows, hashes, groups and local ids are reused as they are (only their slice numbers
    follow the new stack order); the new patches are matched to the old exemplars first
    (:func:`cemcurate.dedup.group_incremental`). The old intensity window is kept, so old
    and new slices share one mapping. Returns the source row and all manifest rows.
    """
    from cemcurate.dedup import group_incremental
    from cemcurate.dhash import hex_to_dhash

    vol = open_volumes(spec)[0]
    row = dict(old_record["sources"][0])
    low, high = (None if v is None or np.isnan(v) else float(v) for v in (row["window_low"], row["window_high"]))
    window = IntensityWindow(low, high, spec.options.invert)
    position = {f.name: z for z, f in enumerate(spec.files)}
    old_names = {stamp[0] for stamp in old_record["files"]}
    new_slices = [z for z, f in enumerate(spec.files) if f.name not in old_names]
    old = old.copy()
    old["slice"] = [position[Path(f).name] for f in old["file"]]

    new_path = out_dir / "parts" / "work" / f"{shard_name}.new.u8"
    images = (("xy", z, window.apply(vol.read_slices(z, z + 1))[0]) for z in new_slices)
    with ShardWriter(new_path, cfg.patch_size) as writer:
        cut = _cut_patches(images, writer, cfg)
    n_old, n_new = len(old), len(cut["hashes"])
    if cfg.dedup and n_new:
        exemplars = old[~old["duplicate"]]
        grouping = group_incremental(cut["hashes"], hex_to_dhash(exemplars["dhash"].tolist()), cfg.max_hamming, cfg.seed)
        matched = grouping.existing_exemplar >= 0
        group_local = np.where(matched, exemplars["local_id"].to_numpy()[np.maximum(grouping.existing_exemplar, 0)],
                               n_old + grouping.new_exemplar)
        keep = grouping.is_new_exemplar
    else:
        group_local, keep = n_old + np.arange(n_new), np.ones(n_new, bool)
    shard_row = np.full(n_new, -1, np.int64)
    with ShardWriter(out_dir / "store" / f"{shard_name}.u8", cfg.patch_size) as final:
        if n_old and (out_dir / "store" / f"{old['shard'].iat[0]}.u8").is_file():
            _copy_shard(out_dir / "store" / f"{old['shard'].iat[0]}.u8", final, cfg.patch_size)
        if n_new:
            new_patches = open_shard(new_path, cfg.patch_size)
            kept_rows = np.flatnonzero(keep)
            for start in range(0, len(kept_rows), 512):
                chunk = kept_rows[start:start + 512]
                shard_row[chunk] = final.append(np.asarray(new_patches[chunk]))
            del new_patches
    new_path.unlink(missing_ok=True)
    old["shard"] = shard_name  # the old shard was copied first, so old shard rows are unchanged
    new_rows = _manifest_rows(cut, row["source"], spec.name, shard_name, shard_row, group_local, ~keep)
    new_rows["local_id"] += n_old
    frame = pd.concat([old, new_rows], ignore_index=True)
    notes = [n for n in str(row.get("notes") or "").split("; ") if n and not n.startswith("extended")]
    row.update(shape=str(tuple(vol.shape)), n_raw=len(frame), n_unique=int((~frame["duplicate"]).sum()),
               files=json.dumps([str(p) for p in spec.files]),
               notes="; ".join(notes + [f"extended incrementally by {len(new_slices)} file(s)"]))
    return row, frame


def process_source(spec: SourceSpec, cfg: BuildConfig, out_dir: str | Path, raw: str | Path) -> dict:
    """Process one source and write its part; return the part record (also on failure).

    Errors in reading or processing are caught and recorded with the file name so that a
    single bad file never stops the build.
    """
    out_dir, raw = Path(out_dir), Path(raw)
    record = {"format": PART_FORMAT, "key": spec.key, "name": spec.name, "fingerprint": _fingerprint(spec, cfg),
              "settings": _settings_hash(spec, cfg), "files": _file_stamps(spec), "status": "ok", "sources": []}
    json_path, parquet_path = _part_paths(out_dir, spec.key)
    try:
        previous = _extendable_part(out_dir, spec, cfg)
        frames = []
        if previous is not None:
            old_record, old_frame = previous
            row, frame = _extend_stack(spec, cfg, out_dir, f"{spec.key}-{record['fingerprint'][:8]}-0", old_record, old_frame)
            record["sources"].append(row)
            record["extends"] = {"fingerprint": old_record["fingerprint"], "count": len(old_frame)}
            frames.append(frame)
        else:
            volumes = open_volumes(spec)
            for i, vol in enumerate(volumes):
                name = spec.name if len(volumes) == 1 else f"{spec.name}:{vol.dataset or i}"
                # The fingerprint in the shard name keeps the shard an older manifest points to
                # until a new manifest replaces it, so an interrupted re-run corrupts nothing.
                shard_name = f"{spec.key}-{record['fingerprint'][:8]}-{i}"
                row, frame = _process_volume(vol, name, shard_name, spec, cfg, spec.name, out_dir)
                # Local ids (and the groups that point at them) run on across the file's volumes.
                offset = sum(len(f) for f in frames)
                frame["local_id"] += offset
                frame["group_local"] += offset
                record["sources"].append(row)
                frames.append(frame)
        part = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
        if spec.options.stack and len(part):
            # xy patches of a stack come from one file each: name it, not just the folder.
            rel = np.array([f.relative_to(raw).as_posix() if f.is_relative_to(raw) else f.name for f in spec.files], object)
            xy = (part["plane"] == "xy").to_numpy()
            files = part["file"].to_numpy(object).copy()
            files[xy] = rel[part["slice"].to_numpy()[xy]]
            part["file"] = files
        with atomic_path(parquet_path) as tmp:
            part.to_parquet(tmp, index=False)
    except Exception as exc:  # one bad source must not stop the build
        message = str(exc) if isinstance(exc, (ReadError, ValueError)) else f"{type(exc).__name__}: {exc}"
        if not isinstance(exc, (ReadError, ValueError)):
            message += "\n" + traceback.format_exc(limit=3)
        if spec.name not in message and str(spec.files[0]) not in message:
            message = f"{spec.name}: {message}"
        record["status"] = "failed"
        record["sources"] = [_source_row(spec, spec.name, status="failed", error=message)]
    with atomic_path(json_path) as tmp:
        tmp.write_text(json.dumps(record, default=str))
    return record


def _load_part(out_dir: Path, spec: SourceSpec, cfg: BuildConfig) -> dict | None:
    """A finished, successful part of ``spec`` made with the same files and settings, else None."""
    json_path, parquet_path = _part_paths(out_dir, spec.key)
    if not (json_path.is_file() and parquet_path.is_file()):
        return None
    try:
        record = json.loads(json_path.read_text())
    except json.JSONDecodeError:
        return None
    if record.get("format") != PART_FORMAT or record.get("status") != "ok":
        return None
    if record.get("fingerprint") != _fingerprint(spec, cfg):
        return None
    return record


# ----------------------------------------------------------------------------- merge

def _assign_patch_ids(out_dir: Path, records: list[dict], counts: dict[str, int]) -> dict[str, np.ndarray]:
    """``patch_id`` of every local id of each part (``{key: int64 array indexed by local id}``).

    A part keeps its ids while its fingerprint is unchanged; a stack extended with new
    files keeps the ids of its old patches and gets a new block for the added ones; any
    other change gives the part a new block. Blocks are recorded in
    ``OUT/parts/patch_ids.json`` as ``[first local id, first patch_id, count]``.
    """
    registry_path = out_dir / "parts" / "patch_ids.json"
    registry = json.loads(registry_path.read_text()) if registry_path.is_file() else {}
    next_id = max((b[1] + b[2] for entry in registry.values() for b in entry["blocks"]), default=0)
    ids = {}
    for rec in records:
        key, n = rec["key"], counts.get(rec["key"], 0)
        entry, extends = registry.get(key), rec.get("extends")
        held = sum(b[2] for b in entry["blocks"]) if entry else -1
        if entry and entry["fingerprint"] == rec["fingerprint"] and held == n:
            pass
        elif entry and extends and entry["fingerprint"] == extends["fingerprint"] and held == extends["count"] <= n:
            entry = {"fingerprint": rec["fingerprint"], "blocks": entry["blocks"] + [[held, next_id, n - held]]}
            next_id += n - held
        else:
            entry = {"fingerprint": rec["fingerprint"], "blocks": [[0, next_id, n]]}
            next_id += n
        registry[key] = entry
        table = np.empty(n, np.int64)
        for local, first, count in entry["blocks"]:
            table[local:local + count] = first + np.arange(count)
        ids[key] = table
    with atomic_path(registry_path) as tmp:
        tmp.write_text(json.dumps(registry, indent=1))
    return ids


def score_patches(out_dir: Path, manifest: pd.DataFrame, cfg: BuildConfig, progress: bool = True) -> np.ndarray:
    """Informative probability of every stored patch (NaN for patches not stored).

    Scores are cached per shard and filter identity under ``OUT/parts/filter/``, so a
    re-run scores only new shards, and changing ``--filter`` rescores without re-reading
    any source.
    """
    from cemcurate.filtering import make_filter

    patch_filter = make_filter(cfg.filter, batch_size=cfg.filter_batch_size)
    cache = out_dir / "parts" / "filter" / hashlib.sha1(patch_filter.name.encode()).hexdigest()[:16]
    cache.mkdir(parents=True, exist_ok=True)
    probs = np.full(len(manifest), np.nan, np.float32)
    if not len(manifest):
        return probs
    stored = manifest["shard_row"].to_numpy() >= 0
    shards = manifest.loc[stored, "shard"].unique()
    todo = [s for s in shards if not (cache / f"{s}.npy").is_file()]
    sizes = {s: (out_dir / "store" / f"{s}.u8").stat().st_size // (cfg.patch_size ** 2) for s in todo}
    bar = tqdm(total=sum(sizes.values()), desc=f"filter ({cfg.filter})", unit="patch", disable=not progress or not todo)
    for shard in todo:
        patches = open_shard(out_dir / "store" / f"{shard}.u8", cfg.patch_size)
        scores = np.empty(len(patches), np.float32)
        step = cfg.filter_batch_size  # also bounds the filters' per-batch float temporaries
        for start in range(0, len(patches), step):
            scores[start:start + step] = patch_filter(np.asarray(patches[start:start + step]))
            bar.update(min(step, len(patches) - start))
        with atomic_path(cache / f"{shard}.npy") as tmp:
            with open(tmp, "wb") as f:
                np.save(f, scores)
    bar.close()
    shard_col, row_col = manifest["shard"].to_numpy(), manifest["shard_row"].to_numpy()
    for shard in shards:
        sel = np.flatnonzero(stored & (shard_col == shard))
        probs[sel] = np.load(cache / f"{shard}.npy")[row_col[sel]]
    return probs


def merge_parts(out_dir: Path, records: list[dict], cfg: BuildConfig, progress: bool = True) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Combine parts into the manifest and the source table (not yet written)."""
    frames = {}
    for rec in records:
        if rec["status"] == "ok":
            frames[rec["key"]] = pd.read_parquet(_part_paths(out_dir, rec["key"])[1])
    ids = _assign_patch_ids(out_dir, records, {k: len(f) for k, f in frames.items()})
    parts = []
    for key, frame in frames.items():
        if len(frame) == 0:
            continue
        frame = frame.copy()
        frame.insert(0, "patch_id", ids[key][frame["local_id"].to_numpy()])
        frame["group"] = ids[key][frame["group_local"].to_numpy()]
        parts.append(frame.drop(columns=["local_id", "group_local"]))
    manifest = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(
        {c: pd.Series(dtype=t) for c, t in [("patch_id", "int64"), ("source", object), ("file", object), ("plane", object),
                                           ("slice", "int64"), ("y", "int64"), ("x", "int64"), ("h", "int64"), ("w", "int64"),
                                           ("shard", object), ("shard_row", "int64"), ("dhash", object), ("duplicate", bool),
                                           ("pixel_mean", "float32"), ("pixel_std", "float32"), ("group", "int64")]})
    if cfg.dedup and cfg.dedup_scope == "corpus" and len(manifest):
        from cemcurate.dedup import group_near_duplicates
        from cemcurate.dhash import hex_to_dhash

        unique = np.flatnonzero(~manifest["duplicate"].to_numpy())
        exemplar = group_near_duplicates(hex_to_dhash(manifest["dhash"].iloc[unique].tolist()), cfg.max_hamming, seed=cfg.seed)
        dup = exemplar != np.arange(len(unique))
        group = manifest["group"].to_numpy().copy()
        ids = manifest["patch_id"].to_numpy()
        group[unique[dup]] = ids[unique[exemplar[dup]]]
        manifest["group"] = group
        manifest.loc[manifest.index[unique[dup]], "duplicate"] = True
    manifest["informative_prob"] = score_patches(out_dir, manifest, cfg, progress)
    informative = manifest["informative_prob"].fillna(0.0).to_numpy() >= cfg.filter_threshold
    duplicate = manifest["duplicate"].to_numpy(bool)
    manifest["kept"] = ~duplicate & informative
    manifest["reason"] = np.where(duplicate, "duplicate", np.where(informative, "", "uninformative"))
    manifest = manifest.sort_values("patch_id", kind="stable").reset_index(drop=True)
    sources = pd.DataFrame([row for rec in records for row in rec["sources"]])
    return manifest, sources


# ----------------------------------------------------------------------------- build

def build(raw: str | Path, out_dir: str | Path, cfg: BuildConfig | None = None, progress: bool = True) -> BuildSummary:
    """Run ``cemcurate build RAW OUT``; see the module docstring. Returns a summary."""
    cfg = cfg or BuildConfig()
    raw, out_dir = Path(raw), Path(out_dir)
    specs, skipped = discover_sources(raw, cfg.sources)
    names = [s.name for s in specs]
    if len(set(s.key for s in specs)) != len(specs):
        raise ValueError(f"{raw}: two sources map to the same id; rename one of them")
    for sub in ("parts", "store"):
        (out_dir / sub).mkdir(parents=True, exist_ok=True)
    records: dict[str, dict] = {}
    todo = []
    for spec in specs:
        record = _load_part(out_dir, spec, cfg)
        if record is None:
            todo.append(spec)
        else:
            records[spec.key] = record
    reused = len(records)
    workers = cfg.workers or os.cpu_count() or 1
    bar = tqdm(total=len(todo), desc="sources", unit="src", disable=not progress or not todo)
    if workers == 1 or len(todo) <= 1:
        for spec in todo:
            records[spec.key] = process_source(spec, cfg, out_dir, raw)
            bar.update()
    else:
        with cf.ProcessPoolExecutor(max_workers=min(workers, len(todo))) as pool:
            futures = {pool.submit(process_source, spec, cfg, out_dir, raw): spec for spec in todo}
            for future in cf.as_completed(futures):
                spec = futures[future]
                try:
                    records[spec.key] = future.result()
                except Exception as exc:  # a crashed worker process
                    records[spec.key] = {"key": spec.key, "name": spec.name, "fingerprint": "", "status": "failed",
                                         "sources": [_source_row(spec, spec.name, status="failed", error=f"{spec.name}: worker crashed: {exc}")]}
                bar.update()
    bar.close()
    shutil.rmtree(out_dir / "parts" / "work", ignore_errors=True)
    ordered = [records[s.key] for s in specs]
    manifest, sources = merge_parts(out_dir, ordered, cfg, progress)
    sources = pd.concat([sources, pd.DataFrame([{"source": s.name, "files": s.name, "status": "skipped", "error": s.reason}
                                                for s in skipped])], ignore_index=True)
    write_manifest(manifest, out_dir / "manifest.parquet")
    _remove_stale_shards(out_dir, manifest)
    with atomic_path(out_dir / "sources.parquet") as tmp:
        sources.astype({"voxel_size": str, "shape": str}).to_parquet(tmp, index=False)
    kept = manifest[manifest["kept"]]
    mean = float(kept["pixel_mean"].mean()) if len(kept) else 0.0
    # Pooled std of equal-sized patches: E[x^2] - E[x]^2 with E[x^2] = std^2 + mean^2 per patch.
    sq = float((kept["pixel_std"].astype(np.float64) ** 2 + kept["pixel_mean"].astype(np.float64) ** 2).mean()) if len(kept) else 0.0
    write_store_info(out_dir, cfg.patch_size, mean, float(np.sqrt(max(sq - mean * mean, 0.0))))
    with atomic_path(out_dir / "build_config.yaml") as tmp:
        import yaml

        tmp.write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
    from cemcurate.report import write_report

    write_report(out_dir, manifest, sources, cfg)
    failed = {r["name"]: r["sources"][0]["error"] for r in ordered if r["status"] != "ok"}
    return BuildSummary(out_dir, len(specs), len(manifest), int(manifest["kept"].sum()), failed, len(skipped), reused)


def _remove_stale_shards(out_dir: Path, manifest: pd.DataFrame) -> None:
    """Delete shards no manifest row points to (sources removed from RAW or redone)."""
    live = set(manifest["shard"].unique()) if len(manifest) else set()
    for path in (out_dir / "store").glob("*.u8"):
        if path.stem not in live:
            path.unlink()

"""One source to one part: read -> window -> planes -> cut -> hash -> dedup -> shard.

:func:`process_source` runs in a worker process. It writes the source's shard(s) under
``OUT/store`` and its part (``OUT/parts/<key>.parquet`` with the manifest rows, then
``<key>.json`` with the :class:`PartRecord`), each atomically; the JSON is written last, so
a part whose JSON exists is complete.
"""

from __future__ import annotations

import os
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from cemcurate.build.config import BuildConfig
from cemcurate.build.cut import cut_patches, iter_standard_planes, manifest_rows, volume_window
from cemcurate.build.extend import extend_stack, extendable_part
from cemcurate.build.records import CutPatches, Extends, PartRecord, SourceRow
from cemcurate.build.resume import new_record
from cemcurate.build.scoring import score_new_shard
from cemcurate.build.timing import timed
from cemcurate.common.atomic import atomic_path
from cemcurate.dedup import group_near_duplicates
from cemcurate.io import ReadError, Volume
from cemcurate.layout import BuildLayout
from cemcurate.slicing import planes_for_spacing
from cemcurate.sources import SourceSpec, open_volumes
from cemcurate.standardize import IntensityWindow
from cemcurate.store import ShardWriter, open_shard


def shard_name(record: PartRecord, index: int) -> str:
    """The shard of volume ``index`` of a part. The fingerprint in the name keeps the shard an
    older manifest points to until a new manifest replaces it, so an interrupted re-run
    corrupts nothing."""
    return f"{record.key}-{record.fingerprint[:8]}-{index}"


@dataclass(frozen=True)
class VolumeFacts:
    """What the source table records of a volume, without its reader (so it travels between processes)."""

    shape: tuple[int, int, int]
    dtype: str
    reader: str
    voxel_size: tuple[float, float, float] | None
    voxel_size_from: str
    dataset: str

    @classmethod
    def of(cls, vol: Volume) -> VolumeFacts:
        return cls(tuple(vol.shape), str(vol.dtype), vol.reader, vol.voxel_size, vol.voxel_size_from, vol.dataset or "")


def volume_plan(vol: Volume, spec: SourceSpec, cfg: BuildConfig) -> tuple[tuple[str, ...], IntensityWindow, list[str]]:
    """The planes a volume is cut in, its intensity window and the notes so far (the reader's, the planes')."""
    notes = list(vol.notes)
    planes, note = planes_for_spacing(vol.voxel_size, vol.shape[0], cfg.isotropy_tolerance, vol.xy_only)
    if note:
        notes.append(note)
    window = volume_window(vol, spec.options.invert, cfg.low_percentile, cfg.high_percentile, cfg.window_sample_slices)
    return planes, window, notes


def process_volume(
    vol: Volume, name: str, shard: str, spec: SourceSpec, cfg: BuildConfig, layout: BuildLayout
) -> tuple[SourceRow, pd.DataFrame]:
    """Cut, hash and deduplicate one volume; write its shard; return its source row and manifest rows."""
    planes, window, notes = volume_plan(vol, spec, cfg)
    all_path = layout.work_file(shard, ".all.u8")
    images = iter_standard_planes(vol, window, planes, layout.work_file(shard, ".std.npy"))
    with ShardWriter(all_path, cfg.patch_size) as writer:
        cut = cut_patches(images, writer, cfg.min_edge)
    return finish_volume(VolumeFacts.of(vol), planes, window, notes, cut, all_path, name, shard, spec, cfg, layout)


def finish_volume(
    facts: VolumeFacts,
    planes: tuple[str, ...],
    window: IntensityWindow,
    notes: list[str],
    cut: CutPatches,
    all_path: Path,
    name: str,
    shard: str,
    spec: SourceSpec,
    cfg: BuildConfig,
    layout: BuildLayout,
) -> tuple[SourceRow, pd.DataFrame]:
    """Deduplicate the patches of a cut volume (all of them in the work shard ``all_path``), write
    its shard and score it; return its source row and manifest rows."""
    n = len(cut)
    if n == 0:
        all_path.unlink(missing_ok=True)
        if min(facts.shape[1:]) < cfg.min_edge:
            notes.append(
                f"slices of {facts.shape[1]}x{facts.shape[2]} px are smaller than min-edge {cfg.min_edge}: no patches"
            )
    with timed("group"):
        exemplar = (
            group_near_duplicates(cut.hashes, cfg.max_hamming, seed=cfg.seed)
            if cfg.dedup and n
            else np.arange(n, dtype=np.int64)
        )
    unique = exemplar == np.arange(n)
    shard_row = np.full(n, -1, np.int64)
    if n and unique.all():
        os.replace(all_path, layout.shard(shard))
        shard_row[:] = np.arange(n)
    elif n:
        with timed("write"), ShardWriter(layout.shard(shard), cfg.patch_size) as final:
            keep = np.flatnonzero(unique)
            shard_row[keep] = final.append_from(open_shard(all_path, cfg.patch_size), keep)
        all_path.unlink()
    if n:
        score_new_shard(layout, cfg, shard)
    rows = manifest_rows(cut, name, spec.name, shard, shard_row, exemplar, ~unique)
    row = SourceRow.for_spec(
        spec,
        name,
        reader=facts.reader,
        shape=str(tuple(facts.shape)),
        dtype=facts.dtype,
        voxel_size=str(tuple(facts.voxel_size)) if facts.voxel_size else "",
        voxel_size_from=facts.voxel_size_from,
        planes=",".join(planes),
        window_low=np.nan if window.low is None else window.low,
        window_high=np.nan if window.high is None else window.high,
        n_raw=n,
        n_unique=int(unique.sum()),
        dataset=facts.dataset,
        notes="; ".join(notes),
    )
    return row, rows


def _name_stack_files(part: pd.DataFrame, spec: SourceSpec, raw: Path) -> None:
    """xy patches of a stack come from one file each: name it, not just the folder."""
    rel = np.array([f.relative_to(raw).as_posix() if f.is_relative_to(raw) else f.name for f in spec.files], object)
    xy = (part["plane"] == "xy").to_numpy()
    files = part["file"].to_numpy(object).copy()
    files[xy] = rel[part["slice"].to_numpy()[xy]]
    part["file"] = files


def error_line(exc: BaseException, spec: SourceSpec) -> str:
    """What the source table says about a failed source: one line, naming the source or its file."""
    expected = isinstance(exc, (ReadError, ValueError))
    text = " ".join(str(exc).split()) or "no message"
    message = text if expected else f"{type(exc).__name__}: {text}"
    if spec.name not in message and str(spec.files[0]) not in message:
        message = f"{spec.name}: {message}"
    return message


def process_source(
    spec: SourceSpec, cfg: BuildConfig, out_dir: str | Path, raw: str | Path, debug: bool = False
) -> PartRecord:
    """Process one source and write its part; return the part record (also on failure).

    Errors in reading or processing are caught and recorded in one line naming the file, so
    that a single bad file never stops the build; ``debug`` also prints the full traceback.
    """
    layout, raw = BuildLayout(out_dir), Path(raw)
    record = new_record(spec, cfg)
    try:
        previous = extendable_part(layout, spec, cfg)
        frames = []
        if previous is not None:
            old_record, old_frame = previous
            row, frame = extend_stack(spec, cfg, layout, shard_name(record, 0), old_record, old_frame)
            record.sources.append(row)
            record.extends = Extends(old_record.fingerprint, len(old_frame))
            frames.append(frame)
        else:
            with timed("decode"):  # headers
                volumes = open_volumes(spec)
            for i, vol in enumerate(volumes):
                name = spec.name if len(volumes) == 1 else f"{spec.name}:{vol.dataset or i}"
                row, frame = process_volume(vol, name, shard_name(record, i), spec, cfg, layout)
                # Local ids (and the groups that point at them) run on across the file's volumes.
                offset = sum(len(f) for f in frames)
                frame["local_id"] += offset
                frame["group_local"] += offset
                record.sources.append(row)
                frames.append(frame)
        write_part_rows(layout, spec, raw, record, frames)
    except Exception as exc:  # one bad source must not stop the build
        fail_record(record, spec, exc, debug)
    return write_part_record(layout, spec, record)


def write_part_rows(layout: BuildLayout, spec: SourceSpec, raw: Path, record: PartRecord, frames: list) -> None:
    """Write a source's manifest rows (its part's parquet), atomically, and set ``record.rows``."""
    part = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    if spec.options.stack and len(part):
        _name_stack_files(part, spec, raw)
    with timed("write"), atomic_path(layout.part_parquet(spec.key)) as tmp:
        part.to_parquet(tmp, index=False)
    record.rows = part


def fail_record(record: PartRecord, spec: SourceSpec, exc: BaseException, debug: bool) -> None:
    """Mark ``record`` failed with one line naming the source; ``debug`` prints the traceback."""
    if debug:
        traceback.print_exception(exc, file=sys.stderr)
    record.status = "failed"  # rows are set only after the part file is written
    record.sources = [SourceRow.failed(spec, error_line(exc, spec))]


def write_part_record(layout: BuildLayout, spec: SourceSpec, record: PartRecord) -> PartRecord:
    """Write the part's JSON (last, atomically: a part whose JSON exists is complete); return ``record``."""
    with atomic_path(layout.part_json(spec.key)) as tmp:
        tmp.write_text(record.to_json())
    return record

"""Incremental extension of a stack that gained files: only the new slices are read and cut.

A stack cut in xy only keeps its old patches unchanged when slices are added, so its part
can be extended in place: the new patches are matched to the exemplars the stack keeps
(:func:`cemcurate.dedup.group_incremental`) and appended to a copy of its shard.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pandas as pd

from cemcurate.build.config import BuildConfig
from cemcurate.build.cut import cut_patches, manifest_rows
from cemcurate.build.records import PartRecord, SourceRow, encode_files
from cemcurate.build.resume import file_stamps, read_part, settings_hash
from cemcurate.build.scoring import score_new_shard
from cemcurate.dedup import group_incremental
from cemcurate.dhash import hex_to_dhash
from cemcurate.layout import BuildLayout
from cemcurate.sources import SourceSpec, open_volumes
from cemcurate.store import ShardWriter, open_shard

EXTENDED_NOTE = "extended incrementally by {n} file(s)"


def extendable_part(layout: BuildLayout, spec: SourceSpec, cfg: BuildConfig) -> tuple[PartRecord, pd.DataFrame] | None:
    """The previous part of a stack that only gained files, with its manifest rows, if it can be
    extended in place; else None.

    That holds for a stack cut in xy only (its old patches do not change when slices are
    added) whose settings are unchanged and whose old files are all still there, unchanged.
    """
    if not spec.options.stack:
        return None
    record = read_part(layout, spec.key)
    if (
        record is None
        or len(record.sources) != 1
        or record.sources[0].planes != "xy"
        or record.settings != settings_hash(spec, cfg)
    ):
        return None
    old, new = record.files, file_stamps(spec)
    if len(new) <= len(old) or not all(stamp in new for stamp in old):
        return None
    return record, pd.read_parquet(layout.part_parquet(spec.key))


def extend_stack(
    spec: SourceSpec, cfg: BuildConfig, layout: BuildLayout, shard: str, old_record: PartRecord, old: pd.DataFrame
) -> tuple[SourceRow, pd.DataFrame]:
    """Add the patches of a stack's new files, deduplicated against the exemplars it keeps.

    Old rows, hashes, groups and local ids are reused as they are (only their slice numbers
    follow the new stack order); the new patches are matched to the old exemplars first. The
    old intensity window is kept, so old and new slices share one mapping. Writes shard
    ``shard`` (the old patches, then the kept new ones) and returns the source row and all
    manifest rows. ``old_record`` and ``old`` are the part and rows :func:`extendable_part` found.
    """
    vol = open_volumes(spec)[0]
    old_row = old_record.sources[0]
    window = old_row.window()
    position = {f.name: z for z, f in enumerate(spec.files)}
    old_names = {stamp[0] for stamp in old_record.files}
    new_slices = [z for z, f in enumerate(spec.files) if f.name not in old_names]
    old = old.copy()
    old["slice"] = [position[Path(f).name] for f in old["file"]]

    new_path = layout.work_file(shard, ".new.u8")
    images = (("xy", z, window.apply(vol.read_slices(z, z + 1))[0]) for z in new_slices)
    with ShardWriter(new_path, cfg.patch_size) as writer:
        cut = cut_patches(images, writer, cfg.min_edge)
    n_old, n_new = len(old), len(cut)
    if cfg.dedup and n_new:
        exemplars = old[~old["duplicate"]]
        grouping = group_incremental(cut.hashes, hex_to_dhash(exemplars["dhash"].tolist()), cfg.max_hamming, cfg.seed)
        matched = grouping.existing_exemplar >= 0
        group_local = np.where(
            matched,
            exemplars["local_id"].to_numpy()[np.maximum(grouping.existing_exemplar, 0)],
            n_old + grouping.new_exemplar,
        )
        keep = grouping.is_new_exemplar
    else:
        group_local, keep = n_old + np.arange(n_new), np.ones(n_new, bool)
    shard_row = np.full(n_new, -1, np.int64)
    with ShardWriter(layout.shard(shard), cfg.patch_size) as final:
        old_shard = layout.shard(old["shard"].iat[0]) if n_old else None
        if old_shard is not None and old_shard.is_file():
            final.append_from(open_shard(old_shard, cfg.patch_size))
        if n_new:
            kept_rows = np.flatnonzero(keep)
            shard_row[kept_rows] = final.append_from(open_shard(new_path, cfg.patch_size), kept_rows)
    new_path.unlink(missing_ok=True)
    score_new_shard(layout, cfg, shard)
    old["shard"] = shard  # the old shard was copied first, so old shard rows are unchanged
    new_rows = manifest_rows(cut, old_row.source, spec.name, shard, shard_row, group_local, ~keep)
    new_rows["local_id"] += n_old
    frame = pd.concat([old, new_rows], ignore_index=True)
    notes = [n for n in str(old_row.notes or "").split("; ") if n and not n.startswith("extended")]
    row = dataclasses.replace(
        old_row,
        shape=str(tuple(vol.shape)),
        n_raw=len(frame),
        n_unique=int((~frame["duplicate"]).sum()),
        files=encode_files(spec.files),
        notes="; ".join(notes + [EXTENDED_NOTE.format(n=len(new_slices))]),
    )
    return row, frame

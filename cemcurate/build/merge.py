"""The merge: finished parts -> the manifest (ids, corpus dedup, filter, kept/reason) and the source table."""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd

from cemcurate.build.config import BuildConfig
from cemcurate.build.patch_ids import assign_patch_ids
from cemcurate.build.records import PartRecord
from cemcurate.build.scoring import score_patches
from cemcurate.dedup import group_near_duplicates
from cemcurate.dhash import hex_to_dhash
from cemcurate.layout import BuildLayout
from cemcurate.manifest import MANIFEST_COLUMNS, empty_manifest

# The manifest columns that come from the parts; the filter stage adds the rest.
PART_COLUMNS = MANIFEST_COLUMNS[: MANIFEST_COLUMNS.index("informative_prob")]


def _deduplicate_corpus(manifest: pd.DataFrame, cfg: BuildConfig) -> None:
    """Group the exemplars of all sources once more, across sources (``--dedup-scope corpus``), in place."""
    unique = np.flatnonzero(~manifest["duplicate"].to_numpy())
    exemplar = group_near_duplicates(
        hex_to_dhash(manifest["dhash"].iloc[unique].tolist()), cfg.max_hamming, seed=cfg.seed
    )
    dup = exemplar != np.arange(len(unique))
    group = manifest["group"].to_numpy().copy()
    ids = manifest["patch_id"].to_numpy()
    group[unique[dup]] = ids[unique[exemplar[dup]]]
    manifest["group"] = group
    manifest.loc[manifest.index[unique[dup]], "duplicate"] = True


def merge_parts(
    layout: BuildLayout, records: list[PartRecord], cfg: BuildConfig, progress: bool = True, client: object = None
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Combine parts into the manifest and the source table (not yet written); ``client``: the
    build's Dask client, which then scores what is left to score.

    ``records`` are every source's part in source order; a record's manifest rows are read
    from its part file unless the record carries them (``PartRecord.rows``). The manifest has the columns of
    :data:`cemcurate.manifest.MANIFEST_SCHEMA`, sorted by ``patch_id``; the source table has
    one :class:`SourceRow` per volume.
    """
    frames = {
        rec.key: rec.rows if rec.rows is not None else pd.read_parquet(layout.part_parquet(rec.key))
        for rec in records
        if rec.ok
    }
    ids = assign_patch_ids(layout, records, {k: len(f) for k, f in frames.items()})
    parts = []
    for key, frame in frames.items():
        if len(frame) == 0:
            continue
        frame = frame.copy()
        frame.insert(0, "patch_id", ids[key][frame["local_id"].to_numpy()])
        frame["group"] = ids[key][frame["group_local"].to_numpy()]
        parts.append(frame.drop(columns=["local_id", "group_local"]))
    manifest = pd.concat(parts, ignore_index=True) if parts else empty_manifest(PART_COLUMNS)
    if cfg.dedup and cfg.dedup_scope == "corpus" and len(manifest):
        _deduplicate_corpus(manifest, cfg)
    manifest["informative_prob"], decided_by = score_patches(layout, manifest, cfg, progress, client)
    manifest.insert(manifest.columns.get_loc("informative_prob") + 1, "decided_by", decided_by)
    informative = manifest["informative_prob"].fillna(0.0).to_numpy() >= cfg.filter_threshold
    duplicate = manifest["duplicate"].to_numpy(bool)
    manifest["kept"] = ~duplicate & informative
    manifest["reason"] = np.where(duplicate, "duplicate", np.where(informative, "", "uninformative"))
    manifest = manifest.sort_values("patch_id", kind="stable").reset_index(drop=True)
    sources = pd.DataFrame([dataclasses.asdict(row) for rec in records for row in rec.sources])
    return manifest, sources

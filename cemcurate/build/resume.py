"""Resume: what identifies a source's part, and whether a finished one can be reused.

A part is reused when its files (name, size, modification time) and the settings that
shape its patches (:meth:`BuildConfig.patch_settings` and the sidecar options) are those
it was made with, both summed up in its *fingerprint*, and when the store still holds its
shards whole (:func:`store_problem`): a source that left RAW and came back, or a shard lost
or cut short, is redone instead of leaving OUT pointing at patches that are not there.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json

import pandas as pd

from cemcurate.build.config import BuildConfig
from cemcurate.build.records import PartRecord
from cemcurate.common.lazy import lazy_import
from cemcurate.layout import BuildLayout
from cemcurate.sources import SourceSpec

pyarrow_parquet = lazy_import("pyarrow.parquet")


def file_stamps(spec: SourceSpec) -> list[list]:
    """``[name, size, mtime_ns]`` of each file: what tells a changed file from an unchanged one."""
    return [[f.name, f.stat().st_size, f.stat().st_mtime_ns] if f.is_file() else [f.name, 0, 0] for f in spec.files]


def settings_hash(spec: SourceSpec, cfg: BuildConfig) -> str:
    """SHA-1 (hex) of the source's name, its sidecar options and the patch-shaping settings."""
    blob = json.dumps([spec.name, dataclasses.asdict(spec.options), cfg.patch_settings()], default=str)
    return hashlib.sha1(blob.encode()).hexdigest()


def fingerprint(spec: SourceSpec, cfg: BuildConfig) -> str:
    """SHA-1 (hex) of :func:`settings_hash` and :func:`file_stamps`."""
    blob = json.dumps([settings_hash(spec, cfg), file_stamps(spec)])
    return hashlib.sha1(blob.encode()).hexdigest()


def new_record(spec: SourceSpec, cfg: BuildConfig) -> PartRecord:
    """The record of a part about to be made for ``spec`` (no volume rows yet)."""
    return PartRecord(
        key=spec.key,
        name=spec.name,
        fingerprint=fingerprint(spec, cfg),
        settings=settings_hash(spec, cfg),
        files=file_stamps(spec),
    )


def read_part(layout: BuildLayout, key: str) -> PartRecord | None:
    """The successful part stored under ``key`` (both its files present), else None."""
    json_path, parquet_path = layout.part_json(key), layout.part_parquet(key)
    if not (json_path.is_file() and parquet_path.is_file()):
        return None
    record = PartRecord.from_json(json_path.read_text())
    return record if record is not None and record.ok else None


def store_problem(layout: BuildLayout, key: str, patch_size: int) -> str | None:
    """Why the store cannot serve the part stored under ``key`` (a shard missing or of the wrong
    size for the rows the part's manifest rows point at), or None when it can."""
    path = layout.part_parquet(key)
    try:
        if "shard_row" not in pyarrow_parquet.read_schema(path).names:
            return None  # a source that gave no patches has an empty part and no shard
        rows = pd.read_parquet(path, columns=["shard", "shard_row"])
    except (OSError, ValueError) as exc:  # pyarrow's errors for a damaged file are both
        return f"its manifest rows {path} cannot be read ({exc})"
    stored = rows[rows["shard_row"] >= 0]
    for shard, count in stored.groupby("shard")["shard_row"].max().items():
        path = layout.shard(shard)
        if not path.is_file():
            return f"its shard {path} is missing"
        expected = (int(count) + 1) * patch_size * patch_size
        if path.stat().st_size != expected:
            return f"its shard {path} holds {path.stat().st_size} bytes, {expected} expected"
    return None


def finished_part(layout: BuildLayout, spec: SourceSpec, cfg: BuildConfig) -> tuple[PartRecord | None, str]:
    """``(part, "")`` for a finished part of ``spec`` that can be reused, else ``(None, why)``.

    ``why`` is empty when there is simply nothing to reuse (a new source, changed files or
    settings) and names the problem when a part made with the same files and settings
    cannot be reused because the store lost its patches.
    """
    record = read_part(layout, spec.key)
    if record is None or record.fingerprint != fingerprint(spec, cfg):
        return None, ""
    problem = store_problem(layout, spec.key, cfg.patch_size)
    return (record, "") if problem is None else (None, problem)

"""Resume: what identifies a source's part, and whether a finished one can be reused.

A part is reused when its files (name, size, modification time) and the settings that
shape its patches (:meth:`BuildConfig.patch_settings` and the sidecar options) are those
it was made with; both are summed up in its *fingerprint*.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json

from cemcurate.build.config import BuildConfig
from cemcurate.build.records import PartRecord
from cemcurate.layout import BuildLayout
from cemcurate.sources import SourceSpec


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


def finished_part(layout: BuildLayout, spec: SourceSpec, cfg: BuildConfig) -> PartRecord | None:
    """A finished, successful part of ``spec`` made with the same files and settings, else None."""
    record = read_part(layout, spec.key)
    return record if record is not None and record.fingerprint == fingerprint(spec, cfg) else None

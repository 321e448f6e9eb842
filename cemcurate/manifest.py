"""The manifest: one row per raw patch, the contract between curation and what follows.

Columns (dtype): ``patch_id`` (int64, stable across re-runs), ``source`` (str, the source
name), ``file`` (str, path relative to RAW), ``plane`` (``xy``/``xz``/``yz``), ``slice``
(int64, index along the plane's normal axis), ``y``, ``x``, ``h``, ``w`` (int64, the crop
in that plane before any resize), ``kept`` (bool, in the curated store), ``reason`` (str,
empty when kept, else why it was dropped), ``shard`` (str) and ``shard_row`` (int64, -1
when the pixels are not stored). Later stages add ``dhash``, ``group``, ``duplicate`` and
``informative_prob``.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from cemcurate.common.atomic import atomic_path

BASE_COLUMNS = ("patch_id", "source", "file", "plane", "slice", "y", "x", "h", "w",
                "kept", "reason", "shard", "shard_row")


def write_manifest(manifest: pd.DataFrame, path: str | Path) -> None:
    """Validate the base columns and write ``manifest`` as parquet, atomically."""
    missing = [c for c in BASE_COLUMNS if c not in manifest.columns]
    if missing:
        raise ValueError(f"{path}: manifest lacks column(s) {missing}")
    if manifest["patch_id"].duplicated().any():
        raise ValueError(f"{path}: patch_id values are not unique")
    with atomic_path(path) as tmp:
        manifest.to_parquet(tmp, index=False)


def read_manifest(path: str | Path) -> pd.DataFrame:
    """Read a manifest written by :func:`write_manifest`."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: manifest not found; run `cemcurate build` first")
    return pd.read_parquet(path)

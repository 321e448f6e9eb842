"""The manifest: one row per raw patch, the contract between curation and what follows.

Columns, in the order ``cemcurate build`` writes them (:data:`MANIFEST_SCHEMA` holds the dtypes):

* ``patch_id`` (int64): stable across re-runs, unique;
* ``source`` (str): the source name, its path relative to RAW (``name:dataset`` for one
  volume of a multi-volume file);
* ``file`` (str): path relative to RAW (for a stack's xy patches, the slice's own file);
* ``plane`` (str): ``xy``, ``xz`` or ``yz``; ``slice`` (int64): index along its normal axis;
* ``y``, ``x``, ``h``, ``w`` (int64): the crop in that plane, in pixels, before any resize;
* ``shard`` (str) and ``shard_row`` (int64): where the pixels are stored; -1 when they are not
  (near-duplicates);
* ``dhash`` (str): the 64-bit difference hash as 16 hex digits;
* ``duplicate`` (bool): a near-duplicate of the exemplar ``group`` (int64, a ``patch_id``;
  exemplars point to themselves);
* ``pixel_mean``, ``pixel_std`` (float32): intensity statistics of the patch in [0, 1];
* ``informative_prob`` (float32): the filter's informative probability, NaN when not stored;
* ``decided_by`` (str): what gave that score - the label-free rule that fired (``uniform``,
  ``overlay``, ``low-contrast``, ``unstructured``), ``rules`` when none did, or ``classifier``, ``forest`` or
  ``none`` (the ``--filter`` method); '' when not stored;
* ``kept`` (bool): in the curated store; ``reason`` (str): empty when kept, else
  ``duplicate`` or ``uninformative``.

:data:`BASE_COLUMNS` are the ones every manifest has (:func:`cemcurate.store.write_patch_store`
writes only these); the others are added by the build's deduplication and filter stages.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from cemcurate.common.atomic import atomic_path

MANIFEST_SCHEMA: dict[str, str] = {
    "patch_id": "int64",
    "source": "str",
    "file": "str",
    "plane": "str",
    "slice": "int64",
    "y": "int64",
    "x": "int64",
    "h": "int64",
    "w": "int64",
    "shard": "str",
    "shard_row": "int64",
    "dhash": "str",
    "duplicate": "bool",
    "pixel_mean": "float32",
    "pixel_std": "float32",
    "group": "int64",
    "informative_prob": "float32",
    "decided_by": "str",
    "kept": "bool",
    "reason": "str",
}
MANIFEST_COLUMNS = tuple(MANIFEST_SCHEMA)
BASE_COLUMNS = (
    "patch_id",
    "source",
    "file",
    "plane",
    "slice",
    "y",
    "x",
    "h",
    "w",
    "kept",
    "reason",
    "shard",
    "shard_row",
)

_KIND_CHECKS = {
    "int64": pd.api.types.is_integer_dtype,
    "bool": pd.api.types.is_bool_dtype,
    "float32": pd.api.types.is_float_dtype,
    "str": lambda dtype: pd.api.types.is_string_dtype(dtype) or pd.api.types.is_object_dtype(dtype),
}


def empty_manifest(columns: tuple[str, ...] = MANIFEST_COLUMNS) -> pd.DataFrame:
    """A manifest without rows: ``columns`` (schema names) with their schema dtypes."""
    return pd.DataFrame({c: pd.Series(dtype=MANIFEST_SCHEMA[c]) for c in columns})


def check_manifest(manifest: pd.DataFrame, path: str | Path) -> None:
    """Raise ``ValueError`` (naming ``path``) unless ``manifest`` has the base columns, unique
    ``patch_id`` values and, for every schema column it has, a dtype of the schema's kind."""
    missing = [c for c in BASE_COLUMNS if c not in manifest.columns]
    if missing:
        raise ValueError(f"{path}: manifest lacks column(s) {missing}")
    wrong = [
        f"{c} is {manifest[c].dtype}, expected {t}"
        for c, t in MANIFEST_SCHEMA.items()
        if c in manifest.columns and not _KIND_CHECKS[t](manifest[c].dtype)
    ]
    if wrong:
        raise ValueError(f"{path}: manifest column dtypes do not match the schema: {'; '.join(wrong)}")
    if manifest["patch_id"].duplicated().any():
        raise ValueError(f"{path}: patch_id values are not unique")


def write_manifest(manifest: pd.DataFrame, path: str | Path) -> None:
    """Validate ``manifest`` (:func:`check_manifest`) and write it as parquet, atomically."""
    check_manifest(manifest, path)
    with atomic_path(path) as tmp:
        manifest.to_parquet(tmp, index=False)


def read_manifest(path: str | Path) -> pd.DataFrame:
    """Read a manifest written by :func:`write_manifest`."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: manifest not found; run `cemcurate build` first")
    return pd.read_parquet(path)

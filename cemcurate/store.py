"""The packed patch store: raw uint8 shards, memory-mapped, indexed by the manifest.

Layout inside a build folder ``OUT``::

    OUT/store/<shard>.u8     uint8, C order, shape (n, patch_size, patch_size), no header
    OUT/store.json           {"format": 1, "patch_size": 224, "mean": m, "std": s}
    OUT/manifest.parquet     one row per raw patch; kept rows carry ``shard`` and ``shard_row``

A shard is written by one source and holds every patch of that source that survived
deduplication (so the uninformative-patch filter can be re-run without re-reading the
source). :func:`open_patches` returns the *kept* patches only, in ``patch_id`` order.
Reading a random batch is one fancy index into a memory map per shard, so it runs at
page-cache speed instead of decoding one image file per patch.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Sequence

import numpy as np
import pandas as pd

from cemcurate.commit import finish_interrupted_commit
from cemcurate.common.atomic import atomic_path
from cemcurate.layout import BuildLayout
from cemcurate.manifest import write_manifest

STORE_FORMAT = 1
# Patches copied between shards at a time: 512 patches of 224 x 224 are 25 MB.
COPY_CHUNK = 512


class StoreError(ValueError):
    """A build folder is missing, incomplete or inconsistent."""


class ShardWriter:
    """Append patches of one size to a shard file, then publish it atomically.

    Use as a context manager: the shard appears at ``path`` only if the block exits
    without error, so an interrupted build never leaves a truncated shard behind.
    """

    def __init__(self, path: str | Path, patch_size: int):
        self.path = Path(path)
        self.patch_size = int(patch_size)
        self.count = 0
        self._ctx = atomic_path(self.path)
        self._file: BinaryIO | None = None

    def __enter__(self) -> "ShardWriter":
        tmp = self._ctx.__enter__()
        self._file = open(tmp, "wb")
        return self

    def append(self, patches: np.ndarray) -> np.ndarray:
        """Write ``patches`` (uint8, ``(n, p, p)``); return their row numbers in the shard."""
        p = self.patch_size
        if patches.dtype != np.uint8 or patches.ndim != 3 or patches.shape[1:] != (p, p):
            raise ValueError(
                f"shard {self.path.name}: expected uint8 (n, {p}, {p}), got {patches.dtype} {patches.shape}"
            )
        assert self._file is not None
        # A memoryview writes the array's buffer as it is; ``tobytes`` would copy it first.
        self._file.write(memoryview(np.ascontiguousarray(patches)).cast("B"))
        rows = np.arange(self.count, self.count + len(patches), dtype=np.int64)
        self.count += len(patches)
        return rows

    def append_from(self, source: np.ndarray, rows: np.ndarray | None = None) -> np.ndarray:
        """Append ``source[rows]`` (all of ``source`` when ``rows`` is None), a bounded chunk at a
        time, so a memory-mapped shard is copied without loading it; return the new row numbers."""
        rows = np.arange(len(source)) if rows is None else np.asarray(rows, np.int64)
        written = np.empty(len(rows), np.int64)
        for start in range(0, len(rows), COPY_CHUNK):
            chunk = rows[start : start + COPY_CHUNK]
            written[start : start + len(chunk)] = self.append(np.asarray(source[chunk]))
        return written

    def __exit__(self, exc_type, exc, tb) -> bool:
        assert self._file is not None
        self._file.close()
        return bool(self._ctx.__exit__(exc_type, exc, tb))


def open_shard(path: str | Path, patch_size: int) -> np.ndarray:
    """Memory-map a shard as a read-only uint8 array of shape ``(n, patch_size, patch_size)``.

    Raises:
        StoreError: the shard is missing or not a whole number of patches (names it, and the fix).
    """
    path = Path(path)
    if not path.is_file():
        out = path.parent.parent
        raise StoreError(f"{path}: shard missing from the store; `cemcurate check {out} --repair` rebuilds it")
    size = path.stat().st_size
    per_patch = patch_size * patch_size
    if size % per_patch:
        raise StoreError(f"{path}: {size} bytes is not a whole number of {patch_size}x{patch_size} patches")
    n = size // per_patch
    if n == 0:
        return np.zeros((0, patch_size, patch_size), np.uint8)
    return np.memmap(path, dtype=np.uint8, mode="r", shape=(n, patch_size, patch_size))


def _gather(shards: Sequence[np.ndarray], shard_of: np.ndarray, row_of: np.ndarray, patch_size: int) -> np.ndarray:
    """``shards[shard_of[i]][row_of[i]]`` for every i: uint8 ``(n, p, p)``. With several shards,
    each is read with one fancy index in ascending row order (forward reads of its memory map)."""
    if len(shards) == 1:
        return shards[0][row_of] if len(row_of) else np.zeros((0, patch_size, patch_size), np.uint8)
    out = np.empty((len(row_of), patch_size, patch_size), np.uint8)
    order = np.lexsort((row_of, shard_of))
    bounds = np.flatnonzero(np.diff(shard_of[order])) + 1
    for sel in np.split(order, bounds):
        if len(sel):
            out[sel] = shards[shard_of[sel[0]]][row_of[sel]]
    return out


class ShardReader:
    """The shards of a build folder, each memory-mapped once, read by ``(shard, shard_row)``."""

    def __init__(self, out_dir: str | Path, patch_size: int):
        self.layout = BuildLayout(out_dir)
        self.patch_size = int(patch_size)
        self._open: dict[str, np.ndarray] = {}

    def shard(self, name: str) -> np.ndarray:
        """Shard ``name`` as a read-only uint8 ``(n, p, p)`` memory map."""
        if name not in self._open:
            self._open[name] = open_shard(self.layout.shard(name), self.patch_size)
        return self._open[name]

    def read(self, shards: Sequence[str] | np.ndarray, rows: Sequence[int] | np.ndarray) -> np.ndarray:
        """Pixels of the patches at ``(shards[i], rows[i])``: uint8 ``(n, p, p)`` in the order given."""
        codes, names = pd.factorize(np.asarray(shards, dtype=object))
        return _gather(
            [self.shard(str(n)) for n in names], codes.astype(np.int64), np.asarray(rows, np.int64), self.patch_size
        )


@dataclass(frozen=True)
class StoreInfo:
    """``OUT/store.json``: patch edge in pixels and the kept patches' intensity mean and std in [0, 1]."""

    patch_size: int
    mean: float
    std: float


def _not_finished(out_dir: Path, missing: Path) -> StoreError:
    return StoreError(
        f"{out_dir}: not a finished build folder ({missing.name} is missing); run `cemcurate build RAW {out_dir}` first"
    )


def read_store_info(out_dir: str | Path) -> StoreInfo:
    """Read and check ``OUT/store.json``; a missing file or an unknown format is a :class:`StoreError`."""
    layout = BuildLayout(out_dir)
    if not layout.store_info.is_file():
        raise _not_finished(layout.root, layout.store_info)
    info = json.loads(layout.store_info.read_text())
    if info.get("format") != STORE_FORMAT:
        raise StoreError(
            f"{layout.store_info}: store format {info.get('format')} is not supported (expected {STORE_FORMAT})"
        )
    return StoreInfo(int(info["patch_size"]), float(info["mean"]), float(info["std"]))


def write_store_info(path: str | Path, patch_size: int, mean: float, std: float) -> None:
    """Write ``store.json`` to ``path`` (``OUT/store.json``, or its staged copy): patch size and the
    kept patches' intensity statistics in [0, 1]."""
    info = {"format": STORE_FORMAT, "patch_size": int(patch_size), "mean": float(mean), "std": float(std)}
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(info, indent=2))


class PatchStore:
    """The curated patches of a build folder, aligned with the manifest's kept rows.

    Attributes:
        manifest: the kept rows of ``OUT/manifest.parquet``, sorted by ``patch_id``;
            row ``i`` describes ``store[i]``.
        patch_ids: ``int64[N]``, the manifest ``patch_id`` of each stored patch.
        patch_size: edge length in pixels.
        mean, std: intensity statistics of the kept patches, in [0, 1] units (pixel / 255).

    Indexing: ``store[i]`` is a uint8 ``(p, p)`` array; ``store[indices]`` (a sequence or
    array of ints, or a slice) is a uint8 ``(n, p, p)`` array in the order given.
    """

    def __init__(self, out_dir: str | Path):
        layout = BuildLayout(out_dir)
        out_dir = layout.root
        finish_interrupted_commit(layout)  # a build killed while publishing: finish it, never read a mix
        info = read_store_info(out_dir)
        if not layout.manifest.is_file():
            raise _not_finished(out_dir, layout.manifest)
        self.patch_size, self.mean, self.std = info.patch_size, info.mean, info.std
        manifest = pd.read_parquet(layout.manifest)
        kept = manifest[manifest["kept"]].sort_values("patch_id").reset_index(drop=True)
        self.manifest = kept
        self.patch_ids = kept["patch_id"].to_numpy(np.int64)
        # Integer shard codes keep batch lookups in fast numeric numpy code.
        codes, names = pd.factorize(kept["shard"])
        self._shard_of = codes.astype(np.int64)
        self._shards = [open_shard(layout.shard(name), self.patch_size) for name in names]
        self._row_of = kept["shard_row"].to_numpy(np.int64)
        for code, (name, shard) in enumerate(zip(names, self._shards)):
            rows = self._row_of[self._shard_of == code]
            if len(rows) and (rows.max() >= len(shard) or rows.min() < 0):
                raise StoreError(
                    f"{out_dir}: shard {name} has {len(shard)} patches but the manifest refers to row {rows.max()}"
                )

    def __len__(self) -> int:
        return len(self.patch_ids)

    def __getitem__(self, index: int | slice | Sequence[int] | np.ndarray) -> np.ndarray:
        if isinstance(index, (int, np.integer)):
            i = int(index)
            if not -len(self) <= i < len(self):
                raise IndexError(f"patch index {i} out of range for {len(self)} patches")
            return np.asarray(self._shards[self._shard_of[i]][self._row_of[i]])
        indices = np.arange(len(self))[index] if isinstance(index, slice) else np.asarray(index, np.int64)
        return _gather(self._shards, self._shard_of[indices], self._row_of[indices], self.patch_size)


def open_patches(out_dir: str | Path) -> PatchStore:
    """Open the curated patches of a ``cemcurate build`` output folder.

    Returns a :class:`PatchStore`: ``len(store)`` kept patches, ``store[i]`` a uint8
    ``(224, 224)`` patch, ``store[batch_indices]`` a uint8 ``(n, 224, 224)`` batch,
    ``store.manifest`` the matching manifest rows and ``store.mean``/``store.std`` the
    intensity statistics (in [0, 1]) for normalisation.
    """
    return PatchStore(out_dir)


def write_patch_store(out_dir: str | Path, patches: np.ndarray, source: str = "array") -> PatchStore:
    """Write ``patches`` (uint8, ``(n, p, p)``) as a one-shard store with a minimal manifest.

    For tools and tests that have patches in memory; ``cemcurate build`` writes the full
    manifest itself. Every patch is kept; ``patch_id`` is its index.
    """
    layout = BuildLayout(out_dir)
    if patches.ndim != 3 or patches.shape[1] != patches.shape[2] or len(patches) == 0:
        raise ValueError(f"expected a non-empty uint8 array of square patches (n, p, p), got {patches.shape}")
    p = patches.shape[1]
    with ShardWriter(layout.shard("array"), p) as shard:
        rows = shard.append(patches.astype(np.uint8, copy=False))
    n = len(patches)
    manifest = pd.DataFrame(
        {
            "patch_id": np.arange(n, dtype=np.int64),
            "source": source,
            "file": source,
            "plane": "xy",
            "slice": np.arange(n, dtype=np.int64),
            "y": 0,
            "x": 0,
            "h": p,
            "w": p,
            "kept": True,
            "reason": "",
            "shard": "array",
            "shard_row": rows,
        }
    )
    write_manifest(manifest, layout.manifest)
    scaled = patches.astype(np.float64) / 255.0
    write_store_info(layout.store_info, p, scaled.mean(), scaled.std())
    return PatchStore(layout.root)

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
from pathlib import Path
from typing import BinaryIO, Sequence

import numpy as np
import pandas as pd

from cemcurate.common.atomic import atomic_path

STORE_FORMAT = 1


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
            raise ValueError(f"shard {self.path.name}: expected uint8 (n, {p}, {p}), got {patches.dtype} {patches.shape}")
        assert self._file is not None
        self._file.write(np.ascontiguousarray(patches).tobytes())
        rows = np.arange(self.count, self.count + len(patches), dtype=np.int64)
        self.count += len(patches)
        return rows

    def __exit__(self, exc_type, exc, tb) -> bool:
        assert self._file is not None
        self._file.close()
        return bool(self._ctx.__exit__(exc_type, exc, tb))


def open_shard(path: str | Path, patch_size: int) -> np.ndarray:
    """Memory-map a shard as a read-only uint8 array of shape ``(n, patch_size, patch_size)``."""
    path = Path(path)
    size = path.stat().st_size
    per_patch = patch_size * patch_size
    if size % per_patch:
        raise StoreError(f"{path}: {size} bytes is not a whole number of {patch_size}x{patch_size} patches")
    n = size // per_patch
    if n == 0:
        return np.zeros((0, patch_size, patch_size), np.uint8)
    return np.memmap(path, dtype=np.uint8, mode="r", shape=(n, patch_size, patch_size))


def write_store_info(out_dir: str | Path, patch_size: int, mean: float, std: float) -> None:
    """Write ``OUT/store.json`` (patch size and kept-patch intensity statistics in [0, 1])."""
    info = {"format": STORE_FORMAT, "patch_size": int(patch_size), "mean": float(mean), "std": float(std)}
    with atomic_path(Path(out_dir) / "store.json") as tmp:
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
        out_dir = Path(out_dir)
        info_path, manifest_path = out_dir / "store.json", out_dir / "manifest.parquet"
        for required in (info_path, manifest_path):
            if not required.is_file():
                raise StoreError(f"{out_dir}: not a finished build folder ({required.name} is missing); run `cemcurate build RAW {out_dir}` first")
        info = json.loads(info_path.read_text())
        if info.get("format") != STORE_FORMAT:
            raise StoreError(f"{info_path}: store format {info.get('format')} is not supported (expected {STORE_FORMAT})")
        self.patch_size = int(info["patch_size"])
        self.mean, self.std = float(info["mean"]), float(info["std"])
        manifest = pd.read_parquet(manifest_path)
        kept = manifest[manifest["kept"]].sort_values("patch_id").reset_index(drop=True)
        self.manifest = kept
        self.patch_ids = kept["patch_id"].to_numpy(np.int64)
        # Integer shard codes keep batch lookups in fast numeric numpy code.
        codes, names = pd.factorize(kept["shard"])
        self._shard_of = codes.astype(np.int64)
        self._shards = [open_shard(out_dir / "store" / f"{name}.u8", self.patch_size) for name in names]
        self._row_of = kept["shard_row"].to_numpy(np.int64)
        for code, (name, shard) in enumerate(zip(names, self._shards)):
            rows = self._row_of[self._shard_of == code]
            if len(rows) and (rows.max() >= len(shard) or rows.min() < 0):
                raise StoreError(f"{out_dir}: shard {name} has {len(shard)} patches but the manifest refers to row {rows.max()}")

    def __len__(self) -> int:
        return len(self.patch_ids)

    def __getitem__(self, index: int | slice | Sequence[int] | np.ndarray) -> np.ndarray:
        if isinstance(index, (int, np.integer)):
            i = int(index)
            if not -len(self) <= i < len(self):
                raise IndexError(f"patch index {i} out of range for {len(self)} patches")
            return np.asarray(self._shards[self._shard_of[i]][self._row_of[i]])
        indices = np.arange(len(self))[index] if isinstance(index, slice) else np.asarray(index, np.int64)
        shards = self._shard_of[indices]
        rows = self._row_of[indices]
        if len(self._shards) == 1:
            return self._shards[0][rows] if len(rows) else np.zeros((0, self.patch_size, self.patch_size), np.uint8)
        out = np.empty((len(indices), self.patch_size, self.patch_size), np.uint8)
        order = np.lexsort((rows, shards))
        bounds = np.flatnonzero(np.diff(shards[order])) + 1
        for sel in np.split(order, bounds):
            if len(sel):
                out[sel] = self._shards[shards[sel[0]]][rows[sel]]
        return out


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
    from cemcurate.manifest import write_manifest

    out_dir = Path(out_dir)
    if patches.ndim != 3 or patches.shape[1] != patches.shape[2] or len(patches) == 0:
        raise ValueError(f"expected a non-empty uint8 array of square patches (n, p, p), got {patches.shape}")
    p = patches.shape[1]
    with ShardWriter(out_dir / "store" / "array.u8", p) as shard:
        rows = shard.append(patches.astype(np.uint8, copy=False))
    n = len(patches)
    manifest = pd.DataFrame({
        "patch_id": np.arange(n, dtype=np.int64), "source": source, "file": source, "plane": "xy",
        "slice": np.arange(n, dtype=np.int64), "y": 0, "x": 0, "h": p, "w": p,
        "kept": True, "reason": "", "shard": "array", "shard_row": rows,
    })
    write_manifest(manifest, out_dir / "manifest.parquet")
    scaled = patches.astype(np.float64) / 255.0
    write_store_info(out_dir, p, scaled.mean(), scaled.std())
    return PatchStore(out_dir)

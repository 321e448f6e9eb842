"""One volume to patches: intensity window, standardised planes, tiles, hashes and statistics.

Pure steps on a :class:`cemcurate.io.Volume`, given the settings they use (not the build
config); the only files touched are the shard being written and, for volumes cut in three
planes, a scratch memory map.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np
import pandas as pd

from cemcurate.build.records import CutPatches
from cemcurate.build.timing import timed
from cemcurate.dhash import dhash64, dhash_hex
from cemcurate.io import Volume
from cemcurate.patch_grid import crop_patches, tile_grid
from cemcurate.slicing import iter_planes
from cemcurate.standardize import IntensityWindow, compute_window, sample_slice_indices
from cemcurate.store import ShardWriter

# ~8 M voxels per slab: the float copy made while windowing stays near 64 MB.
SLAB_VOXELS = 8 << 20
# A volume cut in three planes is standardised into memory up to this many voxels (64 MB,
# the size of the blocks read from a larger one's scratch memory map), else into a scratch file.
IN_MEMORY_VOXELS = 64 << 20
# Patches per chunk of the statistics: their float32 copy (3 MB for 224-px patches) stays in the cache.
STATS_CHUNK = 16
# Patches of consecutive planes hashed, measured and written together (12 MB of 224-px
# patches): a 3-plane volume of 250^3 gives one patch per plane, and the per-call costs of
# hashing, statistics and writing one patch at a time were most of its cut.
BATCH_PATCHES = 256


def volume_window(
    vol: Volume, invert: bool, low_percentile: float, high_percentile: float, sample_slices: int
) -> IntensityWindow:
    """The uint8 mapping of a volume: the percentiles (0-100) of up to ``sample_slices`` evenly
    spread slices, subsampled in-plane; uint8 volumes pass through."""
    if vol.dtype == np.uint8:
        return IntensityWindow(None, None, invert)
    # Every k-th pixel of up to N slices: ~1e6 values are plenty for 0.1/99.9 percentiles.
    indices = sample_slice_indices(vol.shape[0], sample_slices)
    step = max(1, int(np.sqrt(vol.shape[1] * vol.shape[2] * len(indices) / 2e6)))
    with timed("decode"):
        sample = np.concatenate([vol.read_slices(int(z), int(z) + 1)[0, ::step, ::step].ravel() for z in indices])
    with timed("standardise"):
        return compute_window(sample, low_percentile, high_percentile, invert)


def iter_standard_planes(
    vol: Volume, window: IntensityWindow, planes: tuple[str, ...], scratch: Path
) -> Iterator[tuple[str, int, np.ndarray]]:
    """Yield ``(plane, slice_index, uint8 image)`` for every cross-section to tile.

    xy-only volumes are streamed a slab at a time. Volumes cut in three planes are first
    standardised whole: into memory up to :data:`IN_MEMORY_VOXELS`, else into a uint8 memory
    map at ``scratch`` (removed afterwards), from which xz and yz sections are read in
    bounded blocks.
    """
    z, y, x = vol.shape
    slab = max(1, SLAB_VOXELS // max(1, y * x))
    if planes == ("xy",):
        for z0 in range(0, z, slab):
            block = standard_slab(vol, window, z0, min(z, z0 + slab))
            for k in range(block.shape[0]):
                yield "xy", z0 + k, block[k]
        return
    if z * y * x <= IN_MEMORY_VOXELS:
        std = np.empty((z, y, x), np.uint8)
        _standardise_into(std, vol, window, slab)
        yield from _sections(std, planes)
        return
    scratch.parent.mkdir(parents=True, exist_ok=True)
    try:
        with timed("standardise"):
            std = np.lib.format.open_memmap(scratch, mode="w+", dtype=np.uint8, shape=(z, y, x))
        _standardise_into(std, vol, window, slab)
        with timed("standardise"):
            std.flush()
            del std
            std = np.load(scratch, mmap_mode="r")
        yield from _sections(std, planes)
        del std
    finally:
        scratch.unlink(missing_ok=True)


def _standardise_into(std: np.ndarray, vol: Volume, window: IntensityWindow, slab: int) -> None:
    """Fill ``std`` (uint8, the volume's shape) with the standardised volume, ``slab`` slices at a time."""
    for z0 in range(0, vol.shape[0], slab):
        block = standard_slab(vol, window, z0, min(vol.shape[0], z0 + slab))
        with timed("standardise"):
            std[z0 : z0 + slab] = block


def _sections(std: np.ndarray, planes: tuple[str, ...]) -> Iterator[tuple[str, int, np.ndarray]]:
    """``(plane, index, image)`` of every section of the standardised volume ``std`` in ``planes``."""
    for plane in planes:
        sections = iter_planes(std, plane, block_bytes=IN_MEMORY_VOXELS)
        while True:
            with timed("slice"):  # not around the yield: the consumer's time is its own
                section = next(sections, None)
            if section is None:
                break
            yield plane, section[0], section[1]


def standard_slab(vol: Volume, window: IntensityWindow, z0: int, z1: int) -> np.ndarray:
    """Slices ``z0:z1`` of ``vol`` read and mapped to uint8 ``(z1 - z0, y, x)``."""
    with timed("decode"):
        block = vol.read_slices(z0, z1)
    with timed("standardise"):
        return window.apply(block)


def patch_statistics(patches: np.ndarray) -> np.ndarray:
    """Mean and std of each patch's pixels in [0, 1]: float32 ``(n, 2)`` from uint8 ``(n, p, p)``.

    The values of ``x = patches.reshape(n, -1).astype(float32) / 255``, ``x.mean(1)``,
    ``x.std(1)``, computed a chunk of patches at a time (rows reduce independently, so the
    result is the same) with one float copy per chunk and the mean passed to ``std``.
    """
    n = len(patches)
    flat = patches.reshape(n, -1)
    out = np.empty((n, 2), np.float32)
    for start in range(0, n, STATS_CHUNK):
        x = np.divide(flat[start : start + STATS_CHUNK], np.float32(255.0), dtype=np.float32)
        mean = x.mean(axis=1, keepdims=True)
        out[start : start + len(x), 0] = mean[:, 0]
        out[start : start + len(x), 1] = x.std(axis=1, mean=mean)
    return out


def cut_patches(images: Iterator[tuple[str, int, np.ndarray]], writer: ShardWriter, min_edge: int) -> CutPatches:
    """Tile every ``(plane, index, uint8 image)`` into patches of the writer's patch size (edge
    crops need both sides >= ``min_edge`` px), append them to ``writer`` and return their
    crops, hashes and statistics (see :class:`CutPatches`).

    Patches are collected in a batch of up to :data:`BATCH_PATCHES` (a plane with more is a
    batch of its own), then hashed, measured and written in plane order.
    """
    p = writer.patch_size
    grids, planes, slices, hashes, stats = [], [], [], [], []
    batch = np.empty((BATCH_PATCHES, p, p), np.uint8)
    filled = 0

    def flush(patches: np.ndarray) -> None:
        with timed("cut"):
            stats.append(patch_statistics(patches))
        with timed("write"):
            writer.append(patches)
        with timed("hash"):
            hashes.append(dhash64(patches))

    for plane, index, image in images:
        with timed("cut"):
            grid = tile_grid(*image.shape, p, min_edge)
            if len(grid) == 0:
                continue
            grids.append(grid)
            planes += [plane] * len(grid)
            slices += [index] * len(grid)
            if filled + len(grid) > BATCH_PATCHES and filled:
                flush(batch[:filled])
                filled = 0
            if len(grid) > BATCH_PATCHES:
                flush(crop_patches(image, grid, p))
                continue
            crop_patches(image, grid, p, out=batch[filled : filled + len(grid)])
            filled += len(grid)
    if filled:
        flush(batch[:filled])
    return CutPatches(
        grid=np.concatenate(grids) if grids else np.zeros((0, 4), np.int64),
        planes=np.array(planes, object),
        slices=np.array(slices, np.int64),
        hashes=np.concatenate(hashes) if hashes else np.zeros(0, np.uint64),
        stats=np.concatenate(stats).astype(np.float32) if stats else np.zeros((0, 2), np.float32),
    )


def manifest_rows(
    cut: CutPatches,
    name: str,
    file: str,
    shard: str,
    shard_row: np.ndarray,
    group_local: np.ndarray,
    duplicate: np.ndarray,
) -> pd.DataFrame:
    """A part's manifest rows for the patches of ``cut``.

    ``shard_row``: int64 (n,), -1 where not stored; ``group_local``: int64 (n,), the local id
    of each patch's exemplar; ``duplicate``: bool (n,). Local ids run from 0; the merge maps
    them (and the groups) to ``patch_id`` values.
    """
    with timed("write"):
        return _rows(cut, name, file, shard, shard_row, group_local, duplicate)


def _rows(cut, name, file, shard, shard_row, group_local, duplicate) -> pd.DataFrame:
    n, grid = len(cut), cut.grid
    return pd.DataFrame(
        {
            "local_id": np.arange(n, dtype=np.int64),
            "source": name,
            "file": file,
            "plane": cut.planes,
            "slice": cut.slices,
            "y": grid[:, 0],
            "x": grid[:, 1],
            "h": grid[:, 2],
            "w": grid[:, 3],
            "shard": shard,
            "shard_row": shard_row,
            "dhash": dhash_hex(cut.hashes) if n else [],
            "group_local": group_local,
            "duplicate": duplicate,
            "pixel_mean": cut.stats[:, 0],
            "pixel_std": cut.stats[:, 1],
        }
    )

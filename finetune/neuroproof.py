"""FlyEM NeuroProof ground truth as boundary targets (for tests and benchmarks).

:func:`neuroproof_sample` reads a NeuroProof sample (grayscale PNG slices and the
supervoxel-to-body HDF5 ground truth); :func:`boundary_map` marks the voxels on both sides
of every interface between two objects.
"""

from __future__ import annotations

import gzip
import shutil
from pathlib import Path

import numpy as np

from cemcurate.common.lazy import lazy_import
from cemcurate.io import open_series

h5py = lazy_import("h5py")


def boundary_map(ids: np.ndarray) -> np.ndarray:
    """Voxels whose id differs from one of their 6 neighbours (both sides of every interface).

    Args:
        ids: ``(z, y, x)`` integer object ids (e.g. neuron body ids).

    Returns:
        ``uint8[z, y, x]``: 1 on boundaries, 0 inside objects.
    """
    ids = np.asarray(ids)
    if ids.ndim != 3:
        raise ValueError(f"expected a (z, y, x) id volume, got shape {ids.shape}")
    out = np.zeros(ids.shape, dtype=bool)
    for axis in range(3):
        differs = np.diff(ids, axis=axis) != 0
        lo = [slice(None)] * 3
        hi = [slice(None)] * 3
        lo[axis] = slice(None, -1)
        hi[axis] = slice(1, None)
        out[tuple(lo)] |= differs
        out[tuple(hi)] |= differs
    return out.astype(np.uint8)


def neuroproof_sample(sample_dir: str | Path, workdir: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Image and neuron body ids of a FlyEM NeuroProof sample (e.g. ``training_sample2``).

    Args:
        sample_dir: folder with ``grayscale_maps/*.png`` and ``groundtruth.h5.gz``.
        workdir: writable folder for the decompressed HDF5 file.

    Returns:
        ``(image uint8[z, y, x], bodies int64[z, y, x])``: the ``stack`` supervoxels mapped
        to bodies through ``transforms`` (``N x 2`` rows ``supervoxel, body``); 10 nm
        isotropic voxels.
    """
    sample_dir = Path(sample_dir)
    pngs = sorted((sample_dir / "grayscale_maps").glob("*.png"))
    gz = sample_dir / "groundtruth.h5.gz"
    if not pngs or not gz.is_file():
        raise ValueError(f"{sample_dir}: expected grayscale_maps/*.png and groundtruth.h5.gz (a NeuroProof sample)")
    vol = open_series(pngs)
    image = vol.read_slices(0, vol.shape[0])
    h5_path = Path(workdir) / "groundtruth.h5"
    with gzip.open(gz, "rb") as src, open(h5_path, "wb") as dst:
        shutil.copyfileobj(src, dst)
    with h5py.File(h5_path, "r") as f:
        stack = f["stack"][:]
        transforms = f["transforms"][:]
    if stack.shape != image.shape:
        raise ValueError(f"{gz}: ground truth shape {stack.shape} differs from the image {image.shape}")
    lut = np.arange(int(stack.max()) + 1, dtype=np.int64)
    keep = transforms[:, 0] < lut.size
    lut[transforms[keep, 0]] = transforms[keep, 1]
    return image, lut[stack]

"""Which planes to cut from a volume, and cutting them.

Following CEM500K: isotropic volumes, and anisotropic ones whose z spacing is within 20%
of the lateral spacing, give xy, xz and yz cross-sections; other volumes give xy only.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np

ALL_PLANES = ("xy", "xz", "yz")


def planes_for_spacing(
    voxel_size: tuple[float, float, float] | None, depth: int, tolerance: float = 0.2, xy_only: bool = False
) -> tuple[tuple[str, ...], str]:
    """Decide the planes for a volume.

    Args:
        voxel_size: ``(z, y, x)`` spacing in any one unit, or ``None`` when unknown.
        depth: number of z slices (1 for a 2D image).
        tolerance: largest relative difference ``|z - y| / y`` and ``|z - x| / x``
            (inclusive) for which the volume counts as isotropic enough.
        xy_only: force xy (e.g. video frames, whose z axis is time).

    Returns:
        ``(planes, note)``: the planes to cut and a note for the source table (empty
        when nothing needs saying).
    """
    if depth <= 1 or xy_only:
        return ("xy",), ""
    if voxel_size is None or any(not np.isfinite(s) or s <= 0 for s in voxel_size):
        return ("xy",), "voxel size unknown: sliced in xy only (give voxel_size in cemcurate.yaml to add xz/yz)"
    z, y, x = voxel_size
    if abs(z - y) / y <= tolerance and abs(z - x) / x <= tolerance:
        return ALL_PLANES, ""
    return ("xy",), ""


def plane_shape(shape: tuple[int, int, int], plane: str) -> tuple[int, int, int]:
    """``(number of slices, rows, cols)`` of ``plane`` cut from a ``(z, y, x)`` volume.

    xy slices are indexed by z with rows y and cols x; xz by y with rows z and cols x;
    yz by x with rows z and cols y.
    """
    z, y, x = shape
    return {"xy": (z, y, x), "xz": (y, z, x), "yz": (x, z, y)}[plane]


def iter_planes(volume: np.ndarray, plane: str, block_bytes: int = 256 << 20) -> Iterator[tuple[int, np.ndarray]]:
    """Yield ``(slice_index, image)`` for every cross-section of ``volume`` in ``plane``.

    ``volume`` is a ``(z, y, x)`` array, typically a read-only memory map, taken in blocks of
    about ``block_bytes``. Images have the row/col order of :func:`plane_shape`; they are
    views into ``volume`` (strided for xz and yz): no copy is made here, whoever crops them
    copies the pixels once.
    """
    z, y, x = volume.shape
    if plane == "xy":
        step = max(1, block_bytes // max(1, y * x * volume.itemsize))
        for z0 in range(0, z, step):
            block = np.asarray(volume[z0 : z0 + step])
            for k in range(block.shape[0]):
                yield z0 + k, block[k]
    elif plane == "xz":
        step = max(1, block_bytes // max(1, z * x * volume.itemsize))
        for y0 in range(0, y, step):
            block = np.asarray(volume[:, y0 : y0 + step, :])
            for k in range(block.shape[1]):
                yield y0 + k, block[:, k, :]
    elif plane == "yz":
        step = max(1, block_bytes // max(1, z * y * volume.itemsize))
        for x0 in range(0, x, step):
            block = np.asarray(volume[:, :, x0 : x0 + step])
            for k in range(block.shape[2]):
                yield x0 + k, block[:, :, k]
    else:
        raise ValueError(f"unknown plane {plane!r}; expected one of {ALL_PLANES}")

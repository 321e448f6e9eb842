"""A numbered series of same-shaped 2D images read as one 3D volume."""

from __future__ import annotations

import math
import os
import re
from pathlib import Path

import numpy as np

from .base import ReadError, Slicer, Volume
from .formats import open_file

_DIGITS = re.compile(r"(\d+)")


def natural_sort_key(path: str | os.PathLike) -> tuple:
    """Sort key that orders embedded numbers by value: ``img2.png`` before ``img10.png``.

    Case-insensitive, folder by folder; names equal up to case or leading zeros fall back
    to plain string order so the key is a total order.
    """
    p = Path(path)
    parts = tuple(
        tuple((1, int(tok)) if i % 2 else (0, tok.lower()) for i, tok in enumerate(_DIGITS.split(part)))
        for part in p.parts
    )
    return (parts, str(p))


def open_series(paths: list[Path]) -> Volume:
    """Stack 2D images into one ``(n, y, x)`` volume, in natural order of their names.

    Every file's header is read now (cheap) to check that all are single 2D images of the
    same shape and dtype; pixels are decoded by ``read_slices``. The lateral voxel size is
    the first file's (z is unknown: ``NaN``), and a note records any disagreement.

    Raises:
        ReadError: naming the first file that is not a single 2D image, or whose shape or
            dtype differs from the first file's (both shapes are given).
        ValueError: ``paths`` is empty.
    """
    paths = sorted((Path(p) for p in paths), key=natural_sort_key)
    if not paths:
        raise ValueError("open_series needs at least one file")
    slicers, notes = [], []
    first: Volume | None = None
    for p in paths:
        vols = open_file(p)
        if len(vols) != 1 or vols[0].shape[0] != 1:
            shapes = ", ".join(str(v.shape) for v in vols)
            raise ReadError(p, f"is not a single 2D image (volumes: {shapes}); a series holds 2D images only")
        v = vols[0]
        if first is None:
            first = v
        elif v.shape != first.shape:
            raise ReadError(
                p,
                f"image shape (y, x) = {v.shape[1:]} differs from {first.shape[1:]} of "
                f"{paths[0].name}; every image in a series must have the same shape",
            )
        elif v.dtype != first.dtype:
            raise ReadError(p, f"dtype {v.dtype} differs from {first.dtype} of {paths[0].name}")
        elif not _same_xy(v.voxel_size, first.voxel_size) and len(notes) < 5:
            notes.append(f"{p.name}: voxel size {v.voxel_size} differs from the first image's")
        notes += [f"{p.name}: {n}" for n in v.notes][: max(0, 5 - len(notes))]
        slicers.append(v.read_slices)
    shape = (len(paths), first.shape[1], first.shape[2])
    voxel = None if first.voxel_size is None else (math.nan,) + tuple(first.voxel_size[1:])
    vol = Volume(
        shape=shape,
        dtype=first.dtype,
        read_slices=_SeriesSlicer(paths[0], shape, first.dtype, slicers),
        reader=f"series/{first.reader}",
        voxel_size=voxel,
        notes=notes,
    )
    vol.path = str(paths[0].parent)
    return vol


def _same_xy(a, b) -> bool:
    if a is None or b is None:
        return a is b
    return np.allclose(a[1:], b[1:], rtol=1e-6)


class _SeriesSlicer(Slicer):
    def __init__(self, path, shape, dtype, slicers):
        super().__init__(path, shape, dtype)
        self.slicers = slicers

    def _read(self, z0: int, z1: int) -> np.ndarray:
        out = np.empty((z1 - z0,) + self.shape[1:], dtype=self.dtype)
        for i in range(z0, z1):
            out[i - z0] = self.slicers[i](0, 1)[0]
        return out

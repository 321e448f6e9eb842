"""NIfTI-1/2 (``.nii``, ``.nii.gz``) via nibabel.

NIfTI stores axes as (x, y, z); volumes are returned transposed to (z, y, x). Only the
header is read at open time; ``read_slices`` reads the requested z range through
nibabel's lazy ``dataobj``. For ``.nii`` that is a seek and one read; for ``.nii.gz``
gzip has no random access, so every call decompresses from the start of the file up to
``z1`` (reading a large ``.nii.gz`` in many small ranges is therefore slow; prefer few
large ranges).

Voxel size: ``pixdim`` in the unit of ``xyzt_units`` (mm, micron or metre); with unit
"unknown" the voxel size is unknown. Data with a non-trivial ``scl_slope``/``scl_inter``
are scaled and returned as float32.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cemcurate.common.lazy import lazy_import

from . import handles
from .base import ReadError, Slicer, Volume, nm_per_unit, spacing_nm

nibabel = lazy_import("nibabel")

_UNIT_NAMES = {"mm": "mm", "micron": "micron", "meter": "m"}


def read_nifti(path: Path, dataset: str | None = None) -> list[Volume]:
    """One ``(z, y, x)`` volume from a NIfTI file; see the module docstring."""
    img = _load(path)
    shape = tuple(int(s) for s in img.shape)
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    if len(shape) > 3:
        raise ReadError(
            path,
            f"4D NIfTI of shape (x, y, z, ...) = {tuple(img.shape)} is not supported; "
            "save one 3D file per time point/channel",
        )
    if len(shape) < 2:
        raise ReadError(path, f"NIfTI of shape {tuple(img.shape)} is not an image")
    header = img.header
    stored = header.get_data_dtype()
    if stored.fields is not None:
        raise ReadError(path, f"NIfTI with structured/RGB data type {stored} is not supported; convert to gray")
    notes = []
    slope, inter = img.dataobj.slope, img.dataobj.inter
    scaled = not (slope == 1 and inter == 0)
    dtype = np.dtype(np.float32) if scaled else stored.newbyteorder("=")
    if scaled:
        notes.append(f"values scaled by scl_slope={slope}, scl_inter={inter}; returned as float32")
    x, y = shape[0], shape[1]
    z = shape[2] if len(shape) == 3 else 1
    unit = header.get_xyzt_units()[0]
    zooms = tuple(float(v) for v in header.get_zooms()[:3])
    if len(zooms) == 2:
        zooms = zooms + (float("nan"),)
    voxel = spacing_nm((zooms[2], zooms[1], zooms[0]), nm_per_unit(_UNIT_NAMES.get(unit, "")))
    if voxel is None and unit == "unknown":
        notes.append("xyzt_units is 'unknown'; pixdim not trusted, voxel size unknown")
    slicer = _NiftiSlicer(path, (z, y, x), dtype, len(shape))
    return [Volume(shape=(z, y, x), dtype=dtype, read_slices=slicer, reader="nifti", voxel_size=voxel, notes=notes)]


def _load(path):
    try:
        return nibabel.load(str(path))
    except Exception as exc:
        raise ReadError(
            path,
            f"nibabel could not read the NIfTI header ({type(exc).__name__}: {exc}); the file is corrupt or not NIfTI",
        ) from exc


class _NiftiSlicer(Slicer):
    def __init__(self, path, shape, dtype, ndim: int):
        super().__init__(path, shape, dtype)
        self.ndim = ndim

    def _read(self, z0: int, z1: int) -> np.ndarray:
        img = handles.get("nifti", self.path, lambda: (_load(self.path), lambda: None))
        if self.ndim == 2:
            block = np.asarray(img.dataobj[:, :])[:, :, np.newaxis]
        else:
            index = (slice(None), slice(None), slice(z0, z1)) + (0,) * (len(img.shape) - 3)
            block = np.asarray(img.dataobj[index])
        return block.transpose(2, 1, 0).astype(self.dtype, copy=False)

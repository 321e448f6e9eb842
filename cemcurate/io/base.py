"""The reader contract shared by every format module.

A reader turns one file (or one numbered series of 2D files) into one or more
:class:`Volume` objects. A volume is always three-dimensional with axes
``(z, y, x)``; a 2D image is a volume with ``z == 1``. Pixel data are read
lazily, a range of z slices at a time, so a volume larger than memory is never
held at once.

Voxel sizes are in nanometres, ``(z, y, x)``. When a file states its lateral
pixel size but not its slice spacing (2D images, stacks without z calibration),
the z entry is ``NaN``; ``voxel_size`` is ``None`` only when the lateral size is
unknown too. A single-slice volume always has ``NaN`` for z because a slice
spacing means nothing for one slice.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

NAN = float("nan")


class ReadError(Exception):
    """A file could not be read. The message names the file and the problem."""

    def __init__(self, path: Path | str, problem: str):
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{path}: {problem}")

    def __reduce__(self):
        # Keeps the error picklable across worker processes (the default would call
        # __init__ with the formatted message only).
        return (type(self), (self.path, self.problem))


@dataclass
class Volume:
    """A lazily read grayscale volume.

    Attributes:
        shape: ``(z, y, x)`` in voxels.
        dtype: the native dtype of the stored samples (after grayscale conversion).
        read_slices: ``read_slices(z0, z1) -> ndarray`` of shape ``(z1 - z0, y, x)``
            and dtype ``dtype``; must accept any ``0 <= z0 < z1 <= shape[0]``. The
            result is a fresh, writable, C-contiguous array.
        reader: short name of the reader (``"tiff"``, ``"mrc"``, ...).
        voxel_size: ``(z, y, x)`` spacing in nanometres (seven significant digits), or
            ``None`` if unknown; z may be ``NaN`` when only the lateral spacing is known
            (see the module docstring).
        voxel_size_from: ``"metadata"``, ``"sidecar"`` or ``"unknown"``.
        xy_only: true for data whose z axis is not spatial (video frames, tilt series).
        dataset: key inside a container file (h5/zarr) or the split of a hyperstack
            (``"c1"``, ``"t0:c1"``, ``"0:c1"``), else ``None``.
        notes: warnings a person should see in the source table.
        path: the file the volume came from (set by :func:`cemcurate.io.open_file`).
    """

    shape: tuple[int, int, int]
    dtype: np.dtype
    read_slices: Callable[[int, int], np.ndarray]
    reader: str
    voxel_size: tuple[float, float, float] | None = None
    voxel_size_from: str = "unknown"
    xy_only: bool = False
    dataset: str | None = None
    notes: list[str] = field(default_factory=list)
    path: str | None = None

    def __post_init__(self) -> None:
        self.shape = tuple(int(s) for s in self.shape)  # type: ignore[assignment]
        if len(self.shape) != 3:
            raise ValueError(f"Volume shape must be (z, y, x), got {self.shape}")
        self.dtype = np.dtype(self.dtype)
        if self.voxel_size is not None:
            z, y, x = (float(v) for v in self.voxel_size)
            if not (math.isfinite(y) and math.isfinite(x) and y > 0 and x > 0):
                raise ValueError(f"lateral voxel size must be positive, got {self.voxel_size}")
            if self.shape[0] == 1 or not (math.isfinite(z) and z > 0):
                z = NAN
            # Headers store float32 or rationals (1.052 comes back as 1.0520000000950358);
            # seven significant digits is all such a number carries.
            self.voxel_size = tuple(float(f"{v:.7g}") for v in (z, y, x))  # type: ignore[assignment]
            if self.voxel_size_from == "unknown":
                self.voxel_size_from = "metadata"
        else:
            self.voxel_size_from = "unknown"

    def __len__(self) -> int:
        return self.shape[0]


def to_grayscale(arr: np.ndarray, path: Path | str) -> np.ndarray:
    """Collapse a trailing colour channel axis to one gray channel.

    ``arr`` is ``(..., y, x)`` or ``(..., y, x, c)``. With ``c`` in 3/4 (RGB/RGBA) alpha is
    dropped; when all colour channels are equal the first is returned unchanged (no
    rounding), otherwise the ITU-R 601 luma ``0.299 R + 0.587 G + 0.114 B`` is returned in
    the input dtype (integers rounded half up, computed exactly). With ``c == 2`` the data are taken as
    gray + alpha and channel 0 is returned.
    """
    if arr.ndim >= 3 and arr.shape[-1] in (3, 4):
        rgb = arr[..., :3]
        if np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 0], rgb[..., 2]):
            return np.ascontiguousarray(rgb[..., 0])
        if np.issubdtype(arr.dtype, np.integer):
            # Integer arithmetic: exact, so the result never depends on float summation order.
            c = rgb.astype(np.int64)
            scaled = 299 * c[..., 0] + 587 * c[..., 1] + 114 * c[..., 2]
            return np.floor_divide(scaled + 500, 1000).astype(arr.dtype)
        luma = 0.299 * rgb[..., 0].astype(np.float64) + 0.587 * rgb[..., 1] + 0.114 * rgb[..., 2]
        return luma.astype(arr.dtype)
    if arr.ndim >= 3 and arr.shape[-1] == 2:
        return np.ascontiguousarray(arr[..., 0])
    return arr


class Slicer:
    """Base of the picklable ``read_slices`` callables every reader hands out.

    Subclasses implement ``_read(z0, z1)``; this class checks the range, turns backend
    failures into :class:`ReadError` naming the file, and checks the result's shape and
    dtype so a damaged file cannot pass garbage downstream. Subclasses keep only plain
    attributes (paths, offsets, keys) so a volume can be sent to a worker process.
    """

    def __init__(self, path: Path | str, shape: tuple[int, int, int], dtype: np.dtype):
        self.path = str(path)
        self.shape = tuple(int(s) for s in shape)
        self.dtype = np.dtype(dtype)

    def _read(self, z0: int, z1: int) -> np.ndarray:
        raise NotImplementedError

    def __call__(self, z0: int, z1: int) -> np.ndarray:
        z0, z1 = int(z0), int(z1)
        if not 0 <= z0 < z1 <= self.shape[0]:
            raise ValueError(f"{self.path}: slice range {z0}:{z1} is outside 0:{self.shape[0]}")
        try:
            out = np.asarray(self._read(z0, z1))
        except ReadError:
            raise
        except Exception as exc:
            raise ReadError(
                self.path,
                f"reading slices {z0}:{z1} failed ({type(exc).__name__}: {exc}); the file may be truncated or corrupt",
            ) from exc
        expected = (z1 - z0,) + self.shape[1:]
        if out.shape != expected:
            raise ReadError(
                self.path,
                f"slices {z0}:{z1} decoded to shape {out.shape}, expected {expected}; "
                "the file may be truncated or corrupt",
            )
        if out.dtype != self.dtype:
            if not np.can_cast(out.dtype, self.dtype, casting="equiv"):
                raise ReadError(self.path, f"slices {z0}:{z1} decoded as {out.dtype}, expected {self.dtype}")
            out = out.astype(self.dtype)  # byte order only
        if not _fresh(out):
            out = np.array(out, order="C")  # detach from memory maps and read-only buffers
        return out


def _fresh(arr: np.ndarray) -> bool:
    """Whether ``arr`` is writable, C-contiguous memory of its own: it owns its data, or it is a
    view of all of a plain array that does (``arr[np.newaxis]`` of a freshly decoded plane),
    which needs no copy."""
    if not (arr.flags.writeable and arr.flags.c_contiguous):
        return False
    if arr.flags.owndata:
        return True
    base = arr.base
    return type(base) is np.ndarray and base.flags.owndata and base.nbytes == arr.nbytes


_NM_PER_UNIT = {
    "nm": 1.0,
    "nanometer": 1.0,
    "nanometre": 1.0,
    "um": 1e3,
    "µm": 1e3,
    "μm": 1e3,
    "micron": 1e3,
    "micrometer": 1e3,
    "micrometre": 1e3,
    "mm": 1e6,
    "millimeter": 1e6,
    "millimetre": 1e6,
    "cm": 1e7,
    "centimeter": 1e7,
    "centimetre": 1e7,
    "m": 1e9,
    "meter": 1e9,
    "metre": 1e9,
    "å": 0.1,
    "a": 0.1,
    "angstrom": 0.1,
    "ångström": 0.1,
    "ångstrom": 0.1,
    "pm": 1e-3,
    "picometer": 1e-3,
    "picometre": 1e-3,
}


def nm_per_unit(unit: object) -> float | None:
    """Nanometres per one ``unit`` (``"micron"`` -> 1000), or ``None`` if not a length.

    Accepts the spellings found in ImageJ (``micron``, ``\\u00B5m``), OME (``µm``, ``Å``)
    and UDUNITS (``micrometer``) metadata, singular or plural. ``"pixel"`` and empty
    strings give ``None`` (uncalibrated).
    """
    if not isinstance(unit, str):
        return None
    u = unit.strip().replace("\\u00B5", "µ").replace("\\u00b5", "µ").lower()
    if u in _NM_PER_UNIT:
        return _NM_PER_UNIT[u]
    if u.endswith("s") and u[:-1] in _NM_PER_UNIT and len(u) > 2:
        return _NM_PER_UNIT[u[:-1]]
    return None


def spacing_nm(values: tuple[float, ...], scale: float | None) -> tuple[float, float, float] | None:
    """``(z, y, x)`` in nm from spacings in one unit (``scale`` nm per unit).

    ``values`` is ``(y, x)`` or ``(z, y, x)``. Gives ``None`` when the unit is unknown or
    the lateral spacing is not a positive number; a missing or non-positive z is ``NaN``.
    """
    if scale is None:
        return None
    vals = [float(v) for v in values]
    if len(vals) == 2:
        vals = [NAN] + vals
    z, y, x = (v * scale for v in vals)
    if not (math.isfinite(y) and math.isfinite(x) and y > 0 and x > 0):
        return None
    if not (math.isfinite(z) and z > 0):
        z = NAN
    return (z, y, x)


def lateral_only(voxel: tuple[float, float, float] | None) -> tuple[float, float, float] | None:
    """``voxel`` with z set to ``NaN``: for stacks whose z is not spatial (time, tilt)."""
    return None if voxel is None else (NAN, voxel[1], voxel[2])

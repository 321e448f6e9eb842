"""MRC/CCP4 maps, tomograms and image stacks (``.mrc .map .rec .st .mrcs``) via mrcfile.

The header is validated strictly (``permissive=False``): a header mrcfile rejects is a
:class:`ReadError`. Pixel data are memory-mapped; ``read_slices`` maps the file and
copies only the requested sections, so opening never loads the data.

- Voxel size comes from the header (cell size / sampling, Ångström) and is divided by
  10 to give nm; a size of 0 means unknown (z alone unknown -> ``NaN``).
- The array is returned in file order (sections, rows, columns); when the header maps
  these to other axes than (z, y, x) (MAPC/MAPR/MAPS), the voxel size follows the
  mapping and a note says so.
- Mode 0 is signed int8 by the standard, but IMOD writes unsigned bytes and says so in
  its header stamp; such files are read as uint8.
- An image stack (ISPG 0) named ``.st``/``.mrcs`` is a tilt series or a set of
  particles, not a volume: ``xy_only`` is set and the z spacing is ``NaN``.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np

from cemcurate.common.lazy import lazy_import

from .base import NAN, ReadError, Slicer, Volume, lateral_only

mrcfile = lazy_import("mrcfile")

IMOD_STAMP = 1146047817  # "IMOD" as int32
_IMOD_OFFSET = 152  # imodStamp, then imodFlags (bit 0 set = bytes are signed)


def read_mrc(path: Path, dataset: str | None = None) -> list[Volume]:
    """One ``(z, y, x)`` volume from an MRC-family file; see the module docstring."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            mrc = mrcfile.mmap(path, mode="r", permissive=False)
        except ValueError as exc:
            raise ReadError(
                path,
                f"mrcfile rejected the header ({exc}); the file is not a valid MRC file, is "
                "truncated, or its header is wrong",
            ) from exc
    notes = [f"mrcfile: {w.message}"[:200] for w in caught]
    with mrc:
        data, header = mrc.data, mrc.header
        if data is None or not isinstance(data, np.memmap):
            raise ReadError(path, "MRC file holds no memory-mappable data (empty or packed 4-bit mode)")
        if np.iscomplexobj(data):
            raise ReadError(
                path,
                f"complex MRC data (mode {int(header.mode)}) is not image intensity; convert it to amplitudes first",
            )
        if data.ndim == 4:
            raise ReadError(
                path,
                f"4D MRC volume stack of shape {data.shape} is not supported; split it into one 3D file per volume",
            )
        shape = (1,) + data.shape if data.ndim == 2 else data.shape
        file_dtype = data.dtype
        header_bytes = header.tobytes()
        if int(header.mode) == 0 and _imod_unsigned(header_bytes, header.mode.dtype.byteorder):
            file_dtype = np.dtype(np.uint8)
            notes.append("mode 0 with IMOD unsigned-byte flag: read as uint8")
        offset = int(data.offset)
        voxel, vnotes = _voxel_size(header, mrc.voxel_size)
        image_stack = mrc.is_image_stack() if data.ndim == 3 else False
    xy_only = image_stack and path.suffix.lower() in (".st", ".mrcs")
    if image_stack and not xy_only:
        notes.append("header marks an image stack (ISPG 0); read as a volume because of the file extension")
    dtype = file_dtype.newbyteorder("=")
    slicer = _MrcSlicer(path, shape, dtype, offset, file_dtype.str)
    return [
        Volume(
            shape=shape,
            dtype=dtype,
            read_slices=slicer,
            reader="mrc",
            voxel_size=lateral_only(voxel) if xy_only else voxel,
            xy_only=xy_only,
            notes=notes + vnotes,
        )
    ]


def _imod_unsigned(header_bytes: bytes, byteorder: str) -> bool:
    order = ">" if byteorder == ">" else "<"
    stamp, flags = np.frombuffer(header_bytes, dtype=f"{order}i4", count=2, offset=_IMOD_OFFSET)
    return int(stamp) == IMOD_STAMP and not (int(flags) & 1)


def _voxel_size(header, voxel) -> tuple[tuple[float, float, float] | None, list[str]]:
    by_axis = (float(voxel.x), float(voxel.y), float(voxel.z))  # Å along X, Y, Z
    mapping = (int(header.maps), int(header.mapr), int(header.mapc))  # sections, rows, columns
    notes = []
    if sorted(mapping) != [1, 2, 3]:
        notes.append(f"invalid MAPS/MAPR/MAPC {mapping}; assumed (3, 2, 1)")
        mapping = (3, 2, 1)
    elif mapping != (3, 2, 1):
        notes.append(
            f"axes stored as (sections, rows, columns) = {'XYZ'[mapping[0] - 1]}, "
            f"{'XYZ'[mapping[1] - 1]}, {'XYZ'[mapping[2] - 1]}; volume kept in file order"
        )
    z, y, x = (by_axis[m - 1] / 10.0 for m in mapping)
    if not (np.isfinite(y) and np.isfinite(x) and y > 0 and x > 0):
        return None, notes
    return (z if np.isfinite(z) and z > 0 else NAN, y, x), notes


class _MrcSlicer(Slicer):
    def __init__(self, path, shape, dtype, offset: int, file_dtype: str):
        super().__init__(path, shape, dtype)
        self.offset, self.file_dtype = offset, file_dtype

    def _read(self, z0: int, z1: int) -> np.ndarray:
        data = np.memmap(self.path, dtype=np.dtype(self.file_dtype), mode="r", offset=self.offset, shape=self.shape)
        return np.array(data[z0:z1])

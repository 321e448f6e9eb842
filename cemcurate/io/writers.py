"""Writing volumes, each format readable back by :func:`cemcurate.io.open_file`.

``write_volume`` picks the format by suffix and writes atomically: a temporary sibling
(same folder, same suffix) is written and then renamed over the target, so a crash never
leaves a half-written file under the final name. Voxel sizes are ``(z, y, x)`` in nm and
are stored as each format expects:

- ``.tif/.tiff``: ImageJ hyperstack (uint8, uint16, int16, float32) with ``unit=nm``,
  X/YResolution and ``spacing``; other dtypes, and ``.ome.tif(f)``, as OME-TIFF with
  ``PhysicalSize*`` in nm.
- ``.nii/.nii.gz``: pixdim in millimetres (``xyzt_units = mm``), the unit most NIfTI
  tools assume. NIfTI cannot mark z as unknown, so a 3D array with a ``NaN`` z spacing
  is refused.
- ``.mrc/.map/.rec``: cell size in Å; uint8 is written as mode 0 with the IMOD
  unsigned-byte stamp (read back as uint8); int8, int16, uint16, float16, float32 as is.
- ``.zarr/.ome.zarr``: OME-Zarr 0.4 (zarr format 2), array ``"0"`` with a ``scale`` in
  nanometres; written into a temporary directory that is then renamed.
- ``.png``: 2D uint8/uint16 only; PNG has no reliable voxel size, so none is stored.

Boolean arrays are written as uint8 (0/1).
"""

from __future__ import annotations

import math
import os
import struct
import uuid
import warnings
from pathlib import Path

import numpy as np
from PIL import Image

from cemcurate.common.atomic import PublishOnExit, remove_path, replace_path
from cemcurate.common.lazy import lazy_import

from .formats import ZARR_SUFFIXES, suffix_of
from .mrc import IMOD_STAMP
from .ngff import NgffStore

mrcfile = lazy_import("mrcfile")
nibabel = lazy_import("nibabel")
tifffile = lazy_import("tifffile")
zarr = lazy_import("zarr")

WRITABLE_SUFFIXES = (
    ".tif",
    ".tiff",
    ".ome.tif",
    ".ome.tiff",
    ".nii",
    ".nii.gz",
    ".mrc",
    ".map",
    ".rec",
    ".zarr",
    ".ome.zarr",
    ".png",
)
_IMAGEJ_DTYPES = ("uint8", "uint16", "int16", "float32")
_MRC_MODES = {"uint8": 0, "int8": 0, "int16": 1, "float32": 2, "uint16": 6, "float16": 12}
_SLAB = 16  # slices copied at a time when streaming from a memory map


def write_volume(path: str | os.PathLike, array, voxel_size: tuple[float, float, float] | None = None) -> Path:
    """Write ``array`` to ``path`` in the format its suffix names (see the module docstring).

    Args:
        path: target file (or ``.zarr`` directory); its folder is created if missing.
        array: ``(z, y, x)`` or ``(y, x)`` array-like (a ``np.memmap`` is streamed in
            slabs by the tif, mrc and zarr writers rather than loaded at once).
        voxel_size: ``(z, y, x)`` in nm; z may be ``NaN`` (unknown). ``None``: not stored.

    Returns:
        ``path`` as a :class:`Path`.

    Raises:
        ValueError: unsupported suffix, dimensionality, dtype or voxel size for the format.
    """
    path = Path(path)
    arr = _as_volume(array)
    voxel = _check_voxel(voxel_size)
    suffix = suffix_of(path)
    writer = _WRITERS.get(suffix)
    if writer is None:
        raise ValueError(f"{path}: cannot write '{suffix or path.name}'; writable: {' '.join(WRITABLE_SUFFIXES)}")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_sibling(path, suffix, "partial")
    try:
        writer(tmp, arr, voxel)
        replace_path(tmp, path)
    finally:
        remove_path(tmp)
    return path


def _as_volume(array) -> np.ndarray:
    arr = array if isinstance(array, np.ndarray) else np.asarray(array)
    if arr.ndim == 2:
        arr = arr[np.newaxis]
    if arr.ndim != 3:
        raise ValueError(f"expected a (z, y, x) or (y, x) array, got shape {arr.shape}")
    if arr.dtype == np.bool_:
        arr = arr.view(np.uint8)
    return arr


def _check_voxel(voxel_size) -> tuple[float, float, float] | None:
    if voxel_size is None:
        return None
    vals = tuple(float(v) for v in voxel_size)
    if len(vals) != 3 or not all(math.isfinite(v) and v > 0 for v in vals[1:]):
        raise ValueError(f"voxel_size must be (z, y, x) in nm with positive y, x (z may be NaN), got {voxel_size!r}")
    z = vals[0] if math.isfinite(vals[0]) and vals[0] > 0 else math.nan
    return (z, vals[1], vals[2])


def _slabs(n: int):
    for z0 in range(0, n, _SLAB):
        yield z0, min(n, z0 + _SLAB)


def _write_tif(tmp: Path, arr: np.ndarray, voxel) -> None:
    pages = (np.ascontiguousarray(arr[i]) for i in range(arr.shape[0]))
    common = dict(shape=arr.shape, dtype=arr.dtype)
    if arr.dtype.name in _IMAGEJ_DTYPES and suffix_of(tmp) not in (".ome.tif", ".ome.tiff"):
        metadata: dict = {"axes": "ZYX"}
        resolution = None
        if voxel is not None:
            metadata["unit"] = "nm"
            resolution = (1.0 / voxel[2], 1.0 / voxel[1])
            if not math.isnan(voxel[0]):
                metadata["spacing"] = voxel[0]
        tifffile.imwrite(tmp, pages, imagej=True, resolution=resolution, metadata=metadata, **common)
    else:
        metadata = {"axes": "ZYX"}
        if voxel is not None:
            for axis, value in zip("ZYX", voxel):
                if not math.isnan(value):
                    metadata[f"PhysicalSize{axis}"] = value
                    metadata[f"PhysicalSize{axis}Unit"] = "nm"
        tifffile.imwrite(tmp, pages, ome=True, metadata=metadata, **common)


def _write_nifti(tmp: Path, arr: np.ndarray, voxel) -> None:
    header = nibabel.Nifti1Header()
    try:
        header.set_data_dtype(arr.dtype)
    except Exception as exc:
        raise ValueError(f"NIfTI cannot store dtype {arr.dtype}") from exc
    header.set_data_shape(arr.shape[::-1])
    if voxel is not None:
        z, y, x = voxel
        if math.isnan(z):
            if arr.shape[0] > 1:
                raise ValueError(
                    "NIfTI cannot mark the z spacing as unknown; pass a z voxel size or write tif/mrc/zarr"
                )
            z = x  # one slice: z spacing is meaningless and read back as NaN
        header.set_zooms((x * 1e-6, y * 1e-6, z * 1e-6))  # nm -> mm
        header.set_xyzt_units("mm")
    # NIfTI is (x, y, z) in Fortran order: the transposed view has exactly that memory layout.
    nibabel.save(nibabel.Nifti1Image(arr.transpose(2, 1, 0), None, header=header), str(tmp))


def _write_mrc(tmp: Path, arr: np.ndarray, voxel) -> None:
    mode = _MRC_MODES.get(arr.dtype.name)
    if mode is None:
        raise ValueError(f"MRC cannot store dtype {arr.dtype}; use one of {', '.join(_MRC_MODES)}")
    lo, hi, total, total_sq = math.inf, -math.inf, 0.0, 0.0
    with mrcfile.new_mmap(str(tmp), shape=arr.shape, mrc_mode=mode, overwrite=True) as mrc:
        for z0, z1 in _slabs(arr.shape[0]):
            block = np.asarray(arr[z0:z1])
            mrc.data[z0:z1] = block.view(np.int8) if arr.dtype == np.uint8 else block
            lo, hi = min(lo, float(block.min())), max(hi, float(block.max()))
            total += float(block.sum(dtype=np.float64))
            total_sq += float(np.square(block, dtype=np.float64).sum())
        n = arr.size
        mean = total / n
        mrc.header.dmin, mrc.header.dmax, mrc.header.dmean = lo, hi, mean
        mrc.header.rms = math.sqrt(max(0.0, total_sq / n - mean * mean))
        if voxel is not None:
            z, y, x = voxel
            mrc.voxel_size = (x * 10.0, y * 10.0, 0.0 if math.isnan(z) else z * 10.0)  # nm -> Å, (x, y, z)
    if arr.dtype == np.uint8:
        with open(tmp, "r+b") as fh:
            fh.seek(152)
            fh.write(struct.pack("<ii", IMOD_STAMP, 0))  # IMOD stamp, flags 0: bytes are unsigned


def _write_zarr(tmp: Path, arr: np.ndarray, voxel) -> None:
    with NgffStore(tmp) as store:
        out = store.add_image("", arr.shape, arr.dtype, voxel_size=voxel)
        for z0, z1 in _slabs(arr.shape[0]):
            out[z0:z1] = np.asarray(arr[z0:z1])


def _write_png(tmp: Path, arr: np.ndarray, voxel) -> None:
    if arr.shape[0] != 1:
        raise ValueError(f"PNG holds one 2D image, got {arr.shape[0]} slices; write tif, mrc, nii or zarr")
    if arr.dtype.name not in ("uint8", "uint16"):
        raise ValueError(f"PNG stores uint8 or uint16, got {arr.dtype}")
    if voxel is not None:
        warnings.warn(f"{tmp.name}: PNG stores no voxel size; {voxel} nm is not saved", stacklevel=3)
    Image.fromarray(np.ascontiguousarray(arr[0])).save(tmp, format="PNG")


_WRITERS = {
    ".tif": _write_tif,
    ".tiff": _write_tif,
    ".ome.tif": _write_tif,
    ".ome.tiff": _write_tif,
    ".nii": _write_nifti,
    ".nii.gz": _write_nifti,
    ".mrc": _write_mrc,
    ".map": _write_mrc,
    ".rec": _write_mrc,
    ".zarr": _write_zarr,
    ".ome.zarr": _write_zarr,
    ".png": _write_png,
}


def _temp_sibling(path: Path, suffix: str, tag: str) -> Path:
    # Same folder (so the final rename is atomic) and same suffix (nibabel picks gzip by it).
    stem = path.name[: len(path.name) - len(suffix)] if suffix else path.name
    return path.with_name(f".{stem}.{uuid.uuid4().hex[:8]}.{tag}{path.name[len(stem) :]}")


class ChunkedOutput(PublishOnExit):
    """A volume written piece by piece, then published under its final name.

    Attributes:
        path: the final file.
        array: writable ``(z, y, x)`` array-like (zarr array or ``np.memmap``); assign
            slabs, e.g. ``out.array[z0:z1] = block``.

    ``.zarr`` is written into a temporary OME-Zarr directory (an :class:`~cemcurate.io.ngff.NgffStore`
    whose root image has ``levels`` pyramid levels, downsampled by ``method``), ``.npy``/``.raw`` into a
    temporary memory map (raw: C order, no header), and every other writable format into
    a temporary ``.npy`` staging map converted by :func:`write_volume` in
    :meth:`finalize`. Use as a context manager: a clean exit finalises, an exception
    discards the temporary data.
    """

    def __init__(self, path: str | os.PathLike, shape, dtype, chunks=None, voxel_size=None, levels=1, method="mean"):
        self.path = Path(path)
        self.shape = tuple(int(s) for s in shape)
        self.dtype = np.dtype(dtype)
        self.voxel_size = _check_voxel(voxel_size)
        if len(self.shape) != 3:
            raise ValueError(f"{self.path}: shape must be (z, y, x), got {self.shape}")
        suffix = suffix_of(self.path)
        self._suffix = suffix
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if suffix in ZARR_SUFFIXES:
            self._store = NgffStore(self.path)
            self._tmp = self._store.tmp
            self.array = self._store.add_image("", self.shape, self.dtype, chunks, self.voxel_size, levels, method)
        elif suffix == ".npy":
            self._tmp = _temp_sibling(self.path, suffix, "partial")
            self.array = np.lib.format.open_memmap(self._tmp, mode="w+", dtype=self.dtype, shape=self.shape)
        elif suffix == ".raw":
            self._tmp = _temp_sibling(self.path, suffix, "partial")
            self.array = np.memmap(self._tmp, mode="w+", dtype=self.dtype, shape=self.shape)
        elif suffix in _WRITERS:
            self._tmp = self.path.with_name(f".{self.path.name}.{uuid.uuid4().hex[:8]}.staging.npy")
            self.array = np.lib.format.open_memmap(self._tmp, mode="w+", dtype=self.dtype, shape=self.shape)
        else:
            raise ValueError(
                f"{self.path}: cannot write '{suffix}'; use .zarr, .npy, .raw or one of " + " ".join(WRITABLE_SUFFIXES)
            )
        self.done = False

    def finalize(self) -> Path:
        """Publish the data under :attr:`path` (atomically) and return it."""
        if self.done:
            return self.path
        if isinstance(self.array, np.memmap):
            self.array.flush()
        try:
            if self._suffix in ZARR_SUFFIXES:
                self.array = None
                self._store.finalize()
            elif self._suffix in (".npy", ".raw"):
                self.array = None
                replace_path(self._tmp, self.path)
            else:
                write_volume(self.path, self.array, self.voxel_size)
        finally:
            self.array = None
            remove_path(self._tmp)
        self.done = True
        return self.path

    def discard(self) -> None:
        """Drop the temporary data; :attr:`path` is left untouched."""
        self.array = None
        remove_path(self._tmp)
        self.done = True


def open_chunked_output(
    path: str | os.PathLike,
    shape: tuple[int, int, int],
    dtype,
    chunks: tuple[int, int, int] | None = None,
    voxel_size: tuple[float, float, float] | None = None,
    levels: int | None = 1,
    method: str = "mean",
) -> ChunkedOutput:
    """Start a ``(z, y, x)`` output larger than memory; see :class:`ChunkedOutput`.

    Args:
        path: final file: ``.zarr`` (chunked OME-Zarr, ``chunks`` applies), ``.npy``,
            ``.raw``, or any :data:`WRITABLE_SUFFIXES` format (staged, converted at the end).
        shape: ``(z, y, x)``.
        dtype: sample type.
        chunks: zarr chunk shape; default ``(16, 512, 512)`` clipped to ``shape``.
        voxel_size: ``(z, y, x)`` nm stored with the result where the format allows.
        levels: ``.zarr`` only: resolution levels (``None``: automatic, see
            :func:`cemcurate.io.ngff.pyramid_factors`); other formats hold level 0 only.
        method: ``.zarr`` pyramid downsampling, ``mean`` or ``nearest`` (labels).
    """
    return ChunkedOutput(path, shape, dtype, chunks, voxel_size, levels, method)

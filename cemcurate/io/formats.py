"""Which reader handles which file: dispatch by (case-insensitive) suffix."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

from . import hdf5, images, mrc, nifti, tiff, video, zarrfile
from .base import ReadError, Volume

# Longest first so ".ome.tif" wins over ".tif" and ".nii.gz" over ".gz".
_COMPOUND = (".ome.tiff", ".ome.tif", ".ome.zarr", ".nii.gz")
ZARR_SUFFIXES = (".zarr", ".ome.zarr")  # directory stores (zarr, OME-Zarr)

# One reader per format. Each reader module imports its backend (tifffile, h5py, zarr, ...)
# with cemcurate.common.lazy.lazy_import, so importing cemcurate.io stays cheap and a missing
# optional backend only breaks its own formats.
READERS: dict[str, Callable[[Path, str | None], list[Volume]]] = {
    ".png": images.read_image,
    ".jpg": images.read_image,
    ".jpeg": images.read_image,
    ".bmp": images.read_image,
    ".tif": tiff.read_tiff,
    ".tiff": tiff.read_tiff,
    ".ome.tif": tiff.read_tiff,
    ".ome.tiff": tiff.read_tiff,
    ".mrc": mrc.read_mrc,
    ".map": mrc.read_mrc,
    ".rec": mrc.read_mrc,
    ".st": mrc.read_mrc,
    ".mrcs": mrc.read_mrc,
    ".nii": nifti.read_nifti,
    ".nii.gz": nifti.read_nifti,
    ".h5": hdf5.read_hdf5,
    ".hdf5": hdf5.read_hdf5,
    ".hdf": hdf5.read_hdf5,
    ".zarr": zarrfile.read_zarr,
    ".ome.zarr": zarrfile.read_zarr,
    ".avi": video.read_video,
    ".mp4": video.read_video,
    ".mov": video.read_video,
    ".mkv": video.read_video,
}

SUPPORTED_SUFFIXES: tuple[str, ...] = tuple(READERS)


def suffix_of(path: str | os.PathLike) -> str:
    """The lower-case format suffix of ``path``, compound ones included (``".nii.gz"``)."""
    name = Path(path).name.lower()
    for compound in _COMPOUND:
        if name.endswith(compound) and len(name) > len(compound):
            return compound
    return Path(name).suffix


def is_supported(path: str | os.PathLike) -> bool:
    """Whether :func:`open_file` has a reader for ``path``.

    Case-insensitive. A ``*.zarr`` / ``*.ome.zarr`` path counts only as a directory (or not
    yet existing); any other supported suffix only as a file (or not yet existing).
    """
    suffix = suffix_of(path)
    if suffix not in READERS:
        return False
    p = Path(path)
    if suffix in ZARR_SUFFIXES:
        return not p.exists() or p.is_dir()
    return not p.is_dir()


def open_file(path: str | os.PathLike, dataset: str | None = None) -> list[Volume]:
    """Open one file (or zarr directory) as a list of lazy volumes.

    Args:
        path: the file. Its suffix picks the reader (see ``SUPPORTED_SUFFIXES``).
        dataset: select one volume by its ``Volume.dataset`` key (an HDF5/zarr key such as
            ``"stack"``, or a hyperstack split such as ``"c1"``); a key without a split
            suffix selects all splits of that array.

    Returns:
        One or more :class:`Volume`, each ``(z, y, x)``; only metadata have been read.

    Raises:
        ReadError: missing, empty, unsupported or damaged file, or ``dataset`` not found
            (the message lists the available keys).
    """
    path = Path(path)
    if not path.exists():
        raise ReadError(path, "file not found")
    suffix = suffix_of(path)
    if path.is_dir():
        if suffix not in ZARR_SUFFIXES:
            raise ReadError(
                path,
                "is a directory; only '*.zarr' directories are read as one source "
                "(use open_series for a folder of 2D images)",
            )
    elif path.stat().st_size == 0:
        raise ReadError(path, "file is empty (0 bytes); it was probably not copied or written completely")
    elif suffix in ZARR_SUFFIXES:
        raise ReadError(path, "a zarr store must be a directory, but this is a file (zipped stores are not read)")
    reader = READERS.get(suffix)
    if reader is None:
        hint = " (decompress it first, e.g. with gunzip)" if suffix == ".gz" else ""
        raise ReadError(
            path, f"unknown file type '{suffix or path.name}'{hint}; supported: " + " ".join(SUPPORTED_SUFFIXES)
        )
    try:
        volumes = reader(path, dataset)
    except ReadError:
        raise
    except Exception as exc:
        raise ReadError(
            path,
            f"{suffix} reader failed ({type(exc).__name__}: {exc}); the file may be "
            "corrupt or of another format than its name says",
        ) from exc
    if dataset is not None:
        key = dataset.strip("/")
        chosen = [v for v in volumes if v.dataset is not None and (v.dataset == key or v.dataset.startswith(key + ":"))]
        if not chosen:
            available = ", ".join(repr(v.dataset) for v in volumes if v.dataset) or "none (a single volume)"
            raise ReadError(path, f"dataset {dataset!r} not found; available: {available}")
        volumes = chosen
    for v in volumes:
        v.path = str(path)
    return volumes

"""Which reader handles which file: dispatch by (case-insensitive) suffix."""

from __future__ import annotations

import importlib
import os
from pathlib import Path
from typing import Callable

from .base import ReadError, Volume

# Longest first so ".ome.tif" wins over ".tif" and ".nii.gz" over ".gz".
_COMPOUND = (".ome.tiff", ".ome.tif", ".ome.zarr", ".nii.gz")
_DIRECTORY_SUFFIXES = (".zarr", ".ome.zarr")


def _lazy(module: str, function: str) -> Callable[[Path, str | None], list[Volume]]:
    """A reader that imports its backend module on first call."""

    def read(path: Path, dataset: str | None) -> list[Volume]:
        return getattr(importlib.import_module(module, __package__), function)(path, dataset)

    return read


_image, _tiff, _mrc = _lazy(".images", "read_image"), _lazy(".tiff", "read_tiff"), _lazy(".mrc", "read_mrc")
_nifti, _hdf5 = _lazy(".nifti", "read_nifti"), _lazy(".hdf5", "read_hdf5")
_zarr, _video = _lazy(".zarrfile", "read_zarr"), _lazy(".video", "read_video")

# Backends are imported on first use: importing cemcurate.io stays cheap, and a missing
# optional backend only breaks its own formats.
READERS: dict[str, Callable[[Path, str | None], list[Volume]]] = {
    ".png": _image, ".jpg": _image, ".jpeg": _image, ".bmp": _image,
    ".tif": _tiff, ".tiff": _tiff, ".ome.tif": _tiff, ".ome.tiff": _tiff,
    ".mrc": _mrc, ".map": _mrc, ".rec": _mrc, ".st": _mrc, ".mrcs": _mrc,
    ".nii": _nifti, ".nii.gz": _nifti,
    ".h5": _hdf5, ".hdf5": _hdf5, ".hdf": _hdf5,
    ".zarr": _zarr, ".ome.zarr": _zarr,
    ".avi": _video, ".mp4": _video, ".mov": _video, ".mkv": _video,
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
    if suffix in _DIRECTORY_SUFFIXES:
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
        if suffix not in _DIRECTORY_SUFFIXES:
            raise ReadError(path, "is a directory; only '*.zarr' directories are read as one source "
                            "(use open_series for a folder of 2D images)")
    elif path.stat().st_size == 0:
        raise ReadError(path, "file is empty (0 bytes); it was probably not copied or written completely")
    elif suffix in _DIRECTORY_SUFFIXES:
        raise ReadError(path, "a zarr store must be a directory, but this is a file (zipped stores are not read)")
    reader = READERS.get(suffix)
    if reader is None:
        hint = " (decompress it first, e.g. with gunzip)" if suffix == ".gz" else ""
        raise ReadError(path, f"unknown file type '{suffix or path.name}'{hint}; supported: "
                        + " ".join(SUPPORTED_SUFFIXES))
    try:
        volumes = reader(path, dataset)
    except ReadError:
        raise
    except Exception as exc:
        raise ReadError(path, f"{suffix} reader failed ({type(exc).__name__}: {exc}); the file may be "
                        "corrupt or of another format than its name says") from exc
    if dataset is not None:
        key = dataset.strip("/")
        chosen = [v for v in volumes if v.dataset is not None
                  and (v.dataset == key or v.dataset.startswith(key + ":"))]
        if not chosen:
            available = ", ".join(repr(v.dataset) for v in volumes if v.dataset) or "none (a single volume)"
            raise ReadError(path, f"dataset {dataset!r} not found; available: {available}")
        volumes = chosen
    for v in volumes:
        v.path = str(path)
    return volumes

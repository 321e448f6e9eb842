"""File edge of ``finetune``: globs to paths, files to arrays, arrays to files.

Reading goes through :mod:`cemcurate.io` (every format the curation readers read);
intensities that are not uint8 are windowed to 0-255 with the 0.1/99.9 percentiles of a
sample of slices (:mod:`cemcurate.standardize`), the same mapping the curation step uses.

An input spec is one of: a file (``.tif``, ``.mrc``, ``.nii.gz``, ``.h5``, ...), a
``.zarr`` folder, a folder of 2D images, or a glob matching 2D images (read as a stack,
naturally sorted). ``PATH::KEY`` selects a dataset inside an HDF5/zarr container.
"""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cemcurate.io import ReadError, Volume, natural_sort_key, open_file, open_series
from cemcurate.standardize import IntensityWindow, compute_window, sample_slice_indices

_GLOB_CHARS = set("*?[")


def _split_dataset(spec: str) -> tuple[str, str | None]:
    path, sep, key = str(spec).partition("::")
    return path, (key or None) if sep else None


def expand_patterns(
    patterns: list[str] | str, base: str | os.PathLike | None = None, what: str = "files"
) -> list[Path]:
    """Files matched by globs (or plain paths), in pattern order, each naturally sorted.

    Args:
        patterns: globs such as ``raw/*.tif``; relative ones are resolved against ``base``
            (default: the working directory). ``**`` recurses.
        what: name used in the error message (e.g. ``"--images"``).

    Raises:
        ValueError: a pattern matches nothing (names the pattern and the folder searched).
    """
    if isinstance(patterns, str):
        patterns = [patterns]
    base_dir = Path(base) if base else Path.cwd()
    out: list[Path] = []
    for pattern in patterns:
        path_part, key = _split_dataset(pattern)
        full = Path(path_part) if Path(path_part).is_absolute() else base_dir / path_part
        if _GLOB_CHARS & set(path_part):
            found = sorted((Path(p) for p in glob.glob(str(full), recursive=True)), key=natural_sort_key)
        else:
            found = [full] if full.exists() else []
        if not found:
            raise ValueError(f"{what}: {pattern!r} matches no file (searched in {full.parent})")
        out += [Path(f"{p}::{key}") if key else p for p in found]
    return out


def open_volume(path: str | os.PathLike) -> Volume:
    """The single volume in a file (``PATH::KEY`` picks one of several), lazily read."""
    path_str, key = _split_dataset(str(path))
    volumes = open_file(path_str, dataset=key)
    if len(volumes) != 1:
        keys = ", ".join(repr(v.dataset) for v in volumes)
        raise ReadError(path_str, f"holds {len(volumes)} volumes ({keys}); pick one with PATH::KEY")
    return volumes[0]


def intensity_window(vol: Volume) -> IntensityWindow:
    """The 0-255 window for a volume (pass-through for uint8), from up to 32 spread slices."""
    if vol.dtype == np.uint8:
        return IntensityWindow(None, None)
    idx = sample_slice_indices(vol.shape[0])
    sample = np.stack([vol.read_slices(int(i), int(i) + 1)[0] for i in idx])
    return compute_window(sample)


def read_array(path: str | os.PathLike) -> np.ndarray:
    """Whole volume ``(z, y, x)`` in its native dtype (a 2D image has ``z == 1``)."""
    vol = open_volume(path)
    if 0 in vol.shape:
        raise ReadError(path, f"is empty (shape {vol.shape})")
    return vol.read_slices(0, vol.shape[0])


def read_uint8(path: str | os.PathLike) -> np.ndarray:
    """Whole volume ``(z, y, x)`` as uint8 (windowed if it is not uint8 already)."""
    vol = open_volume(path)
    if 0 in vol.shape:
        raise ReadError(path, f"is empty (shape {vol.shape})")
    return intensity_window(vol).apply(vol.read_slices(0, vol.shape[0]))


@dataclass
class InputVolume:
    """A prediction input: a lazily read volume plus its 0-255 window.

    ``read_unit(z0, z1)`` returns ``float32[(z1 - z0), y, x]`` in [0, 1], the model's input.
    """

    volume: Volume
    window: IntensityWindow
    name: str

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.volume.shape

    @property
    def voxel_size(self) -> tuple[float, float, float] | None:
        return self.volume.voxel_size

    def read_uint8(self, z0: int, z1: int) -> np.ndarray:
        return self.window.apply(self.volume.read_slices(z0, z1))

    def read_unit(self, z0: int, z1: int) -> np.ndarray:
        return self.read_uint8(z0, z1).astype(np.float32) / np.float32(255.0)


def input_files(spec: str | os.PathLike) -> list[Path]:
    """The files of an input spec (see the module docstring): a folder's files in natural order
    (hidden ones left out), or what a file path or glob matches.

    Raises:
        ValueError: an empty folder, or a pattern that matches nothing.
    """
    path_part, _ = _split_dataset(str(spec))
    p = Path(path_part)
    if p.is_dir() and not str(p).lower().rstrip("/").endswith(".zarr"):
        paths = sorted((q for q in p.iterdir() if q.is_file() and not q.name.startswith(".")), key=natural_sort_key)
        if not paths:
            raise ValueError(f"{p}: folder holds no image files")
        return paths
    return expand_patterns([str(spec)], what="input")


def open_input(spec: str | os.PathLike | list[Path]) -> InputVolume:
    """Open a prediction/evaluation input (see the module docstring) as one volume.

    Raises:
        ValueError / ReadError: nothing matches, files of different shapes, empty volume.
    """
    if isinstance(spec, list):
        paths, name = spec, str(spec[0].parent) if spec else "inputs"
    else:
        paths, name = input_files(spec), str(spec)
    if not paths:
        raise ValueError("no input files")
    vol = open_volume(paths[0]) if len(paths) == 1 else open_series(paths)
    if 0 in vol.shape:
        raise ReadError(paths[0], f"is empty (shape {vol.shape})")
    return InputVolume(vol, intensity_window(vol), name)

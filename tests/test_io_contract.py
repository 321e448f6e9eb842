"""One contract, every reader: each suffix of ``cemcurate.io.formats.READERS`` gets the same test.

A crop of real VNC ssTEM slices (../shared/data) is written in the suffix's format, with
our writers where they cover it and with the format's own library otherwise; ``open_file``
must give the (z, y, x) shape, the written pixels (exactly for lossless formats, closely
for JPEG and H.264), the voxel size where the format stores one, and a ``ReadError`` that
names the file when the file is empty or cut short. A reader registered without an entry
in ``CASES`` fails the test, so no format is added untested.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import h5py
import imageio.v3 as iio
import mrcfile
import numpy as np
import pytest
import tifffile
from PIL import Image

from cemcurate.io import ReadError, close_cached_files, open_file, write_volume
from cemcurate.io.formats import READERS

VOXEL = (50.0, 4.6, 4.6)  # (z, y, x) nm of the VNC stack (data README)
NAN = float("nan")


def _write(path: Path, data: np.ndarray) -> None:
    write_volume(path, data, voxel_size=VOXEL)


def _write_2d(path: Path, data: np.ndarray) -> None:
    write_volume(path, data[0])


def _pillow(quality: int | None = None) -> Callable[[Path, np.ndarray], None]:
    def write(path: Path, data: np.ndarray) -> None:
        Image.fromarray(data[0]).save(path, **({} if quality is None else {"quality": quality}))

    return write


def _mrc_image_stack(path: Path, data: np.ndarray) -> None:
    # A tilt series / particle stack: ISPG 0, read as xy-only with an unknown z spacing. Our
    # writer stores uint8 with the IMOD unsigned stamp; mrcfile turns the volume into a stack.
    volume = write_volume(path.with_suffix(".mrc"), data, voxel_size=VOXEL)
    with mrcfile.open(volume, mode="r+") as mrc:
        mrc.set_image_stack()
    volume.rename(path)


def _hdf5(path: Path, data: np.ndarray) -> None:
    with h5py.File(path, "w") as f:
        f.create_dataset("raw", data=data, chunks=(2, 48, 64), compression="gzip")
        f["raw"].attrs["element_size_um"] = [v / 1000 for v in VOXEL]


def _video(codec: str) -> Callable[[Path, np.ndarray], None]:
    def write(path: Path, data: np.ndarray) -> None:
        options = {"out_pixel_format": "gray"} if codec == "ffv1" else {}
        iio.imwrite(path, data, plugin="pyav", codec=codec, fps=5, in_pixel_format="gray", **options)

    return write


@dataclass(frozen=True)
class Case:
    """How to write a suffix and what reading it back must give."""

    write: Callable[[Path, np.ndarray], None]
    planar: bool = False  # one 2D image: only the first slice is written
    tolerance: float = 0.0  # mean absolute error allowed (lossy codecs)
    voxel: tuple[float, float, float] | None = None  # None: the format stores no voxel size
    xy_only: bool = False
    # Why a file cut short still reads without error, where the format gives the reader no way to
    # tell (a limit documented in the README's Readers section); None: it must raise ReadError.
    cut_short_reads: str | None = None


LOSSY_IMAGE = Case(_pillow(quality=95), planar=True, tolerance=3.0)
LOSSLESS_VIDEO = Case(_video("ffv1"), xy_only=True)
UNCOUNTED = "no frame count in the header: the frames left are counted, a shorter video reads fine"
ZARR_CHUNK = "numcodecs decodes a cut-short chunk without error (part of it comes back as zeros)"
LOSSY_VIDEO = Case(_video("libx264"), tolerance=6.0, xy_only=True)

CASES: dict[str, Case] = {
    ".png": Case(_write_2d, planar=True),
    ".bmp": Case(_pillow(), planar=True),
    ".jpg": LOSSY_IMAGE,
    ".jpeg": LOSSY_IMAGE,
    **{s: Case(_write, voxel=VOXEL) for s in (".tif", ".tiff", ".ome.tif", ".ome.tiff")},
    **{s: Case(_write, voxel=VOXEL) for s in (".mrc", ".map", ".rec")},
    ".st": Case(_mrc_image_stack, voxel=(NAN, *VOXEL[1:]), xy_only=True),
    ".mrcs": Case(_mrc_image_stack, voxel=(NAN, *VOXEL[1:]), xy_only=True),
    ".nii": Case(_write, voxel=VOXEL),
    ".nii.gz": Case(_write, voxel=VOXEL),
    **{s: Case(_hdf5, voxel=VOXEL) for s in (".h5", ".hdf5", ".hdf")},
    ".zarr": Case(_write, voxel=VOXEL, cut_short_reads=ZARR_CHUNK),
    ".ome.zarr": Case(_write, voxel=VOXEL, cut_short_reads=ZARR_CHUNK),
    ".avi": LOSSLESS_VIDEO,
    ".mkv": Case(_video("ffv1"), xy_only=True, cut_short_reads=UNCOUNTED),
    ".mp4": LOSSY_VIDEO,
    ".mov": LOSSY_VIDEO,
}


@pytest.fixture(autouse=True)
def no_open_handles():
    """Close the readers' cached handles after each case. A video decoder left open here would be
    inherited by the worker processes a later test forks, and freeing it there deadlocks FFmpeg."""
    yield
    close_cached_files()


@pytest.fixture(scope="module")
def vnc_crop(data_root) -> np.ndarray:
    """(8, 96, 128) uint8: the same crop of eight real VNC ssTEM sections, read with tifffile."""
    paths = sorted((data_root / "drosophila_vnc_gerhard/stack1/raw").glob("*.tif"))[:8]
    if len(paths) != 8:
        pytest.skip("VNC stack1/raw incomplete")
    return np.stack([tifffile.imread(p)[200:296, 300:428] for p in paths])


def _cut_short(path: Path) -> Path:
    """Keep the first half of the file's bytes; for a zarr directory, of its largest chunk."""
    target = max((p for p in path.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size) if path.is_dir() else path
    data = target.read_bytes()
    target.write_bytes(data[: len(data) // 2])
    return path


@pytest.mark.parametrize("suffix", sorted(READERS))
def test_reader_contract(suffix, vnc_crop, tmp_path):
    case = CASES.get(suffix)
    assert case is not None, f"reader for {suffix!r} has no contract case: add one to CASES"
    data = vnc_crop[:1] if case.planar else vnc_crop
    path = tmp_path / f"crop{suffix}"
    case.write(path, data)

    [vol] = open_file(path)
    assert vol.shape == data.shape and vol.dtype == np.uint8
    assert vol.path == str(path) and vol.xy_only == case.xy_only
    whole = vol.read_slices(0, vol.shape[0])
    if case.tolerance:
        assert np.abs(whole.astype(np.int64) - data).mean() < case.tolerance
    else:
        np.testing.assert_array_equal(whole, data)
    n = vol.shape[0]
    pieces = [vol.read_slices(a, b) for a, b in ((n // 2, n), (0, n // 2)) if a < b]  # out of order
    np.testing.assert_array_equal(np.concatenate(pieces[::-1]), whole)
    if case.voxel is None:
        assert vol.voxel_size is None
    else:
        expected = case.voxel if n > 1 else (NAN, *case.voxel[1:])
        assert vol.voxel_size[1:] == pytest.approx(expected[1:], rel=1e-6)
        if math.isnan(expected[0]):
            assert math.isnan(vol.voxel_size[0])
        else:
            assert vol.voxel_size[0] == pytest.approx(expected[0])

    empty = tmp_path / f"empty{suffix}"
    empty.mkdir() if path.is_dir() else empty.write_bytes(b"")
    with pytest.raises(ReadError) as err:
        open_file(empty)
    assert err.value.path == str(empty) and str(err.value).startswith(f"{empty}: ")

    try:
        for v in open_file(_cut_short(path)):  # opening may pass (header intact); reading must not
            v.read_slices(0, v.shape[0])
    except ReadError as cut:
        assert cut.path == str(path) and str(cut).startswith(f"{path}: ")
    else:
        # Only the documented limits of a format (README, Readers) may read a damaged file quietly.
        assert case.cut_short_reads is not None, f"{path.name} cut short was read without a ReadError"

"""TIFF pages decoded one by one by tifffile, straight into the result (issue 13, "Speed").

Compressed, tiled and strip-scattered TIFFs whose pages each hold one plane are read page
by page (no zarr view); the result must be what ``tifffile.imread`` gives, arranged as
``(z, y, x)``, for every layout the reader splits (ImageJ hyperstacks, RGB pages, big-endian).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tifffile
from conftest import REPO, require

from cemcurate.io import open_file
from cemcurate.io.base import Slicer

RNG = np.random.default_rng(0)
VOL8 = RNG.integers(0, 256, (5, 70, 90), dtype=np.uint8)
VOL16 = RNG.integers(0, 60000, (5, 70, 90), dtype=np.uint16)

# name: (array written, tifffile.imwrite options, the (z, y, x) volumes expected)
CASES = {
    "lzw": (VOL8, {"compression": "lzw"}, [VOL8]),
    "lzw, 7-row strips": (VOL8, {"compression": "lzw", "rowsperstrip": 7}, [VOL8]),
    "zlib uint16": (VOL16, {"compression": "zlib"}, [VOL16]),
    "zlib uint16 big-endian": (VOL16, {"compression": "zlib", "byteorder": ">"}, [VOL16]),
    "tiled zlib": (VOL8, {"tile": (32, 32), "compression": "zlib"}, [VOL8]),
    "tiled uncompressed": (VOL8, {"tile": (32, 32)}, [VOL8]),
    "one lzw page": (VOL8[0], {"compression": "lzw"}, [VOL8[:1]]),
}
HYPER = RNG.integers(0, 256, (2, 4, 3, 30, 40), dtype=np.uint8)  # T, Z, C, Y, X
CASES["imagej TZCYX zlib"] = (
    HYPER,
    {"imagej": True, "metadata": {"axes": "TZCYX"}, "compression": "zlib"},
    [HYPER[t, :, c] for t in range(2) for c in range(3)],
)


@pytest.mark.parametrize("name", sorted(CASES))
def test_pages_decode_to_what_tifffile_reads(tmp_path, name):
    array, options, expected = CASES[name]
    path = tmp_path / "case.tif"
    tifffile.imwrite(path, array, **options)
    volumes = open_file(path)
    assert len(volumes) == len(expected)
    for vol, want in zip(volumes, expected):
        assert vol.read_slices.source[0] == "pages"  # the page-by-page path, not the zarr view
        assert vol.shape == want.shape and vol.dtype == want.dtype
        whole = vol.read_slices(0, vol.shape[0])
        assert np.array_equal(whole, want)
        assert whole.flags.writeable and whole.flags.c_contiguous and whole.dtype.isnative
        if vol.shape[0] > 2:
            assert np.array_equal(vol.read_slices(1, 3), want[1:3])


def test_rgb_pages_become_gray_as_before(tmp_path):
    rgb = RNG.integers(0, 256, (3, 40, 50, 3), dtype=np.uint8)
    tifffile.imwrite(tmp_path / "lzw.tif", rgb, compression="lzw", photometric="rgb")
    tifffile.imwrite(tmp_path / "raw.tif", rgb, photometric="rgb")  # memory-mapped: the reference
    (lzw,), (raw,) = open_file(tmp_path / "lzw.tif"), open_file(tmp_path / "raw.tif")
    assert lzw.read_slices.source[0] == "pages" and raw.read_slices.source[0] == "memmap"
    assert np.array_equal(lzw.read_slices(0, 3), raw.read_slices(0, 3))


def test_planar_colour_still_reads_through_the_zarr_view(tmp_path):
    planar = RNG.integers(0, 256, (3, 40, 50), dtype=np.uint8)
    tifffile.imwrite(tmp_path / "planar.tif", planar, photometric="rgb", planarconfig="separate", compression="zlib")
    (vol,) = open_file(tmp_path / "planar.tif")
    assert vol.read_slices.source[0] == "zarr" and vol.read_slices(0, 1).shape == (1, 40, 50)


class _Given(Slicer):
    """A slicer whose backend returns a given array."""

    def __init__(self, array):
        super().__init__("given.tif", (1,) + array.shape[-2:], array.dtype)
        self.array = array

    def _read(self, z0, z1):
        return self.array


def test_a_freshly_decoded_plane_is_not_copied_again(tmp_path):
    plane = np.arange(12, dtype=np.uint8).reshape(3, 4)
    out = _Given(plane[np.newaxis])(0, 1)
    assert np.shares_memory(out, plane)  # passed on as it is: a view of all of a fresh array
    # Memory maps, read-only buffers and views of part of a larger array are copied.
    tifffile.imwrite(tmp_path / "raw.tif", plane)
    mapped = tifffile.memmap(tmp_path / "raw.tif", mode="r")
    frozen = plane.copy()
    frozen.flags.writeable = False
    for given in (mapped[np.newaxis], frozen[np.newaxis], np.zeros((2, 3, 4), np.uint8)[:1]):
        out = _Given(given)(0, 1)
        assert out.flags.owndata and out.flags.writeable and np.array_equal(out, given)


def test_reading_lzw_tiffs_does_not_import_zarr(tmp_path, data_root):
    """zarr costs 0.3 s to import; a build of compressed TIFF stacks does not need it."""
    plate = tifffile.imread(require(data_root / "sem_plate_databar/plateImage2D.tif"))
    path = tmp_path / "plate_stack.tif"
    tifffile.imwrite(path, np.stack([plate, plate[::-1]]), compression="lzw")
    code = (
        "import json, sys\n"
        "from cemcurate.io import open_file\n"
        f"(vol,) = open_file({str(path)!r})\n"
        "data = vol.read_slices(0, 2)\n"
        "print(json.dumps([int(data.sum()), 'zarr' in sys.modules]))\n"
    )
    env = dict(os.environ, PYTHONPATH=str(REPO))
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    total, zarr_loaded = json.loads(result.stdout)
    assert total == 2 * int(plate.sum(dtype=np.int64)) and not zarr_loaded

"""Readers and writers of cemcurate.io, on the real EM data in ../shared/data.

Formats missing from the shared data (NIfTI, video, JPEG, BMP, 16-bit and signed images,
RGB PNG, zarr, OME-Zarr, OME-TIFF, hyperstacks with channels) are made in fixtures by
re-encoding real images from it with the format's own library; references are always
read with those libraries directly, never with the code under test.
"""

from __future__ import annotations

import gzip
import math
import os
import pickle
import shutil
import struct
import warnings
from pathlib import Path

import h5py
import numpy as np
import pytest
import tifffile
from PIL import Image

from cemcurate.io import (
    SUPPORTED_SUFFIXES,
    ReadError,
    Volume,
    is_supported,
    natural_sort_key,
    open_chunked_output,
    open_file,
    open_series,
    to_grayscale,
    write_volume,
)

VNC_XY_NM = 4.6  # lateral pixel size of the VNC stack (data README); used as a realistic voxel size


# --------------------------------------------------------------------------- helpers


def full(vol: Volume) -> np.ndarray:
    return vol.read_slices(0, vol.shape[0])


def one(path, **kw) -> Volume:
    vols = open_file(path, **kw)
    assert len(vols) == 1, [v.dataset for v in vols]
    return vols[0]


def assert_ranges_match(vol: Volume, ref: np.ndarray | None = None) -> None:
    """Reading in pieces (including out of order) gives the same as one full read."""
    whole = full(vol) if ref is None else ref
    n = vol.shape[0]
    assert whole.shape == vol.shape
    cuts = sorted({0, n // 3, n // 2, n})
    pieces = [vol.read_slices(a, b) for a, b in zip(cuts[:-1], cuts[1:]) if a < b]
    np.testing.assert_array_equal(np.concatenate(pieces), whole)
    last = vol.read_slices(n - 1, n)
    first = vol.read_slices(0, 1)
    np.testing.assert_array_equal(last[0], whole[-1])
    np.testing.assert_array_equal(first[0], whole[0])


def luma(rgb: np.ndarray) -> np.ndarray:
    """ITU-R 601 luma rounded half up, pixel by pixel with Python fractions: the reference."""
    from fractions import Fraction

    out = np.empty(rgb.shape[:-1], dtype=rgb.dtype)
    w = (Fraction(299, 1000), Fraction(587, 1000), Fraction(114, 1000))
    for idx in np.ndindex(out.shape):
        r, g, b = (int(v) for v in rgb[idx][:3])
        out[idx] = math.floor(w[0] * r + w[1] * g + w[2] * b + Fraction(1, 2))
    return out


def mrc_header_voxel_nm(path: Path) -> tuple[float, float, float]:
    """(z, y, x) nm of the array as stored, parsed from the raw MRC header bytes."""
    head = np.fromfile(path, dtype="<i4", count=256)
    words = head.view("<f4")
    mx, my, mz = head[7:10]
    cella = words[10:13]
    per_axis = [cella[0] / mx, cella[1] / my, cella[2] / mz]  # Å along X, Y, Z
    mapc, mapr, maps = head[16:19]
    return tuple(float(per_axis[m - 1]) / 10 for m in (maps, mapr, mapc))


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def isbi0(data_root) -> np.ndarray:
    return np.asarray(Image.open(data_root / "isbi2012_unet/train/image/0.png"))


@pytest.fixture(scope="module")
def patch(isbi0) -> np.ndarray:
    """(64, 64) uint8 crop of a real ISBI image: small enough for the per-pixel luma reference."""
    return isbi0[100:164, 200:264].copy()


@pytest.fixture(scope="module")
def vnc_raw(data_root) -> list[Path]:
    paths = sorted((data_root / "drosophila_vnc_gerhard/stack1/raw").glob("*.tif"))
    if len(paths) != 20:
        pytest.skip("VNC stack1/raw incomplete")
    return paths


@pytest.fixture(scope="module")
def small_stack(vnc_raw) -> np.ndarray:
    """(6, 96, 128) uint8 crop of real VNC slices, read with tifffile."""
    return np.stack([tifffile.imread(p)[200:296, 300:428] for p in vnc_raw[:6]])


@pytest.fixture(scope="module")
def tomo(data_root) -> np.ndarray:
    return tifffile.imread(data_root / "cryoet_tomo_napari_bio/tomo.tif")


# --------------------------------------------------------------------------- dispatch


def test_suffixes_are_case_insensitive_and_compound(tmp_path):
    for name in (
        "a.PNG",
        "b.Tif",
        "c.OME.TIFF",
        "d.nii.gz",
        "e.NII",
        "f.mrc",
        "g.map",
        "h.rec",
        "i.h5",
        "j.mp4",
        "k.AVI",
        "l.jpeg",
        "m.bmp",
    ):
        assert is_supported(tmp_path / name), name
    for name in ("a.txt", "b.gz", "c.npy", "d.h5.gz", "e"):
        assert not is_supported(tmp_path / name), name
    store = tmp_path / "vol.ome.zarr"
    store.mkdir()
    assert is_supported(store)
    (tmp_path / "file.zarr").write_bytes(b"x")
    assert not is_supported(tmp_path / "file.zarr")  # a zarr store is a directory
    folder = tmp_path / "folder.tif"
    folder.mkdir()
    assert not is_supported(folder)
    assert ".nii.gz" in SUPPORTED_SUFFIXES and ".ome.zarr" in SUPPORTED_SUFFIXES


def test_natural_sort_key_orders_numbers_by_value():
    names = ["img10.png", "img2.png", "img1.png", "Img3.png", "img20.png", "a/img100.png"]
    got = [Path(n).name for n in sorted(names, key=natural_sort_key)]
    assert got == ["img100.png", "img1.png", "img2.png", "Img3.png", "img10.png", "img20.png"]


# --------------------------------------------------------------------------- real data, one test per reader


def test_vnc_series_of_tifs(vnc_raw):
    shuffled = vnc_raw[::-1]  # open_series must sort by name itself
    vol = open_series(shuffled)
    assert vol.shape == (20, 1024, 1024) and vol.dtype == np.uint8
    assert vol.reader == "series/tiff" and not vol.xy_only
    assert vol.voxel_size is None  # the VNC tifs carry ImageJ metadata without a unit
    part = vol.read_slices(5, 8)
    np.testing.assert_array_equal(part, np.stack([tifffile.imread(p) for p in vnc_raw[5:8]]))
    np.testing.assert_array_equal(vol.read_slices(19, 20)[0], tifffile.imread(vnc_raw[19]))


def test_vnc_single_tif_is_memory_mapped_2d(vnc_raw):
    vol = one(vnc_raw[0])
    assert vol.shape == (1, 1024, 1024)
    assert vol.read_slices.source[0] == "memmap"  # uncompressed and contiguous
    np.testing.assert_array_equal(full(vol)[0], tifffile.imread(vnc_raw[0]))


def test_isbi_png(data_root, isbi0):
    vol = one(data_root / "isbi2012_unet/train/image/0.png")
    assert (vol.shape, vol.dtype, vol.reader, vol.voxel_size) == ((1, 512, 512), np.uint8, "image", None)
    np.testing.assert_array_equal(full(vol)[0], isbi0)


def test_neuroproof_png_series(data_root):
    paths = list((data_root / "neuroproof_flyem/training_sample2/grayscale_maps").glob("*.png"))
    vol = open_series(paths)
    assert vol.shape == (250, 250, 250) and vol.dtype == np.uint8
    ordered = sorted(paths, key=lambda p: int(p.stem.split(".")[-1]))  # iso.2600 ... iso.2849
    for z in (0, 137, 249):
        np.testing.assert_array_equal(vol.read_slices(z, z + 1)[0], np.asarray(Image.open(ordered[z])))
    np.testing.assert_array_equal(vol.read_slices(10, 13)[1], np.asarray(Image.open(ordered[11])))


def test_cem500k_tiff_patches(data_root):
    for path in sorted((data_root / "cem500k_examples/occlusion").glob("*.tiff")):
        ref = tifffile.imread(path)  # mostly 224 x 224; a few patches are narrower
        vol = one(path)
        assert vol.shape == (1,) + ref.shape and vol.dtype == np.uint8
        np.testing.assert_array_equal(full(vol)[0], ref)


def test_cryoet_tomo_float32_compressed_pages(data_root, tomo):
    vol = one(data_root / "cryoet_tomo_napari_bio/tomo.tif")
    assert vol.shape == (101, 135, 135) and vol.dtype == np.float32
    assert vol.read_slices.source[0] == "pages"  # deflate-compressed: read page by page
    assert vol.voxel_size is None
    assert_ranges_match(vol, tomo)


@pytest.mark.parametrize("name", ["13pf_MT.tif", "14pf_MT.tif"])
def test_cylindra_imagej_hyperstack_voxel_size(data_root, name):
    path = data_root / "cylindra_cryoet" / name
    with tifffile.TiffFile(path) as tif:
        # What the file says: 'unit=nm' and 'spacing=1.052' in the description, and the
        # X/YResolution tags as pixels per nm.
        description = tif.pages[0].description
        num, den = tif.pages[0].tags["XResolution"].value
        ref = tif.asarray()
    fields = dict(line.split("=", 1) for line in description.splitlines() if "=" in line)
    assert fields["unit"] == "nm"
    vol = one(path)
    assert vol.shape == ref.shape and vol.dtype == np.uint8
    assert vol.voxel_size_from == "metadata"
    np.testing.assert_allclose(vol.voxel_size, (float(fields["spacing"]), den / num, den / num), rtol=1e-6)
    np.testing.assert_allclose(vol.voxel_size, (1.052, 1.052, 1.052), rtol=1e-6)
    assert_ranges_match(vol, ref)


@pytest.mark.parametrize(
    "rel", ["cylindra_cryoet/beta-tubulin.mrc", "mrcfile_testdata/EMD-3001.map", "mrcfile_testdata/EMD-3197.map"]
)
def test_mrc_voxel_size_from_header(data_root, rel):
    import mrcfile

    path = data_root / rel
    vol = one(path)
    ref = mrcfile.read(path)
    assert vol.shape == ref.shape and vol.dtype == np.float32 and vol.reader == "mrc"
    np.testing.assert_allclose(vol.voxel_size, mrc_header_voxel_nm(path), rtol=1e-6)
    assert_ranges_match(vol, ref)


def test_mrc_known_voxel_sizes(data_root):
    assert one(data_root / "mrcfile_testdata/EMD-3197.map").voxel_size == pytest.approx((1.14, 1.14, 1.14))
    assert one(data_root / "cylindra_cryoet/beta-tubulin.mrc").voxel_size == pytest.approx((0.5144,) * 3)
    emd3001 = one(data_root / "mrcfile_testdata/EMD-3001.map")  # axes stored as (Y, X, Z)
    assert emd3001.voxel_size == pytest.approx((0.03925, 0.044825, 0.045875), rel=1e-5)
    assert any("file order" in n for n in emd3001.notes)


def test_gala_hdf5(data_root):
    path = data_root / "gala_flyem/tests/example-data/train-image.h5"
    vol = one(path)
    assert (vol.shape, vol.dtype, vol.dataset, vol.reader) == ((50, 100, 200), np.uint8, "stack", "hdf5")
    with h5py.File(path, "r") as f:
        ref = f["stack"][()]
    assert_ranges_match(vol, ref)
    assert one(path, dataset="stack").shape == (50, 100, 200)
    assert one(path, dataset="/stack").dataset == "stack"
    gt = one(data_root / "gala_flyem/tests/example-data/train-gt.lzf.h5")  # LZF-compressed chunks
    assert gt.dtype == np.int32
    with h5py.File(data_root / "gala_flyem/tests/example-data/train-gt.lzf.h5", "r") as f:
        np.testing.assert_array_equal(gt.read_slices(20, 30), f["stack"][20:30])


def test_neuroproof_groundtruth_h5_after_gunzip(data_root, tmp_path):
    gz = data_root / "neuroproof_flyem/training_sample2/groundtruth.h5.gz"
    with pytest.raises(ReadError, match="gunzip"):
        open_file(gz)
    path = tmp_path / "groundtruth.h5"
    with gzip.open(gz, "rb") as src, open(path, "wb") as dst:
        shutil.copyfileobj(src, dst)
    vols = {v.dataset: v for v in open_file(path)}
    assert set(vols) == {"stack", "transforms"}  # every 2D/3D dataset is a volume
    stack = vols["stack"]
    assert stack.shape == (250, 250, 250) and stack.dtype == np.int32
    with h5py.File(path, "r") as f:
        np.testing.assert_array_equal(stack.read_slices(100, 103), f["stack"][100:103])
        assert vols["transforms"].shape == (1,) + f["transforms"].shape
    with pytest.raises(ReadError, match="'stack'") as err:
        open_file(path, dataset="raw")
    assert "groundtruth.h5" in str(err.value) and "transforms" in str(err.value)


# --------------------------------------------------------------------------- re-encoded formats


def test_nifti_gz_and_nii(tmp_path, tomo):
    """NIfTI written with nibabel directly from the real tomogram (x, y, z order, mm / micron)."""
    import nibabel as nib

    crop = tomo[:20, :40, :50]
    for name, unit, zooms, expected in (
        ("t.nii.gz", "mm", (4e-6, 5e-6, 6e-6), (6.0, 5.0, 4.0)),
        ("t.nii", "micron", (0.004, 0.005, 0.006), (6.0, 5.0, 4.0)),
    ):
        img = nib.Nifti1Image(crop.transpose(2, 1, 0), np.diag([*zooms, 1.0]))
        img.header.set_xyzt_units(unit)
        nib.save(img, str(tmp_path / name))
        vol = one(tmp_path / name)
        assert vol.shape == crop.shape and vol.dtype == np.float32 and vol.reader == "nifti"
        assert vol.voxel_size == pytest.approx(expected, rel=1e-5)
        assert_ranges_match(vol, crop)


def test_nifti_unknown_units_and_4d(tmp_path, small_stack):
    import nibabel as nib

    nib.save(nib.Nifti1Image(small_stack.transpose(2, 1, 0), np.eye(4)), str(tmp_path / "u.nii.gz"))
    assert one(tmp_path / "u.nii.gz").voxel_size is None
    four = np.stack([small_stack, small_stack], axis=-1).transpose(2, 1, 0, 3)
    nib.save(nib.Nifti1Image(four, np.eye(4)), str(tmp_path / "four.nii.gz"))
    with pytest.raises(ReadError, match="four.nii.gz.*4D"):
        open_file(tmp_path / "four.nii.gz")


@pytest.fixture(scope="module")
def frames(vnc_raw) -> np.ndarray:
    """(8, 128, 96) uint8 frames cut from real VNC slices."""
    return np.stack([tifffile.imread(p)[300:428, 500:596] for p in vnc_raw[:8]])


def test_video_lossless_avi_and_mkv(tmp_path, frames):
    import imageio.v3 as iio

    for name in ("v.avi", "v.mkv"):  # FFV1 gray: lossless, so frames must come back exactly
        iio.imwrite(
            tmp_path / name, frames, plugin="pyav", codec="ffv1", fps=5, in_pixel_format="gray", out_pixel_format="gray"
        )
        vol = one(tmp_path / name)
        assert vol.shape == frames.shape and vol.dtype == np.uint8
        assert vol.xy_only and vol.voxel_size is None and vol.reader == "video"
        assert_ranges_match(vol, frames)
        np.testing.assert_array_equal(vol.read_slices(6, 8), frames[6:])
        np.testing.assert_array_equal(vol.read_slices(1, 3), frames[1:3])  # backwards: decoder restarts


def test_video_mp4_h264(tmp_path, frames):
    import imageio.v3 as iio

    iio.imwrite(tmp_path / "v.mp4", frames, plugin="pyav", codec="libx264", fps=5, in_pixel_format="gray")
    vol = one(tmp_path / "v.mp4")
    assert vol.shape == frames.shape and vol.xy_only
    got = full(vol)
    assert np.abs(got.astype(int) - frames).mean() < 6  # lossy codec: close, not equal
    assert_ranges_match(vol, got)


def test_jpeg_bmp_and_16bit_png(tmp_path, isbi0):
    Image.fromarray(isbi0).save(tmp_path / "a.jpg", quality=95)
    Image.fromarray(isbi0).save(tmp_path / "a.bmp")
    wide = isbi0.astype(np.uint16) * 257 + 3
    Image.fromarray(wide).save(tmp_path / "a16.png")
    jpg = one(tmp_path / "a.jpg")
    assert jpg.shape == (1, 512, 512) and jpg.dtype == np.uint8
    assert np.abs(full(jpg)[0].astype(int) - isbi0).mean() < 3
    np.testing.assert_array_equal(full(one(tmp_path / "a.bmp"))[0], isbi0)
    png16 = one(tmp_path / "a16.png")
    assert png16.dtype == np.uint16
    np.testing.assert_array_equal(full(png16)[0], wide)


def test_rgb_and_gray_alpha_png(tmp_path, isbi0, patch):
    rgb = np.stack([patch, patch[::-1], patch[:, ::-1]], axis=-1)
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    np.testing.assert_array_equal(full(one(tmp_path / "rgb.png"))[0], luma(rgb))
    equal = np.stack([isbi0] * 3 + [np.full_like(isbi0, 200)], axis=-1)
    Image.fromarray(equal, mode="RGBA").save(tmp_path / "rgba_equal.png")
    np.testing.assert_array_equal(full(one(tmp_path / "rgba_equal.png"))[0], isbi0)  # no rounding at all
    gray_alpha = np.stack([isbi0, np.full_like(isbi0, 255)], axis=-1)
    Image.fromarray(gray_alpha, mode="LA").save(tmp_path / "la.png")
    np.testing.assert_array_equal(full(one(tmp_path / "la.png"))[0], isbi0)


def test_rgb_16bit_png_keeps_16_bits(tmp_path, patch):
    import cv2

    rgb16 = np.stack([patch, patch[::-1], patch.T], axis=-1).astype(np.uint16) * 250
    cv2.imwrite(str(tmp_path / "rgb16.png"), rgb16[..., ::-1])  # OpenCV takes BGR
    vol = one(tmp_path / "rgb16.png")
    assert vol.dtype == np.uint16
    np.testing.assert_array_equal(full(vol)[0], luma(rgb16))


def test_16bit_and_signed_tif(tmp_path, small_stack, tomo):
    wide = small_stack.astype(np.uint16) * 200
    tifffile.imwrite(tmp_path / "u16.tif", wide)
    signed = np.round(tomo[:10, :64, :64] * 30000).astype(np.int16)  # real tomogram rescaled
    assert signed.min() < 0
    tifffile.imwrite(tmp_path / "s16.tif", signed, compression="zlib")
    for name, ref in (("u16.tif", wide), ("s16.tif", signed)):
        vol = one(tmp_path / name)
        assert vol.dtype == ref.dtype and vol.shape == ref.shape
        assert_ranges_match(vol, ref)


def test_big_endian_tif(tmp_path, small_stack):
    ref = small_stack.astype(np.uint16) * 100
    tifffile.imwrite(tmp_path / "be.tif", ref, byteorder=">")
    vol = one(tmp_path / "be.tif")
    assert vol.dtype == np.dtype("uint16") and vol.dtype.isnative
    assert_ranges_match(vol, ref)


def test_imagej_hyperstack_with_channels_and_micron_unit(tmp_path, small_stack):
    channels = np.stack([small_stack, 255 - small_stack], axis=1)  # (z, c, y, x)
    tifffile.imwrite(
        tmp_path / "hs.tif",
        channels,
        imagej=True,
        resolution=(1 / 0.0046, 1 / 0.0046),
        metadata={"axes": "ZCYX", "unit": "micron", "spacing": 0.05},
    )
    vols = open_file(tmp_path / "hs.tif")
    assert [v.dataset for v in vols] == ["c0", "c1"]  # policy: one volume per channel
    for c, vol in enumerate(vols):
        assert vol.shape == small_stack.shape
        assert vol.voxel_size == pytest.approx((50.0, 4.6, 4.6), rel=1e-6)
        assert_ranges_match(vol, channels[:, c])
    assert one(tmp_path / "hs.tif", dataset="c1").dataset == "c1"
    with pytest.raises(ReadError, match="c2.*not found.*'c0', 'c1'"):
        open_file(tmp_path / "hs.tif", dataset="c2")


def test_imagej_time_series_without_z_is_xy_only(tmp_path, small_stack):
    tifffile.imwrite(
        tmp_path / "movie.tif",
        small_stack,
        imagej=True,
        resolution=(1 / 4.6, 1 / 4.6),
        metadata={"axes": "TYX", "unit": "nm", "finterval": 2.0},
    )
    vol = one(tmp_path / "movie.tif")
    assert vol.shape == small_stack.shape and vol.xy_only
    assert math.isnan(vol.voxel_size[0]) and vol.voxel_size[1:] == pytest.approx((4.6, 4.6))
    np.testing.assert_array_equal(full(vol), small_stack)


def test_ome_tiff_physical_size(tmp_path, small_stack):
    tifffile.imwrite(
        tmp_path / "a.ome.tif",
        small_stack,
        ome=True,
        compression="zlib",
        metadata={"axes": "ZYX", "PhysicalSizeX": 0.0046, "PhysicalSizeY": 0.0046, "PhysicalSizeZ": 0.045},
    )  # default unit µm
    vol = one(tmp_path / "a.ome.tif")
    assert vol.voxel_size == pytest.approx((45.0, 4.6, 4.6), rel=1e-6)
    assert_ranges_match(vol, small_stack)
    tifffile.imwrite(
        tmp_path / "b.ome.tiff",
        small_stack,
        ome=True,
        metadata={
            "axes": "ZYX",
            "PhysicalSizeX": 46,
            "PhysicalSizeXUnit": "Å",
            "PhysicalSizeY": 46,
            "PhysicalSizeYUnit": "Å",
        },
    )
    vol = one(tmp_path / "b.ome.tiff")
    assert math.isnan(vol.voxel_size[0]) and vol.voxel_size[1:] == pytest.approx((4.6, 4.6))


def test_lzw_tif_stack_without_imagecodecs(tmp_path, small_stack):
    """LZW (common from microscopes) is decoded even though tifffile would need imagecodecs."""
    pages = [Image.fromarray(p) for p in small_stack]
    pages[0].save(tmp_path / "lzw.tif", save_all=True, append_images=pages[1:], compression="tiff_lzw")
    vol = one(tmp_path / "lzw.tif")
    assert vol.shape == small_stack.shape
    assert_ranges_match(vol, small_stack)
    wide = small_stack[0].astype(np.uint16) * 257
    Image.fromarray(wide).save(tmp_path / "lzw16.tif", compression="tiff_lzw")
    np.testing.assert_array_equal(full(one(tmp_path / "lzw16.tif"))[0], wide)


def test_rgb_tif_becomes_gray(tmp_path, patch):
    rgb = np.stack([patch, patch.T, patch[::-1]], axis=-1)
    tifffile.imwrite(tmp_path / "rgb.tif", rgb, photometric="rgb")
    np.testing.assert_array_equal(full(one(tmp_path / "rgb.tif"))[0], luma(rgb))
    # planar RGB stack: samples stored before y, x (axes QSYX)
    planar = np.stack([np.moveaxis(rgb, -1, 0), np.moveaxis(rgb[::-1], -1, 0)])
    tifffile.imwrite(tmp_path / "planar.tif", planar, photometric="rgb", planarconfig="separate")
    vol = one(tmp_path / "planar.tif")
    assert vol.shape == (2, 64, 64)
    np.testing.assert_array_equal(vol.read_slices(1, 2)[0], luma(rgb[::-1]))


def test_plain_zarr_v2_and_v3(tmp_path, data_root):
    import zarr

    with h5py.File(data_root / "gala_flyem/tests/example-data/train-image.h5", "r") as f:
        ref = f["stack"][()]
    for fmt in (2, 3):
        store = tmp_path / f"plain{fmt}.zarr"
        root = zarr.open_group(str(store), mode="w", zarr_format=fmt)
        arr = root.create_array("volumes/raw", shape=ref.shape, chunks=(8, 50, 50), dtype=ref.dtype)
        arr[:] = ref
        arr.attrs["resolution"] = [40, 8, 8]  # CREMI style: nm, no unit attribute
        root.create_array("meta/lut", shape=(256,), dtype="u1")  # 1D: skipped
        vol = one(store)
        assert vol.dataset == "volumes/raw" and vol.shape == ref.shape and vol.reader == "zarr"
        assert vol.voxel_size == (40.0, 8.0, 8.0)
        assert any("assumed nanometres" in n for n in vol.notes)
        assert_ranges_match(vol, ref)


def test_ome_zarr_v04_with_channels_and_v05(tmp_path, small_stack):
    import zarr

    data = np.stack([small_stack, small_stack // 2])  # (c, z, y, x)
    store = tmp_path / "img.ome.zarr"
    root = zarr.open_group(str(store), mode="w", zarr_format=2)
    root.create_array("0", shape=data.shape, chunks=(1, 2, 48, 64), dtype=data.dtype)[:] = data
    root.create_array("1", shape=(2, 6, 48, 64), dtype=data.dtype)  # lower level: ignored
    root.attrs["multiscales"] = [
        {
            "version": "0.4",
            "axes": [
                {"name": "c", "type": "channel"},
                {"name": "z", "type": "space", "unit": "micrometer"},
                {"name": "y", "type": "space", "unit": "micrometer"},
                {"name": "x", "type": "space", "unit": "micrometer"},
            ],
            "datasets": [
                {"path": "0", "coordinateTransformations": [{"type": "scale", "scale": [1, 0.05, 0.0046, 0.0046]}]},
                {"path": "1", "coordinateTransformations": [{"type": "scale", "scale": [1, 0.05, 0.0092, 0.0092]}]},
            ],
        }
    ]
    vols = open_file(store)
    assert [v.dataset for v in vols] == ["0:c0", "0:c1"]
    for c, vol in enumerate(vols):
        assert vol.reader == "ome-zarr" and vol.shape == small_stack.shape
        assert vol.voxel_size == pytest.approx((50.0, 4.6, 4.6), rel=1e-6)
        assert_ranges_match(vol, data[c])
    assert [v.dataset for v in open_file(store, dataset="0")] == ["0:c0", "0:c1"]

    v3 = tmp_path / "img5.ome.zarr"
    root = zarr.open_group(str(v3), mode="w", zarr_format=3)
    root.create_array("s0", shape=small_stack.shape, dtype=small_stack.dtype)[:] = small_stack
    root.attrs["ome"] = {
        "version": "0.5",
        "multiscales": [
            {
                "axes": [{"name": n, "type": "space", "unit": "nanometer"} for n in "zyx"],
                "datasets": [{"path": "s0", "coordinateTransformations": [{"type": "scale", "scale": [45, 4.6, 4.6]}]}],
            }
        ],
    }
    vol = one(v3)
    assert vol.dataset == "s0" and vol.voxel_size == pytest.approx((45.0, 4.6, 4.6))
    assert_ranges_match(vol, small_stack)


def test_hdf5_voxel_attributes_rgb_and_4d(tmp_path, small_stack, patch):
    path = tmp_path / "v.h5"
    rgb = np.stack([patch, patch.T, patch[::-1]], axis=-1)
    with h5py.File(path, "w") as f:
        f.create_dataset("raw", data=small_stack, chunks=(2, 48, 64), compression="gzip")
        f["raw"].attrs["element_size_um"] = [0.05, 0.0046, 0.0046]
        f.create_dataset("grp/rgb", data=rgb)
        f["grp"].attrs["resolution"] = [4.6, 4.6]
        f["grp"].attrs["unit"] = "nm"
        f.create_dataset("grp/single", data=small_stack[None])  # (1, z, y, x): squeezed
        f.create_dataset("four", data=np.stack([small_stack] * 2))  # (2, z, y, x): not an image
    vols = {v.dataset: v for v in open_file(path)}
    assert set(vols) == {"raw", "grp/rgb", "grp/single"}
    assert vols["raw"].voxel_size == pytest.approx((50.0, 4.6, 4.6))
    assert_ranges_match(vols["raw"], small_stack)
    assert vols["grp/rgb"].shape == (1, 64, 64)
    np.testing.assert_array_equal(full(vols["grp/rgb"])[0], luma(rgb))
    assert vols["grp/rgb"].voxel_size[1:] == pytest.approx((4.6, 4.6))  # found on the parent group
    np.testing.assert_array_equal(full(vols["grp/single"]), small_stack)
    assert any("four" in n and "4D" in n for n in vols["raw"].notes)
    with pytest.raises(ReadError, match=r"v\.h5.*'four'.*4D"):
        open_file(path, dataset="four")


def test_4d_tif_without_axis_names_is_an_error(tmp_path, small_stack):
    tifffile.imwrite(tmp_path / "four_d.tif", np.stack([small_stack] * 3), photometric="minisblack")
    with pytest.raises(ReadError, match=r"four_d\.tif: 4D data"):
        open_file(tmp_path / "four_d.tif")


def test_only_4d_data_is_an_error(tmp_path, small_stack):
    with h5py.File(tmp_path / "only4d.h5", "w") as f:
        f["channels"] = np.stack([small_stack, small_stack])
    with pytest.raises(ReadError, match=r"only4d\.h5: no 2D/3D image dataset.*'channels'.*4D"):
        open_file(tmp_path / "only4d.h5")


def test_unit_spellings():
    from cemcurate.io import nm_per_unit

    for unit, nm in (
        ("nm", 1),
        ("micron", 1000),
        ("microns", 1000),
        ("um", 1000),
        ("µm", 1000),
        ("\\u00B5m", 1000),
        ("μm", 1000),
        ("micrometer", 1000),
        ("Å", 0.1),
        ("angstrom", 0.1),
        ("mm", 1e6),
        ("nanometer", 1),
    ):
        assert nm_per_unit(unit) == nm, unit
    for unit in ("pixel", "pixels", "", None, "inch"):
        assert nm_per_unit(unit) is None, unit


# --------------------------------------------------------------------------- bad input


def test_error_messages_name_file_and_problem(tmp_path, data_root):
    (tmp_path / "empty.tif").write_bytes(b"")
    (tmp_path / "text.png").write_text("this is a text file, not a PNG\n")
    (tmp_path / "notes.xyz").write_text("x")
    cases = [
        ("empty.tif", "empty \\(0 bytes\\)"),
        ("text.png", "not a readable image"),
        ("notes.xyz", "unknown file type '.xyz'.*supported: .*\\.png"),
        ("missing.mrc", "file not found"),
    ]
    for name, pattern in cases:
        with pytest.raises(ReadError, match=pattern) as err:
            open_file(tmp_path / name)
        assert err.value.path == str(tmp_path / name)
        assert name in str(err.value)
    folder = tmp_path / "slices"
    folder.mkdir()
    with pytest.raises(ReadError, match="directory"):
        open_file(folder)


@pytest.mark.parametrize(
    "name", ["t.tif", "t.png", "t.jpg", "t.bmp", "t.mrc", "t.map", "t.nii", "t.nii.gz", "t.h5", "t.mp4", "t.avi"]
)
def test_text_file_with_image_extension(tmp_path, name):
    (tmp_path / name).write_text("a text file saved under an image name\n" * 20)
    with pytest.raises(ReadError, match="(corrupt|not a valid|rejected)") as err:
        open_file(tmp_path / name)
    assert str(err.value).startswith(str(tmp_path / name) + ": ")


def test_zarr_directory_problems(tmp_path, small_stack):
    (tmp_path / "empty.zarr").mkdir()
    with pytest.raises(ReadError, match="empty.zarr: not a readable zarr store"):
        open_file(tmp_path / "empty.zarr")
    write_volume(tmp_path / "v.zarr", small_stack)
    with pytest.raises(ReadError, match="'raw' not found.*'0'"):
        open_file(tmp_path / "v.zarr", dataset="raw")


@pytest.mark.parametrize(
    "rel",
    ["cryoet_tomo_napari_bio/tomo.tif", "cylindra_cryoet/13pf_MT.tif", "cem500k_examples/occlusion/example0.tiff"],
)
def test_truncated_tif(tmp_path, data_root, rel):
    data = (data_root / rel).read_bytes()
    cut = tmp_path / "cut.tif"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(ReadError, match="cut.tif.*(truncated|damaged)"):
        vols = open_file(cut)
        for v in vols:  # if opening passed, reading must fail, never return a short stack
            full(v)


def test_truncated_png_fails_on_read(tmp_path, data_root):
    data = (data_root / "isbi2012_unet/train/image/0.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    vol = one(tmp_path / "cut.png")  # the header is intact, so opening is fine
    with pytest.raises(ReadError, match="cut.png.*truncated"):
        full(vol)


def test_mrc_bad_headers(tmp_path, data_root):
    good = (data_root / "cylindra_cryoet/beta-tubulin.mrc").read_bytes()
    bad_mode = bytearray(good)
    bad_mode[12:16] = struct.pack("<i", 99)
    bad_id = bytearray(good)
    bad_id[208:212] = b"XXXX"
    for name, content in (("mode.mrc", bad_mode), ("id.mrc", bad_id), ("short.mrc", good[:3000])):
        (tmp_path / name).write_bytes(bytes(content))
        with pytest.raises(ReadError, match=f"{name}: mrcfile rejected the header"):
            open_file(tmp_path / name)


def test_mrc_zero_voxel_size_is_unknown_and_volume_stack_is_4d(tmp_path, small_stack):
    import mrcfile

    with mrcfile.new(tmp_path / "zero.mrc") as m:
        m.set_data(small_stack.astype(np.int16))
        m.voxel_size = 0
    assert one(tmp_path / "zero.mrc").voxel_size is None
    with mrcfile.new(tmp_path / "stack4d.mrc") as m:
        m.set_data(np.stack([small_stack, small_stack]).astype(np.float32))
    with pytest.raises(ReadError, match="stack4d.mrc.*4D"):
        open_file(tmp_path / "stack4d.mrc")


def test_imod_tilt_series_is_xy_only(tmp_path, small_stack):
    import mrcfile

    with mrcfile.new(tmp_path / "tilt.st") as m:
        m.set_data(small_stack.astype(np.int16))
        m.set_image_stack()
        m.voxel_size = 46.0  # Å
    vol = one(tmp_path / "tilt.st")
    assert vol.xy_only and vol.shape == small_stack.shape
    assert math.isnan(vol.voxel_size[0]) and vol.voxel_size[1:] == pytest.approx((4.6, 4.6))


def test_tiny_constant_and_nan_images_are_readable(tmp_path, isbi0, tomo):
    Image.fromarray(isbi0[:1, :1]).save(tmp_path / "px.png")
    tifffile.imwrite(tmp_path / "px.tif", isbi0[:1, :1])
    for name in ("px.png", "px.tif"):
        vol = one(tmp_path / name)
        assert vol.shape == (1, 1, 1) and full(vol)[0, 0, 0] == isbi0[0, 0]
    Image.fromarray(np.full((64, 64), 17, np.uint8)).save(tmp_path / "flat.png")
    assert np.all(full(one(tmp_path / "flat.png")) == 17)
    holes = tomo[:5].copy()
    holes[1, 10:20, 10:20] = np.nan
    tifffile.imwrite(tmp_path / "nan.tif", holes)
    got = full(one(tmp_path / "nan.tif"))
    np.testing.assert_array_equal(np.isnan(got), np.isnan(holes))
    np.testing.assert_array_equal(got[~np.isnan(got)], holes[~np.isnan(holes)])


def test_series_with_mismatched_shape_names_the_file(tmp_path, isbi0):
    for i in (1, 2, 10):
        Image.fromarray(isbi0).save(tmp_path / f"s{i}.png")
    Image.fromarray(isbi0[:100]).save(tmp_path / "s3.png")
    paths = list(tmp_path.glob("s*.png"))
    with pytest.raises(ReadError, match=r"s3\.png.*\(100, 512\).*\(512, 512\)"):
        open_series(paths)
    (tmp_path / "s3.png").unlink()
    vol = open_series(list(tmp_path.glob("s*.png")))
    assert vol.shape == (3, 512, 512)


def test_read_range_is_checked(data_root):
    vol = one(data_root / "cylindra_cryoet/beta-tubulin.mrc")
    for z0, z1 in ((5, 5), (-1, 2), (0, 21)):
        with pytest.raises(ValueError, match="outside"):
            vol.read_slices(z0, z1)


# --------------------------------------------------------------------------- laziness


def test_opening_reads_no_pixels(tmp_path, small_stack, data_root):
    """Pixels changed on disk after opening show up in read_slices: nothing was loaded early."""
    import mrcfile

    tif = tmp_path / "a.tif"
    tifffile.imwrite(tif, small_stack)
    mrc = tmp_path / "a.mrc"
    shutil.copy(data_root / "cylindra_cryoet/beta-tubulin.mrc", mrc)
    h5 = tmp_path / "a.h5"
    with h5py.File(h5, "w") as f:
        f["raw"] = small_stack
    vols = {"tif": one(tif), "mrc": one(mrc), "h5": one(h5)}
    changed = small_stack.copy()
    changed[3] = 7
    tifffile.imwrite(tif, changed)
    with mrcfile.open(mrc, mode="r+") as m:
        m.data[4] = 3.5
    with h5py.File(h5, "r+") as f:
        f["raw"][3] = 7
    assert np.all(vols["tif"].read_slices(3, 4) == 7)
    assert np.all(vols["mrc"].read_slices(4, 5) == 3.5)
    assert np.all(vols["h5"].read_slices(3, 4) == 7)


def test_volumes_survive_pickling(data_root):
    for rel in (
        "cryoet_tomo_napari_bio/tomo.tif",
        "cylindra_cryoet/beta-tubulin.mrc",
        "gala_flyem/tests/example-data/train-image.h5",
    ):
        vol = one(data_root / rel)
        clone = pickle.loads(pickle.dumps(vol))
        np.testing.assert_array_equal(clone.read_slices(2, 4), vol.read_slices(2, 4))


def test_to_grayscale_contract():
    rgb = np.random.default_rng(0).integers(0, 65535, (5, 6, 3), dtype=np.uint16)
    np.testing.assert_array_equal(to_grayscale(rgb, "x"), luma(rgb))
    ga = np.dstack([rgb[..., 0], rgb[..., 1]])
    np.testing.assert_array_equal(to_grayscale(ga, "x"), rgb[..., 0])
    plain = rgb[..., 0]
    assert to_grayscale(plain, "x") is plain


# --------------------------------------------------------------------------- writers


@pytest.mark.parametrize(
    "suffix,dtype",
    [
        (".tif", "uint8"),
        (".tif", "float32"),
        (".tif", "int16"),
        (".tif", "int8"),
        (".ome.tif", "uint16"),
        (".nii.gz", "int16"),
        (".nii", "float32"),
        (".mrc", "uint8"),
        (".mrc", "int16"),
        (".mrc", "float32"),
        (".zarr", "uint16"),
        (".ome.zarr", "float32"),
    ],
)
def test_write_volume_round_trips(tmp_path, small_stack, suffix, dtype):
    data = (small_stack.astype(np.int32) - 100).astype(dtype) if dtype.startswith("int") else small_stack.astype(dtype)
    path = tmp_path / f"out{suffix}"
    write_volume(path, data, voxel_size=(50.0, VNC_XY_NM, VNC_XY_NM))
    vol = one(path)
    assert vol.dtype == np.dtype(dtype) and vol.shape == data.shape
    assert vol.voxel_size == pytest.approx((50.0, VNC_XY_NM, VNC_XY_NM), rel=1e-6)
    assert_ranges_match(vol, data)
    write_volume(path, data[:2], voxel_size=None)  # overwrite in place
    again = one(path)
    assert again.shape[0] == 2 and again.voxel_size is None
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary left behind


@pytest.mark.parametrize("suffix", [".tif", ".mrc", ".zarr"])
def test_write_volume_unknown_z(tmp_path, small_stack, suffix):
    write_volume(tmp_path / f"o{suffix}", small_stack, voxel_size=(float("nan"), 4.6, 4.6))
    vz, vy, vx = one(tmp_path / f"o{suffix}").voxel_size
    assert math.isnan(vz) and (vy, vx) == pytest.approx((4.6, 4.6))


def test_write_volume_2d_and_refusals(tmp_path, isbi0, small_stack):
    write_volume(tmp_path / "a.png", isbi0)
    np.testing.assert_array_equal(full(one(tmp_path / "a.png"))[0], isbi0)
    write_volume(tmp_path / "a.nii.gz", isbi0, voxel_size=(float("nan"), 4.0, 4.0))
    vol = one(tmp_path / "a.nii.gz")
    assert vol.shape == (1, 512, 512) and vol.voxel_size[1:] == pytest.approx((4.0, 4.0))
    np.testing.assert_array_equal(full(vol)[0], isbi0)
    with pytest.warns(UserWarning, match="no voxel size"):
        write_volume(tmp_path / "b.png", isbi0, voxel_size=(1.0, 4.0, 4.0))
    with pytest.raises(ValueError, match="one 2D image"):
        write_volume(tmp_path / "c.png", small_stack)
    with pytest.raises(ValueError, match="z spacing"):
        write_volume(tmp_path / "c.nii", small_stack, voxel_size=(float("nan"), 4.0, 4.0))
    with pytest.raises(ValueError, match="cannot write '.jpg'"):
        write_volume(tmp_path / "c.jpg", isbi0)
    with pytest.raises(ValueError, match="MRC cannot store dtype int64"):
        write_volume(tmp_path / "c.mrc", small_stack.astype(np.int64))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.nii.gz", "a.png", "b.png"]


@pytest.mark.parametrize("suffix", [".zarr", ".npy", ".raw", ".tif", ".mrc", ".nii.gz"])
def test_chunked_output_streams_and_finalises(tmp_path, small_stack, suffix):
    path = tmp_path / f"pred{suffix}"
    with open_chunked_output(path, small_stack.shape, np.uint8, chunks=(2, 48, 64), voxel_size=(50.0, 4.6, 4.6)) as out:
        for z0 in range(0, small_stack.shape[0], 2):
            out.array[z0 : z0 + 2] = small_stack[z0 : z0 + 2]
        assert not path.exists()  # nothing under the final name until finalised
    assert [p.name for p in tmp_path.iterdir()] == [path.name]
    if suffix == ".npy":
        np.testing.assert_array_equal(np.load(path), small_stack)
        return
    if suffix == ".raw":  # headerless C-order samples
        np.testing.assert_array_equal(np.fromfile(path, np.uint8).reshape(small_stack.shape), small_stack)
        return
    vol = one(path)
    assert vol.voxel_size == pytest.approx((50.0, 4.6, 4.6))
    assert_ranges_match(vol, small_stack)


def test_chunked_output_discards_on_error(tmp_path, small_stack):
    with pytest.raises(RuntimeError):
        with open_chunked_output(tmp_path / "p.zarr", small_stack.shape, np.uint8) as out:
            out.array[0:1] = small_stack[0:1]
            raise RuntimeError("predictor crashed")
    assert list(tmp_path.iterdir()) == []


def test_no_resource_warnings_when_reading(data_root, recwarn):
    warnings.simplefilter("always")
    full(one(data_root / "cylindra_cryoet/14pf_MT.tif"))
    full(one(data_root / "mrcfile_testdata/EMD-3197.map"))
    assert not [w for w in recwarn if issubclass(w.category, ResourceWarning)]


def test_handles_opened_before_a_fork_are_kept_but_not_used_or_freed_in_the_child(tmp_path):
    from cemcurate.io import handles

    path = tmp_path / "f.bin"
    path.write_bytes(b"x")
    closed = []
    parent_obj = handles.get("test", str(path), lambda: (object(), lambda: closed.append("parent")))
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: a fresh cache, the parent's object still referenced, nothing closed
        child_obj = handles.get("test", str(path), lambda: (object(), lambda: closed.append("child")))
        handles.close_all()
        ok = (
            child_obj is not parent_obj
            and closed == ["child"]
            and any(entry[0] is parent_obj for kept in handles._INHERITED for entry in kept)
        )
        os.write(write_end, b"1" if ok else b"0")
        os._exit(0)
    os.waitpid(pid, 0)
    assert os.read(read_end, 1) == b"1"
    assert handles.get("test", str(path), lambda: (object(), lambda: None)) is parent_obj  # the parent's stays
    handles.drop("test", str(path))
    assert closed == ["parent"]

"""Batched dHash must equal imagehash.dhash bit for bit, on real EM patches of many sizes."""

from __future__ import annotations

from pathlib import Path

import imagehash
import imageio.v3 as iio
import numpy as np
import pytest
import tifffile
from conftest import require
from PIL import Image

from cemcurate.dhash import dhash64, dhash_hex, hex_to_dhash

PATCH = 224


def reference_hex(patch: np.ndarray) -> str:
    """The paper's hash: imagehash's dhash at hash size 8, one PIL call per patch."""
    return str(imagehash.dhash(Image.fromarray(patch), hash_size=8))


def assert_same_as_imagehash(patches: np.ndarray) -> None:
    ours = dhash_hex(dhash64(patches))
    expected = [reference_hex(p) for p in patches]
    mismatches = [i for i, (a, b) in enumerate(zip(ours, expected)) if a != b]
    assert not mismatches, (
        f"{len(mismatches)}/{len(patches)} hashes of shape {patches.shape[1:]} differ from imagehash,"
        f" first at {mismatches[0]}: ours {ours[mismatches[0]]} vs {expected[mismatches[0]]}"
    )


@pytest.fixture(scope="module")
def vnc_stack(data_root: Path) -> np.ndarray:
    """Drosophila VNC ssTEM stack1: (20, 1024, 1024) uint8."""
    files = sorted(require(data_root / "drosophila_vnc_gerhard" / "stack1" / "raw").glob("*.tif"))
    if len(files) != 20:
        pytest.skip(f"expected 20 VNC stack1 slices, found {len(files)}")
    return np.stack([tifffile.imread(f) for f in files])


def tile(image: np.ndarray, size: int, min_edge: int) -> list[np.ndarray]:
    """Non-overlapping size x size tiles, plus the paper's edge crops (kept when >= min_edge)."""
    tiles = []
    for y in range(0, image.shape[0], size):
        for x in range(0, image.shape[1], size):
            crop = image[y : y + size, x : x + size]
            if min(crop.shape) >= min_edge:
                tiles.append(crop)
    return tiles


def test_vnc_tiles_match_imagehash(vnc_stack):
    # 20 slices x (16 full tiles + 9 edge crops of 224x128, 128x224, 128x128): 500 patches
    by_shape: dict[tuple, list] = {}
    for section in vnc_stack:
        for crop in tile(section, PATCH, 112):
            by_shape.setdefault(crop.shape, []).append(crop)
    assert set(by_shape) == {(224, 224), (224, 128), (128, 224), (128, 128)}
    for crops in by_shape.values():
        assert_same_as_imagehash(np.stack(crops))


def test_random_vnc_crops_match_imagehash(vnc_stack):
    rng = np.random.default_rng(0)
    z = rng.integers(0, 20, 1200)
    y, x = rng.integers(0, 1024 - PATCH, (2, 1200))
    assert_same_as_imagehash(np.stack([vnc_stack[k, i : i + PATCH, j : j + PATCH] for k, i, j in zip(z, y, x)]))


def test_neuroproof_planes_match_imagehash(neuroproof_volume):
    # xy, xz and yz planes of an isotropic volume; 224 crops and the full 250 x 250 planes
    every_fifth = slice(0, 250, 5)
    xy = neuroproof_volume[every_fifth, :PATCH, :PATCH]
    xz = neuroproof_volume[:PATCH, every_fifth, -PATCH:].transpose(1, 0, 2)
    yz = neuroproof_volume[-PATCH:, -PATCH:, every_fifth].transpose(2, 0, 1)
    assert_same_as_imagehash(np.ascontiguousarray(np.concatenate([xy, xz, yz])))
    assert_same_as_imagehash(np.ascontiguousarray(neuroproof_volume[::2]))  # 125 planes of 250 x 250


def test_isbi_and_cem500k_patches_match_imagehash(data_root):
    isbi = [iio.imread(f) for f in sorted(require(data_root / "isbi2012_unet" / "train" / "image").glob("*.png"))]
    crops: dict[tuple, list] = {}
    for image in isbi:  # 512 x 512: 4 tiles of 224, edge crops of 64 px dropped by min_edge
        for crop in tile(image, PATCH, 1):
            crops.setdefault(crop.shape, []).append(crop)
    for group in crops.values():
        assert_same_as_imagehash(np.stack(group))
    examples = data_root / "cem500k_examples"
    cem = [tifffile.imread(f) for f in sorted((examples / "occlusion").glob("*.tiff"))]
    cem += [iio.imread(f) for f in sorted((examples / "correlation" / "images").glob("*.png"))]
    if not cem:
        pytest.skip("cem500k_examples patches missing")
    by_shape: dict[tuple, list] = {}
    for patch in cem:  # mostly 224 x 224; some released patches are edge crops (e.g. 130 x 224)
        assert patch.dtype == np.uint8 and patch.ndim == 2
        by_shape.setdefault(patch.shape, []).append(patch)
    for group in by_shape.values():
        assert_same_as_imagehash(np.stack(group))


@pytest.mark.parametrize(
    "shape",
    [
        (112, 150),
        (250, 224),
        (224, 112),
        (224, 116),
        (224, 117),
        (150, 112),
        (1, 1),
        (1, 9),
        (8, 1),
        (9, 8),
        (8, 9),
        (9, 9),
        (8, 8),
        (2, 3),
        (17, 5),
        (13, 1000),
        (1000, 13),
        (511, 64),
    ],
)
def test_odd_sized_real_crops_match_imagehash(vnc_stack, shape):
    # (224, 116) and (224, 117) straddle Pillow 13's switch to the vertical pass first
    rng = np.random.default_rng(sum(shape))
    height, width = shape
    z = rng.integers(0, 20, 40)
    y = rng.integers(0, 1024 - height + 1, 40)
    x = rng.integers(0, 1024 - width + 1, 40)
    assert_same_as_imagehash(np.stack([vnc_stack[k, i : i + height, j : j + width] for k, i, j in zip(z, y, x)]))


def test_flat_patches_match_imagehash(data_root):
    # Real flat regions of the SEM image (16 x 16 blocks of constant value), then constant
    # 224 x 224 patches at those and at extreme grey values (synthetic by construction).
    image = tifffile.imread(require(data_root / "sem_plate_databar" / "plateImage2D.tif"))
    blocks = image[: 943 // 16 * 16].reshape(58, 16, 64, 16).transpose(0, 2, 1, 3).reshape(-1, 16, 16)
    flat_blocks = blocks[blocks.std(axis=(1, 2)) == 0]
    assert len(flat_blocks) > 0
    assert_same_as_imagehash(np.ascontiguousarray(flat_blocks))
    levels = sorted({0, 1, 127, 254, 255, *(int(b[0, 0]) for b in flat_blocks)})
    constant = np.stack([np.full((PATCH, PATCH), v, dtype=np.uint8) for v in levels])
    assert_same_as_imagehash(constant)
    assert np.all(dhash64(constant) == 0)  # no pixel is brighter than its left neighbour


def test_noise_at_pass_order_boundary_matches_imagehash():
    # Pillow 13 resizes vertically first iff H - 8 > 2 * (W - 9); test both sides of it.
    rng = np.random.default_rng(5)
    for height in (9, 10, 31, 100, 224, 487):
        boundary = (height + 9) // 2
        for width in (boundary - 1, boundary, boundary + 1):
            if width != 9 and width > 0:
                assert_same_as_imagehash(rng.integers(0, 256, (5, height, width), dtype=np.uint8))


def test_hex_round_trip_and_bit_order(vnc_stack):
    patches = np.ascontiguousarray(vnc_stack[:4, :PATCH, :PATCH])
    hashes = dhash64(patches)
    strings = dhash_hex(hashes)
    assert all(len(s) == 16 for s in strings)
    assert np.array_equal(hex_to_dhash(strings), hashes)
    # bit 63 - (8 * row + col) is "pixel (row, col + 1) brighter than (row, col)"
    thumbnail = np.asarray(Image.fromarray(patches[0]).resize((9, 8), Image.LANCZOS)).astype(int)
    bits = (thumbnail[:, 1:] > thumbnail[:, :-1]).ravel()
    as_int = int(hashes[0])
    assert [bool(as_int >> (63 - i) & 1) for i in range(64)] == bits.tolist()
    assert hex_to_dhash(["00000000000000ff", "FFFFFFFFFFFFFFFF"]).tolist() == [255, 2**64 - 1]


def test_workers_give_same_hashes(vnc_stack):
    patches = np.ascontiguousarray(vnc_stack[:, :896, :896].reshape(20, 4, 224, 4, 224).transpose(0, 1, 3, 2, 4))
    patches = patches.reshape(-1, PATCH, PATCH)
    assert np.array_equal(dhash64(patches, workers=2), dhash64(patches, workers=1))


def test_empty_batch():
    result = dhash64(np.zeros((0, PATCH, PATCH), dtype=np.uint8))
    assert result.dtype == np.uint64 and result.shape == (0,)
    assert dhash_hex(result) == []


@pytest.mark.parametrize(
    "bad",
    [
        np.zeros((2, 224, 224), dtype=np.uint16),
        np.zeros((2, 224, 224), dtype=np.float32),
        np.zeros((224, 224), dtype=np.uint8),
        np.zeros((1, 1, 224, 224), dtype=np.uint8),
        np.zeros((2, 0, 224), dtype=np.uint8),
        [[[0, 1], [2, 3]]],
    ],
)
def test_bad_patches_raise_value_error(bad):
    with pytest.raises(ValueError):
        dhash64(bad)


def test_bad_arguments_raise_value_error():
    patches = np.zeros((1, 8, 8), dtype=np.uint8)
    for workers in (0, -1, 1.5, True):
        with pytest.raises(ValueError):
            dhash64(patches, workers=workers)
    for strings in (["0x00000000000000"], ["123"], ["g" * 16], [" 000000000000000"], "0" * 16, [7]):
        with pytest.raises(ValueError):
            hex_to_dhash(strings)
    with pytest.raises(ValueError):
        dhash_hex(np.array([1, 2], dtype=np.int64))

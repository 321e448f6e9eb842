import numpy as np
import pytest
from PIL import Image

from cemcurate.patch_grid import crop_patches, tile_grid, tile_spans
from cemcurate.slicing import iter_planes, plane_shape, planes_for_spacing


def expected_count(length, patch=224, min_edge=112):
    # The rule written out: full tiles, plus one edge tile if the leftover is >= min_edge.
    return length // patch + (1 if length % patch >= min_edge else 0)


@pytest.mark.parametrize("length", [1, 111, 112, 223, 224, 250, 335, 336, 447, 448, 1024])
def test_tile_spans_follow_the_rule(length):
    spans = tile_spans(length)
    assert len(spans) == expected_count(length)
    assert all(size == 224 for _, size in spans[: length // 224])
    assert all(start + size <= length for start, size in spans)
    assert [s for s, _ in spans] == [i * 224 for i in range(len(spans))]


def test_grid_on_a_1024_px_slice_is_bit_identical():
    # The size of a VNC ssTEM section; the pixels only need to differ from crop to crop.
    image = np.random.default_rng(3).integers(0, 256, (1024, 1024), dtype=np.uint8)
    grid = tile_grid(*image.shape)
    # 1024 = 4 * 224 + 128: 4 full tiles and one 128 px edge tile per axis.
    assert len(grid) == expected_count(1024) ** 2 == 25
    patches = crop_patches(image, grid)
    assert patches.shape == (25, 224, 224) and patches.dtype == np.uint8
    full = [i for i, (y, x, h, w) in enumerate(grid) if h == w == 224]
    assert len(full) == 16
    for i in full:
        y, x = grid[i, :2]
        assert np.array_equal(patches[i], image[y : y + 224, x : x + 224])
    edge = [i for i, (y, x, h, w) in enumerate(grid) if (h, w) == (224, 128)][0]
    y, x, h, w = grid[edge]
    ref = np.asarray(Image.fromarray(image[y : y + h, x : x + w]).resize((224, 224), Image.BILINEAR))
    assert np.array_equal(patches[edge], ref)


def test_planes_for_spacing():
    assert planes_for_spacing((10, 10, 10), 250)[0] == ("xy", "xz", "yz")
    assert planes_for_spacing((12, 10, 10), 250)[0] == ("xy", "xz", "yz")  # exactly 20%: within
    assert planes_for_spacing((12.1, 10, 10), 250)[0] == ("xy",)
    assert planes_for_spacing((50, 4.6, 4.6), 20)[0] == ("xy",)
    planes, note = planes_for_spacing(None, 100)
    assert planes == ("xy",) and "unknown" in note
    assert planes_for_spacing((10, 10, 10), 1)[0] == ("xy",)
    assert planes_for_spacing((10, 10, 10), 50, xy_only=True)[0] == ("xy",)


def test_iter_planes_matches_numpy_indexing():
    vol = np.random.default_rng(0).integers(0, 255, (7, 5, 6), dtype=np.uint8)
    for plane in ("xy", "xz", "yz"):
        # A tiny block size forces the blocked reading path.
        got = list(iter_planes(vol, plane, block_bytes=40))
        n, rows, cols = plane_shape(vol.shape, plane)
        assert [i for i, _ in got] == list(range(n))
        for i, image in got:
            ref = vol[i] if plane == "xy" else vol[:, i, :] if plane == "xz" else vol[:, :, i]
            assert image.shape == (rows, cols) and np.array_equal(image, ref)

"""MoCoV2 augmentations on real EM patches: shapes, ranges, geometry, jitter, blur, noise, determinism."""

from __future__ import annotations

import math
from dataclasses import replace

import cv2
import numpy as np
import pytest
import tifffile

from pretrain.augment import (
    AugmentParams,
    ViewParams,
    apply_geometry,
    augment_view,
    jitter_lut,
    render_view,
    sample_crop,
    sample_view,
    two_views,
)

# Every operation switched off; tests switch on the one they look at.
NOTHING = AugmentParams(
    image_size=224,
    crop_scale=(1.0, 1.0),
    crop_ratio=(1.0, 1.0),
    rotation_p=0,
    hflip_p=0,
    vflip_p=0,
    jitter_p=0,
    blur_p=0,
    noise_p=0,
)


@pytest.fixture(scope="module")
def patch(data_root) -> np.ndarray:
    """A real 224 x 224 ssTEM patch (uint8) with membranes, mitochondria and vesicles."""
    path = sorted((data_root / "drosophila_vnc_gerhard" / "stack1" / "raw").glob("*.tif"))[0]
    return np.ascontiguousarray(tifffile.imread(path)[300:524, 300:524])


def test_views_have_the_requested_shape_dtype_and_range(patch):
    rng = np.random.default_rng(0)
    for size in (224, 64):
        views = [augment_view(patch, AugmentParams(image_size=size), rng) for _ in range(20)]
        assert all(v.shape == (size, size) and v.dtype == np.float32 for v in views)
        assert all(0.0 <= v.min() and v.max() <= 1.0 for v in views)
        # Views differ from each other: the augmentations are random.
        assert len({v.tobytes() for v in views}) == 20
    with pytest.raises(ValueError, match="uint8"):
        augment_view(patch.astype(np.float32), AugmentParams(), rng)


def test_identity_view_reproduces_the_patch(patch):
    view = render_view(patch, ViewParams(crop=(0, 0, 224, 224)), 224)
    assert np.array_equal(np.rint(view * 255).astype(np.uint8), patch)


def test_rotation_really_rotates(patch):
    full = (0.0, 0.0, 224.0, 224.0)
    assert np.array_equal(apply_geometry(patch, ViewParams(crop=full, angle=90.0), 224), np.rot90(patch, 1))
    assert np.array_equal(apply_geometry(patch, ViewParams(crop=full, angle=-90.0), 224), np.rot90(patch, -1))
    assert np.array_equal(apply_geometry(patch, ViewParams(crop=full, angle=180.0), 224), patch[::-1, ::-1])
    # An arbitrary angle matches OpenCV's own rotation about the centre in the interior.
    ours = apply_geometry(patch, ViewParams(crop=full, angle=30.0), 224).astype(int)
    theirs = cv2.warpAffine(patch, cv2.getRotationMatrix2D((111.5, 111.5), 30.0, 1.0), (224, 224)).astype(int)
    inner = slice(40, 184)
    assert np.abs(ours[inner, inner] - theirs[inner, inner]).max() <= 1
    # Random views rotate by angles spread over the whole circle.
    rng = np.random.default_rng(1)
    angles = [sample_view(rng, (224, 224), replace(NOTHING, rotation_p=1.0)).angle for _ in range(400)]
    assert min(angles) < -150 and max(angles) > 150 and abs(np.mean(angles)) < 20
    # Mirrored borders: a rotated view has no black corners.
    corner = apply_geometry(patch, ViewParams(crop=full, angle=45.0), 224)[:10, :10]
    assert corner.mean() > 0.5 * patch.mean()


def test_flips_and_crops(patch):
    full = (0.0, 0.0, 224.0, 224.0)
    assert np.array_equal(apply_geometry(patch, ViewParams(crop=full, hflip=True), 224), patch[:, ::-1])
    assert np.array_equal(apply_geometry(patch, ViewParams(crop=full, vflip=True), 224), patch[::-1])
    # An axis-aligned crop resized down equals OpenCV's area resize of that crop.
    small = apply_geometry(patch, ViewParams(crop=(10.0, 20.0, 112.0, 112.0)), 56)
    assert np.array_equal(small, cv2.resize(patch[10:122, 20:132], (56, 56), interpolation=cv2.INTER_AREA))
    # Sampled crops lie inside the patch and cover 20-100 % of it.
    rng = np.random.default_rng(2)
    for _ in range(500):
        y0, x0, h, w = sample_crop(rng, 224, 224, (0.2, 1.0), (3 / 4, 4 / 3))
        assert 0 <= y0 and 0 <= x0 and y0 + h <= 224 + 1e-9 and x0 + w <= 224 + 1e-9
        assert 0.2 - 1e-9 <= h * w / 224**2 <= 1.0 + 1e-9 and 3 / 4 - 1e-9 <= w / h <= 4 / 3 + 1e-9


def test_small_views_of_large_crops_are_antialiased():
    # A one-pixel checkerboard shrunk 4x must average to grey, not alias into stripes.
    board = ((np.indices((224, 224)).sum(0) % 2) * 255).astype(np.uint8)
    view = apply_geometry(board, ViewParams(crop=(0.0, 0.0, 224.0, 224.0), angle=10.0), 56)
    assert view.std() < 10 and abs(view.mean() - 127.5) < 3


def test_jitter_changes_brightness_and_contrast(patch):
    hist = np.bincount(patch.ravel(), minlength=256).astype(np.float64)
    brighter = cv2.LUT(patch, jitter_lut(hist, 1.3, 1.0, False))
    flatter = cv2.LUT(patch, jitter_lut(hist, 1.0, 0.6, False))
    assert brighter.mean() == pytest.approx(min(255, 1.3 * patch.mean()), rel=0.03)
    assert flatter.std() == pytest.approx(0.6 * patch.std(), rel=0.03)
    assert flatter.mean() == pytest.approx(patch.mean(), abs=1.0)
    assert np.array_equal(cv2.LUT(patch, jitter_lut(hist, 1.0, 1.0, True)), patch)


def test_blur_removes_fine_detail(patch):
    detail = lambda img: np.abs(cv2.Laplacian(img.astype(np.float32), cv2.CV_32F)).mean()  # noqa: E731
    sharp = render_view(patch, ViewParams(crop=(0, 0, 224, 224)), 224)
    soft = render_view(patch, ViewParams(crop=(0, 0, 224, 224), blur_sigma=2.0), 224)
    softer = [render_view(patch, ViewParams(crop=(0, 0, 224, 224), blur_sigma=s), 224) for s in (0.5, 1.0, 2.0)]
    assert detail(soft) < 0.5 * detail(sharp)
    assert detail(softer[0]) > detail(softer[1]) > detail(softer[2])


def test_noise_adds_the_drawn_variance():
    flat = np.full((224, 224), 128, np.uint8)
    clean = render_view(flat, ViewParams(crop=(0, 0, 224, 224)), 224)
    assert clean.var() == 0
    for std in (0.003, 0.01):
        noisy = render_view(flat, ViewParams(crop=(0, 0, 224, 224), noise_std=std, noise_seed=5), 224)
        assert noisy.var() == pytest.approx(std**2, rel=0.05)
        assert abs(noisy.mean() - clean.mean()) < 1e-3
    # Drawn variances stay within the CEM500K range, log-uniformly (median near the geometric mean).
    rng = np.random.default_rng(3)
    stds = [sample_view(rng, (224, 224), replace(NOTHING, noise_p=1.0)).noise_std for _ in range(400)]
    assert min(stds) ** 2 >= 1e-5 - 1e-12 and max(stds) ** 2 <= 1e-4 + 1e-12
    assert np.median(np.square(stds)) == pytest.approx(math.sqrt(1e-5 * 1e-4), rel=0.25)
    off = [sample_view(rng, (224, 224), NOTHING).noise_std for _ in range(50)]
    assert not any(off)


def test_probabilities_are_respected():
    rng = np.random.default_rng(4)
    views = [sample_view(rng, (224, 224), AugmentParams()) for _ in range(2000)]
    assert np.mean([v.angle != 0 for v in views]) == pytest.approx(0.5, abs=0.05)
    assert np.mean([v.hflip for v in views]) == pytest.approx(0.5, abs=0.05)
    assert np.mean([v.brightness != 1 for v in views]) == pytest.approx(0.8, abs=0.05)
    assert np.mean([v.blur_sigma > 0 for v in views]) == pytest.approx(0.5, abs=0.05)
    assert np.mean([v.noise_std > 0 for v in views]) == pytest.approx(0.5, abs=0.05)
    assert all(0.6 <= v.brightness <= 1.4 and 0.6 <= v.contrast <= 1.4 for v in views)


def test_views_are_deterministic_given_a_seed(patch):
    params = AugmentParams(image_size=64)
    a = augment_view(patch, params, np.random.default_rng(7))
    b = augment_view(patch, params, np.random.default_rng(7))
    c = augment_view(patch, params, np.random.default_rng(8))
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    batch = np.stack([patch, patch[::-1].copy()])
    seeds = np.array([[1, 0, 0], [1, 0, 1]])
    q1, k1 = two_views(batch, seeds, params, mean=0.5, std=0.2)
    q2, k2 = two_views(batch, seeds, params, mean=0.5, std=0.2)
    assert q1.shape == k1.shape == (2, 1, 64, 64) and q1.dtype == np.float32
    assert np.array_equal(q1, q2) and np.array_equal(k1, k2) and not np.array_equal(q1, k1)
    # Normalised as (view - mean) / std.
    raw = augment_view(patch, params, np.random.default_rng([1, 0, 0]))
    assert np.allclose(q1[0, 0], (raw - 0.5) / 0.2, atol=1e-5)

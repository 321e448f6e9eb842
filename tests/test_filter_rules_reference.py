"""The label-free rules give exactly what their plain formulation gives.

``flat_fraction`` and ``rule_reasons`` compute the block statistics and count flat pixels per
block from integer sums instead of drawing a float copy and a full-size mask of every patch; the plain formulation below
(the one the rules were written in) is the reference, on real patches and on synthetic
near-threshold ones, for the default and for other block settings.
"""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
from conftest import require
from PIL import Image
from test_filter_rules import BAR_ROWS, PLATE_EMPTY

from cemcurate.filtering.rules import (
    DEFAULT_RULES,
    RuleSettings,
    flat_fraction,
    intensity_range,
    level_counts,
    noise_sigma,
    overlay_shares,
    rule_reasons,
    structure_fraction,
)


def plain_flat_fraction(patches: np.ndarray, rules: RuleSettings) -> np.ndarray:
    n, p, _ = patches.shape
    m = p // rules.block
    off = (p - m * rules.block) // 2
    core = patches[:, off : off + m * rules.block, off : off + m * rules.block]
    s, b = rules.smooth, rules.block // rules.smooth
    # The std of the s x s means is that of the (integer) s x s sums over s^2.
    sums = core.reshape(n, m * b, s, m * b, s).sum(axis=(2, 4), dtype=np.int64).astype(np.float64)
    block_std = sums.reshape(n, m, b, m, b).std(axis=(2, 4)) / (s * s)
    limit = np.maximum(rules.std_floor, rules.noise_factor * noise_sigma(patches) / s)
    if rules.rel_factor > 0:
        smoothest = np.percentile(block_std.reshape(n, -1), rules.rel_quantile, axis=1)
        limit = np.maximum(limit, rules.rel_factor * smoothest)
    uniform_block = block_std < limit[:, None, None]
    flat = np.repeat(np.repeat(uniform_block, rules.block, axis=1), rules.block, axis=2)
    counts = np.stack([np.bincount(c.ravel(), minlength=256) for c in core])
    mode = counts.argmax(axis=1)
    share = counts.max(axis=1) / core[0].size
    filled = (core == mode[:, None, None].astype(np.uint8)) & (share >= rules.mode_share)[:, None, None]
    return (flat | filled).reshape(n, -1).mean(axis=1)


def plain_reasons(patches: np.ndarray, rules: RuleSettings) -> np.ndarray:
    reasons = np.full(len(patches), "", dtype=object)
    reasons[structure_fraction(patches, rules) < rules.min_structure] = "unstructured"
    two, second = overlay_shares(patches)
    reasons[intensity_range(patches) < rules.min_range] = "low-contrast"
    reasons[(two >= rules.overlay_share) & (second >= rules.overlay_minor)] = "overlay"
    reasons[plain_flat_fraction(patches, rules) >= rules.max_flat] = "uniform"
    return reasons


def synthetic_patches(n: int, seed: int = 0, size: int = 224) -> np.ndarray:
    """Near-uniform patches with little noise (block stds near the 2-grey-level floor and the
    noise limit), ramps, quantised levels and padded parts: where rounding would show."""
    rng = np.random.default_rng(seed)
    out = np.empty((n, size, size), np.uint8)
    for k in range(n):
        base = rng.integers(0, 256)
        image = base + rng.normal(0, rng.uniform(0, 6), (size, size))
        if k % 2:
            image += np.linspace(0, rng.uniform(0, 40), size)[None, :]
        if k % 5 == 0:
            image = np.round(image / 8) * 8
        image = np.clip(image, 0, 255).astype(np.uint8)
        if k % 3 == 0:
            image[: rng.integers(0, size)] = base
        out[k] = image
    return out


@pytest.fixture(scope="module")
def real_patches(data_root):
    """224-px tiles of VNC ssTEM, the SEM plate and ISBI, the plate's empty background (enlarged
    2x) and its data bar (4x): every outcome of the rules."""
    plate = tifffile.imread(require(data_root / "sem_plate_databar/plateImage2D.tif"))
    images = [tifffile.imread(require(data_root / f"drosophila_vnc_gerhard/stack1/raw/{i:02d}.tif")) for i in (0, 9)]
    images += [plate, np.asarray(Image.open(require(data_root / "isbi2012_unet/test/0.png")).convert("L"))]
    tiles = [
        image[y : y + 224, x : x + 224]
        for image in images
        for y in range(0, image.shape[0] - 223, 112)
        for x in range(0, image.shape[1] - 223, 112)
    ]
    return np.ascontiguousarray(np.stack(tiles + enlarged_plate_crops(plate)))


def enlarged_plate_crops(plate: np.ndarray) -> list[np.ndarray]:
    """The SEM plate's empty background (2x, bilinear) and data bar (4x, nearest) as 224-px
    patches, enlarged as the tests of the rules do: patches the rules drop."""
    enlarged = [(plate[y : y + 112, x : x + 112], 2) for y, x in PLATE_EMPTY]
    enlarged += [(plate[BAR_ROWS[0] : BAR_ROWS[0] + 56, x : x + 56], 4) for x in range(0, plate.shape[1] - 55, 56)]
    return [
        np.asarray(Image.fromarray(crop).resize((224, 224), Image.NEAREST if factor == 4 else Image.BILINEAR))
        for crop, factor in enlarged
    ]


def test_real_patches_match_the_plain_formulation(real_patches):
    assert np.array_equal(flat_fraction(real_patches), plain_flat_fraction(real_patches, DEFAULT_RULES))
    reasons = rule_reasons(real_patches)
    assert (reasons == plain_reasons(real_patches, DEFAULT_RULES)).all()
    assert {"", "uniform", "overlay"} <= set(reasons)  # the outcomes are exercised


@pytest.mark.parametrize(
    "rules",
    [
        DEFAULT_RULES,
        RuleSettings(block=12, smooth=3),
        RuleSettings(block=16, smooth=4),
        RuleSettings(block=10, smooth=1),
    ],
)
def test_synthetic_patches_match_the_plain_formulation(rules):
    patches = synthetic_patches(160)
    assert np.array_equal(flat_fraction(patches, rules), plain_flat_fraction(patches, rules))
    assert (rule_reasons(patches, rules) == plain_reasons(patches, rules)).all()


def test_a_side_that_is_not_a_multiple_of_the_block():
    patches = synthetic_patches(60, seed=1, size=200)  # 12 blocks of 16 px in the central 192 px
    assert np.array_equal(flat_fraction(patches), plain_flat_fraction(patches, DEFAULT_RULES))
    assert (rule_reasons(patches) == plain_reasons(patches, DEFAULT_RULES)).all()


def test_noise_sigma_and_level_counts_are_per_patch():
    patches = synthetic_patches(20, seed=2)
    one_by_one = np.concatenate([noise_sigma(p[None]) for p in patches])
    assert np.array_equal(noise_sigma(patches), one_by_one)
    assert np.array_equal(level_counts(patches), np.stack([np.bincount(p.ravel(), minlength=256) for p in patches]))

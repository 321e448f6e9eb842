"""The four CEM500K image statistics against a plain per-image skimage reference, on real patches."""

from __future__ import annotations

import imageio.v3 as iio
import numpy as np
import pytest
import tifffile
from PIL import Image

from cemcurate.filtering.features import (
    FEATURE_NAMES,
    image_statistics,
    lbp_uniform,
    local_entropy,
    local_geometric_mean,
)


@pytest.fixture(scope="module")
def real_patches(data_root):
    """Six real 224-px patches of different kinds: ssTEM, FIB-SEM, SEM data bar, SEM background, CEM500K."""
    vnc = tifffile.imread(data_root / "drosophila_vnc_gerhard/stack1/raw/00.tif")
    neuro = iio.imread(data_root / "neuroproof_flyem/training_sample2/grayscale_maps/iso.2600.png")
    plate = tifffile.imread(data_root / "sem_plate_databar/plateImage2D.tif")
    cem = iio.imread(data_root / "cem500k_examples/occlusion/example0.tiff")
    # The data bar (rows 886-942) and a dark background crop are smaller than a patch here;
    # scale them up as the pipeline does for edge crops.
    bar = np.asarray(Image.fromarray(plate[886:942, 0:56]).resize((224, 224), Image.NEAREST))
    empty = np.asarray(Image.fromarray(plate[252:364, 0:112]).resize((224, 224), Image.BILINEAR))
    patches = np.stack([vnc[:224, :224], vnc[400:624, 600:824], neuro[:224, :224], bar, empty, cem])
    assert patches.dtype == np.uint8 and patches.shape == (6, 224, 224)
    return patches


def reference_statistics(patch: np.ndarray) -> np.ndarray:
    """The documented definitions, one image at a time, straight from skimage."""
    from skimage.feature import canny, local_binary_pattern
    from skimage.filters.rank import entropy, geometric_mean

    window = np.ones((9, 9), bool)
    return np.array(
        [
            local_binary_pattern(patch, 8, 1, method="uniform").std(),
            entropy(patch >> 3, window).std(),
            np.median(geometric_mean(patch, window)),
            canny(patch).mean(),  # skimage's defaults: sigma 1, thresholds 0.1 / 0.2 of the range
        ]
    )


def test_statistics_match_per_image_reference(real_patches):
    got = image_statistics(real_patches)
    assert got.shape == (len(real_patches), len(FEATURE_NAMES)) and got.dtype == np.float64
    want = np.stack([reference_statistics(p) for p in real_patches])
    np.testing.assert_allclose(got[:, 0], want[:, 0], rtol=0, atol=1e-12)  # LBP std
    np.testing.assert_allclose(got[:, 1], want[:, 1], rtol=0, atol=1e-9)  # entropy std
    # skimage rounds each local geometric mean to uint8; ours is unrounded, so the
    # medians differ by at most half a grey level.
    np.testing.assert_allclose(got[:, 2], want[:, 2], rtol=0, atol=0.5 + 1e-9)
    np.testing.assert_allclose(got[:, 3], want[:, 3], rtol=0, atol=1e-12)  # Canny edge fraction
    # The features must tell these patches apart: the data bar and the empty background
    # have far fewer edges than the ssTEM patches.
    assert got[4, 3] < 0.5 * got[0, 3] and got[4, 1] != got[0, 1]


def test_filter_images_pixel_exact(real_patches):
    from skimage.feature import local_binary_pattern
    from skimage.filters.rank import entropy, geometric_mean

    window = np.ones((9, 9), bool)
    lbp = lbp_uniform(real_patches)
    ent = local_entropy(real_patches)
    geo = local_geometric_mean(real_patches)
    for i, patch in enumerate(real_patches):
        np.testing.assert_array_equal(lbp[i], local_binary_pattern(patch, 8, 1, method="uniform"))
        np.testing.assert_allclose(ent[i], entropy(patch >> 3, window), atol=1e-9)
        # Rounding ours to uint8 reproduces skimage's filter (ties aside: allow 1 level).
        assert np.abs(np.round(geo[i]) - geometric_mean(patch, window)).max() <= 1


def test_batching_does_not_mix_patches(real_patches):
    # A chunk boundary falls inside a batch of 11; each row must equal the patch alone.
    batch = np.concatenate([real_patches, real_patches[:5]])
    together = image_statistics(batch)
    alone = np.stack([image_statistics(p[None])[0] for p in batch])
    np.testing.assert_array_equal(together, alone)


def test_input_validation():
    assert image_statistics(np.zeros((0, 32, 32), np.uint8)).shape == (0, 4)
    with pytest.raises(ValueError, match="uint8"):
        image_statistics(np.zeros((2, 32, 32), np.float32))
    with pytest.raises(ValueError, match="shape"):
        image_statistics(np.zeros((2, 32, 30), np.uint8))
    with pytest.raises(ValueError, match="odd"):
        local_entropy(np.zeros((1, 32, 32), np.uint8), window=8)

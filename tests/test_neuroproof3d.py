"""3D training data on FlyEM NeuroProof (10 nm isotropic FIB-SEM): boundary targets,
augmentations, the Dice loss. The training run itself is in ``test_finetune3d.py``."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from finetune.augment3d import Augment3D, augment_subvolume
from finetune.data3d import SubvolumeSamples
from finetune.losses import dice_loss, training_loss
from finetune.neuroproof import boundary_map

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_boundary_map_marks_both_sides_of_interfaces():
    ids = np.zeros((3, 4, 5), np.int32)
    ids[:, :, 3:] = 7
    b = boundary_map(ids)
    assert b.dtype == np.uint8
    assert b[:, :, 2:4].all() and not b[:, :, :2].any() and not b[:, :, 4].any()
    ids[1, 1, 1] = 9  # an isolated voxel marks itself and its six neighbours
    b = boundary_map(ids)
    assert b[1, 1, 1] and b[0, 1, 1] and b[2, 1, 1] and b[1, 0, 1] and b[1, 2, 1] and b[1, 1, 0] and b[1, 1, 2]
    assert not b[0, 0, 0]


def test_neuroproof_ground_truth_is_aligned(neuroproof_boundaries):
    image, bodies, lab = neuroproof_boundaries
    assert image.shape == bodies.shape == (250, 250, 250) and image.dtype == np.uint8
    assert 400 < len(np.unique(bodies)) < 600  # the README's 526 bodies
    # Membranes are dark in this FIB-SEM: boundary voxels are darker on average, which only
    # holds if the label volume is in the image's (z, y, x) orientation.
    assert image[lab == 1].mean() < image[lab == 0].mean() - 15


def test_augmentations_move_image_and_labels_together():
    rng = np.random.default_rng(0)
    img = rng.random((8, 16, 16), dtype=np.float32)
    lab = (img > 0.5).astype(np.uint8)
    aug = Augment3D(brightness=0.0, contrast=0.0, elastic_alpha=2.0, p_elastic=1.0)
    for seed in range(6):
        a, b = augment_subvolume(img, lab, np.random.default_rng(seed), aug)
        assert a.shape == img.shape and b.dtype == np.uint8 and set(np.unique(b)) <= {0, 1}
    # Without elastic deformation, the label map is exactly the thresholded image after any
    # flip / rotation combination.
    for seed in range(6):
        a, b = augment_subvolume(img, lab, np.random.default_rng(seed), Augment3D(brightness=0.0, contrast=0.0))
        np.testing.assert_array_equal(b, (a > 0.5).astype(np.uint8))
    # Samples are a pure function of (seed, index).
    ds = SubvolumeSamples([(np.uint8(img * 255), lab)], (4, 8, 8), 10, seed=3, augment=Augment3D())
    x0, y0 = ds[5]
    x1, y1 = ds[5]
    assert x0.shape == (1, 4, 8, 8) and y0.shape == (4, 8, 8)
    assert torch.equal(x0, x1) and torch.equal(y0, y1)


def test_dice_loss_against_a_direct_computation():
    torch.manual_seed(0)
    logits = torch.randn(2, 1, 4, 5, 6)
    target = (torch.rand(2, 4, 5, 6) > 0.7).long()
    target[0, 0, 0, :3] = 255  # ignored voxels
    p = torch.sigmoid(logits[:, 0])
    keep = target != 255
    t = (target == 1).float()
    ref = 1 - (2 * (p * t)[keep].sum() + 1) / (p[keep].sum() + t[keep].sum() + 1)
    torch.testing.assert_close(dice_loss(logits, target), ref)
    # Multi-class: perfect logits give a loss near 0, and training_loss adds cross-entropy to it.
    target3 = torch.randint(0, 3, (1, 4, 5, 6))
    perfect = 20.0 * torch.nn.functional.one_hot(target3, 3).movedim(-1, 1).float()
    assert float(dice_loss(perfect, target3)) < 1e-3
    assert float(training_loss(perfect, target3, "dice_ce")) < 1e-3
    with pytest.raises(ValueError, match="valid losses"):
        training_loss(perfect, target3, "focal")

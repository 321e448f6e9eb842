"""Real data: a short CPU run of the 3D UNet on FlyEM NeuroProof (10 nm isotropic FIB-SEM).

Targets are neuron boundaries derived from the ground truth (voxels whose body id differs
from a 6-neighbour). The model trains on one 64^3 region and is scored on a different
64^3 region, far away in z, with sliding-window prediction; it must beat both trivial
predictions (all background: boundary IoU 0; all foreground: IoU = boundary prevalence).

Budget: a resnet18 3D encoder, frozen at its seeded random initialisation, with a small
decoder trained for a few dozen iterations on 32^3 crops (about a minute on 2 CPU cores).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from finetune.data3d import (Augment3D, SubvolumeSamples, augment_subvolume, boundary_map, dice_loss, loss_3d,
                             neuroproof_sample, train_3d)
from finetune.metrics import confusion_matrix, iou_from_confusion, probs_to_classes
from finetune.models.unet3d import build_unet3d
from finetune.predict.sliding import predict_sliding

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TRAIN = (slice(0, 64), slice(0, 64), slice(0, 64))
TEST = (slice(186, 250), slice(0, 64), slice(0, 64))


@pytest.fixture(scope="module")
def neuroproof(data_root, tmp_path_factory):
    sample = data_root / "neuroproof_flyem" / "training_sample2"
    if not (sample / "groundtruth.h5.gz").is_file():
        pytest.skip(f"{sample}/groundtruth.h5.gz not found")
    image, bodies = neuroproof_sample(sample, tmp_path_factory.mktemp("neuroproof"))
    return image, bodies


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


def test_neuroproof_ground_truth_is_aligned(neuroproof):
    image, bodies = neuroproof
    assert image.shape == bodies.shape == (250, 250, 250) and image.dtype == np.uint8
    assert 400 < len(np.unique(bodies)) < 600  # the README's 526 bodies
    lab = boundary_map(bodies)
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
    # Multi-class: perfect logits give a loss near 0, and loss_3d adds cross-entropy to it.
    target3 = torch.randint(0, 3, (1, 4, 5, 6))
    perfect = 20.0 * torch.nn.functional.one_hot(target3, 3).movedim(-1, 1).float()
    assert float(dice_loss(perfect, target3)) < 1e-3
    assert float(loss_3d(perfect, target3, "dice_ce")) < 1e-3
    with pytest.raises(ValueError, match="valid losses"):
        loss_3d(perfect, target3, "focal")


@pytest.mark.slow
def test_short_training_beats_trivial_baselines(neuroproof):
    image, bodies = neuroproof
    labels = boundary_map(bodies)
    torch.manual_seed(0)
    model = build_unet3d("resnet18", 2, None, geometry="isotropic", decoder_channels=(32, 16, 8, 8, 4),
                         freeze_encoder=True)
    iters, batch = 80, 4
    samples = SubvolumeSamples([(image[TRAIN], labels[TRAIN])], 32, iters * batch, seed=0, augment=Augment3D())
    # Boundaries are ~10% of the voxels: weight them up so a short run does not settle on
    # "all background" (the paper's rare-class weighting does the same for multi-class tasks).
    log = train_3d(model, samples, iters, batch, lr=0.01, loss="bce", class_weights=torch.tensor([1.0, 5.0]))
    assert np.mean(log.losses[-10:]) < np.mean(log.losses[:10])

    truth = labels[TEST]
    probs = predict_sliding(model, image[TEST], window=(32, 64, 64), overlap=(8, 0, 0), batch_size=2)
    iou = iou_from_confusion(confusion_matrix(probs_to_classes(probs), truth, 2))[1]
    all_fg = iou_from_confusion(confusion_matrix(np.ones_like(truth), truth, 2))[1]
    all_bg = iou_from_confusion(confusion_matrix(np.zeros_like(truth), truth, 2))[1]
    assert all_bg == 0.0 and 0.1 < all_fg < 0.25
    assert iou > all_fg + 0.03, f"boundary IoU {iou:.3f} vs all-foreground {all_fg:.3f}"

"""ASEM's training recipe: block rejection, clipped inverse-frequency class weights, labelled-region masks.

Rules and weights are checked on constructed label volumes against hand computations; the
samplers and ``--mask-volume`` on real data (VNC mitochondria, NeuroProof boundaries).
"""

from __future__ import annotations

import imageio.v3 as iio
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cemcurate.common.config import build_config
from cemcurate.io import write_volume
from finetune.config import TrainConfig
from finetune.data import load_labelled
from finetune.data3d import SubvolumeSamples
from finetune.labels import LabelSpec
from finetune.losses import IGNORE_INDEX, balanced_weights, training_loss
from finetune.sampling import SAMPLING_RULES, SamplingRule
from finetune.train import train, training_samples

pytestmark = pytest.mark.usefixtures("one_torch_thread")
ASEM = SAMPLING_RULES["asem"]


def _block(unlabelled: int, foreground: int, n: int = 1000) -> np.ndarray:
    labels = np.zeros(n, np.uint8)
    labels[:unlabelled] = IGNORE_INDEX
    labels[unlabelled : unlabelled + foreground] = 1
    return labels.reshape(10, 10, 10)


def test_asem_rule_on_constructed_blocks():
    rng = np.random.default_rng(0)
    assert ASEM == SamplingRule(max_unlabelled=0.25, min_foreground=0.05, reject_probability=0.9)
    assert not any(ASEM.accepts(_block(251, 300), rng) for _ in range(100))  # > 25% outside the sample
    assert all(ASEM.accepts(_block(250, 50), rng) for _ in range(100))  # exactly 25% and 5%: kept
    # Under 5% foreground (also none at all): kept with probability 0.1.
    for fg in (49, 0):
        kept = np.mean([ASEM.accepts(_block(0, fg), rng) for _ in range(4000)])
        assert 0.085 < kept < 0.115, (fg, kept)
    # Foreground counts every class but 0 (multi-class) and not the unlabelled voxels.
    multi = _block(100, 0)
    multi.flat[100:130], multi.flat[130:160] = 2, 3
    assert ASEM.accepts(multi, rng)


def test_balanced_weights_and_loss_by_hand():
    target = torch.zeros(1, 100, dtype=torch.uint8)
    target[0, :10] = 1
    target[0, 10:30] = IGNORE_INDEX  # not counted: 70 background, 10 foreground
    assert torch.equal(balanced_weights(target, 2), torch.tensor([1.0, 7.0]))
    rare = torch.zeros(1, 10000, dtype=torch.uint8)
    rare[0, :5] = 1  # 1:1999 clipped at 1:100
    assert torch.equal(balanced_weights(rare, 2), torch.tensor([1.0, 100.0]))
    assert torch.equal(balanced_weights(torch.zeros(1, 50, dtype=torch.uint8), 2), torch.tensor([1.0, 100.0]))
    multi = torch.tensor([[0] * 60 + [1] * 30 + [2] * 10], dtype=torch.uint8)
    assert torch.allclose(balanced_weights(multi, 3), torch.tensor([1.0, 2.0, 6.0]))

    logits = torch.linspace(-2, 2, 100).reshape(1, 1, 100)
    bce = F.binary_cross_entropy_with_logits(logits[0, 0], (target[0] == 1).float(), reduction="none")
    w = torch.where(target[0] == 1, 7.0, 1.0) * (target[0] != IGNORE_INDEX)
    expected = (bce * w).sum() / w.sum()
    assert torch.allclose(training_loss(logits, target, "ce", balanced=True), expected)
    assert not torch.allclose(training_loss(logits, target, "ce"), expected)


def test_asem_sampling_on_real_labels_keeps_foreground_and_drops_unlabelled(vnc):
    """VNC mitochondria (about 5% of pixels) with the left half of every slice marked
    unlabelled: ASEM sampling never trains on a mostly unlabelled crop and raises the share
    of crops with foreground, while staying a pure function of (seed, index)."""
    image = np.stack([iio.imread(vnc / f"raw/{i:02d}.png") for i in range(16)])
    labels = (np.stack([iio.imread(vnc / f"mito/{i:02d}.png") for i in range(16)]) > 127).astype(np.uint8)
    labels[:, :, :96] = IGNORE_INDEX
    items = [(image, labels)]

    def stats(rule):
        samples = SubvolumeSamples(items, (4, 64, 64), 300, seed=3, rule=rule)
        crops = [samples[k][1].numpy() for k in range(300)]
        unlabelled = np.array([np.mean(c == IGNORE_INDEX) for c in crops])
        foreground = np.array([np.mean(c == 1) for c in crops])
        return samples, unlabelled, foreground

    uniform, u_unl, u_fg = stats(None)
    asem, a_unl, a_fg = stats(ASEM)
    assert np.mean(u_unl > 0.25) > 0.3 and np.all(a_unl <= 0.25)
    assert np.mean(a_fg >= 0.05) > np.mean(u_fg >= 0.05) + 0.1
    again = SubvolumeSamples(items, (4, 64, 64), 300, seed=3, rule=ASEM)
    assert all(torch.equal(a, b) for a, b in zip(asem[17], again[17]))


def test_mask_volume_errors_name_the_file(vnc, tmp_path):
    image = vnc / "raw/00.png"
    spec = LabelSpec.from_settings(["background", "mito"], 127, [], None, "error")
    iio.imwrite(tmp_path / "small.png", np.ones((10, 10), np.uint8))
    iio.imwrite(tmp_path / "empty.png", np.zeros((256, 256), np.uint8))
    with pytest.raises(ValueError, match="small.png: mask volume shape"):
        load_labelled([(image, vnc / "mito/00.png")], spec, [tmp_path / "small.png"])
    with pytest.raises(ValueError, match="empty.png: mask volume is all zero"):
        load_labelled([(image, vnc / "mito/00.png")], spec, [tmp_path / "empty.png"])
    half = np.zeros((256, 256), np.uint8)
    half[:, 128:] = 1
    iio.imwrite(tmp_path / "half.png", half)
    (item,) = load_labelled([(image, vnc / "mito/00.png")], spec, [tmp_path / "half.png"])
    assert np.all(item.labels[:, :, :128] == IGNORE_INDEX) and not np.any(item.labels[:, :, 128:] == IGNORE_INDEX)


def test_voxels_outside_the_mask_volume_never_reach_the_loss(neuroproof_boundaries, tmp_path):
    """Two 3D runs whose labels differ only outside the labelled region end with identical
    weights (ASEM sampling and balanced weights on), and a run without the mask does not."""
    image, _, boundary = neuroproof_boundaries
    region = (slice(0, 32), slice(0, 64), slice(0, 64))
    img, lab = image[region], boundary[region]
    mask = np.zeros_like(lab)
    mask[:, :, 16:] = 1
    scrambled = lab.copy()
    scrambled[:, :, :16] = 1 - scrambled[:, :, :16]
    write_volume(tmp_path / "image.tif", img)
    write_volume(tmp_path / "mask.tif", mask)
    for name, labels in (("labels", lab), ("scrambled", scrambled)):
        write_volume(tmp_path / f"{name}.tif", labels)

    def run(labels: str, masked: bool = True) -> dict:
        cfg = build_config(
            TrainConfig,
            dim="3d",
            images=[str(tmp_path / "image.tif")],
            masks=[str(tmp_path / labels)],
            mask_volume=[str(tmp_path / "mask.tif")] if masked else [],
            mask_threshold=0,
            arch="resnet18",
            decoder_channels=[16, 8, 8, 4, 4],
            sampling="asem",
            class_weighting="balanced",
            crop=32,
            crop_depth=16,
            batch_size=2,
            iters=2,
            workers=0,
        )
        out = tmp_path / f"run_{labels}_{masked}"
        assert train(cfg, out, progress=False).finished
        return torch.load(out / "model.pth", weights_only=True)["state_dict"]

    a, b = run("labels.tif"), run("scrambled.tif")
    assert all(torch.equal(a[k], b[k]) for k in a)
    c = run("scrambled.tif", masked=False)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_training_samples_use_the_configured_rule(vnc):
    cfg = build_config(
        TrainConfig, images=["raw/00.png"], masks=["mito/00.png"], mask_threshold=127, crop=64, sampling="asem"
    )
    spec = cfg.data.label_spec()
    items = load_labelled([(vnc / "raw/00.png", vnc / "mito/00.png")], spec)
    assert training_samples(cfg, items).rule is ASEM
    with pytest.raises(ValueError, match="sampling must be one of"):
        build_config(TrainConfig, images=["x"], masks=["y"], sampling="balanced")

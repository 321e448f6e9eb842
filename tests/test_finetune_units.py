"""finetune pure functions: losses, class weights, labels, IoU, crops, configs.

Each compute function is checked against a plain reference written here (loops, hand
counts) or against an exact property. Tiling is tested with the window engine in
``test_predict_windows.py``.
"""

from __future__ import annotations

import glob

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cemcurate.common.archs import get_arch
from cemcurate.common.config import build_config
from finetune.augment2d import Augmenter, native_scale_crop
from finetune.config import TrainConfig
from finetune.labels import LabelSpec, parse_label_map, parse_unmapped, to_class_map
from finetune.losses import IGNORE_INDEX, count_classes, prevalence_weights, segmentation_loss
from finetune.metrics import confusion_matrix, iou_from_confusion, probs_to_classes, unlabelled_prediction_mask
from finetune.models import build_model

# ---------------------------------------------------------------------------- losses


def test_binary_loss_matches_naive_loop_with_ignore():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 1, 5, 6, generator=g)
    target = torch.randint(0, 2, (2, 5, 6), generator=g).to(torch.uint8)
    target[0, 0, :3] = IGNORE_INDEX
    total, n = 0.0, 0
    for b in range(2):
        for i in range(5):
            for j in range(6):
                t = int(target[b, i, j])
                if t == IGNORE_INDEX:
                    continue
                p = 1 / (1 + np.exp(-float(logits[b, 0, i, j])))
                total += -(t * np.log(p) + (1 - t) * np.log(1 - p))
                n += 1
    assert float(segmentation_loss(logits, target)) == pytest.approx(total / n, rel=1e-5)


def test_weighted_multiclass_loss_matches_naive_loop():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 3, 4, 4, generator=g)
    target = torch.randint(0, 3, (2, 4, 4), generator=g).to(torch.uint8)
    target[1, 2] = IGNORE_INDEX
    w = torch.tensor([0.1, 3.0, 1.0])
    num = den = 0.0
    logp = F.log_softmax(logits, dim=1)
    for b in range(2):
        for i in range(4):
            for j in range(4):
                t = int(target[b, i, j])
                if t == IGNORE_INDEX:
                    continue
                num += -float(w[t]) * float(logp[b, t, i, j])
                den += float(w[t])
    assert float(segmentation_loss(logits, target, w)) == pytest.approx(num / den, rel=1e-5)


def test_prevalence_weights_rule():
    # 70% background, 20% common class, 8% and 2% rare classes.
    weights = prevalence_weights([700, 200, 80, 20], background=[0])
    np.testing.assert_allclose(weights, [0.1, 1.0, 3.0, 3.0])
    with pytest.raises(ValueError, match="no pixels"):
        prevalence_weights([10, 0, 5], class_names=["bg", "mito", "er"])
    with pytest.raises(ValueError, match="no labelled pixels"):
        prevalence_weights([0, 0])


def test_class_weights_from_real_vnc_label_prevalence(data_root, tmp_path):
    """VNC stack1/labels merges 9 grey values; weights follow their real prevalence."""
    from finetune.data import load_labelled, pair_files
    from finetune.train import class_weights

    labels_dir = data_root / "drosophila_vnc_gerhard/stack1/labels"
    raw_dir = data_root / "drosophila_vnc_gerhard/stack1/raw"
    if not labels_dir.is_dir():
        pytest.skip(f"{labels_dir} not found")
    # classes: intracellular (background), membranes (5 orientations/junctions), glia, mito, synapse
    cfg = build_config(
        TrainConfig,
        images=[str(raw_dir / "0[0-3].tif")],
        masks=[str(labels_dir / "labels0000000[0-3].png")],
        classes=["intracellular", "membrane", "glia", "mitochondria", "synapse"],
        label_map=[
            "255:intracellular",
            "0:membrane",
            "32:membrane",
            "64:membrane",
            "96:membrane",
            "128:membrane",
            "159:glia",
            "191:mitochondria",
            "223:synapse",
        ],
        class_weighting="prevalence",
    )
    items = load_labelled(pair_files(cfg.data.images, cfg.data.masks, None), cfg.data.label_spec())
    weights = class_weights(cfg.optim, cfg.data.classes, items)
    # Hand computation straight from the PNG grey values.
    import imageio.v3 as iio

    raw = np.concatenate([iio.imread(p).ravel() for p in sorted(glob.glob(str(labels_dir / "labels0000000[0-3].png")))])
    groups = {"membrane": [0, 32, 64, 96, 128], "glia": [159], "mitochondria": [191], "synapse": [223]}
    expected = [0.1]
    for name in ["membrane", "glia", "mitochondria", "synapse"]:
        frac = np.isin(raw, groups[name]).mean()
        expected.append(3.0 if frac < 0.1 else 1.0)
    np.testing.assert_allclose(weights, expected)
    assert expected[1] == 1.0 and expected[3] == 3.0  # membranes are common, mitochondria rare
    counts = count_classes([it.labels for it in items], 5)
    assert counts.sum() == raw.size and counts[0] == (raw == 255).sum()


# ---------------------------------------------------------------------------- labels


def test_label_spec_threshold_map_ignore_and_errors():
    raw = np.array([[0, 100, 128, 255], [7, 7, 200, 0]])
    spec = LabelSpec(2, threshold=127, ignore_value=7)
    np.testing.assert_array_equal(to_class_map(raw, spec), [[0, 0, 1, 1], [255, 255, 1, 0]])
    mapping = parse_label_map(["0:membrane", "255:background"], ["background", "membrane"])
    assert mapping == ((0.0, 1), (255.0, 0))
    isbi = to_class_map(np.array([0, 255, 0]), LabelSpec(2, mapping=mapping))
    np.testing.assert_array_equal(isbi, [1, 0, 1])
    with pytest.raises(ValueError, match=r"label values \[100"):
        to_class_map(np.array([0, 100, 255]), LabelSpec(2, mapping=mapping), source="lab.png")
    # CREMI-style: background value mapped, every other value (cleft ids) to one class.
    cremi = to_class_map(
        np.array([2**64 - 1, 5, 9], dtype=np.uint64),
        LabelSpec(2, mapping=((float(2**64 - 1), 0),), unmapped=parse_unmapped("cleft", ["bg", "cleft"])),
    )
    np.testing.assert_array_equal(cremi, [0, 1, 1])
    with pytest.raises(ValueError, match="not class indices"):
        to_class_map(np.array([0, 1, 2]), LabelSpec(2))


# ---------------------------------------------------------------------------- metrics


def test_iou_matches_hand_count():
    target = np.array([[0, 0, 1, 1], [0, 2, 2, 1], [255, 2, 0, 0]])
    pred = np.array([[0, 1, 1, 1], [0, 2, 0, 1], [1, 2, 2, 0]])
    # Ignored pixel (2, 0) is skipped. Class 1: TP 3 (0,2),(0,3),(1,3); FP 1 (0,1); FN 0 -> 3/4.
    # Class 2: TP 2 (1,1),(2,1); FP 1 (2,2); FN 1 (1,2) -> 2/4. Class 0: TP 3; FP 1 (1,2); FN 2 -> 3/6.
    iou = iou_from_confusion(confusion_matrix(pred, target, 3))
    np.testing.assert_allclose(iou, [3 / 6, 3 / 4, 2 / 4])
    assert np.isnan(iou_from_confusion(confusion_matrix(np.zeros(4), np.zeros(4), 2))[1])
    with pytest.raises(ValueError, match="does not match"):
        confusion_matrix(pred, target[:2], 3)


def test_unlabelled_prediction_regions_are_ignored_perez_style():
    target = np.zeros((6, 8), np.uint8)
    target[1:3, 1:3] = 1  # one labelled instance
    pred = np.zeros_like(target)
    pred[1:3, 1:4] = 1  # touches it (one extra false-positive column)
    pred[4:6, 5:8] = 1  # an unlabelled instance: not scored
    ignore = unlabelled_prediction_mask(pred, target, 2)
    assert ignore[4:6, 5:8].all() and ignore.sum() == 6
    iou = iou_from_confusion(confusion_matrix(pred, target, 2, ignore))
    assert iou[1] == pytest.approx(4 / 6)
    assert iou_from_confusion(confusion_matrix(pred, target, 2))[1] == pytest.approx(4 / 12)
    probs = np.stack([np.full((2, 2), 0.2), np.full((2, 2), 0.5), np.full((2, 2), 0.3)])
    np.testing.assert_array_equal(probs_to_classes(probs), 1)
    np.testing.assert_array_equal(probs_to_classes(np.full((1, 2), 0.5)), 1)


# ---------------------------------------------------------------------------- crops, config, registry


def test_native_crop_at_zoom_one_is_an_exact_subarray():
    rng = np.random.default_rng(3)
    image = rng.integers(0, 255, (100, 120), dtype=np.uint8)
    labels = rng.integers(0, 3, (100, 120), dtype=np.uint8)
    img, lab = native_scale_crop(image, labels, 64, 1.0, 0.0, np.random.default_rng(5))
    # find the offset: the crop must equal image[y:y+64, x:x+64] for some integer y, x
    hits = [(y, x) for y in range(37) for x in range(57) if np.array_equal(image[y : y + 64, x : x + 64], img)]
    assert len(hits) == 1
    y, x = hits[0]
    np.testing.assert_array_equal(lab, labels[y : y + 64, x : x + 64])
    # zoom 2 shows half the field of view: a 32 px source square blown up to 64 px.
    img2, lab2 = native_scale_crop(image, labels, 64, 2.0, 90.0, np.random.default_rng(5))
    assert img2.shape == (64, 64) and set(np.unique(lab2)) <= {0, 1, 2}


def test_augmenter_is_a_pure_function_of_the_seed():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (90, 90), dtype=np.uint8)
    labels = (image > 128).astype(np.uint8)
    for mode in ("native", "paper"):
        cfg = build_config(
            TrainConfig, images=["x"], masks=["y"], crop=64, crop_mode=mode, noise_var=[400, 1200], blur_sigma=2
        )
        aug = Augmenter(cfg.augment_2d())
        a = aug(image, labels, 123)
        b = aug(image, labels, 123)
        c = aug(image, labels, 124)
        assert a[0].shape == (64, 64) and a[1].shape == (64, 64)
        np.testing.assert_array_equal(a[0], b[0])
        np.testing.assert_array_equal(a[1], b[1])
        assert not np.array_equal(a[0], c[0])


def test_config_validation_and_registry_errors():
    with pytest.raises(ValueError, match="multiple of 32"):
        build_config(TrainConfig, images=["a"], masks=["b"], crop=100)
    with pytest.raises(ValueError, match="no training data"):
        build_config(TrainConfig)
    with pytest.raises(ValueError, match="valid archs: resnet18"):
        build_config(TrainConfig, images=["a"], masks=["b"], arch="resnet51")
    with pytest.raises(ValueError, match="unknown class"):
        build_config(TrainConfig, images=["a"], masks=["b"], label_map=["3:nucleus"])
    with pytest.raises(ValueError, match="valid archs"):
        get_arch("vgg16")
    with pytest.raises(ValueError, match="valid models: asem_unet, rsunet, unet2d, unet3d"):
        build_model("unet4d")
    model = build_model("unet2d", arch="resnet18", num_classes=3)
    out = model(torch.rand(1, 1, 64, 64))
    assert out.shape == (1, 3, 64, 64)


def test_volumes_are_sliced_along_the_configured_planes(data_root, tmp_path):
    """A real 3D label volume (neuroproof crop, body ids > 0 as foreground) sliced xy/xz/yz."""
    from cemcurate.io import write_volume
    from finetune.data import CropSamples, get_slice, load_labelled, pair_files, slice_index

    files = sorted(glob.glob(str(data_root / "neuroproof_flyem/training_sample2/grayscale_maps/*.png")))[:12]
    import imageio.v3 as iio

    vol = np.stack([iio.imread(f)[:40, :56] for f in files])  # (12, 40, 56)
    labels = (vol > np.median(vol)).astype(np.uint8)
    write_volume(tmp_path / "img.tif", vol)
    write_volume(tmp_path / "lab.tif", labels)
    cfg = build_config(
        TrainConfig,
        images=[str(tmp_path / "img.tif")],
        masks=[str(tmp_path / "lab.tif")],
        planes=["xy", "xz", "yz"],
        crop=32,
        batch_size=2,
        iters=3,
    )
    items = load_labelled(pair_files(cfg.data.images, cfg.data.masks, None), cfg.data.label_spec())
    index = slice_index(items, cfg.dim2d.planes)
    assert len(index) == 12 + 40 + 56
    img, lab = get_slice(items[0], 1, 7)  # xz plane at y = 7
    np.testing.assert_array_equal(img, vol[:, 7, :])
    np.testing.assert_array_equal(lab, labels[:, 7, :])
    img, _ = get_slice(items[0], 2, 5)  # yz plane at x = 5
    np.testing.assert_array_equal(img, vol[:, :, 5])
    x, y = CropSamples(items, cfg.dim2d.planes, cfg.augment_2d(), cfg.optim.seed, 6)[4]
    assert x.shape == (1, 32, 32) and x.dtype == torch.float32 and 0 <= float(x.min()) <= float(x.max()) <= 1
    assert y.shape == (32, 32) and set(np.unique(y.numpy())) <= {0, 1}
    assert len(slice_index(items, ["xy"])) == 12

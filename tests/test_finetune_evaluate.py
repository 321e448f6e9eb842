"""``finetune evaluate`` on files: IoU per class, per image, Perez-style and ignore handling.

Predictions are derived from real ISBI-2012 labels (eroded / shifted) so the expected
IoU can be counted by hand here with plain numpy.
"""

from __future__ import annotations

import json

import imageio.v3 as iio
import numpy as np
import pytest
from scipy import ndimage

from cemcurate.io import write_volume
from finetune.cli import main
from finetune.evaluate import format_table
from finetune.losses import IGNORE_INDEX
from finetune.metrics import cross_entropy_sum, scores_from_confusion


def _iou(pred: np.ndarray, truth: np.ndarray) -> float:
    return float((pred & truth).sum() / (pred | truth).sum())


@pytest.fixture(scope="module")
def isbi(data_root):
    folder = data_root / "isbi2012_unet/train/label"
    if not folder.is_dir():
        pytest.skip(f"{folder} not found")
    return [iio.imread(folder / f"{i}.png") for i in (24, 25)]


def test_per_image_and_pooled_iou_match_hand_counts(isbi, tmp_path):
    labels_dir, pred_dir = tmp_path / "labels", tmp_path / "pred"
    labels_dir.mkdir()
    pred_dir.mkdir()
    truths, preds = [], []
    for i, lab in enumerate(isbi):
        membrane = lab == 0
        pred = ndimage.binary_dilation(membrane, iterations=i + 1)  # over-segment by 1 and 2 px
        iio.imwrite(labels_dir / f"{i}.png", lab)
        iio.imwrite(pred_dir / f"{i}.png", pred.astype(np.uint8))  # class indices 0/1
        truths.append(membrane)
        preds.append(pred)
    out = tmp_path / "s.json"
    rc = main(
        [
            "evaluate",
            str(pred_dir),
            str(labels_dir / "*.png"),
            "--classes",
            "background",
            "membrane",
            "--label-map",
            "0:membrane",
            "255:background",
            "--json",
            str(out),
        ]
    )
    assert rc == 0
    result = json.loads(out.read_text())
    for row, p, t in zip(result["per_image"], preds, truths):
        assert row["iou"]["membrane"] == pytest.approx(_iou(p, t))
        assert row["iou"]["background"] == pytest.approx(_iou(~p, ~t))
    pooled = _iou(np.stack(preds), np.stack(truths))
    assert result["iou"]["membrane"] == pytest.approx(pooled)
    assert result["scored_pixels"] == sum(t.size for t in truths)
    # F1 (Dice), precision and recall of the pooled pixels, counted by hand.
    p, t = np.stack(preds), np.stack(truths)
    tp, fp, fn = (p & t).sum(), (p & ~t).sum(), (~p & t).sum()
    assert result["f1"]["membrane"] == pytest.approx(2 * tp / (2 * tp + fp + fn))
    assert result["precision"]["membrane"] == pytest.approx(tp / (tp + fp))
    assert result["recall"]["membrane"] == pytest.approx(tp / (tp + fn))
    assert result["mean_foreground_f1"] == pytest.approx(result["f1"]["membrane"])
    assert result["recall"]["background"] == pytest.approx((~p & ~t).sum() / (~t).sum())


def test_scores_from_a_confusion_matrix_by_hand():
    # Rows: true class; columns: predicted. Class 2 is never predicted and never present.
    cm = np.array([[50, 10, 0], [5, 35, 0], [0, 0, 0]])
    s = scores_from_confusion(cm)
    assert s["iou"][1] == pytest.approx(35 / (35 + 10 + 5)) and s["f1"][1] == pytest.approx(70 / (70 + 10 + 5))
    assert s["precision"][1] == pytest.approx(35 / 45) and s["recall"][1] == pytest.approx(35 / 40)
    assert s["precision"][0] == pytest.approx(50 / 55) and s["recall"][0] == pytest.approx(50 / 60)
    assert all(np.isnan(s[k][2]) for k in s)
    # F1 and IoU are tied: F1 = 2 IoU / (1 + IoU).
    assert s["f1"][:2] == pytest.approx(2 * s["iou"][:2] / (1 + s["iou"][:2]))


def test_validation_cross_entropy_by_hand():
    binary = np.array([[0.9, 0.2, 0.5, 0.0]])
    target = np.array([1, 0, IGNORE_INDEX, 1], np.uint8)
    total, count = cross_entropy_sum(binary, target)
    assert count == 3 and total == pytest.approx(-np.log(0.9) - np.log(0.8) - np.log(1e-6))
    multi = np.array([[0.7, 0.1], [0.2, 0.3], [0.1, 0.6]])  # (C=3, 2 voxels)
    total, count = cross_entropy_sum(multi, np.array([0, 2], np.uint8))
    assert count == 2 and total == pytest.approx(-np.log(0.7) - np.log(0.6))


def test_the_table_shows_every_metric(tmp_path):
    result = {
        "classes": ["background", "mito"],
        "per_image": [],
        **{k: {"background": 0.9, "mito": 0.5} for k in ("iou", "f1", "precision", "recall")},
        **{f"mean_foreground_{k}": 0.5 for k in ("iou", "f1", "precision", "recall")},
    }
    table = format_table(result).splitlines()
    assert table[0].split() == ["class", "IoU", "F1/Dice", "precision", "recall"]
    assert table[2].split() == ["mito", "0.5000", "0.5000", "0.5000", "0.5000"]


def test_volume_probabilities_ignore_label_and_instances_only(isbi, tmp_path):
    membrane = np.stack([lab == 0 for lab in isbi])
    labels = np.where(membrane, 255, 0).astype(np.uint8)  # 255 = foreground here
    labels[:, :20, :] = 7  # an "unlabelled" band: ignored
    in_plane = np.ones((1, 3, 3), bool)  # erode within each slice only
    probs = np.where(ndimage.binary_erosion(membrane, in_plane), 0.9, 0.2).astype(np.float32)
    # False positives far (> 10 px) from any membrane: regions that touch no labelled instance.
    extra = np.stack([ndimage.distance_transform_edt(~m) > 10 for m in membrane])
    probs[extra] = 0.95
    write_volume(tmp_path / "labels.tif", labels)
    write_volume(tmp_path / "probs.tif", probs)
    out = tmp_path / "s.json"
    common = [
        str(tmp_path / "probs.tif"),
        str(tmp_path / "labels.tif"),
        "--label-threshold",
        "127",
        "--ignore-label",
        "7",
        "--json",
        str(out),
    ]
    assert main(["evaluate", *common]) == 0
    r = json.loads(out.read_text())
    keep = np.ones_like(membrane)
    keep[:, :20] = False
    pred = probs >= 0.5
    assert extra.any()
    assert r["iou"]["foreground"] == pytest.approx(_iou(pred & keep, membrane & keep))
    assert r["scored_pixels"] == int(keep.sum())
    # Perez-style: the blob touches no labelled instance and is left out of the score.
    assert main(["evaluate", *common, "--instances-only"]) == 0
    r2 = json.loads(out.read_text())
    regions, _ = ndimage.label(pred, structure=np.ones((3, 3, 3)))
    touching = np.isin(regions, np.unique(regions[pred & membrane & keep]))
    scored = keep & (~pred | touching)
    assert r2["iou"]["foreground"] == pytest.approx(_iou(pred & scored, membrane & scored))
    assert r2["iou"]["foreground"] > r["iou"]["foreground"]


def test_evaluate_rejects_mismatched_inputs(isbi, tmp_path, capsys):
    write_volume(tmp_path / "a.tif", np.zeros((2, 512, 512), np.uint8))
    write_volume(tmp_path / "b.tif", np.zeros((2, 500, 512), np.uint8))
    assert main(["evaluate", str(tmp_path / "a.tif"), str(tmp_path / "b.tif")]) == 2
    assert "does not match labels" in capsys.readouterr().err
    write_volume(tmp_path / "c.tif", np.full((2, 512, 512), 3, np.uint8))
    assert main(["evaluate", str(tmp_path / "c.tif"), str(tmp_path / "a.tif"), "--pred-kind", "labels"]) == 2
    assert "predicted classes [3]" in capsys.readouterr().err

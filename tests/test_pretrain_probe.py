"""``pretrain probe``: tiles, tile labels, the two read-outs on constructed features, and a real VNC run."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import require

from pretrain.analyze import read_image
from pretrain.cli import main
from pretrain.probe import (
    AMBIGUOUS,
    ProbeSettings,
    balanced_accuracy,
    knn_probe,
    linear_probe,
    pair_files,
    tile_grid,
    tile_labels,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_tile_grid_cuts_row_by_row_and_drops_the_remainder():
    image = np.arange(10 * 7).reshape(10, 7)
    tiles = tile_grid(image, 3)
    assert tiles.shape == (3 * 2, 3, 3)
    assert np.array_equal(tiles[0], image[0:3, 0:3])
    assert np.array_equal(tiles[1], image[0:3, 3:6])  # second column before the second row
    assert np.array_equal(tiles[2], image[3:6, 0:3])


def test_tile_labels_use_both_fractions_and_leave_the_middle_out():
    mask = np.zeros((20, 30), bool)
    mask[0:10, 0:10] = True  # tile 0: 100%
    mask[10, 10] = True  # tile 4 (row 1, column 1): 1 of 100 pixels = 1%
    mask[10:12, 20:25] = True  # tile 5: 10 of 100 = 10%
    labels = tile_labels(mask, 10, positive_fraction=0.05, negative_fraction=0.005)
    assert labels.tolist() == [1, 0, 0, 0, AMBIGUOUS, 1]


def test_balanced_accuracy_scores_a_constant_answer_one_half():
    truth = np.array([0] * 90 + [1] * 10)
    assert balanced_accuracy(truth, np.zeros(100)) == 0.5
    assert balanced_accuracy(truth, truth) == 1.0
    assert balanced_accuracy(truth, 1 - truth) == 0.0


def _features(n: int, informative: bool, seed: int):
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.2).astype(np.int64)  # a rare class, as organelle tiles are
    x = rng.normal(size=(n, 16))
    if informative:
        x[:, 3] += 4.0 * y  # one channel fires on the class
    return x, y


def test_both_readouts_find_a_channel_that_codes_the_class_and_nothing_in_noise():
    (tx, ty), (vx, vy) = _features(400, True, 0), _features(200, True, 1)
    lin, knn = linear_probe(tx, ty, vx, vy), knn_probe(tx, ty, vx, vy, k=5)
    assert lin["auroc"] > 0.98 and lin["balanced_accuracy"] > 0.9
    assert knn["balanced_accuracy"] > 0.75
    (nx, ny), (mx, my) = _features(400, False, 2), _features(200, False, 3)
    assert abs(linear_probe(nx, ny, mx, my)["auroc"] - 0.5) < 0.12
    assert abs(knn_probe(nx, ny, mx, my, k=5)["balanced_accuracy"] - 0.5) < 0.12


def test_knn_vote_is_class_balanced():
    # Every test point's 3 nearest training points are 1 positive and 2 negatives; with 10% positives
    # in training, a balanced vote (1/0.1 against 2/0.9) says positive, a plain majority would not.
    train_x = np.array([[1.0, 0.0]] * 1 + [[0.9, 0.1]] * 2 + [[0.0, 1.0]] * 27)
    train_y = np.array([1] + [0] * 29)
    out = knn_probe(train_x, train_y, np.array([[1.0, 0.0], [0.0, 1.0]]), np.array([1, 0]), k=3)
    assert out["balanced_accuracy"] == 1.0


def test_settings_and_pairing_reject_bad_input(tmp_path):
    with pytest.raises(ValueError, match="negative_fraction < positive_fraction"):
        ProbeSettings(positive_fraction=0.01, negative_fraction=0.02)
    (tmp_path / "im").mkdir()
    (tmp_path / "ma").mkdir()
    for i in range(3):
        (tmp_path / "im" / f"{i}.png").write_bytes(b"")
    (tmp_path / "ma" / "0.png").write_bytes(b"")
    with pytest.raises(ValueError, match="gives 3 image files but .* gives 1 masks"):
        pair_files([str(tmp_path / "im")], [str(tmp_path / "ma")])


def test_probe_on_real_vnc_sections(data_root, tmp_path, capsys):
    """Two VNC sections train, one tests: tile counts follow the masks, and a random ResNet18's
    pooled features already rank mitochondria tiles above chance (random conv features keep
    texture statistics; that is the baseline a pre-trained encoder has to beat)."""
    stack = require(data_root / "drosophila_vnc_gerhard" / "stack1")
    out = tmp_path / "probe"
    rc = main(
        [
            "probe",
            "random=random",
            "--arch",
            "resnet18",
            "--mask-threshold",
            "127",
            "--crop",
            "128",
            "--train-images",
            str(stack / "raw" / "0[0-1].tif"),
            "--train-masks",
            str(stack / "mitochondria" / "0[0-1].png"),
            "--test-images",
            str(stack / "raw" / "16.tif"),
            "--test-masks",
            str(stack / "mitochondria" / "16.png"),
            "--device",
            "cpu",
            "--out",
            str(out),
        ]
    )
    assert rc == 0
    doc = json.loads((out / "probe.json").read_text())
    expected_positive = 0
    for name in ("00", "01"):
        mask = read_image(stack / "mitochondria" / f"{name}.png") > 127
        expected_positive += int((tile_labels(mask, 128, 0.05, 0.005) == 1).sum())
    assert doc["train"]["files"] == 2 and doc["test"]["files"] == 1
    assert doc["train"]["positive"] == expected_positive > 0
    assert doc["train"]["tiles"] <= 2 * (1024 // 128) ** 2
    scores = doc["encoders"]["random"]
    assert 0.5 < scores["linear"]["auroc"] <= 1.0
    assert "| random |" in capsys.readouterr().out

"""`cemcurate filter train OUT --bootstrap`: a classifier from the label-free rules' confident extremes.

Real data: a default build of the cryo-ET tomogram (empty ice and cell slices), VNC ssTEM
sections and the SEM plate; the ResNet is a random resnet18 at 64 px for the mechanics.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pandas as pd
import pytest

from cemcurate.build import BuildConfig, build
from cemcurate.cli import main
from cemcurate.filtering.labels import LabelPool, append_labels, confident_extremes, labels_path
from cemcurate.filtering.rules import rule_informative_prob


def test_confident_extremes_takes_the_surest_first_up_to_the_limit():
    scores = np.array([0.1, 0.9, 0.2, 0.99, 0.5, 0.1, 0.96, 0.96])
    low, high = confident_extremes(scores, low=0.2, high=0.95, limit=2)
    assert low.tolist() == [0, 5]  # 0.1, 0.1 (index order on ties); 0.2 is past the limit
    assert high.tolist() == [3, 6]  # 0.99, then the first 0.96
    low, high = confident_extremes(scores, low=0.05, high=1.0, limit=5)
    assert len(low) == 0 and len(high) == 0


@pytest.fixture(scope="module")
def scored_build(data_root, tmp_path_factory):
    root = tmp_path_factory.mktemp("bootstrap")
    raw = root / "raw"
    raw.mkdir()
    os.symlink(data_root / "cryoet_tomo_napari_bio/tomo.tif", raw / "tomo.tif")
    os.symlink(data_root / "sem_plate_databar/plateImage2D.tif", raw / "plate.tif")
    for i in range(2):
        os.symlink(data_root / f"drosophila_vnc_gerhard/stack1/raw/{i:02d}.tif", raw / f"vnc{i:02d}.tif")
    out = root / "out"
    build(raw, out, BuildConfig(workers=1), progress=False)
    return out


def _train_args(out, dest, *extra):
    args = ["filter", "train", str(out), "--bootstrap", "--arch", "resnet18", "--weights", "random"]
    args += ["--epochs", "2", "--batch-size", "16", "--input-size", "64", "--forest-trees", "20", "--quiet"]
    return [*args, "--output", str(dest), *extra]


def test_bootstrap_trains_on_the_rules_confident_extremes(scored_build, tmp_path, capsys):
    out = scored_build
    assert not labels_path(out).exists()  # no hand label at all
    assert main(_train_args(out, tmp_path / "filter")) == 0
    printed = capsys.readouterr().out
    assert "labelled by the label-free rules, 0 hand labels" in printed
    metrics = json.loads((tmp_path / "filter" / "metrics.json").read_text())
    boot = metrics["bootstrap"]
    assert boot["hand_labels"] == 0 and boot["uninformative"] >= 4 and boot["informative"] >= 4
    assert metrics["n_labels"] == boot["uninformative"] + boot["informative"]
    # The pseudo-labels are the patches the rules score at the extremes: the empty ice low.
    manifest = pd.read_parquet(out / "manifest.parquet").set_index("patch_id")
    pool = LabelPool(out)
    scores = rule_informative_prob(pool.patches(pool.patch_ids))
    np.testing.assert_allclose(scores, manifest.loc[pool.patch_ids, "informative_prob"], atol=1e-6)
    expected = int((scores <= 0.27).sum()), int((scores >= 0.95).sum())
    assert (boot["uninformative"], boot["informative"]) == expected
    low_sources = set(manifest.loc[pool.patch_ids[scores <= 0.27], "source"])
    assert low_sources == {"tomo.tif"}
    assert (tmp_path / "filter" / "classifier.pth").is_file()


def test_hand_labels_win_and_too_few_extremes_are_refused(scored_build, tmp_path, capsys):
    out = scored_build
    pool = LabelPool(out)
    scores = rule_informative_prob(pool.patches(pool.patch_ids))
    surest_bad = int(pool.patch_ids[np.argmin(scores)])
    labels = tmp_path / "hand.csv"
    append_labels(labels, [(surest_bad, 1)])  # a person disagrees with the rules
    assert main(_train_args(out, tmp_path / "filter", "--labels", str(labels))) == 0
    metrics = json.loads((tmp_path / "filter" / "metrics.json").read_text())
    assert metrics["bootstrap"]["hand_labels"] == 1
    assert metrics["bootstrap"]["uninformative"] == int((scores <= 0.27).sum()) - 1  # not labelled twice
    capsys.readouterr()
    assert main(_train_args(out, tmp_path / "f2", "--bootstrap-low", "0.0")) == 2
    err = capsys.readouterr().err
    assert "the label-free rules are sure of only 0 uninformative" in err and "cemcurate label" in err
    assert main(_train_args(out, tmp_path / "f3", "--bootstrap-low", "0.9", "--bootstrap-high", "0.5")) == 2
    assert "need 0 <= bootstrap_low < bootstrap_high <= 1" in capsys.readouterr().err

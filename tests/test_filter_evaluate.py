"""Evaluation sets (``cemcurate filter evaluate``): the committed labelled set on ../shared/data,
the patches it names (the pixels a build stores), the metrics and the command."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import require
from sklearn.metrics import roc_auc_score

from cemcurate.build import BuildConfig, build
from cemcurate.cli import main
from cemcurate.filtering.evaluation import (
    EvaluationSetError,
    WindowSettings,
    evaluation_patches,
    filter_metrics,
    read_evaluation_set,
)
from cemcurate.filtering.rules import RuleSettings, rule_reasons, rule_scores
from cemcurate.store import open_patches

LABELLED_SET = Path(__file__).resolve().parents[1] / "benchmarks" / "filter_labels.csv"
HEADER = ["file", "plane", "slice", "y", "x", "h", "w", "label"]


@pytest.fixture(scope="module")
def labelled(data_root):
    crops = read_evaluation_set(LABELLED_SET)
    require(data_root / crops[0].file)
    return crops, evaluation_patches(crops, data_root, source=LABELLED_SET)


def test_the_labelled_set_covers_the_sources_the_issue_names(labelled):
    crops, patches = labelled
    labels = np.array([c.label for c in crops])
    files = {c.file for c in crops}
    groups = {c.group for c in crops}
    assert len(crops) >= 400 and len(groups) >= 6 and patches.shape == (len(crops), 224, 224)
    for folder in ("cryoet_tomo_napari_bio", "mrcfile_testdata", "sem_plate_databar", "drosophila_vnc_gerhard"):
        assert folder in groups
    assert {"isbi2012_unet", "neuroproof_flyem", "cem500k_examples"} <= groups
    assert "cem500k_examples/correlation/images/nuclei.png" in files
    assert 0.1 < (labels == 0).mean() < 0.5  # both classes, informative the larger one
    # Every patch is a real crop: no constant patch (a crop outside the image would be padding).
    assert (patches.reshape(len(patches), -1).std(axis=1) > 0).all()


def test_the_set_cuts_the_pixels_a_default_build_stores(tmp_path, data_root, labelled):
    """The SEM plate (uint8 TIFF) and the cryo-ET tomogram (float32: the intensity window
    matters) built with default settings: each stored patch at a labelled position equals the
    patch the evaluation set cuts there."""
    crops, patches = labelled
    raw = tmp_path / "raw"
    raw.mkdir()
    names = {"sem_plate_databar/plateImage2D.tif": "plate.tif", "cryoet_tomo_napari_bio/tomo.tif": "tomo.tif"}
    for rel, name in names.items():
        (raw / name).symlink_to(require(data_root / rel))
    build(raw, tmp_path / "out", BuildConfig(workers=1, dedup=False, filter="none"), progress=False)
    store = open_patches(tmp_path / "out")
    index = {
        (row.source, row.slice, row.y, row.x, row.h, row.w): i
        for i, row in enumerate(store.manifest.itertuples(index=False))
    }
    matched = 0
    for crop, patch in zip(crops, patches):
        key = (names.get(crop.file), crop.slice, crop.y, crop.x, crop.h, crop.w)
        if key in index:
            assert np.array_equal(store[index[key]], patch), crop
            matched += 1
    assert matched >= 40  # the tomogram's labelled slices and the plate's tiles on the build's grid


def test_the_default_filter_on_the_labelled_set(labelled):
    """The label-free default on the patches a default build cuts (crops of at least 112 px; the
    EMDB maps' 20-43 px slices and the 84-100 px cryo-ET and GALA crops are enlarged 2-11x
    here but give no patch at the default --min-edge): a ranking well above chance, no
    informative patch dropped in the tissue sources, the tomogram's empty ice dropped; AUROC >= 0.95
    and <= 2% of the informative dropped, the issue's goal, on the build-sized crops."""
    crops, patches = labelled
    labels = np.array([c.label for c in crops])
    groups = np.array([c.group for c in crops])
    probs, reasons = rule_scores(patches)
    built = np.array([min(c.h, c.w) >= 112 for c in crops])
    # Measured: 0.983 on the 463 build-sized crops, 0.706 on all 554 (the EMDB maps score as tissue,
    # and 18 of the 36 faint-filament cryo-ET crops, enlarged 2.4-2.7x, as unstructured).
    assert roc_auc_score(labels[built], probs[built]) >= 0.95
    assert roc_auc_score(labels, probs) > 0.68
    informative = labels == 1
    assert (probs[informative & built] < 0.5).mean() <= 0.02
    for group in ("drosophila_vnc_gerhard", "isbi2012_unet", "neuroproof_flyem", "cem500k_examples"):
        tissue = informative & (groups == group)
        assert (probs[tissue] >= 0.5).mean() >= 0.98, group
    tomo = groups == "cryoet_tomo_napari_bio"
    ice, cell = tomo & ~informative, tomo & informative
    assert (probs[ice] < 0.5).mean() >= 0.9 and (reasons[ice & (probs < 0.5)] == "uniform").all()
    assert (probs[cell] >= 0.5).mean() >= 0.9  # measured: all 17
    # The rules before issue 12 (no relative noise floor, no structure rule) kept the ice.
    assert (rule_reasons(patches[ice], RuleSettings(rel_factor=0, min_structure=0)) == "").mean() >= 0.9


def test_the_window_settings_are_the_builds_defaults():
    cfg, window = BuildConfig(), WindowSettings()
    assert (window.low_percentile, window.high_percentile) == (cfg.low_percentile, cfg.high_percentile)
    assert window.sample_slices == cfg.window_sample_slices


def test_metrics_by_hand():
    labels = np.array([1, 1, 1, 1, 0, 0])
    scores = np.array([0.9, 0.8, 0.4, 0.7, 0.6, 0.1])
    m = filter_metrics(labels, scores, threshold=0.5)
    # Kept: the first, second and fourth informative and the first uninformative.
    assert m["precision"] == 3 / 4 and m["recall"] == 3 / 4
    assert m["informative_dropped"] == 1 / 4 and m["uninformative_dropped"] == 1 / 2
    assert m["auroc"] == pytest.approx(roc_auc_score(labels, scores)) and m["auroc"] == pytest.approx(7 / 8)
    assert np.isnan(filter_metrics(np.ones(3), np.ones(3), 0.5)["auroc"])  # one class: no AUROC


def _write_set(path: Path, rows: list[list]) -> Path:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(HEADER)
        writer.writerows(rows)
    return path


def test_the_command_prints_and_writes_the_metrics(tmp_path, data_root, capsys):
    require(data_root / "sem_plate_databar/plateImage2D.tif")
    rows = [
        ["sem_plate_databar/plateImage2D.tif", "xy", 0, 0, 0, 224, 224, 1],
        ["sem_plate_databar/plateImage2D.tif", "xy", 0, 224, 224, 224, 224, 1],
        ["cryoet_tomo_napari_bio/tomo.tif", "xy", 10, 0, 0, 135, 135, 0],
        ["neuroproof_flyem/training_sample2/grayscale_maps/iso.2601.png", "xy", 0, 13, 13, 224, 224, 1],
    ]
    labels = _write_set(tmp_path / "set.csv", rows)
    out = tmp_path / "eval"
    assert (
        main(["filter", "evaluate", str(labels), "--data", str(data_root), "--filter", "none", "--out", str(out)]) == 0
    )
    printed = capsys.readouterr().out
    assert "4 patches from 3 source folder(s), 3 informative, 1 uninformative" in printed
    assert "--filter none (keeps score >= 0.5): AUROC 0.500, precision 0.750, recall 1.000" in printed
    metrics = json.loads((out / "metrics.json").read_text())["none"]
    assert metrics["uninformative_dropped"] == 0.0 and metrics["by_source_folder"]["cryoet_tomo_napari_bio"]["n"] == 1
    assert (out / "roc.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # --min-edge scores only the crops a build with that --min-edge cuts: the 135-px one stays out.
    assert main(["filter", "evaluate", str(labels), "--data", str(data_root), "--min-edge", "200"]) == 0
    printed = capsys.readouterr().out
    assert "left out 1 crop(s) with a side below 200 px" in printed and "3 patches from 2 source folder(s)" in printed
    assert main(["filter", "evaluate", str(labels), "--data", str(data_root), "--min-edge", "300"]) == 2
    assert "no crop has both sides of at least --min-edge 300 px" in capsys.readouterr().err


@pytest.mark.parametrize(
    "row, message",
    [
        (["missing.tif", "xy", 0, 0, 0, 224, 224, 1], "line 2: missing.tif: no such file under the data root"),
        (["sem_plate_databar/plateImage2D.tif", "xy", 0, 800, 0, 224, 224, 1], "leaves the xy plane (943 x 1024 px)"),
        (["sem_plate_databar/plateImage2D.tif", "xy", 3, 0, 0, 224, 224, 1], "slice 3 of plane xy, which has 1"),
        (["sem_plate_databar/plateImage2D.tif", "xy", 0, 0, 0, 224, 224, 2], "line 2: label must be 1"),
        (["sem_plate_databar/plateImage2D.tif", "zz", 0, 0, 0, 224, 224, 1], "plane must be one of xy, xz, yz"),
        (["sem_plate_databar/plateImage2D.tif", "xy", "a", 0, 0, 224, 224, 1], "slice must be an integer"),
    ],
)
def test_a_bad_row_is_named(tmp_path, data_root, capsys, row, message):
    require(data_root / "sem_plate_databar/plateImage2D.tif")
    labels = _write_set(tmp_path / "set.csv", [row])
    assert main(["filter", "evaluate", str(labels), "--data", str(data_root)]) == 2
    err = capsys.readouterr().err
    assert message in err and str(labels) in err and len(err.strip().splitlines()) == 1


def test_a_set_without_a_column_is_refused(tmp_path):
    path = tmp_path / "set.csv"
    pd.DataFrame({"file": ["a.tif"], "label": [1]}).to_csv(path, index=False)
    with pytest.raises(EvaluationSetError, match="missing column"):
        read_evaluation_set(path)

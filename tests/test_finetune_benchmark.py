"""Benchmark definitions match the paper's settings; the runner produces a Table-2-style table."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pytest
import tifffile
import torch
import yaml
from skimage.transform import downscale_local_mean

from cemcurate.common.config import load_config
from finetune.benchmark import REPO, load_definition, parse_init, results_table, run_benchmarks
from finetune.benchmark_cli import parse_sets
from finetune.cli import main
from finetune.config import TrainConfig
from finetune.report import overlay

DEFINITIONS = sorted((REPO / "benchmarks" / "finetune").glob("*.yaml"))
# Conrad & Narayan 2021, Materials and methods: crop size per benchmark.
PAPER_CROPS = {
    "Lucchi++": 512,
    "Kasthuri++": 512,
    "Guay": 512,
    "CREMI Synaptic Clefts": 512,
    "Perez": 480,
    "UroCell": 224,
    "All Mitochondria": 224,
}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _iou(pred: np.ndarray, truth: np.ndarray) -> float:
    """Foreground IoU of two boolean arrays, written out independently of finetune.metrics."""
    return float(np.logical_and(pred, truth).sum() / np.logical_or(pred, truth).sum())


def test_every_definition_loads_with_paper_settings():
    names = set()
    for path in DEFINITIONS:
        d = load_definition(path)
        names.add(d["name"])
        for task in d["tasks"]:
            cfg = load_config(TrainConfig, REPO / task["config"])
            paper = d.get("paper") or {}
            if "iters" in paper:  # Table 2 "Training Iterations"
                assert cfg.optim.iters == paper["iters"], (path.name, cfg.optim.iters)
            if d["name"] in PAPER_CROPS:
                assert cfg.augment.crop == PAPER_CROPS[d["name"]], (path.name, cfg.augment.crop)
                assert (cfg.optim.lr, cfg.optim.weight_decay, cfg.optim.batch_size, cfg.optim.seed) == (
                    0.003,
                    0.1,
                    16,
                    42,
                )
                # The paper's freezing rule (Table 2): a pre-trained encoder frozen, a random one trained.
                assert cfg.model.arch == "resnet50" and cfg.model.freeze_encoder is None
                assert dataclasses.replace(cfg.model, encoder="imagenet").encoder_frozen
    assert set(PAPER_CROPS) <= names, sorted(set(PAPER_CROPS) - names)
    assert {"VNC mitochondria", "ISBI-2012 membranes"} <= names
    guay = load_config(TrainConfig, REPO / "configs/finetune/guay.yaml")
    assert (guay.optim.class_weighting, guay.augment.noise_var, guay.dim2d.blur_sigma) == ("prevalence", [400, 1200], 7)
    assert load_config(TrainConfig, REPO / "configs/finetune/urocell.yaml").dim2d.planes == ["xy", "xz", "yz"]


def test_init_parsing_and_overrides():
    assert parse_init("random").frozen is False and parse_init("random").name == "Random Init."
    cem = parse_init("cem500k:/w/cem.pth.tar")
    assert (cem.name, cem.frozen) == ("CEM500K-moco", True)
    named = parse_init("ours=runs/export", freeze="none")
    assert (named.name, named.spec, named.frozen) == ("ours", "runs/export", False)
    rf = parse_init("Random frozen=random+frozen")
    assert (rf.name, rf.spec, rf.frozen) == ("Random frozen", "random", True)
    assert parse_sets(["class_weighting=prevalence", "zoom=[0.8, 1.2]"]) == {
        "class_weighting": "prevalence",
        "zoom": [0.8, 1.2],
    }
    with pytest.raises(ValueError, match="KEY one of"):
        parse_sets(["colour=blue"])


@pytest.mark.slow
def test_tiny_benchmark_end_to_end(data_root, tmp_path):
    src = data_root / "drosophila_vnc_gerhard/stack1"
    if not src.is_dir():
        pytest.skip(f"{src} not found")
    for sub in ("raw", "mito"):
        (tmp_path / "data" / sub).mkdir(parents=True)
    for i in range(5):  # 8x downsampled: 128 x 128 slices
        iio.imwrite(
            tmp_path / f"data/raw/{i}.png",
            np.rint(downscale_local_mean(iio.imread(src / f"raw/{i:02d}.tif"), (8, 8))).astype(np.uint8),
        )
        iio.imwrite(
            tmp_path / f"data/mito/{i}.png",
            np.rint(downscale_local_mean(iio.imread(src / f"mitochondria/{i:02d}.png"), (8, 8))).astype(np.uint8),
        )
    config = tmp_path / "tiny.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "images": ["raw/[0-2].png"],
                "masks": ["mito/[0-2].png"],
                "mask_threshold": 127,
                "classes": ["background", "mitochondria"],
                "iters": 3,
            }
        )
    )
    definition = tmp_path / "tiny_def.yaml"
    definition.write_text(
        yaml.safe_dump(
            {
                "name": "Tiny VNC",
                "paper": {"cem500k": 0.5},
                "tasks": [
                    {
                        "name": "mito",
                        "config": str(config),
                        "test": {"images": "raw/[3-4].png", "masks": "mito/[3-4].png", "per_image": True},
                    }
                ],
            }
        )
    )
    import timm

    torch.save(timm.create_model("resnet18", num_classes=0, in_chans=1).state_dict(), tmp_path / "enc.pth")
    out = tmp_path / "out"
    rc = main(
        [
            "benchmark",
            str(definition),
            "--inits",
            "random",
            f"enc={tmp_path / 'enc.pth'}",
            "--out",
            str(out),
            "--data-root",
            str(tmp_path / "data"),
            "--arch",
            "resnet18",
            "--crop",
            "64",
            "--batch-size",
            "2",
            "--workers",
            "0",
            "--device",
            "cpu",
            "--set",
            "class_weighting=prevalence",
            "--quiet",
        ]
    )
    assert rc == 0
    rows = json.loads((out / "results.json").read_text())
    assert [(r["init"], r["frozen"], r["iters"]) for r in rows] == [("Random Init.", False, 3), ("enc", True, 3)]
    truth = np.stack([iio.imread(tmp_path / f"data/mito/{i}.png") > 127 for i in (3, 4)])
    for r in rows:
        assert 0.0 <= r["mean_foreground_iou"] <= 1.0 and r["train_seconds"] > 0
        run = Path(out) / "Tiny_VNC" / "mito" / r["init"].replace(" ", "_")
        assert len(json.loads((run / "test_scores.json").read_text())["per_image"]) == 2
        # The table's IoU, recomputed from the prediction files the run wrote (pixels pooled over the test set).
        pred = np.stack([tifffile.imread(f) for f in sorted((run / "test_pred").glob("*.tif"))]) == 1
        assert pred.shape == truth.shape
        assert r["mean_foreground_iou"] == pytest.approx(_iou(pred, truth), abs=1e-9)
    table = (out / "results.md").read_text()
    assert "| Benchmark | Training Iterations | Random Init. | enc | Paper CEM500K-moco |" in table
    assert "| Tiny VNC | 3 |" in table and "0.500" in table
    # results.html: the table and each run's test overlay, on the test image with the most mitochondria.
    page = (out / "results.html").read_text()
    assert "Tiny VNC / mito / 2d / Random Init.: test IoU" in page and "Tiny VNC / mito / 2d / enc: test IoU" in page
    shown = 3 + int(truth[1].sum() > truth[0].sum())
    image = iio.imread(tmp_path / f"data/raw/{shown}.png")
    for r in rows:
        pred = tifffile.imread(sorted(Path(r["overlay"]).parent.glob("test_pred/*.tif"))[shown - 3])
        expected = overlay(image, pred, truth[shown - 3].astype(np.uint8))
        np.testing.assert_array_equal(iio.imread(r["overlay"]), expected)


def _definition(tmp_path: Path, **task) -> Path:
    path = tmp_path / "def.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "name": "NP",
                "tasks": [
                    {
                        "config": "configs/finetune/neuroproof_boundary.yaml",
                        "test": {"images": "a.tif", "masks": "b.tif"},
                        **task,
                    }
                ],
            }
        )
    )
    return path


def test_dim_overrides_are_checked(tmp_path):
    d = load_definition(_definition(tmp_path, dim_overrides={"3d": {"crop": 32, "crop_depth": 16}}))
    assert d["tasks"][0]["dim_overrides"]["3d"]["crop_depth"] == 16
    for bad, match in (
        ({"4d": {"crop": 32}}, "dim_overrides: expected a mapping with keys among"),
        ({"3d": {"colour": "blue"}}, r"dim_overrides.3d: unknown TrainConfig key\(s\) \['colour'\]"),
        ({"2d": {"crop": 33}}, "dim_overrides.2d: crop must be a positive multiple of 32"),
        (["3d"], "dim_overrides: expected a mapping"),
    ):
        with pytest.raises(ValueError, match=match):
            load_definition(_definition(tmp_path, dim_overrides=bad))
    with pytest.raises(ValueError, match="dims must be distinct values"):
        run_benchmarks([_definition(tmp_path)], ["random"], tmp_path / "out", tmp_path, dims=["2d", "4d"])


def test_results_table_has_a_row_per_dim():
    def row(task, dim, init, iou):
        return {
            "benchmark": "NP",
            "task": task,
            "dim": dim,
            "init": init,
            "iters": 100,
            "arch": "resnet18",
            "crop": 32 if dim == "3d" else 128,
            "crop_depth": 32 if dim == "3d" else None,
            "batch_size": 4 if dim == "3d" else 8,
            "train_seconds": 1.0,
            "predict_seconds": 2.0,
            "iou": {"boundary": iou},
            "mean_foreground_iou": iou,
        }

    rows = [
        row("b", dim, init, iou)
        for dim, init, iou in (
            ("2d", "Random Init.", 0.4),
            ("2d", "ours", 0.5),
            ("3d", "Random Init.", 0.3),
            ("3d", "ours", 0.35),
        )
    ]
    lines = results_table(rows, {"NP": {"paper": {}}}, ["Random Init.", "ours"], show_dim=True).splitlines()
    assert lines[:4] == [
        "| Benchmark | Training Iterations | Random Init. | ours | Paper CEM500K-moco |",
        "|---|---|---|---|---|",
        "| NP (2D) | 100 | 0.400 | 0.500 | - |",
        "| NP (3D) | 100 | 0.300 | 0.350 | - |",
    ]
    assert (
        "| Benchmark | Dim | Init | Iterations | Arch | Crop | Batch | Train s | Predict s | IoU per class |" in lines
    )
    assert "| NP (b) | 3d | ours | 100 | resnet18 | 32x32x32 | 4 | 1.0 | 2.0 | boundary 0.350 |" in lines
    assert "| NP (b) | 2d | ours | 100 | resnet18 | 128 | 8 | 1.0 | 2.0 | boundary 0.500 |" in lines
    two_tasks = rows + [{**r, "task": "c"} for r in rows[:2]]
    labels = [line.split(" | ")[0] for line in results_table(two_tasks, {"NP": {}}, ["ours"], True).splitlines()[2:5]]
    assert labels == ["| NP (b, 2D)", "| NP (b, 3D)", "| NP (c, 2D)"]
    assert results_table(rows[:1], {"NP": {}}, ["Random Init."]).splitlines()[2].startswith("| NP | 100 | 0.400 |")


@pytest.mark.slow
def test_neuroproof_benchmark_2d_vs_3d(data_root, tmp_path, monkeypatch):
    """The NeuroProof definition as 2D and 3D models, random and pre-trained, on a small crop of the real split."""
    import timm

    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    from prepare_neuroproof import prepare_neuroproof

    source = data_root / "neuroproof_flyem" / "training_sample2"
    if not (source / "groundtruth.h5.gz").is_file():
        pytest.skip(f"{source} not found")
    data = tmp_path / "data"
    dest = prepare_neuroproof(source, data, limit=(32, 64, 64))
    written = {p: p.stat().st_mtime_ns for p in dest.rglob("*.tif")}
    assert len(written) == 4 and prepare_neuroproof(source, data, limit=(32, 64, 64)) == dest
    assert {p: p.stat().st_mtime_ns for p in dest.rglob("*.tif")} == written  # idempotent: nothing rewritten
    torch.save(timm.create_model("resnet18", num_classes=0, in_chans=1).state_dict(), tmp_path / "enc.pth")
    truth = tifffile.imread(dest / "test" / "boundary.tif") > 0
    out = tmp_path / "out"
    rc = main(
        [
            "benchmark",
            str(REPO / "benchmarks/finetune/neuroproof_boundary.yaml"),
            "--dims",
            "2d",
            "3d",
            "--inits",
            "random",
            f"ours={tmp_path / 'enc.pth'}",
            "--out",
            str(out),
            "--data-root",
            str(data),
            "--iters",
            "2",
            "--crop",
            "32",
            "--batch-size",
            "2",
            "--workers",
            "0",
            "--device",
            "cpu",
            "--quiet",
        ]
    )
    assert rc == 0
    rows = json.loads((out / "results.json").read_text())
    assert sorted((r["dim"], r["init"], r["frozen"]) for r in rows) == [
        ("2d", "Random Init.", False),
        ("2d", "ours", True),
        ("3d", "Random Init.", False),
        ("3d", "ours", True),
    ]
    for r in rows:
        assert 0.0 <= r["mean_foreground_iou"] <= 1.0 and r["iters"] == 2
        run = out / "NeuroProof_boundaries" / "boundaries" / r["dim"] / r["init"].replace(" ", "_")
        model = torch.load(run / "model.pth", map_location="cpu", weights_only=False)
        assert model["model_config"]["model"] == {"2d": "unet2d", "3d": "unet3d"}[r["dim"]]
        # Recomputed from the written prediction volume and the test labels, not from the scores file.
        pred = tifffile.imread(run / "test_pred.tif") == 1
        assert r["mean_foreground_iou"] == pytest.approx(_iou(pred, truth), abs=1e-9)
    table = (out / "results.md").read_text()
    assert "| NeuroProof boundaries (2D) | 2 |" in table and "| NeuroProof boundaries (3D) | 2 |" in table
    assert "| 3d | ours | 2 | resnet18 | 32x32x32 | 2 |" in table

"""Label-fraction curves and transfer matrices (``finetune benchmark --fractions`` / ``--pretrain-tasks --targets``).

Subsets and tables are checked against hand computations; both runners run end to end on
real data: tiny benchmark definitions over the VNC stack-1 mitochondria (4x downsampled,
see the ``vnc`` fixture; slices 0-7 train, 16-17 test), 2 iterations per run.
"""

from __future__ import annotations

import json

import imageio.v3 as iio
import pytest
import torch
import yaml

from finetune.benchmark import parse_init
from finetune.benchmark_transfer import (
    SCRATCH,
    fraction_table,
    matrix_table,
    run_fraction_curve,
    run_transfer_matrix,
    subset_indices,
)
from finetune.cli import main

pytestmark = pytest.mark.usefixtures("one_torch_thread")
FAST = {"iters": 2, "batch_size": 2, "crop": 64, "workers": 0, "device": "cpu", "arch": "resnet18"}


def test_subsets_are_nested_per_seed_and_differ_between_seeds():
    for seed in (0, 1, 2):
        sets = {f: set(subset_indices(16, f, seed)) for f in (1, 0.5, 0.25, 0.1)}
        assert [len(sets[f]) for f in (1, 0.5, 0.25, 0.1)] == [16, 8, 4, 2]  # ceil(0.1 * 16) = 2
        assert sets[0.1] <= sets[0.25] <= sets[0.5] <= sets[1] == set(range(16))
    assert subset_indices(16, 0.25, 0) != subset_indices(16, 0.25, 1)
    assert subset_indices(3, 0.01, 0) and len(subset_indices(3, 0.01, 0)) == 1  # at least one file
    with pytest.raises(ValueError, match="fractions must be in"):
        subset_indices(16, 0, 0)


def _row(task, init, iou, fraction=0.1, seed=0, files=2):
    return {"task": task, "init": init, "mean_foreground_iou": iou, "fraction": fraction, "seed": seed,
            "train_files": files}  # fmt: skip


def test_model_initialisations_parse():
    init = parse_init("from membranes=model:runs/src")
    assert (init.name, init.spec, init.frozen, init.model) == ("from membranes", "random", False, "runs/src")
    assert parse_init("model:runs/src+frozen").frozen and parse_init("model:runs/src").name == "from src"
    with pytest.raises(ValueError, match="needs a run folder"):
        parse_init("model:")


def test_tables_by_hand():
    rows = [
        _row("A", SCRATCH, 0.2, seed=0),
        _row("A", SCRATCH, 0.4, seed=1),
        _row("A", "src", 0.5, seed=0),
        _row("A", "src", 0.6, seed=1),
        _row("B", SCRATCH, 0.7),
        _row("B", "src", 0.1),
    ]
    table = matrix_table(rows, ["src"], ["A", "B"])
    lines = table.splitlines()
    assert lines[0] == "| Pretraining task \\ target | A | B |"
    # A: scratch mean 0.3, sd 0.141; src mean 0.55, sd 0.071 (best: bold). B: scratch best.
    assert lines[2] == "| none (from scratch) | 0.300 ± 0.141 | **0.700** |"
    assert lines[3] == "| src | **0.550 ± 0.071** | 0.100 |"
    curve = fraction_table(
        [_row("A", "random", 0.5, 1.0, 0, 16), _row("A", "random", 0.3, 0.5, 0, 8), _row("A", "random", 0.1, 0.5, 1, 8)]
    )
    assert "| A | random | 0.500 | 0.200 ± 0.141 |" in curve and "1 (16 files)" in curve and "0.5 (8 files)" in curve


def _definition(tmp_path, vnc, name: str, classes: list[str]) -> str:
    config = tmp_path / f"{name}.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "data": {
                    "images": [str(vnc / "raw/0?.png")],
                    "masks": [str(vnc / "mito/0?.png")],
                    "classes": classes,
                    "mask_threshold": 127,
                },
                "dim2d": {"planes": ["xy"]},
            }
        )
    )
    definition = tmp_path / f"{name}_def.yaml"
    test = {"images": str(vnc / "raw/1[67].png"), "masks": str(vnc / "mito/1[67].png"), "per_image": True}
    task = {"name": "mito", "config": str(config), "test": test}
    definition.write_text(yaml.safe_dump({"name": name, "tasks": [task]}))
    return str(definition)


def test_transfer_matrix_end_to_end(vnc, tmp_path):
    vnc8 = tmp_path / "vnc8"  # slices 0-7 as the training files, 16-17 as the test set
    for sub in ("raw", "mito"):
        (vnc8 / sub).mkdir(parents=True)
        for i in list(range(8)) + [16, 17]:
            (vnc8 / sub / f"{i:02d}.png").write_bytes((vnc / sub / f"{i:02d}.png").read_bytes())
    source = _definition(tmp_path, vnc8, "source", ["background", "mitochondria"])
    target = _definition(tmp_path, vnc8, "target", ["background", "mito"])
    out = tmp_path / "matrix"
    rows, table = run_transfer_matrix(
        [source], [target], out, fraction=0.5, seeds=[0, 1], data_root=tmp_path, overrides=FAST, progress=False
    )
    assert [r.get("role", r["init"]) for r in rows] == ["source", SCRATCH, SCRATCH, "source", "source"]
    targets = [r for r in rows if "fraction" in r]
    assert all(r["train_files"] == 4 and r["train_files_available"] == 8 for r in targets)
    # Each target run saw its seed's nested subset; the transferred ones started from the source model.
    configs = [yaml.safe_load((p / "config.yaml").read_text()) for p in sorted((out / "targets").glob("*/*/*"))]
    assert len(configs) == 4 and len({tuple(c["data"]["images"]) for c in configs}) == 2
    transferred = sorted((out / "targets" / "target" / "source").glob("f0.5_s*"))
    payload = torch.load(transferred[0] / "model.pth", weights_only=True)
    assert payload["init_model"]["path"] == str((out / "sources" / "source" / "model.pth").resolve())
    assert payload["init_model"]["classes"] == ["background", "mitochondria"]  # the head was re-initialised
    assert "| none (from scratch) |" in table and "| source |" in table and table.count("**") == 2
    assert "Sources on their own test sets" in (out / "results.md").read_text()
    assert len(json.loads((out / "results.json").read_text())) == 5


def test_fraction_curve_end_to_end(vnc, tmp_path):
    task = _definition(tmp_path, vnc, "vnc", ["background", "mitochondria"])
    out = tmp_path / "curve"
    rows, table = run_fraction_curve(
        [task], ["random"], [1, 0.25], [0, 1], out, data_root=tmp_path, overrides=FAST, progress=False
    )
    assert sorted((r["fraction"], r["seed"], r["train_files"]) for r in rows) == [
        (0.25, 0, 3), (0.25, 1, 3), (1, 0, 10), (1, 1, 10)
    ]  # fmt: skip
    image = iio.imread(out / "fraction_curve.png")
    assert image.ndim == 3 and image.shape[0] > 200
    assert "| vnc | Random Init. |" in table


def test_cli_refuses_settings_that_would_be_ignored(tmp_path, capsys):
    def run(*args):
        rc = main(["benchmark", *args, "--out", str(tmp_path / "o")])
        return rc, capsys.readouterr().err

    rc, err = run("--pretrain-tasks", "benchmarks/finetune/vnc_membranes.yaml")
    assert rc == 2 and "needs both --pretrain-tasks and --targets" in err
    rc, err = run("benchmarks/finetune/vnc_mito.yaml", "--seeds", "0", "1")
    assert rc == 2 and "--seeds applies to --fractions" in err
    rc, err = run(
        "--pretrain-tasks", "benchmarks/finetune/vnc_membranes.yaml", "--targets", "benchmarks/finetune/vnc_mito.yaml",
        "--inits", "imagenet",
    )  # fmt: skip
    assert rc == 2 and "drop the positional definitions and --inits" in err
    rc, err = run("benchmarks/finetune/vnc_mito.yaml", "--fractions", "1", "0.5", "--dims", "2d", "3d")
    assert rc == 2 and "at most one --dims value" in err
    rc, err = run("benchmarks/finetune/vnc_mito.yaml:nuclei", "--fractions", "0.5")
    assert rc == 2 and "no task 'nuclei'" in err
    assert not (tmp_path / "o").exists()

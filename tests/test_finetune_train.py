"""Training on real data: a short CPU run learns, resuming equals not stopping, bad inputs fail early.

Data: the VNC stack-1 mitochondria (Gerhard et al. 2013), downsampled 4x to 256 x 256
(18.4 nm pixels) in a temporary folder so a tiny resnet18 run fits in a CPU test budget.
Slices 0-15 train, 16-19 test, as in the benchmark definition.
"""

from __future__ import annotations

import csv
import json

import imageio.v3 as iio
import numpy as np
import pytest
import torch

import finetune.train as train_module
from cemcurate.common.config import build_config
from finetune.cli import main
from finetune.config import TrainConfig
from finetune.train import train

pytestmark = pytest.mark.usefixtures("one_torch_thread")


TRAIN_IMAGES = ["raw/0?.png", "raw/1[0-5].png"]
TRAIN_MASKS = ["mito/0?.png", "mito/1[0-5].png"]


@pytest.mark.slow
def test_short_cpu_run_beats_trivial_predictions(vnc, tmp_path, monkeypatch):
    monkeypatch.chdir(vnc)  # globs are relative to the working directory
    run = tmp_path / "run"
    rc = main(
        [
            "train",
            "--images",
            *TRAIN_IMAGES,
            "--masks",
            *TRAIN_MASKS,
            "--mask-threshold",
            "127",
            "--arch",
            "resnet18",
            "--no-freeze-encoder",
            "--iters",
            "80",
            "--crop",
            "96",
            "--batch-size",
            "2",
            "--class-weighting",
            "prevalence",
            "--workers",
            "0",
            "--device",
            "cpu",
            "--log-every",
            "10",
            "--checkpoint-every",
            "40",
            "--quiet",
            "--out",
            str(run),
        ]
    )
    assert rc == 0
    for name in ("config.yaml", "model.pth", "checkpoint.pth", "train_log.csv"):
        assert (run / name).is_file(), name
    assert list((run / "tensorboard").iterdir())
    with open(run / "train_log.csv") as fh:
        assert [int(r["iteration"]) for r in csv.DictReader(fh)] == list(range(10, 81, 10))

    preds = tmp_path / "preds"
    assert main(["predict", str(run), "raw/1[6-9].png", str(preds) + "/", "--output-type", "labels", "--quiet"]) == 0
    scores = tmp_path / "scores.json"
    assert (
        main(
            [
                "evaluate",
                str(preds),
                "mito/1[6-9].png",
                "--classes",
                "background",
                "mitochondria",
                "--label-threshold",
                "127",
                "--json",
                str(scores),
            ]
        )
        == 0
    )
    result = json.loads(scores.read_text())
    iou = result["iou"]["mitochondria"]
    assert len(result["per_image"]) == 4
    # Trivial predictions, computed by hand: all background scores 0 for mitochondria;
    # all foreground scores the mitochondria fraction of the test pixels.
    labels = np.stack([iio.imread(vnc / f"mito/{i}.png") > 127 for i in range(16, 20)])
    all_foreground = labels.mean()
    assert 0.02 < all_foreground < 0.1
    assert iou > max(0.12, 2.5 * all_foreground), (iou, all_foreground)
    assert result["iou"]["background"] > 0.5


def _cfg(vnc, **kw) -> TrainConfig:
    base = dict(
        images=TRAIN_IMAGES,
        masks=TRAIN_MASKS,
        data_dir=str(vnc),
        mask_threshold=127,
        arch="resnet18",
        freeze_encoder=False,
        iters=6,
        batch_size=2,
        crop=64,
        checkpoint_every=2,
        log_every=1,
        workers=0,
        device="cpu",
    )
    base.update(kw)
    return build_config(TrainConfig, **base)


def test_resume_equals_uninterrupted_run(vnc, tmp_path):
    interrupted = tmp_path / "interrupted"
    first = train(_cfg(vnc), interrupted, stop_at=3, progress=False)
    assert (first.iteration, first.finished) == (3, False)
    assert not (interrupted / "model.pth").exists()
    ckpt = torch.load(interrupted / "checkpoint.pth", weights_only=True)
    assert ckpt["iteration"] == 3 and ckpt["config"]["optim"]["iters"] == 6
    # A different setting cannot silently continue this run.
    with pytest.raises(ValueError, match="different config.*lr"):
        train(_cfg(vnc, lr=0.01), interrupted, progress=False)
    # Resume with another worker count: the sample stream depends only on (seed, index).
    second = train(_cfg(vnc, workers=1), interrupted, progress=False)
    assert (second.iteration, second.finished) == (6, True)
    straight = train(_cfg(vnc), tmp_path / "straight", progress=False)
    assert straight.finished

    a = torch.load(interrupted / "model.pth", weights_only=True)["state_dict"]
    b = torch.load(tmp_path / "straight" / "model.pth", weights_only=True)["state_dict"]
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs between resumed and uninterrupted runs"
    logs = [list(csv.reader(open(p / "train_log.csv"))) for p in (interrupted, tmp_path / "straight")]
    assert [r[:3] for r in logs[0]] == [r[:3] for r in logs[1]]  # same losses, no duplicated rows
    # re-running a finished run is a no-op
    again = train(_cfg(vnc), interrupted, progress=False)
    assert again.finished and again.iteration == 6


def test_bad_training_inputs_fail_before_training(vnc, tmp_path, capsys):
    bad = tmp_path / "bad"
    bad.mkdir()
    iio.imwrite(bad / "small_mask.png", iio.imread(vnc / "mito/00.png")[:100])
    (bad / "empty.tif").write_bytes(b"")
    common = ["--arch", "resnet18", "--iters", "2", "--crop", "64", "--batch-size", "2", "--workers", "0", "--quiet"]

    def run(*args):
        rc = main(["train", *args, *common, "--out", str(tmp_path / "r")])
        return rc, capsys.readouterr().err

    rc, err = run(
        "--images", str(vnc / "raw/00.png"), "--masks", str(bad / "small_mask.png"), "--mask-threshold", "127"
    )
    assert rc == 2 and "small_mask.png" in err and "does not match image" in err
    rc, err = run("--images", str(vnc / "raw/00.png"), "--masks", str(vnc / "mito/00.png"), "--mask-threshold", "255")
    assert rc == 2 and "no pixels in the training labels" in err and "foreground" in err
    rc, err = run("--images", str(bad / "empty.tif"), "--masks", str(vnc / "mito/00.png"))
    assert rc == 2 and "empty.tif" in err and "empty" in err
    rc, err = run("--images", str(vnc / "raw/0[0-2].png"), "--masks", str(vnc / "mito/00.png"))
    assert rc == 2 and "3 images but 1 masks" in err
    rc, err = run("--images", str(vnc / "raw/00.png"), "--masks", str(vnc / "mito/00.png"))
    assert rc == 2 and "not class indices" in err and "mask threshold" in err
    rc, err = run("--images", str(vnc / "raw/nothing_*.png"), "--masks", str(vnc / "mito/00.png"))
    assert rc == 2 and "matches no file" in err
    import timm

    torch.save(timm.create_model("resnet34", num_classes=0, in_chans=1).state_dict(), bad / "r34.pth")
    rc, err = run(
        "--images",
        str(vnc / "raw/00.png"),
        "--masks",
        str(vnc / "mito/00.png"),
        "--mask-threshold",
        "127",
        "--encoder",
        str(bad / "r34.pth"),
    )
    assert rc == 2 and "r34.pth" in err and "resnet34 encoder; pass --arch resnet34" in err
    assert not (tmp_path / "r" / "checkpoint.pth").exists()


def test_early_stopping_stops_after_n_validations_without_improvement_also_across_a_resume(vnc, tmp_path, monkeypatch):
    """Scripted validations every 2 iterations score 0.2, 0.5, 0.3, 0.4, ...: with early_stop 2
    the run stops at iteration 8 (two validations after the best, at 4), also when it was
    interrupted at 6 and resumed; re-running the command trains no further."""
    scores = {2: 0.2, 4: 0.5, 6: 0.3, 8: 0.4, 10: 0.9, 12: 0.9}
    calls = []

    def scripted(model, items, num_classes, *args, **kwargs):
        it = 2 * (len(calls) + 1)
        calls.append(it)
        return {"iou": [0.9, scores[it]], "mean_foreground_iou": scores[it], "loss": 1 - scores[it]}

    monkeypatch.setattr(train_module, "validate", scripted)
    cfg = _cfg(vnc, iters=12, early_stop=2, val_images=["raw/16.png"], val_masks=["mito/16.png"])
    run = tmp_path / "run"
    assert not train(cfg, run, stop_at=6, progress=False).finished
    result = train(cfg, run, progress=False)
    assert result.finished and result.iteration == 8 and calls == [2, 4, 6, 8]
    model = torch.load(run / "model.pth", weights_only=True)
    assert model["iterations"] == 8 and model["early_stopped"]
    assert torch.load(run / "model_best.pth", weights_only=True)["iterations"] == 4
    assert "stopped early" in (run / "model_card.md").read_text()
    assert train(cfg, run, progress=False).finished and calls == [2, 4, 6, 8]
    with pytest.raises(ValueError, match="early_stop needs validation data"):
        _cfg(vnc, early_stop=2)


def test_the_best_validation_model_is_kept_across_a_resume(vnc, tmp_path, monkeypatch):
    """Validations at iterations 2, 4, 6 score 0.2, 0.5, 0.3 (scripted): model_best.pth holds
    the iteration-4 model, also when the run is interrupted after it and resumed."""
    scores = {2: 0.2, 4: 0.5, 6: 0.3}
    calls = []
    real_save = train_module._save_model

    def scripted(model, items, num_classes, *args, **kwargs):
        it = 2 * (len(calls) + 1)
        calls.append(it)
        return {"iou": [0.9, scores[it]], "mean_foreground_iou": scores[it], "loss": 1 - scores[it]}

    saved_best = []

    def recording(run, model, cfg, enc, it, elapsed, val, name=train_module.MODEL):
        if name == train_module.BEST_MODEL:
            saved_best.append(it)
        real_save(run, model, cfg, enc, it, elapsed, val, name)

    monkeypatch.setattr(train_module, "validate", scripted)
    monkeypatch.setattr(train_module, "_save_model", recording)
    cfg = _cfg(vnc, val_images=["raw/16.png"], val_masks=["mito/16.png"])
    run = tmp_path / "run"
    assert not train(cfg, run, stop_at=4, progress=False).finished
    train(cfg, run, progress=False)  # resumes at 4: the best so far (0.5) comes from val_log.csv
    assert calls == [2, 4, 6] and saved_best == [2, 4]
    best = torch.load(run / "model_best.pth", weights_only=False)
    assert best["iterations"] == 4 and best["val"]["mean_foreground_iou"] == 0.5
    assert torch.load(run / "model.pth", weights_only=False)["iterations"] == 6
    # The selected model predicts like any other.
    assert (
        main(["predict", str(run / "model_best.pth"), str(vnc / "raw/17.png"), str(tmp_path / "p.png"), "--quiet"]) == 0
    )

"""``finetune train --dim 3d`` and ``finetune predict`` with 3D models, on real data.

Data: FlyEM NeuroProof training_sample2 (10 nm isotropic FIB-SEM) with neuron boundaries
derived from its ground truth (voxels whose body id differs from a 6-neighbour). Training
uses one 64^3 region, scoring a different 64^3 region far away in z, predicted by sliding
windows; the model must beat both trivial predictions (all background: boundary IoU 0;
all foreground: IoU = boundary prevalence). Budget: resnet18 encoder frozen at its seeded
random initialisation, a small decoder, 80 iterations of 4 x 32^3 (about 30 s on one core).
"""

from __future__ import annotations

import csv

import numpy as np
import pytest
import timm
import torch

from cemcurate.common.config import build_config
from cemcurate.io import write_volume
from finetune.cli import main
from finetune.config import PredictConfig, TrainConfig
from finetune.metrics import confusion_matrix, iou_from_confusion
from finetune.models.geometry import StageGeometry
from finetune.predict.command import resolve_mode
from finetune.train import train
from finetune.training_model import resolve_geometry
from finetune.volumes import read_array

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TRAIN = (slice(0, 64), slice(0, 64), slice(0, 64))
TEST = (slice(186, 250), slice(0, 64), slice(0, 64))
SMALL = ["--arch", "resnet18", "--decoder-channels", "32", "16", "8", "8", "4", "--workers", "0", "--quiet"]


@pytest.fixture(scope="module")
def boundary_volumes(neuroproof_boundaries, tmp_path_factory):
    """Train/test image and boundary volumes written as TIFF files with their 10 nm voxel size."""
    image, _, labels = neuroproof_boundaries
    out = tmp_path_factory.mktemp("np_boundaries")
    for name, region in (("train", TRAIN), ("test", TEST)):
        write_volume(out / f"{name}_image.tif", image[region], (10.0, 10.0, 10.0))
        write_volume(out / f"{name}_boundary.tif", labels[region], (10.0, 10.0, 10.0))
    return out


def _data_args(d) -> list[str]:
    return [
        "--dim",
        "3d",
        "--images",
        str(d / "train_image.tif"),
        "--masks",
        str(d / "train_boundary.tif"),
        "--mask-threshold",
        "0",
    ]


@pytest.mark.slow
def test_cli_3d_run_beats_trivial_baselines(boundary_volumes, tmp_path, capsys):
    d, run = boundary_volumes, tmp_path / "run"
    # Boundaries are ~15% of voxels: weight them up so a short run does not settle on
    # "all background".
    rc = main(
        [
            "train",
            *_data_args(d),
            "--val-images",
            str(d / "test_image.tif"),
            "--val-masks",
            str(d / "test_boundary.tif"),
            "--crop",
            "32",
            "--crop-depth",
            "32",
            "--batch-size",
            "4",
            "--iters",
            "80",
            "--checkpoint-every",
            "40",
            "--lr",
            "0.01",
            "--seed",
            "0",
            "--class-weights",
            "1",
            "5",
            "--brightness-contrast",
            "0.15",
            *SMALL,
            "--out",
            str(run),
        ]
    )
    assert rc == 0, capsys.readouterr().err
    payload = torch.load(run / "model.pth", weights_only=True)
    # geometry auto + 10 nm isotropic voxels -> 3x3x3 kernels, z pooled in every stage
    assert payload["model_config"]["model"] == "unet3d"
    assert payload["model_config"]["geometry"] == StageGeometry.preset("isotropic").to_dict()
    losses = [float(r["loss"]) for r in csv.DictReader(open(run / "train_log.csv"))]
    assert np.mean(losses[-2:]) < np.mean(losses[:2])

    pred = tmp_path / "pred.tif"
    rc = main(
        [
            "predict",
            str(run),
            str(d / "test_image.tif"),
            str(pred),
            "--output-type",
            "labels",
            "--window",
            "32",
            "64",
            "64",
            "--window-overlap",
            "8",
            "16",
            "16",
            "--quiet",
        ]
    )
    assert rc == 0, capsys.readouterr().err
    truth = read_array(d / "test_boundary.tif")
    predicted = read_array(pred)
    assert predicted.shape == truth.shape == (64, 64, 64)
    iou = iou_from_confusion(confusion_matrix(predicted, truth, 2))[1]
    all_fg = iou_from_confusion(confusion_matrix(np.ones_like(truth), truth, 2))[1]
    assert 0.1 < all_fg < 0.25
    assert iou > all_fg + 0.05, f"boundary IoU {iou:.3f} vs all-foreground {all_fg:.3f}"
    # The validation during training scored the same volume with the default windows.
    val = list(csv.DictReader(open(run / "val_log.csv")))
    assert float(val[-1]["iou_foreground"]) == pytest.approx(iou, abs=0.05)
    # The validation cross-entropy is logged too, and fell as the model learned.
    assert 0 < float(val[-1]["loss"]) < float(val[0]["loss"])

    # A 3D model runs only in sliding mode.
    rc = main(["predict", str(run), str(d / "test_image.tif"), str(tmp_path / "o.tif"), "--mode", "orthoplane"])
    assert rc == 2 and "3D model cannot predict in orthoplane mode" in capsys.readouterr().err
    assert not (tmp_path / "o.tif").exists()


@pytest.mark.slow
def test_3d_resume_equals_uninterrupted_run_with_inflated_weights(boundary_volumes, tmp_path):
    weights = tmp_path / "resnet18.pth"
    torch.manual_seed(1)
    torch.save(timm.create_model("resnet18", num_classes=0, in_chans=1).state_dict(), weights)

    def cfg(**kw) -> TrainConfig:
        d = boundary_volumes
        base = dict(
            dim="3d",
            images=[str(d / "train_image.tif")],
            masks=[str(d / "train_boundary.tif")],
            mask_threshold=0,
            arch="resnet18",
            encoder=str(weights),
            freeze_encoder=False,
            decoder_channels=[16, 8, 8, 4, 4],
            crop=32,
            crop_depth=16,
            batch_size=2,
            iters=4,
            checkpoint_every=2,
            loss="dice_ce",
            elastic_alpha=1.5,
            workers=0,
        )
        return build_config(TrainConfig, **{**base, **kw})

    first = train(cfg(), tmp_path / "interrupted", stop_at=2, progress=False)
    assert (first.iteration, first.finished) == (2, False)
    with pytest.raises(ValueError, match="different config.*crop_depth"):
        train(cfg(crop_depth=32), tmp_path / "interrupted", progress=False)
    assert train(cfg(workers=1), tmp_path / "interrupted", progress=False).finished
    assert train(cfg(), tmp_path / "straight", progress=False).finished
    a = torch.load(tmp_path / "interrupted" / "model.pth", weights_only=True)
    b = torch.load(tmp_path / "straight" / "model.pth", weights_only=True)
    assert a["model_config"] == b["model_config"] and a["state_dict"].keys() == b["state_dict"].keys()
    for k in a["state_dict"]:
        assert torch.equal(a["state_dict"][k], b["state_dict"][k]), (
            f"{k} differs between resumed and uninterrupted runs"
        )
    # The trainable encoder started from the file's weights, inflated: the stem kernel
    # moved away from, but stays close to, the I3D inflation of the 2D kernel.
    stem2d = torch.load(weights, weights_only=True)["conv1.weight"]
    stem3d = a["state_dict"]["encoder.conv1.weight"]
    inflated = stem2d.unsqueeze(2).repeat(1, 1, 3, 1, 1) / 3
    assert stem3d.shape == inflated.shape and not torch.equal(stem3d, inflated)
    assert torch.corrcoef(torch.stack([stem3d.flatten(), inflated.flatten()]))[0, 1] > 0.9


def test_geometry_from_voxel_size_and_clear_errors(boundary_volumes, neuroproof_boundaries, tmp_path, capsys):
    image = neuroproof_boundaries[0][:8, :64, :64]
    write_volume(tmp_path / "aniso.tif", image, (40.0, 10.0, 10.0))
    write_volume(tmp_path / "unknown.tif", image)
    base = build_config(TrainConfig, images=["x"], masks=["y"], dim="3d")
    assert resolve_geometry(base, tmp_path / "aniso.tif") == StageGeometry.from_spacing((40, 10, 10))
    assert resolve_geometry(base, tmp_path / "aniso.tif").kernel_depth[0] == 1  # in-plane first stage
    assert resolve_geometry(base, tmp_path / "unknown.tif") == StageGeometry.preset("isotropic")
    planar = build_config(TrainConfig, images=["x"], masks=["y"], dim="3d", geometry="planar")
    assert resolve_geometry(planar, tmp_path / "aniso.tif") == StageGeometry.preset("planar")

    assert resolve_mode("auto", "unet3d") == "sliding" and resolve_mode("auto", "unet2d") == "stack"
    with pytest.raises(ValueError, match="2D model cannot predict in sliding mode"):
        resolve_mode("sliding", "unet2d", "runs/x")
    with pytest.raises(ValueError, match="window_overlap"):
        PredictConfig(window=[32, 64, 64], window_overlap=[32, 0, 0])
    with pytest.raises(ValueError, match="2D augmentations"):
        build_config(TrainConfig, images=["x"], masks=["y"], dim="3d", blur_sigma=2.0)
    with pytest.raises(ValueError, match="class_weights"):
        build_config(TrainConfig, images=["x"], masks=["y"], class_weights=[1.0])

    # 2D images cannot train a 3D model; the message names the file.
    flat = tmp_path / "flat"
    write_volume(flat / "img.tif", image[0])
    write_volume(flat / "lab.tif", (image[0] < 100).astype(np.uint8))
    rc = main(
        [
            "train",
            "--dim",
            "3d",
            "--images",
            str(flat / "img.tif"),
            "--masks",
            str(flat / "lab.tif"),
            "--iters",
            "1",
            *SMALL,
            "--out",
            str(tmp_path / "r"),
        ]
    )
    err = capsys.readouterr().err
    assert rc == 2 and "img.tif has a single slice" in err and "dim 2d" in err

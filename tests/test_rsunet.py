"""Xie et al.'s residual symmetric anisotropic 3D U-Net (``--arch rsunet``): its described
structure, shapes, parameter count, and a short real-data run that beats the trivial baselines.

Data for the run: the VNC stack-1 mitochondria (serial-section TEM, anisotropic as in Xie et
al.), 4x downsampled in-plane (see the ``vnc`` fixture) and stacked into a 20-slice volume:
slices 0-15 train, 16-19 test.
"""

from __future__ import annotations

import imageio.v3 as iio
import numpy as np
import pytest
import torch

from cemcurate.common.config import build_config
from cemcurate.io import write_volume
from finetune.cli import main
from finetune.config import TrainConfig
from finetune.metrics import confusion_matrix, iou_from_confusion
from finetune.models import RSUNet, build_model
from finetune.models.rsunet import NATIVE_INPUT, WIDTHS
from finetune.models.transfer import read_saved_model
from finetune.train import train
from finetune.training_model import build_training_model
from finetune.volumes import read_array

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def described_parameter_count(widths=WIDTHS, out_channels: int = 1) -> int:
    """Parameters of the network as Xie et al. describe it, counted by hand: bias-free
    convolutions, each followed by BatchNorm (2 per channel), a biased 1x1x1 output layer."""

    def level(cin: int, cout: int) -> int:  # 1x3x3, then two 3x3x3, each + BatchNorm
        return cin * cout * 9 + 2 * cout * cout * 27 + 3 * 2 * cout

    count = 1 * widths[0] * 25 + 2 * widths[0]  # 1x5x5 embedding
    ins = (widths[0],) + tuple(widths[:-1])
    count += sum(level(a, b) for a, b in zip(ins, widths))
    for coarse, fine in zip(reversed(widths[1:]), reversed(widths[:-1])):
        count += coarse * fine * 4 + 2 * fine + level(fine, fine)  # 1x2x2 transposed conv, BN, level
    count += widths[0] * widths[0] * 25 + 2 * widths[0]  # 1x5x5 transposed conv out
    return count + widths[0] * out_channels + out_channels


def test_structure_shapes_and_parameter_count():
    model = build_model("rsunet", num_classes=2)
    assert isinstance(model, RSUNet) and model.widths == (28, 36, 48, 64, 80)
    assert sum(p.numel() for p in model.parameters()) == described_parameter_count()
    assert sum(p.numel() for p in build_model("rsunet", num_classes=4).parameters()) == described_parameter_count(
        out_channels=4
    )
    level = model.encoder.levels[1]
    assert [tuple(c.weight.shape[2:]) for c in (level.conv1, level.conv2, level.conv3)] == [
        (1, 3, 3),
        (3, 3, 3),
        (3, 3, 3),
    ]
    assert tuple(model.encoder.embed.weight.shape[2:]) == (1, 5, 5)
    assert isinstance(model.decoder.embed, torch.nn.ConvTranspose3d) and model.decoder.embed.kernel_size == (1, 5, 5)
    # In-plane pooling only: z keeps the native 18 slices at every level.
    x = torch.rand(1, 1, *NATIVE_INPUT)
    with torch.no_grad():
        feats = model.eval().encoder(model.normalise(x))
        assert [tuple(f.shape[1:]) for f in feats] == [(w, 18, 160 // 2**i, 160 // 2**i) for i, w in enumerate(WIDTHS)]
        assert model(x).shape == (1, 1) + NATIVE_INPUT
        assert model(torch.rand(2, 1, 5, 37, 50)).shape == (2, 1, 5, 37, 50)  # odd sizes padded inside
    with pytest.raises(ValueError, match="expects"):
        model(torch.rand(1, 2, 4, 32, 32))


def test_config_refuses_what_rsunet_would_ignore(tmp_path, capsys):
    common = ["--images", "x.tif", "--masks", "y.tif", "--out", str(tmp_path / "r"), "--quiet"]
    assert main(["train", "--arch", "rsunet", *common]) == 2
    assert "use it with dim 3d" in capsys.readouterr().err
    assert main(["train", "--arch", "rsunet", "--dim", "3d", "--encoder", "imagenet", *common]) == 2
    assert "encoder random" in capsys.readouterr().err


def test_init_model_starts_an_rsunet_from_a_trained_one(vnc, tmp_path):
    image = np.stack([iio.imread(vnc / f"raw/{i:02d}.png") for i in range(8)])
    mito = (np.stack([iio.imread(vnc / f"mito/{i:02d}.png") for i in range(8)]) > 127).astype(np.uint8)
    write_volume(tmp_path / "vol.tif", image)
    write_volume(tmp_path / "mito.tif", mito)

    def cfg(**kw) -> TrainConfig:
        base = dict(dim="3d", arch="rsunet", width_scale=0.25, images=[str(tmp_path / "vol.tif")])
        base.update(masks=[str(tmp_path / "mito.tif")], mask_threshold=0, crop=32, crop_depth=4, batch_size=1)
        return build_config(TrainConfig, **{**base, "iters": 1, "workers": 0, **kw})

    assert train(cfg(), tmp_path / "source", progress=False).finished
    source = read_saved_model(tmp_path / "source")
    assert source.model_config["widths"] == [7, 9, 12, 16, 20]  # a quarter of 28, 36, 48, 64, 80
    model, _ = build_training_model(cfg(init_model=str(tmp_path / "source")), source=source)
    assert all(torch.equal(v, source.state[k]) for k, v in model.state_dict().items())
    with pytest.raises(ValueError, match=r"has shape.*--width-scale giving widths \[7, 9, 12, 16, 20\]"):
        build_training_model(cfg(init_model=str(tmp_path / "source"), width_scale=0.5), source=source)


@pytest.mark.slow
def test_short_real_data_run_beats_the_trivial_baselines(vnc, tmp_path):
    image = np.stack([iio.imread(vnc / f"raw/{i:02d}.png") for i in range(20)])
    mito = (np.stack([iio.imread(vnc / f"mito/{i:02d}.png") for i in range(20)]) > 127).astype(np.uint8)
    for name, sl in (("train", slice(0, 16)), ("test", slice(16, 20))):
        write_volume(tmp_path / f"{name}.tif", image[sl], (50.0, 18.4, 18.4))
        write_volume(tmp_path / f"{name}_mito.tif", mito[sl], (50.0, 18.4, 18.4))
    run = tmp_path / "run"
    args = ["train", "--dim", "3d", "--arch", "rsunet", "--images", str(tmp_path / "train.tif")]
    args += ["--masks", str(tmp_path / "train_mito.tif"), "--mask-threshold", "0", "--crop", "64"]
    args += ["--crop-depth", "8", "--batch-size", "2", "--iters", "35", "--lr", "0.01", "--seed", "0"]
    args += ["--class-weighting", "balanced", "--sampling", "asem", "--workers", "0", "--quiet", "--out", str(run)]
    assert main(args) == 0
    payload = torch.load(run / "model.pth", weights_only=True)
    assert payload["model_config"]["model"] == "rsunet" and payload["voxel_size"] == [50.0, 18.4, 18.4]
    pred = tmp_path / "pred.tif"
    assert main(["predict", str(run), str(tmp_path / "test.tif"), str(pred), "--output-type", "labels", "--quiet"]) == 0
    truth = mito[16:20]
    predicted = read_array(pred)
    assert predicted.shape == truth.shape
    iou = iou_from_confusion(confusion_matrix(predicted, truth, 2))[1]
    all_foreground = iou_from_confusion(confusion_matrix(np.ones_like(truth), truth, 2))[1]
    assert 0.02 < all_foreground < 0.1
    assert iou > all_foreground + 0.05, f"mitochondria IoU {iou:.3f} vs all-foreground {all_foreground:.3f}"

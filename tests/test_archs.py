"""The one architecture table: derived from timm and smp, and round-tripped through every stage.

For every arch of :data:`cemcurate.common.archs.ARCHS`: ``pretrain moco`` on real patches ->
``pretrain export`` -> strict load into timm and into smp's encoder -> ``finetune train`` in
2D from the export -> the export inflated strictly into a 3D UNet. resnet18 runs in the fast
suite, the larger ResNets are marked slow.
"""

from __future__ import annotations

import json

import imageio.v3 as iio
import numpy as np
import pytest
import segmentation_models_pytorch as smp
import timm
import torch
from safetensors.torch import load_file

from cemcurate.common.archs import ARCHS, get_arch, infer_arch
from cemcurate.common.weights import resolve
from cemcurate.store import write_patch_store
from finetune.cli import main as finetune_main
from finetune.models import build_model
from finetune.models.geometry import StageGeometry
from finetune.models.inflate import inflate_state_dict
from finetune.models.unet3d import ResNetEncoder
from pretrain.cli import main as pretrain_main

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _layout(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _plain_resnet(model: torch.nn.Module) -> bool:
    """No grouped convolutions and a 64-wide first stage: what our 3D ResNet encoder mirrors."""
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    return all(c.groups == 1 for c in convs) and model.layer1[0].conv1.out_channels == 64


def test_table_is_the_resnets_timm_smp_and_our_3d_encoder_share():
    derived = []
    with torch.device("meta"):  # no memory for the weights, so even resnext101_32x32d is quick
        for name in smp.encoders.get_encoder_names():
            if not timm.is_model(name):
                continue
            net = timm.create_model(name, pretrained=False, in_chans=1, num_classes=0)
            if not isinstance(net, timm.models.resnet.ResNet):
                continue
            same_keys = _layout(net) == _layout(smp.encoders.get_encoder(name, in_channels=1, weights=None))
            if same_keys and _plain_resnet(net):
                derived.append(name)
    assert derived == list(ARCHS)
    for name in ARCHS:
        with torch.device("meta"):
            ours, theirs = ResNetEncoder(name, dim=2), timm.create_model(name, in_chans=1, num_classes=0)
        assert _layout(ours) == _layout(theirs), name
        assert infer_arch(theirs.state_dict()) == name
        assert theirs.num_features == get_arch(name).num_features


def _real_store(tmp_path, data_root, n=16, size=64):
    """A patch store of real VNC ssTEM crops (64 px: the mechanics, not the learning, are tested)."""
    raw = iio.imread(data_root / "drosophila_vnc_gerhard/stack1/raw/00.tif")
    patches = np.stack(
        [raw[y : y + size, x : x + size] for y in range(0, 4 * size, size) for x in range(0, 4 * size, size)]
    )
    write_patch_store(tmp_path / "store", patches[:n])
    return tmp_path / "store"


@pytest.mark.parametrize("arch", [pytest.param(a, marks=() if a == "resnet18" else pytest.mark.slow) for a in ARCHS])
def test_every_arch_round_trips_through_every_stage(arch, tmp_path, data_root):
    store = _real_store(tmp_path, data_root)
    run, export = tmp_path / "pretrain", tmp_path / "export"
    assert (
        pretrain_main(
            [
                "moco",
                "--data",
                str(store),
                "--out",
                str(run),
                "--gpus",
                "0",
                "--arch",
                arch,
                "--image-size",
                "32",
                "--batch-size",
                "4",
                "--queue-size",
                "8",
                "--max-steps",
                "1",
                "--workers",
                "0",
                "--no-tensorboard",
                "--log-every",
                "1",
            ]
        )
        == 0
    )
    assert pretrain_main(["export", str(run / "checkpoint.pth"), str(export)]) == 0
    state = load_file(str(export / "encoder.safetensors"))
    assert json.loads((export / "config.json").read_text())["arch"] == arch
    timm.create_model(arch, in_chans=1, num_classes=0).load_state_dict(state, strict=True)
    smp.Unet(arch, encoder_weights=None, in_channels=1).encoder.load_state_dict(state, strict=True)

    # 2D fine-tuning from the export (the encoder stays frozen: its weights come through intact).
    image = iio.imread(data_root / "drosophila_vnc_gerhard/stack1/raw/00.tif")[:128, :128]
    mask = iio.imread(data_root / "drosophila_vnc_gerhard/stack1/mitochondria/00.png")[:128, :128]
    iio.imwrite(tmp_path / "img.png", image)
    iio.imwrite(tmp_path / "mask.png", mask)
    assert (
        finetune_main(
            [
                "train",
                "--images",
                str(tmp_path / "img.png"),
                "--masks",
                str(tmp_path / "mask.png"),
                "--mask-threshold",
                "127",
                "--arch",
                arch,
                "--encoder",
                str(export),
                "--iters",
                "1",
                "--batch-size",
                "2",
                "--crop",
                "64",
                "--workers",
                "0",
                "--device",
                "cpu",
                "--quiet",
                "--out",
                str(tmp_path / "run2d"),
            ]
        )
        == 0
    )
    saved = torch.load(tmp_path / "run2d" / "model.pth", weights_only=True)["state_dict"]
    for key, value in state.items():
        assert torch.equal(saved[f"net.encoder.{key}"], value), key

    # 3D: the same export inflated strictly into a UNet3D.
    geometry = StageGeometry.preset("anisotropic")
    model3d = build_model(
        "unet3d",
        arch=arch,
        num_classes=2,
        weights=resolve(str(export), arch),
        geometry=geometry,
        decoder_channels=(8, 8, 8, 8, 8),
    )
    expected = inflate_state_dict(state, geometry)
    got = model3d.encoder.state_dict()
    assert set(got) == set(expected)
    assert all(torch.equal(got[k], expected[k]) for k in expected)
    with torch.no_grad():
        assert model3d.eval()(torch.rand(1, 1, 8, 32, 32)).shape == (1, 1, 8, 32, 32)

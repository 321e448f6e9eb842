"""Encoder weight sources load strictly into the UNet encoder; a frozen encoder never changes.

Weights files are created here in the two layouts we accept (our export: timm ResNet keys +
config.json; the released CEM500K MoCoV2 checkpoint: ``module.encoder_q.`` prefix, MLP
head, ``norms``), since no weights can be downloaded on this machine.
"""

from __future__ import annotations

import json

import imageio.v3 as iio
import numpy as np
import pytest
import timm
import torch
from safetensors.torch import save_file

from cemcurate.common.config import build_config
from cemcurate.common.weights import CEM500K_MEAN, WeightsError, WeightSpec, resolve
from finetune.cli import main as finetune_main
from finetune.config import ModelConfig, TrainConfig
from finetune.models import build_model
from finetune.train import train

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _timm_state(arch: str, in_chans: int = 1, seed: int = 0) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return timm.create_model(arch, pretrained=False, num_classes=0, in_chans=in_chans).state_dict()


def _assert_encoder_equals(model, state):
    enc = model.encoder.state_dict()
    assert set(enc) == set(state)
    for k, v in state.items():
        assert torch.equal(enc[k], v.to(enc[k].dtype)), k


def test_export_layout_loads_strictly_with_its_normalisation(tmp_path):
    state = _timm_state("resnet18")
    folder = tmp_path / "export"
    folder.mkdir()
    save_file({k: v.contiguous() for k, v in state.items()}, str(folder / "encoder.safetensors"))
    torch.save({k: torch.zeros_like(v) for k, v in state.items()}, folder / "encoder.pth")  # safetensors wins
    (folder / "config.json").write_text(json.dumps({"arch": "resnet18", "mean": 0.57, "std": 0.13}))
    for spec in (str(folder / "encoder.safetensors"), str(folder)):  # the file, or its folder
        weights = resolve(spec, "resnet18")
        assert (weights.kind, weights.mean, weights.std) == ("file", 0.57, 0.13)
        model = build_model("unet2d", arch="resnet18", weights=weights)
        assert (float(model.norm_mean), float(model.norm_std)) == pytest.approx((0.57, 0.13))
        _assert_encoder_equals(model, state)
    with pytest.raises(WeightsError, match="says arch 'resnet18'"):
        resolve(str(folder), "resnet34")


def test_cem500k_layout_with_mlp_head_and_rgb_conv1_loads(tmp_path):
    state = _timm_state("resnet50", in_chans=3)
    ckpt = {f"module.encoder_q.{k}": v for k, v in state.items()}
    # MoCoV2 projection head (2-layer MLP) and the momentum encoder: must be dropped.
    ckpt.update(
        {
            "module.encoder_q.fc.0.weight": torch.randn(2048, 2048),
            "module.encoder_q.fc.0.bias": torch.zeros(2048),
            "module.encoder_q.fc.2.weight": torch.randn(128, 2048),
            "module.encoder_q.fc.2.bias": torch.zeros(128),
            "module.encoder_k.conv1.weight": torch.randn(64, 3, 7, 7),
            "module.queue": torch.randn(128, 16),
        }
    )
    path = tmp_path / "cem500k_mocov2_resnet50_200ep.pth.tar"
    torch.save({"epoch": 200, "arch": "resnet50", "state_dict": ckpt, "norms": [0.58, 0.12]}, path)
    assert WeightSpec.parse(f"cem500k:{path}") == WeightSpec("cem500k", path)
    weights = resolve(f"cem500k:{path}", "resnet50")
    assert (weights.mean, weights.std) == (0.58, 0.12)
    torch.save({"state_dict": ckpt}, tmp_path / "no_norms.pth")  # no norms: CEM500K statistics
    assert resolve(f"cem500k:{tmp_path / 'no_norms.pth'}", "resnet50").mean == CEM500K_MEAN
    model = build_model("unet2d", arch="resnet50", weights=weights)
    expected = dict(state)
    expected["conv1.weight"] = state["conv1.weight"].sum(dim=1, keepdim=True)  # grey = R = G = B
    _assert_encoder_equals(model, expected)
    # The same checkpoint initialises a 3D UNet (finetune train --dim 3d): with in-plane
    # kernels (planar geometry) the inflated weights are the 2D ones with a depth axis.

    model3d = build_model(
        "unet3d", arch="resnet50", num_classes=2, weights=weights, geometry="planar", decoder_channels=(8, 8, 8, 8, 8)
    )
    assert float(model3d.norm_mean) == pytest.approx(0.58)
    enc3d = model3d.encoder.state_dict()
    assert set(enc3d) == set(expected)
    for k, v in expected.items():
        assert torch.equal(enc3d[k], v.unsqueeze(2) if v.ndim == 4 else v.to(enc3d[k].dtype)), k


def test_wrong_architecture_and_missing_files_fail_clearly(tmp_path):
    path = tmp_path / "r18.pth"
    torch.save(_timm_state("resnet18"), path)
    # Refused when resolved, before any model is built; and by build_model for a bare state dict.
    with pytest.raises(WeightsError, match=r"r18\.pth.*resnet18 encoder; pass --arch resnet18"):
        resolve(str(path), "resnet50")
    with pytest.raises(WeightsError, match=r"resnet18 encoder; pass --arch resnet18"):
        build_model("unet2d", arch="resnet50", weights=_timm_state("resnet18"))
    with pytest.raises(WeightsError, match="not found"):
        resolve(str(tmp_path / "missing.safetensors"), "resnet18")
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsError, match="junk.pth"):
        resolve(str(junk), "resnet18")


def test_imagenet_source_sums_conv1_and_fails_clearly_offline(monkeypatch):
    real_create = timm.create_model

    def fake_pretrained(arch, pretrained=False, **kw):
        # Stand-in for the download: a seeded RGB model with timm's ImageNet pretrained_cfg.
        torch.manual_seed(1)
        return real_create(arch, pretrained=False, **kw)

    monkeypatch.setattr(timm, "create_model", fake_pretrained)
    weights = resolve("imagenet", "resnet18")
    rgb = fake_pretrained("resnet18", num_classes=0).state_dict()
    assert weights.state["conv1.weight"].shape == (64, 1, 7, 7)
    assert torch.allclose(weights.state["conv1.weight"], rgb["conv1.weight"].sum(1, keepdim=True))
    assert weights.mean == pytest.approx(np.mean([0.485, 0.456, 0.406]))
    build_model("unet2d", arch="resnet18", weights=weights)  # loads strictly

    def offline(*a, **k):
        raise OSError("We couldn't connect to 'https://huggingface.co'")

    monkeypatch.setattr(timm, "create_model", offline)
    with pytest.raises(WeightsError, match="ImageNet weights for resnet18.*internet access"):
        resolve("imagenet", "resnet18")


def test_frozen_encoder_weights_and_bn_stats_do_not_change_in_training(tmp_path, data_root):
    """Three real training steps: decoder moves, encoder (incl. BN running stats) does not."""

    raw = data_root / "drosophila_vnc_gerhard/stack1/raw/00.tif"
    mito = data_root / "drosophila_vnc_gerhard/stack1/mitochondria/00.png"
    iio.imwrite(tmp_path / "img.png", iio.imread(raw)[:256, :256])
    iio.imwrite(tmp_path / "mask.png", iio.imread(mito)[:256, :256])
    state = _timm_state("resnet18", seed=3)
    torch.save(state, tmp_path / "enc.pth")
    cfg = build_config(
        TrainConfig,
        images=[str(tmp_path / "img.png")],
        masks=[str(tmp_path / "mask.png")],
        mask_threshold=127,
        arch="resnet18",
        encoder=str(tmp_path / "enc.pth"),
        freeze_encoder=True,
        iters=3,
        batch_size=2,
        crop=64,
        workers=0,
        device="cpu",
    )
    train(cfg, tmp_path / "run", progress=False)
    saved = torch.load(tmp_path / "run" / "model.pth", weights_only=True)["state_dict"]
    enc = {k[len("net.encoder.") :]: v for k, v in saved.items() if k.startswith("net.encoder.")}
    assert any(k.endswith("running_mean") for k in enc)
    for k, v in state.items():
        assert torch.equal(enc[k], v), f"frozen encoder tensor {k} changed"
    # The decoder did train (same seed -> same initial decoder as a fresh build).
    torch.manual_seed(cfg.optim.seed)
    fresh = build_model("unet2d", arch="resnet18").state_dict()
    changed = [k for k in fresh if k.startswith("net.decoder.") and not torch.equal(fresh[k], saved[k])]
    assert changed
    # Without freezing, the same run updates the encoder.
    cfg.model.freeze_encoder = False
    train(cfg, tmp_path / "run_unfrozen", progress=False)
    saved2 = torch.load(tmp_path / "run_unfrozen" / "model.pth", weights_only=True)["state_dict"]
    assert not torch.equal(saved2["net.encoder.layer1.0.conv1.weight"], state["layer1.0.conv1.weight"])
    assert not torch.equal(saved2["net.encoder.bn1.running_mean"], state["bn1.running_mean"])


def test_a_random_encoder_trains_by_default_and_a_pretrained_one_is_frozen():
    assert ModelConfig().freeze_encoder is None and not ModelConfig().encoder_frozen
    assert ModelConfig(encoder="imagenet").encoder_frozen and ModelConfig(encoder="cem500k:x.pth").encoder_frozen
    assert not ModelConfig(encoder="imagenet", freeze_encoder=False).encoder_frozen
    assert ModelConfig(encoder="random", freeze_encoder=True).encoder_frozen


def test_finetune_train_without_encoder_flags_trains_the_encoder(tmp_path, data_root, capsys):
    """The command a new user types: no --encoder, no freeze flag. The random encoder must
    learn (it did not before: frozen random features); asking to freeze it warns."""
    raw = data_root / "drosophila_vnc_gerhard/stack1/raw/00.tif"
    mito = data_root / "drosophila_vnc_gerhard/stack1/mitochondria/00.png"
    iio.imwrite(tmp_path / "img.png", iio.imread(raw)[:256, :256])
    iio.imwrite(tmp_path / "mask.png", iio.imread(mito)[:256, :256])
    args = ["train", "--images", str(tmp_path / "img.png"), "--masks", str(tmp_path / "mask.png")]
    args += ["--mask-threshold", "127", "--arch", "resnet18", "--iters", "3", "--batch-size", "2"]
    args += ["--crop", "64", "--workers", "0", "--device", "cpu", "--quiet"]
    assert finetune_main(args + ["--out", str(tmp_path / "run")]) == 0
    saved = torch.load(tmp_path / "run" / "model.pth", weights_only=True)["state_dict"]
    torch.manual_seed(42)  # the run's seed: the same initial weights as a fresh build
    fresh = build_model("unet2d", arch="resnet18").state_dict()
    for name in ("net.encoder.conv1.weight", "net.encoder.layer4.1.conv2.weight", "net.encoder.bn1.running_mean"):
        assert not torch.equal(saved[name], fresh[name]), f"{name} did not train"
    assert "warning" not in capsys.readouterr().err
    assert finetune_main(args + ["--out", str(tmp_path / "frozen"), "--freeze-encoder"]) == 0
    # One line naming the command, not a Python warning with a source line.
    err = capsys.readouterr().err
    assert "finetune: warning: the encoder is random and frozen" in err and "UserWarning" not in err

"""3D UNet-ResNet: anisotropic geometry, output shapes, strict loading, freezing, decoder = smp's."""

from __future__ import annotations

import pytest
import timm
import torch
import torch.nn as nn

from cemcurate.common.weights import ResolvedWeights, WeightsError, resolve
from finetune.models import build_model
from finetune.models.geometry import StageGeometry
from finetune.models.inflate import inflate_state_dict
from finetune.models.unet3d import ResNetEncoder, UNet3D, UNetDecoder, conv_nd

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SMALL = (32, 16, 8, 8, 4)  # decoder channels for fast tests


def _state2d(arch: str = "resnet18", seed: int = 0) -> dict:
    torch.manual_seed(seed)
    return timm.create_model(arch, in_chans=1, num_classes=0).state_dict()


def test_anisotropic_kernels_and_strides():
    geo = StageGeometry.preset("anisotropic")  # depth 1 and no z stride in stem and layer1
    enc = ResNetEncoder("resnet18", 3, geo)
    assert enc.conv1.kernel_size == (1, 7, 7) and enc.conv1.stride == (1, 2, 2)
    assert enc.maxpool.kernel_size == (1, 3, 3) and enc.maxpool.stride == (1, 2, 2)
    for m in enc.layer1.modules():
        if isinstance(m, nn.Conv3d):
            assert m.kernel_size[0] == 1 and m.stride[0] == 1
    assert enc.layer2[0].conv1.kernel_size == (3, 3, 3) and enc.layer2[0].conv1.stride == (2, 2, 2)
    assert enc.layer2[0].downsample[0].kernel_size == (1, 1, 1)
    with torch.no_grad():
        feats = enc.eval()(torch.rand(1, 1, 16, 64, 64))
    assert [tuple(f.shape[2:]) for f in feats] == [
        (16, 64, 64),
        (16, 32, 32),
        (16, 16, 16),
        (8, 8, 8),
        (4, 4, 4),
        (2, 2, 2),
    ]
    # The decoder follows: in-plane-only convolutions where the encoder stage is.
    model = UNet3D("resnet18", 2, geo, SMALL)
    assert model.decoder.blocks[3].conv1[0].kernel_size == (1, 3, 3)  # back at stem resolution
    assert model.decoder.blocks[0].conv1[0].kernel_size == (3, 3, 3)
    assert model.head.kernel_size == (1, 3, 3)
    assert model.size_multiple == (8, 32, 32)


@pytest.mark.parametrize("upsample", ["trilinear", "nearest", "transpose"])
def test_output_shape_equals_input_shape(upsample):
    model = build_model(
        "unet3d", arch="resnet18", num_classes=3, geometry="anisotropic", upsample=upsample, decoder_channels=SMALL
    ).eval()
    with torch.no_grad():
        for shape in [(8, 32, 32), (9, 33, 17), (3, 5, 40)]:
            out = model(torch.rand(1, 1, *shape))
            assert out.shape == (1, 3) + shape


def test_odd_sizes_are_reflect_padded_then_cropped():
    # Documented behaviour: pad symmetrically to the size multiple by reflection, crop back.
    model = build_model("unet3d", arch="resnet18", num_classes=2, geometry="isotropic", decoder_channels=SMALL).eval()
    x = torch.rand(1, 1, 30, 29, 32)
    padded = torch.nn.functional.pad(x, (0, 0, 1, 2, 1, 1), mode="reflect")  # to 32 x 32 x 32
    with torch.no_grad():
        direct = model(x)
        manual = model(padded)[:, :, 1:31, 1:30, :]
    torch.testing.assert_close(direct, manual)


def test_build_loads_inflated_weights_strictly():
    state = _state2d("resnet18")
    w = ResolvedWeights("file", state, mean=0.6, std=0.2, source="enc.safetensors")
    model = build_model(
        "unet3d", arch="resnet18", num_classes=2, weights=w, geometry="anisotropic", decoder_channels=SMALL
    )
    expected = inflate_state_dict(state, StageGeometry.preset("anisotropic"))
    got = model.encoder.state_dict()
    assert set(got) == set(expected)
    for k in expected:
        torch.testing.assert_close(got[k], expected[k])
    assert float(model.norm_mean) == pytest.approx(0.6) and float(model.norm_std) == pytest.approx(0.2)
    # A plain state dict works too; explicit mean/std win over the weights' own.
    model = build_model(
        "unet3d",
        arch="resnet18",
        num_classes=2,
        weights=state,
        decoder_channels=SMALL,
        inflate="center",
        mean=0.4,
        std=0.3,
    )
    torch.testing.assert_close(model.encoder.conv1.weight[:, :, 1], state["conv1.weight"])
    assert float(model.norm_mean) == pytest.approx(0.4)


def test_wrong_arch_weights_fail_clearly():
    with pytest.raises(WeightsError, match="resnet18"):
        build_model(
            "unet3d",
            arch="resnet34",
            num_classes=2,
            weights=ResolvedWeights("file", _state2d("resnet18"), source="r18.pth"),
            decoder_channels=SMALL,
        )
    with pytest.raises(ValueError, match="upsampling"):
        build_model("unet3d", arch="resnet18", num_classes=2, upsample="bicubic", decoder_channels=SMALL)
    with pytest.raises(ValueError, match="odd"):
        build_model(
            "unet3d", arch="resnet18", num_classes=2, geometry={"kernel_depth": [3, 2, 3, 3, 3]}, decoder_channels=SMALL
        )
    with pytest.raises(ValueError, match="every stage"):
        build_model("unet3d", arch="resnet9", num_classes=2)
    with pytest.raises(ValueError, match=r"\(batch, 1, z, y, x\)"):
        build_model("unet3d", arch="resnet18", num_classes=2, decoder_channels=SMALL)(torch.rand(1, 32, 32, 32))


def test_frozen_encoder_keeps_bn_statistics_and_gets_no_gradient():
    model = build_model(
        "unet3d", arch="resnet18", num_classes=2, weights=_state2d(), freeze_encoder=True, decoder_channels=SMALL
    )
    model.train()
    assert not model.encoder.training and not model.encoder.bn1.training
    assert model.decoder.training
    before = model.encoder.bn1.running_mean.clone()
    dec_before = model.decoder.blocks[0].conv1[1].running_mean.clone()
    out = model(torch.rand(2, 1, 32, 32, 32))
    out.mean().backward()
    torch.testing.assert_close(model.encoder.bn1.running_mean, before)
    assert not torch.equal(model.decoder.blocks[0].conv1[1].running_mean, dec_before)
    assert all(p.grad is None for p in model.encoder.parameters())
    assert model.head.weight.grad is not None and model.head.weight.grad.abs().sum() > 0
    model.freeze_encoder(False)
    assert model.encoder.training and all(p.requires_grad for p in model.encoder.parameters())


def test_config_round_trip_through_the_registry():
    from finetune.models import build_model

    model = build_model(
        "unet3d",
        arch="resnet18",
        num_classes=3,
        geometry="anisotropic",
        upsample="transpose",
        decoder_channels=SMALL,
        mean=0.45,
        std=0.22,
    ).eval()
    cfg = model.config()
    rebuilt = build_model(cfg.pop("model"), **cfg)
    rebuilt.load_state_dict(model.state_dict(), strict=True)
    rebuilt.eval()
    x = torch.rand(1, 1, 8, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), model(x))


def test_2d_decoder_matches_segmentation_models_pytorch():
    # The decoder is the smp UNet decoder written for any dim: in 2D with nearest upsampling
    # our encoder + decoder + head compute exactly smp.Unet's output from the same weights.
    import segmentation_models_pytorch as smp

    torch.manual_seed(0)
    ref = smp.Unet("resnet18", encoder_weights=None, in_channels=1, classes=2, decoder_channels=SMALL).eval()
    enc = ResNetEncoder("resnet18", dim=2)
    dec = UNetDecoder(2, enc.out_channels, SMALL, StageGeometry.preset("planar"), upsample="nearest")
    head = conv_nd(2, SMALL[-1], 2, 3, bias=True)
    enc.load_state_dict(ref.encoder.state_dict(), strict=True)
    dec.load_state_dict(ref.decoder.state_dict(), strict=True)
    head.load_state_dict({k.split(".", 1)[1]: v for k, v in ref.segmentation_head.state_dict().items()}, strict=True)
    x = torch.rand(1, 1, 64, 96)
    with torch.no_grad():
        torch.testing.assert_close(head(dec.eval()(enc.eval()(x))), ref(x), rtol=1e-4, atol=1e-5)


def test_exported_encoder_file_through_resolve(tmp_path):
    # The path the CLI takes: an exported 2D encoder file (+ config.json) -> resolve
    # -> inflated into the 3D UNet with the file's normalisation.
    import json

    from safetensors.torch import save_file

    state = _state2d("resnet18", seed=4)
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "encoder.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps({"arch": "resnet18", "mean": 0.52, "std": 0.14}))
    weights = resolve(str(tmp_path / "encoder.safetensors"), "resnet18")
    model = build_model(
        "unet3d",
        arch="resnet18",
        num_classes=2,
        weights=weights,
        geometry="isotropic",
        decoder_channels=SMALL,
        freeze_encoder=True,
    )
    assert float(model.norm_mean) == pytest.approx(0.52) and float(model.norm_std) == pytest.approx(0.14)
    torch.testing.assert_close(model.encoder.layer4[1].conv2.weight.sum(2), state["layer4.1.conv2.weight"])
    torch.testing.assert_close(
        model.encoder.layer2[0].downsample[1].running_var, state["layer2.0.downsample.1.running_var"]
    )

"""Inflation of 2D ResNet weights into 3D: the defining property and the state-dict rules.

Reference: timm's 2D ResNet (``timm.create_model(arch, in_chans=1)``) with random weights
and non-trivial BatchNorm statistics, in eval mode. On a volume that is constant along z,
every stage of the inflated 3D encoder must reproduce the 2D features of that slice,
away from the z borders (where zero padding breaks the constancy) for ``i3d``, and
everywhere for ``center``.
"""

from __future__ import annotations

import pytest
import timm
import torch

from finetune.models.geometry import STAGES, StageGeometry
from finetune.models.inflate import inflate_kernel, inflate_state_dict, stage_of
from finetune.models.unet3d import ResNetEncoder

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def randomised_2d(arch: str, in_chans: int = 1, seed: int = 0) -> torch.nn.Module:
    """A timm ResNet in eval mode whose BatchNorm layers have random affine and running stats."""
    torch.manual_seed(seed)
    net = timm.create_model(arch, in_chans=in_chans, num_classes=0)
    g = torch.Generator().manual_seed(seed + 1)
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            n = m.num_features
            m.weight.data = 0.5 + torch.rand(n, generator=g)
            m.bias.data = 0.2 * torch.randn(n, generator=g)
            m.running_mean = 0.2 * torch.randn(n, generator=g)
            m.running_var = 0.5 + torch.rand(n, generator=g)
    return net.eval()


def timm_features(net: torch.nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """``[stem, layer1, layer2, layer3, layer4]`` of a timm ResNet (the smp encoder's stages)."""
    x = net.act1(net.bn1(net.conv1(x)))
    feats = [x]
    x = net.maxpool(x)
    for name in ("layer1", "layer2", "layer3", "layer4"):
        x = getattr(net, name)(x)
        feats.append(x)
    return feats


def features_of_repeated_slice(
    net: torch.nn.Module, enc: torch.nn.Module, depth: int, seed: int
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """2D features of a random 32 x 32 slice, and 3D features of that slice repeated ``depth`` times along z."""
    torch.manual_seed(seed)
    sl = torch.rand(1, 1, 32, 32)
    vol = sl[:, :, None].expand(1, 1, depth, 32, 32).contiguous()
    with torch.no_grad():
        return timm_features(net, sl), enc(vol)[1:]


def encoder_3d(net2d: torch.nn.Module, arch: str, geometry, mode: str = "i3d") -> ResNetEncoder:
    enc = ResNetEncoder(arch, dim=3, geometry=geometry)
    enc.load_state_dict(inflate_state_dict(net2d.state_dict(), enc.geometry, mode), strict=True)
    return enc.eval()


def _close(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest difference relative to the feature scale."""
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-6))


@pytest.mark.parametrize("arch", ["resnet18"])
def test_our_2d_resnet_matches_timm(arch):
    # (Bottleneck wiring is checked against timm in 3D below.)
    # The dim-agnostic encoder in 2D loads timm's state dict strictly and computes the same
    # features: parameter names and block wiring (stride placement, shortcuts) are right.
    net = randomised_2d(arch)
    ours = ResNetEncoder(arch, dim=2)
    ours.load_state_dict(net.state_dict(), strict=True)
    ours.eval()
    x = torch.rand(2, 1, 64, 64)
    with torch.no_grad():
        ref = timm_features(net, x)
        got = ours(x)[1:]
    assert len(got) == 5
    for r, g in zip(ref, got):
        assert r.shape == g.shape
        assert _close(g, r) < 1e-5


def test_i3d_constant_volume_reproduces_2d_features_isotropic():
    # Isotropic geometry: z stride 2 in every stage, so the z receptive field of layer4 is
    # several hundred slices; 448 slices leave the middle of every stage away from the borders.
    net = randomised_2d("resnet18", seed=3)
    enc = encoder_3d(net, "resnet18", "isotropic")
    ref, got = features_of_repeated_slice(net, enc, 448, seed=0)
    for stage, r, g in zip(STAGES, ref, got):
        z = g.shape[2]
        assert z == 448 // 2 ** (STAGES.index(stage) + 1), stage
        assert _close(g[:, :, z // 2], r) < 1e-4, stage
    # Near the z border zero padding changes the features: the comparison above is not vacuous.
    assert _close(got[1][:, :, 0], ref[1]) > 1e-3


def test_i3d_anisotropic_geometry_and_bottleneck():
    # resnet50 (bottleneck blocks, stride on the 3x3) with depth-1 first stages and no z
    # striding there: every interior slice of every stage equals the 2D features.
    net = randomised_2d("resnet50", seed=5)
    geo = StageGeometry(kernel_depth=(1, 1, 3, 3, 3), z_stride=(1, 1, 1, 2, 2))
    enc = encoder_3d(net, "resnet50", geo)
    ref, got = features_of_repeated_slice(net, enc, 64, seed=1)
    assert [g.shape[2] for g in got] == [64, 64, 64, 32, 16]
    # Depth-1 stages have no z context at all: equal on every slice, borders included.
    for g, r in zip(got[:2], ref[:2]):
        assert max(_close(g[:, :, z], r) for z in range(g.shape[2])) < 1e-4
    for g, r in zip(got[2:], ref[2:]):
        assert _close(g[:, :, g.shape[2] // 2], r) < 1e-4


def test_center_mode_matches_2d_on_every_slice():
    net = randomised_2d("resnet18", seed=7)
    enc = encoder_3d(net, "resnet18", "isotropic", mode="center")
    ref, got = features_of_repeated_slice(net, enc, 32, seed=2)
    for g, r in zip(got, ref):
        assert max(_close(g[:, :, z], r) for z in range(g.shape[2])) < 1e-4


def test_inflated_shapes_and_values():
    state = randomised_2d("resnet18").state_dict()
    depths = {"stem": 5, "layer1": 1, "layer3": 3}  # layer2 and layer4 default to 3
    out = inflate_state_dict(state, depths)
    assert set(out) == set(state)
    assert out["conv1.weight"].shape == (64, 1, 5, 7, 7)
    assert out["layer1.0.conv1.weight"].shape == (64, 64, 1, 3, 3)
    assert out["layer2.1.conv2.weight"].shape == (128, 128, 3, 3, 3)
    assert out["layer2.0.downsample.0.weight"].shape == (128, 64, 1, 1, 1)
    # I3D rule: summing the inflated kernel over depth gives the 2D kernel back.
    torch.testing.assert_close(out["layer3.0.conv1.weight"].sum(2), state["layer3.0.conv1.weight"])
    torch.testing.assert_close(out["conv1.weight"][:, :, 2] * 5, state["conv1.weight"])
    # BatchNorm and counters carry over unchanged, and the input dict is not modified.
    for key in (
        "bn1.running_var",
        "layer4.1.bn2.weight",
        "layer2.0.downsample.1.running_mean",
        "layer1.0.bn1.num_batches_tracked",
    ):
        torch.testing.assert_close(out[key], state[key])
        assert out[key].data_ptr() != state[key].data_ptr()
    assert state["conv1.weight"].ndim == 4


def test_center_kernel_and_rgb_stem():
    w = torch.randn(8, 4, 3, 3)
    c = inflate_kernel(w, 3, "center")
    torch.testing.assert_close(c[:, :, 1], w)
    assert float(c[:, :, 0].abs().sum()) == 0.0 and float(c[:, :, 2].abs().sum()) == 0.0
    rgb = randomised_2d("resnet18", in_chans=3).state_dict()
    out = inflate_state_dict(rgb, 3)
    assert out["conv1.weight"].shape == (64, 1, 3, 7, 7)
    torch.testing.assert_close(out["conv1.weight"].sum(2), rgb["conv1.weight"].sum(1, keepdim=True))
    ResNetEncoder("resnet18", 3, "isotropic").load_state_dict(out, strict=True)


def test_stage_of_keys():
    assert stage_of("conv1.weight") == "stem"
    assert stage_of("encoder.conv1.weight") == "stem"
    assert stage_of("layer3.1.conv2.weight") == "layer3"
    assert stage_of("encoder.layer1.0.downsample.0.weight") == "layer1"
    assert stage_of("fc.weight") is None


def test_errors_name_the_problem():
    state = randomised_2d("resnet18").state_dict()
    with pytest.raises(ValueError, match="odd"):
        inflate_state_dict(state, 2)
    with pytest.raises(ValueError, match="unknown stage"):
        inflate_state_dict(state, {"layer5": 3})
    with pytest.raises(ValueError, match="inflation mode"):
        inflate_state_dict(state, 3, mode="mean")
    with pytest.raises(ValueError, match="decoder.conv.weight"):
        inflate_state_dict({"decoder.conv.weight": torch.zeros(4, 4, 3, 3)})
    with pytest.raises(ValueError, match="z_stride must be 1 or 2"):
        StageGeometry((3, 3, 3, 3, 3), (2, 2, 3, 2, 2))
    with pytest.raises(ValueError, match="valid presets"):
        StageGeometry.preset("cubic")


def test_geometry_from_spacing():
    assert StageGeometry.from_spacing((10, 10, 10)) == StageGeometry.preset("isotropic")
    # Serial-section TEM (VNC: 4.6 x 4.6 x 45 nm): in-plane only until x, y are as coarse as z.
    geo = StageGeometry.from_spacing((45, 4.6, 4.6))
    assert geo.kernel_depth[:2] == (1, 1) and geo.z_stride[:3] == (1, 1, 1)
    assert geo.kernel_depth[-1] == 3 and geo.z_stride[-1] == 2
    assert geo.size_multiple == (geo.total_z_stride, 32, 32)
    assert StageGeometry.from_any(geo.to_dict()) == geo

"""3D U-Net with an inflated ResNet encoder (2D pretrained weights into 3D segmentation).

The building blocks are written once for ``dim`` 2 or 3 (``nn.Conv2d``/``nn.Conv3d``,
``BatchNorm2d``/``BatchNorm3d``): :class:`ResNetEncoder` has the parameter names of the
timm/torchvision ResNet (``conv1``, ``bn1``, ``layer1.0.conv1``, ``layer2.0.downsample.0``,
...), so ``dim=2`` loads a 2D state dict and ``dim=3`` loads its inflation
(:func:`finetune.models.inflate.inflate_state_dict`), both with ``strict=True``.
:class:`UNetDecoder` mirrors the decoder of ``segmentation_models_pytorch.Unet``: five
blocks with (by default) 256, 128, 64, 32, 16 channels, each upsampling to the size of the
next skip feature, concatenating it and applying two conv-BN-ReLU; a 3x3(x3) convolution
head gives the logits.

In 3D the kernel depth and the z stride of every encoder stage come from a
:class:`~finetune.models.geometry.StageGeometry` (isotropic by default, anisotropic keeps
the first stages in-plane). Decoder blocks use the kernel depth of the encoder stage whose
resolution they restore, and upsample z only where the encoder strided z.

Axes are ``(z, y, x)``; tensors are ``(batch, channel, z, y, x)``.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from cemcurate.common.archs import get_arch
from finetune.models.base import SegmentationModel, output_channels
from finetune.models.geometry import STAGES, StageGeometry
from finetune.models.registry import DEFAULT_MEAN, DEFAULT_STD, register_model

UPSAMPLE_MODES = ("trilinear", "nearest", "transpose")
DEFAULT_DECODER_CHANNELS = (256, 128, 64, 32, 16)
# Output channels of conv1 and layer1..4 for (basic, bottleneck) blocks.
_WIDTHS = (64, 128, 256, 512)


def _conv_cls(dim: int) -> type[nn.Module]:
    if dim not in (2, 3):
        raise ValueError(f"dim must be 2 or 3, got {dim}")
    return nn.Conv2d if dim == 2 else nn.Conv3d


def _bn_cls(dim: int) -> type[nn.Module]:
    return nn.BatchNorm2d if dim == 2 else nn.BatchNorm3d


def conv_nd(
    dim: int, cin: int, cout: int, k: int, kz: int = 1, stride: int = 1, z_stride: int = 1, bias: bool = False
) -> nn.Module:
    """A ``k x k`` (2D) or ``kz x k x k`` (3D) convolution with 'same' padding for stride 1.

    Args:
        k: in-plane kernel size (odd). kz: kernel depth (3D only, odd).
        stride: in-plane stride. z_stride: z stride (3D only).
    """
    if dim == 2:
        return nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2, bias=bias)
    return nn.Conv3d(
        cin, cout, (kz, k, k), stride=(z_stride, stride, stride), padding=(kz // 2, k // 2, k // 2), bias=bias
    )


class BasicBlock(nn.Module):
    """ResNet basic block: two ``3x3`` (``kz x 3 x 3``) convolutions and a shortcut."""

    expansion = 1

    def __init__(self, dim: int, cin: int, planes: int, stride: int = 1, z_stride: int = 1, kz: int = 3):
        super().__init__()
        bn = _bn_cls(dim)
        self.conv1 = conv_nd(dim, cin, planes, 3, kz, stride, z_stride)
        self.bn1 = bn(planes)
        self.conv2 = conv_nd(dim, planes, planes, 3, kz)
        self.bn2 = bn(planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _shortcut(dim, cin, planes, stride, z_stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """ResNet bottleneck (torchvision v1.5: stride on the ``3x3``): 1x1, 3x3, 1x1 (x4 channels)."""

    expansion = 4

    def __init__(self, dim: int, cin: int, planes: int, stride: int = 1, z_stride: int = 1, kz: int = 3):
        super().__init__()
        bn = _bn_cls(dim)
        self.conv1 = conv_nd(dim, cin, planes, 1)
        self.bn1 = bn(planes)
        self.conv2 = conv_nd(dim, planes, planes, 3, kz, stride, z_stride)
        self.bn2 = bn(planes)
        self.conv3 = conv_nd(dim, planes, planes * 4, 1)
        self.bn3 = bn(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _shortcut(dim, cin, planes * 4, stride, z_stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


def _shortcut(dim: int, cin: int, cout: int, stride: int, z_stride: int) -> nn.Module | None:
    """``downsample`` = 1x1(x1) strided conv + BN when the block changes shape, else None (identity)."""
    if stride == 1 and z_stride == 1 and cin == cout:
        return None
    return nn.Sequential(conv_nd(dim, cin, cout, 1, 1, stride, z_stride), _bn_cls(dim)(cout))


class ResNetEncoder(nn.Module):
    """ResNet feature extractor for one grey channel, in 2D or 3D, with timm key names.

    Args:
        arch: a registered arch (resnet18/34/50/101/152, see
            :data:`finetune.models.registry.ARCHS`).
        dim: 2 or 3.
        geometry: per-stage kernel depth and z stride (3D only; default isotropic).

    ``forward(x)`` with ``x`` ``(B, 1, z, y, x)`` (3D) or ``(B, 1, y, x)`` (2D) returns six
    features ``[x, stem, layer1, layer2, layer3, layer4]``, the same list as an smp encoder:
    in-plane strides 1, 2, 4, 8, 16, 32, z strides the running products of
    ``geometry.z_stride``; channels :attr:`out_channels`.
    """

    def __init__(self, arch: str = "resnet50", dim: int = 3, geometry: StageGeometry | str | Mapping | None = None):
        super().__init__()
        info = get_arch(arch)
        _conv_cls(dim)
        self.arch, self.dim = arch, dim
        self.geometry = StageGeometry.from_any(geometry) if dim == 3 else StageGeometry.preset("planar")
        block = BasicBlock if info.block == "basic" else Bottleneck
        depth, zs = self.geometry.kernel_depth, self.geometry.z_stride
        self.conv1 = conv_nd(dim, 1, 64, 7, depth[0], 2, zs[0])
        self.bn1 = _bn_cls(dim)(64)
        self.relu = nn.ReLU(inplace=True)
        if dim == 2:
            self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        else:
            # Pool across slices only where z is downsampled.
            pz = 3 if zs[1] == 2 else 1
            self.maxpool = nn.MaxPool3d((pz, 3, 3), stride=(zs[1], 2, 2), padding=(pz // 2, 1, 1))
        cin = 64
        for i, (width, n_blocks) in enumerate(zip(_WIDTHS, info.layers)):
            stage = i + 1  # index into STAGES
            stride = 1 if i == 0 else 2
            z_stride = 1 if i == 0 else zs[stage]  # layer1's z stride is the max-pool's
            blocks = []
            for b in range(n_blocks):
                blocks.append(block(dim, cin, width, stride if b == 0 else 1, z_stride if b == 0 else 1, depth[stage]))
                cin = width * block.expansion
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
        self.out_channels = (1, 64) + tuple(w * block.expansion for w in _WIDTHS)
        self._init_weights()

    def _init_weights(self) -> None:
        # He initialisation (fan-out) as in torchvision, so a random encoder is the same
        # kind of network as a 2D random one.
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Conv3d)):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, (nn.BatchNorm2d, nn.BatchNorm3d)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats = [x]
        x = self.relu(self.bn1(self.conv1(x)))
        feats.append(x)
        x = self.layer1(self.maxpool(x))
        feats.append(x)
        for layer in (self.layer2, self.layer3, self.layer4):
            x = layer(x)
            feats.append(x)
        return feats


class ConvBNReLU(nn.Sequential):
    def __init__(self, dim: int, cin: int, cout: int, kz: int = 3):
        super().__init__(conv_nd(dim, cin, cout, 3, kz), _bn_cls(dim)(cout), nn.ReLU(inplace=True))


class DecoderBlock(nn.Module):
    """Upsample to the skip's size, concatenate the skip, two conv-BN-ReLU.

    Args:
        factor: upsampling factor per spatial axis (used by ``transpose``; interpolation
            goes to the skip's exact size).
        kz: kernel depth of the convolutions (3D).
    """

    def __init__(
        self, dim: int, cin: int, cskip: int, cout: int, factor: tuple[int, ...], kz: int, upsample: str = "trilinear"
    ):
        super().__init__()
        if upsample not in UPSAMPLE_MODES:
            raise ValueError(f"unknown upsampling {upsample!r}; valid: {', '.join(UPSAMPLE_MODES)}")
        self.upsample = upsample
        self.dim = dim
        if upsample == "transpose":
            tconv = nn.ConvTranspose2d if dim == 2 else nn.ConvTranspose3d
            self.up = tconv(cin, cin, kernel_size=factor, stride=factor)
        self.conv1 = ConvBNReLU(dim, cin + cskip, cout, kz)
        self.conv2 = ConvBNReLU(dim, cout, cout, kz)

    def forward(self, x: torch.Tensor, size: Sequence[int], skip: torch.Tensor | None = None) -> torch.Tensor:
        if self.upsample == "transpose":
            x = self.up(x)
            if tuple(x.shape[2:]) != tuple(size):
                raise ValueError(
                    f"transposed upsampling gave {tuple(x.shape[2:])}, expected {tuple(size)}; "
                    "the input size must be a multiple of the total stride"
                )
        elif self.upsample == "nearest":
            x = F.interpolate(x, size=tuple(size), mode="nearest")
        else:
            x = F.interpolate(
                x, size=tuple(size), mode="bilinear" if self.dim == 2 else "trilinear", align_corners=False
            )
        if skip is not None:
            x = torch.cat([x, skip], dim=1)
        return self.conv2(self.conv1(x))


class UNetDecoder(nn.Module):
    """The smp UNet decoder in 2D or 3D: five blocks from the deepest feature to full resolution.

    Args:
        encoder_channels: the encoder's six feature channels (the first, the input, is not
            used as a skip, as in smp).
        decoder_channels: output channels of the five blocks.
        geometry: the encoder's geometry (3D): block ``i`` upsamples z by the stride of
            stage ``4 - i`` and uses the kernel depth of the stage it returns to.
    """

    def __init__(
        self,
        dim: int,
        encoder_channels: Sequence[int],
        decoder_channels: Sequence[int],
        geometry: StageGeometry,
        upsample: str = "trilinear",
    ):
        super().__init__()
        if len(decoder_channels) != 5 or any(int(c) < 1 for c in decoder_channels):
            raise ValueError(f"decoder_channels must be 5 positive ints, got {list(decoder_channels)}")
        enc = list(encoder_channels)
        ins = [enc[5]] + list(decoder_channels[:4])
        skips = [enc[4], enc[3], enc[2], enc[1], 0]
        blocks = []
        for i in range(5):
            stage = 4 - i  # the stage whose striding this block undoes
            factor = (2, 2) if dim == 2 else (geometry.z_stride[stage], 2, 2)
            kz = geometry.kernel_depth[max(stage - 1, 0)]
            blocks.append(DecoderBlock(dim, ins[i], skips[i], decoder_channels[i], factor, kz, upsample))
        self.blocks = nn.ModuleList(blocks)

    def forward(self, feats: Sequence[torch.Tensor]) -> torch.Tensor:
        x = feats[5]
        for i, block in enumerate(self.blocks):
            target = feats[4 - i]
            x = block(x, target.shape[2:], target if i < 4 else None)
        return x


@register_model("unet3d")
class UNet3D(SegmentationModel):
    """UNet-ResNet for one-channel volumes, with an inflatable ResNet encoder.

    Args:
        arch: encoder architecture (resnet18/34/50/...).
        num_classes: classes including background (2 = binary, one sigmoid output).
        geometry: per-stage kernel depth and z stride (a
            :class:`~finetune.models.geometry.StageGeometry`, a preset name or a mapping).
        decoder_channels: channels of the five decoder blocks.
        upsample: ``trilinear`` (default), ``nearest`` or ``transpose`` (learned).
        mean, std: input normalisation applied to voxels scaled to [0, 1].

    ``forward(x)``: ``x`` ``(B, 1, z, y, x)`` float in [0, 1], any size; returns logits
    ``(B, C, z, y, x)``. A size that is not a multiple of :attr:`size_multiple`
    (``(prod(z_stride), 32, 32)``) is padded symmetrically inside ``forward`` (reflection,
    or edge replication when the axis is shorter than the pad) and the logits are cropped
    back, so the output always has the input's size.
    """

    dim = 3
    head_prefix = "head."

    def __init__(
        self,
        arch: str = "resnet50",
        num_classes: int = 2,
        geometry: StageGeometry | str | Mapping | None = None,
        decoder_channels: Sequence[int] = DEFAULT_DECODER_CHANNELS,
        upsample: str = "trilinear",
        mean: float = DEFAULT_MEAN,
        std: float = DEFAULT_STD,
    ):
        get_arch(arch)
        if upsample not in UPSAMPLE_MODES:
            raise ValueError(f"unknown upsampling {upsample!r}; valid: {', '.join(UPSAMPLE_MODES)}")
        super().__init__(arch, num_classes, mean, std)
        self.geometry = StageGeometry.from_any(geometry)
        self.upsample = upsample
        self.decoder_channels = tuple(int(c) for c in decoder_channels)
        self.encoder = ResNetEncoder(arch, 3, self.geometry)
        self.decoder = UNetDecoder(3, self.encoder.out_channels, self.decoder_channels, self.geometry, upsample)
        self.head = conv_nd(
            3, self.decoder_channels[-1], output_channels(num_classes), 3, self.geometry.kernel_depth[0], bias=True
        )
        for m in list(self.decoder.modules()) + [self.head]:
            if isinstance(m, (nn.Conv3d, nn.ConvTranspose3d)):
                nn.init.kaiming_uniform_(m.weight, nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    @property
    def size_multiple(self) -> tuple[int, int, int]:
        """``(z, y, x)`` input-size multiple that needs no internal padding."""
        return self.geometry.size_multiple

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.padded_logits(x)

    def config(self) -> dict:
        """Everything :func:`build_model` (``"unet3d"``) needs to rebuild this model, weights aside."""
        return {
            "model": "unet3d",
            "arch": self.arch,
            "num_classes": self.num_classes,
            "geometry": self.geometry.to_dict(),
            "decoder_channels": list(self.decoder_channels),
            "upsample": self.upsample,
            "mean": float(self.norm_mean),
            "std": float(self.norm_std),
        }


__all__ = [
    "BasicBlock",
    "Bottleneck",
    "DecoderBlock",
    "ResNetEncoder",
    "STAGES",
    "UNet3D",
    "UNetDecoder",
    "UPSAMPLE_MODES",
    "conv_nd",
]

"""Residual symmetric anisotropic 3D U-Net (Lee et al. 2017), the network of Xie et al. (2025).

As Xie et al. describe it (Methods, "Network architecture"; their Supplementary Fig. S1):
five levels of 28, 36, 48, 64 and 80 channels, joined by max-pooling in-plane only
(``1 x 2 x 2``: serial-section data are anisotropic, so z keeps its size throughout); each
level is a ``1 x 3 x 3`` convolution followed by two ``3 x 3 x 3`` convolutions, with a
residual connection from the first to the third; a ``1 x 5 x 5`` convolution embeds the
input and a ``1 x 5 x 5`` transposed convolution comes before the output layer. The
upsampling path mirrors the downsampling one ("symmetric"): a ``1 x 2 x 2`` transposed
convolution, then the skip feature is *added* (Lee et al.'s summation joins), then the
level's residual block. BatchNorm and ELU after every convolution, as in Lee et al.; a
``1 x 1 x 1`` convolution gives the logits. Native input ``18 x 160 x 160`` (z, y, x).

It has no ResNet encoder, so it trains from scratch or from a trained model
(``--init-model``), not from ``--encoder`` weights. Axes are ``(z, y, x)``; tensors
``(batch, channel, z, y, x)``.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from finetune.models.base import SegmentationModel, output_channels
from finetune.models.registry import DEFAULT_MEAN, DEFAULT_STD, register_model

ARCH = "rsunet"
WIDTHS = (28, 36, 48, 64, 80)
NATIVE_INPUT = (18, 160, 160)


def _conv(cin: int, cout: int, kernel: tuple[int, int, int]) -> nn.Conv3d:
    return nn.Conv3d(cin, cout, kernel, padding=tuple(k // 2 for k in kernel), bias=False)


class ResidualLevel(nn.Module):
    """``1x3x3`` conv, two ``3x3x3`` convs, the first's output added to the third's (then ELU)."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv1, self.bn1 = _conv(cin, cout, (1, 3, 3)), nn.BatchNorm3d(cout)
        self.conv2, self.bn2 = _conv(cout, cout, (3, 3, 3)), nn.BatchNorm3d(cout)
        self.conv3, self.bn3 = _conv(cout, cout, (3, 3, 3)), nn.BatchNorm3d(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        first = F.elu(self.bn1(self.conv1(x)))
        out = F.elu(self.bn2(self.conv2(first)))
        return F.elu(self.bn3(self.conv3(out)) + first)


class RSUNetEncoder(nn.Module):
    """The downsampling branch: ``1x5x5`` embedding, then five levels with in-plane max-pooling
    between them. ``forward`` returns the five level outputs, finest first."""

    def __init__(self, widths: Sequence[int]):
        super().__init__()
        self.embed = _conv(1, widths[0], (1, 5, 5))
        self.embed_bn = nn.BatchNorm3d(widths[0])
        self.levels = nn.ModuleList(ResidualLevel(a, b) for a, b in zip((widths[0],) + tuple(widths[:-1]), widths))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = F.elu(self.embed_bn(self.embed(x)))
        feats = []
        for i, level in enumerate(self.levels):
            if i:
                x = F.max_pool3d(x, (1, 2, 2))
            x = level(x)
            feats.append(x)
        return feats


class RSUNetDecoder(nn.Module):
    """The upsampling branch: per level a ``1x2x2`` transposed convolution, the skip added,
    BatchNorm + ELU and a residual level; then the ``1x5x5`` transposed convolution."""

    def __init__(self, widths: Sequence[int]):
        super().__init__()
        finer = list(reversed(widths[:-1]))
        coarser = list(reversed(widths[1:]))
        self.ups = nn.ModuleList(
            nn.ConvTranspose3d(c, f, (1, 2, 2), stride=(1, 2, 2), bias=False) for c, f in zip(coarser, finer)
        )
        self.up_bns = nn.ModuleList(nn.BatchNorm3d(f) for f in finer)
        self.levels = nn.ModuleList(ResidualLevel(f, f) for f in finer)
        self.embed = nn.ConvTranspose3d(widths[0], widths[0], (1, 5, 5), padding=(0, 2, 2), bias=False)
        self.embed_bn = nn.BatchNorm3d(widths[0])

    def forward(self, feats: Sequence[torch.Tensor]) -> torch.Tensor:
        x = feats[-1]
        for up, bn, level, skip in zip(self.ups, self.up_bns, self.levels, reversed(feats[:-1])):
            x = level(F.elu(bn(up(x) + skip)))
        return F.elu(self.embed_bn(self.embed(x)))


@register_model("rsunet")
class RSUNet(SegmentationModel):
    """Xie et al.'s residual symmetric anisotropic 3D U-Net for one-channel volumes.

    Args:
        arch: always ``"rsunet"`` (kept so a saved ``config()`` names it like every model).
        num_classes: classes including background (2 = binary, one sigmoid output).
        widths: channels of the five levels (the paper's 28, 36, 48, 64, 80).
        mean, std: input normalisation applied to voxels scaled to [0, 1].

    ``forward(x)``: ``x`` ``(B, 1, z, y, x)`` float in [0, 1], any size; y and x are padded
    inside to a multiple of 16 (four in-plane poolings) and the logits ``(B, C, z, y, x)``
    cropped back to the input's size.
    """

    dim = 3
    head_prefix = "head."
    takes_encoder_weights = False

    def __init__(
        self,
        arch: str = ARCH,
        num_classes: int = 2,
        widths: Sequence[int] = WIDTHS,
        mean: float = DEFAULT_MEAN,
        std: float = DEFAULT_STD,
    ):
        if arch != ARCH:
            raise ValueError(f"RSUNet's arch is {ARCH!r}, got {arch!r}")
        widths = tuple(int(w) for w in widths)
        if len(widths) != 5 or min(widths) < 1:
            raise ValueError(f"widths must be five positive ints, got {list(widths)}")
        super().__init__(arch, num_classes, mean, std)
        self.widths = widths
        self.encoder = RSUNetEncoder(widths)
        self.decoder = RSUNetDecoder(widths)
        self.head = nn.Conv3d(widths[0], output_channels(num_classes), 1)
        for m in self.modules():
            if isinstance(m, (nn.Conv3d, nn.ConvTranspose3d)):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    @property
    def size_multiple(self) -> tuple[int, int, int]:
        """``(z, y, x)`` input-size multiple that needs no internal padding."""
        return (1, 16, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.padded_logits(x)

    def config(self) -> dict:
        """Everything :func:`~finetune.models.build_model` (``"rsunet"``) needs to rebuild it."""
        return {
            "model": "rsunet",
            "arch": ARCH,
            "num_classes": self.num_classes,
            "widths": list(self.widths),
            "mean": float(self.norm_mean),
            "std": float(self.norm_std),
        }

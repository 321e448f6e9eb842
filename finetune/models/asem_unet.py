"""ASEM's 3D U-Net (Gallusser et al. 2023; Cicek et al. 2016 after Funke et al. 2018): valid convolutions.

As ASEM describes it (Methods "Network architecture", Fig. S3A) and its code base (incasem,
on funlib's UNet) builds it: four levels joined by three 2x2x2 max-poolings, two unpadded
3x3x3 convolutions with ReLU per level, 32 feature maps doubling per level (32, 64, 128,
256); upsampling by 2x2x2 transposed convolutions, the skip feature centre-cropped and
concatenated, two unpadded 3x3x3 convolutions; before each concatenation the upsampled
map is cropped so that the output stays translation-equivariant (funlib's
``crop_to_factor``); a last unpadded 3x3x3 convolution gives the logits. A 204^3 input
gives a 110^3 output (47 voxels of context per side); about 6.5 M parameters (ASEM: "~6
million"). :func:`valid_output_size` gives the output size of any input size.

:meth:`ASEMUNet.valid_logits` is that network. ``forward`` makes it fit the rest of the
toolkit, which trains and predicts on same-size crops: it reflects the input out to the
smallest valid size whose output covers it, and crops the logits back. So context beyond a
training crop or prediction window is reflected, not read from the volume as ASEM's
block-wise pipeline does: train on crops of at least ~64^3 and predict with large windows
and overlaps to keep that effect small. It has no ResNet encoder: it trains from scratch
or from ``--init-model``.
"""

from __future__ import annotations

from functools import lru_cache

import torch
import torch.nn as nn
import torch.nn.functional as F

from finetune.models.base import SegmentationModel, output_channels
from finetune.models.registry import DEFAULT_MEAN, DEFAULT_STD, register_model

ARCH = "asem_unet"
LEVELS = 4  # three downsamplings
NATIVE_INPUT = 204
NATIVE_OUTPUT = 110
DEFAULT_FMAPS = 32


def _two_convs(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv3d(cin, cout, 3), nn.ReLU(inplace=True), nn.Conv3d(cout, cout, 3), nn.ReLU(inplace=True)
    )


def _crop_to_factor(size: int, factor: int, conv_crop: int = 4) -> int:
    """funlib's ``crop_to_factor``: the largest ``size' <= size`` with ``size' - conv_crop`` a
    multiple of ``factor``, so the following convolutions leave a size divisible by the
    downsampling still below (translation equivariance)."""
    return (size - conv_crop) // factor * factor + conv_crop


@lru_cache(maxsize=None)
def valid_output_size(n: int) -> int | None:
    """Output size along one axis for input size ``n`` of the valid network, or None when ``n``
    does not fit (a pooling of an odd size, or nothing left)."""
    sizes, a = [], n
    for level in range(LEVELS):
        a -= 4
        if a < 1:
            return None
        sizes.append(a)
        if level < LEVELS - 1:
            if a % 2:
                return None
            a //= 2
    for level in reversed(range(LEVELS - 1)):
        a = _crop_to_factor(a * 2, 2 ** (LEVELS - 1 - level))
        if a > sizes[level] or a - 4 < 1:
            return None
        a -= 4
    return a - 2 if a > 2 else None


def fitting_input_size(size: int) -> tuple[int, int]:
    """``(n, out)``: the smallest valid input size ``n`` whose output ``out`` covers ``size`` voxels."""
    n = size
    while True:
        out = valid_output_size(n)
        if out is not None and out >= size:
            return n, out
        n += 1


def reflect_pad(x: torch.Tensor, pads: list[tuple[int, int]]) -> torch.Tensor:
    """Reflect the spatial axes of ``x`` ``(B, C, ...)`` by ``(before, after)`` voxels each, in
    as many reflections as needed (one reflection adds at most the axis length - 1; an axis of
    length 1 is repeated)."""

    def padded(x: torch.Tensor, dim: int, before: int, after: int, mode: str) -> torch.Tensor:
        flat = [0, 0] * (x.ndim - 2)
        flat[2 * (x.ndim - 1 - dim)], flat[2 * (x.ndim - 1 - dim) + 1] = before, after
        return F.pad(x, flat, mode=mode)

    for axis, (before, after) in enumerate(pads):
        dim = 2 + axis
        while before or after:
            n = x.shape[dim]
            if n < 2:
                x, before, after = padded(x, dim, before, after, "replicate"), 0, 0
                continue
            step_b, step_a = min(before, n - 1), min(after, n - 1)
            x = padded(x, dim, step_b, step_a, "reflect")
            before, after = before - step_b, after - step_a
    return x


def _center_crop(x: torch.Tensor, size: tuple[int, ...]) -> torch.Tensor:
    starts = [(have - want) // 2 for have, want in zip(x.shape[2:], size)]
    return x[(slice(None), slice(None)) + tuple(slice(s, s + w) for s, w in zip(starts, size))]


class ASEMEncoder(nn.Module):
    """The contracting path: ``forward`` returns the four levels' features, finest first."""

    def __init__(self, widths: tuple[int, ...]):
        super().__init__()
        self.levels = nn.ModuleList(_two_convs(cin, cout) for cin, cout in zip((1,) + widths[:-1], widths))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats = []
        for i, level in enumerate(self.levels):
            if i:
                x = F.max_pool3d(x, 2)
            x = level(x)
            feats.append(x)
        return feats


class ASEMDecoder(nn.Module):
    """The expanding path: transposed-convolution upsampling, crop to factor, centre-cropped skip
    concatenated, two valid convolutions; from the deepest level to the finest."""

    def __init__(self, widths: tuple[int, ...]):
        super().__init__()
        self.ups = nn.ModuleList(nn.ConvTranspose3d(w, w, 2, stride=2) for w in reversed(widths[1:]))
        self.levels = nn.ModuleList(
            _two_convs(fine + coarse, fine) for fine, coarse in zip(reversed(widths[:-1]), reversed(widths[1:]))
        )

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        x = feats[-1]
        for i, (up, level) in enumerate(zip(self.ups, self.levels)):
            skip = feats[-2 - i]
            x = up(x)
            factor = 2 ** (i + 1)
            x = _center_crop(x, tuple(_crop_to_factor(s, factor) for s in x.shape[2:]))
            x = level(torch.cat([_center_crop(skip, tuple(x.shape[2:])), x], dim=1))
        return x


@register_model("asem_unet")
class ASEMUNet(SegmentationModel):
    """ASEM's valid-convolution 3D U-Net for one-channel volumes.

    Args:
        arch: always ``"asem_unet"``.
        num_classes: classes including background (2 = binary, one sigmoid output).
        num_fmaps: feature maps of the finest level (ASEM: 32); ``fmap_inc_factor`` per level (2).
        mean, std: input normalisation applied to voxels scaled to [0, 1].

    ``forward(x)``: ``x`` ``(B, 1, z, y, x)`` float in [0, 1], any size; returns logits of the
    input's size (see the module docstring for how the context is supplied).
    """

    dim = 3
    head_prefix = "head."
    takes_encoder_weights = False

    def __init__(
        self,
        arch: str = ARCH,
        num_classes: int = 2,
        num_fmaps: int = DEFAULT_FMAPS,
        fmap_inc_factor: int = 2,
        mean: float = DEFAULT_MEAN,
        std: float = DEFAULT_STD,
    ):
        if arch != ARCH:
            raise ValueError(f"ASEMUNet's arch is {ARCH!r}, got {arch!r}")
        if num_fmaps < 1 or fmap_inc_factor < 1:
            raise ValueError(f"need num_fmaps >= 1 and fmap_inc_factor >= 1, got {num_fmaps}, {fmap_inc_factor}")
        super().__init__(arch, num_classes, mean, std)
        self.num_fmaps, self.fmap_inc_factor = int(num_fmaps), int(fmap_inc_factor)
        widths = tuple(self.num_fmaps * self.fmap_inc_factor**i for i in range(LEVELS))
        self.encoder = ASEMEncoder(widths)
        self.decoder = ASEMDecoder(widths)
        self.head = nn.Conv3d(widths[0], output_channels(num_classes), 3)

    def valid_logits(self, x: torch.Tensor) -> torch.Tensor:
        """The valid network on normalised input ``(B, 1, n, n, n)`` (any valid ``n`` per axis,
        :func:`valid_output_size`): logits of the centred output block (204 -> 110)."""
        return self.head(self.decoder(self.encoder(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 5 or x.shape[1] != 1:
            raise ValueError(f"ASEMUNet expects (batch, 1, z, y, x), got shape {tuple(x.shape)}")
        shape = tuple(x.shape[2:])
        pads = []
        for s in shape:
            n, out = fitting_input_size(s)
            left = (n - out) // 2
            pads.append((left, n - s - left))
        logits = self.valid_logits(reflect_pad(self.normalise(x), pads))
        return logits[(slice(None), slice(None)) + tuple(slice(0, s) for s in shape)]

    def config(self) -> dict:
        """Everything :func:`~finetune.models.build_model` (``"asem_unet"``) needs to rebuild it."""
        return {
            "model": "asem_unet",
            "arch": ARCH,
            "num_classes": self.num_classes,
            "num_fmaps": self.num_fmaps,
            "fmap_inc_factor": self.fmap_inc_factor,
            "mean": float(self.norm_mean),
            "std": float(self.norm_std),
        }

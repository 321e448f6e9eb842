"""What every segmentation model shares: input normalisation, a freezable encoder, output heads.

A model takes one grey channel scaled to [0, 1], normalises it with two buffers saved in
its state dict (so a saved model predicts correctly without side information), and returns
logits: one channel read through a sigmoid for a binary task, K channels through a softmax
for K > 2 classes.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F


def output_channels(num_classes: int) -> int:
    """Logit channels for ``num_classes`` classes (1 for binary, else ``num_classes``)."""
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2 (background + at least one class), got {num_classes}")
    return 1 if num_classes == 2 else num_classes


def logits_to_probs(logits: torch.Tensor) -> torch.Tensor:
    """Class probabilities from logits ``(B, C, ...)`` (2D or 3D).

    Returns float32 of the same shape in [0, 1]: the foreground probability for ``C == 1``,
    otherwise a softmax over the ``C`` classes.
    """
    logits = logits.float()
    return torch.sigmoid(logits) if logits.shape[1] == 1 else torch.softmax(logits, dim=1)


def pad_to_multiple(x: torch.Tensor, multiple: Sequence[int]) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """Pad the spatial axes of ``x`` symmetrically up to multiples; returns the pads per axis.

    Reflection where the axis is long enough (it continues the image structure), else
    edge replication (reflection cannot pad by more than the axis length - 1).
    """
    pads = []
    for n, m in zip(x.shape[2:], multiple):
        extra = -n % m
        pads.append((extra // 2, extra - extra // 2))
    if not any(a or b for a, b in pads):
        return x, pads
    flat = [p for a_b in reversed(pads) for p in a_b]  # F.pad wants the last axis first
    mode = "reflect" if all(max(a, b) < n for (a, b), n in zip(pads, x.shape[2:])) else "replicate"
    return F.pad(x, flat, mode=mode), pads


class SegmentationModel(nn.Module):
    """Base of the 2D and 3D UNets: ``arch``, ``num_classes``, normalisation buffers, freezing.

    Subclasses set :attr:`dim`, :attr:`encoder` (a module with timm ResNet key names),
    :attr:`decoder` and :attr:`head_prefix` (the state-dict prefix of the output convolution,
    re-initialised when a model is transferred to other classes), and call :meth:`normalise`
    on their input.
    """

    dim: int
    encoder: nn.Module
    decoder: nn.Module
    head_prefix: str
    # Whether build_model can load 2D ResNet encoder weights into it (False: trains from
    # scratch or from a whole trained model).
    takes_encoder_weights = True

    def __init__(self, arch: str, num_classes: int, mean: float, std: float):
        super().__init__()
        if not std > 0:
            raise ValueError(f"normalisation std must be > 0, got {std}")
        self.arch = arch
        self.num_classes = num_classes
        self.register_buffer("norm_mean", torch.tensor(float(mean)))
        self.register_buffer("norm_std", torch.tensor(float(std)))
        self.encoder_frozen = False
        self.decoder_frozen = False

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.norm_mean) / self.norm_std

    def padded_logits(self, x: torch.Tensor) -> torch.Tensor:
        """A 3D model's forward pass for ``x`` ``(B, 1, z, y, x)`` of any size: normalised, padded
        to multiples of ``self.size_multiple`` (:func:`pad_to_multiple`), through encoder, decoder
        and ``self.head``, and the logits ``(B, C, z, y, x)`` cropped back to the input's size."""
        if x.ndim != 5 or x.shape[1] != 1:
            raise ValueError(f"{type(self).__name__} expects (batch, 1, z, y, x), got shape {tuple(x.shape)}")
        shape = x.shape[2:]
        x, pads = pad_to_multiple(self.normalise(x), self.size_multiple)
        logits = self.head(self.decoder(self.encoder(x)))
        crop = tuple(slice(a, a + n) for (a, _), n in zip(pads, shape))
        return logits[(slice(None), slice(None)) + crop]

    def freeze_encoder(self, frozen: bool = True) -> None:
        """Freeze (or unfreeze) the encoder: no gradients and BatchNorm statistics fixed.

        A frozen encoder stays in eval mode even when the model is put in train mode, so
        its BatchNorm layers use and keep their running statistics, as in the paper,
        where the pre-trained encoder is not updated at all.
        """
        self.encoder_frozen = frozen
        self._set_trainable(self.encoder, not frozen)

    def freeze_decoder(self, frozen: bool = True) -> None:
        """Freeze (or unfreeze) the decoder as :meth:`freeze_encoder` does the encoder; the
        output head always trains (it is what a transferred model must relearn first)."""
        self.decoder_frozen = frozen
        self._set_trainable(self.decoder, not frozen)

    def _set_trainable(self, part: nn.Module, trainable: bool) -> None:
        for p in part.parameters():
            p.requires_grad_(trainable)
        self.train(self.training)

    def train(self, mode: bool = True) -> "SegmentationModel":
        super().train(mode)
        if self.encoder_frozen:
            self.encoder.eval()
        if self.decoder_frozen:
            self.decoder.eval()
        return self

"""2D U-Net with a ResNet encoder (the paper's UNet-ResNet50), one grey input channel.

The network is ``segmentation_models_pytorch.Unet`` built with ``encoder_weights=None``
(:func:`finetune.models.build_model` loads encoder weights strictly). Input normalisation is
part of the model (two buffers saved in the state dict), so a saved model predicts
correctly from images scaled to [0, 1] without any side information.

A binary task (two classes: background + foreground) has one output channel read
through a sigmoid; a task with K > 2 classes has K channels read through a softmax.
"""

from __future__ import annotations

import segmentation_models_pytorch as smp
import torch
import torch.nn as nn

from cemcurate.common.archs import get_arch
from finetune.models.base import SegmentationModel, output_channels
from finetune.models.registry import DEFAULT_MEAN, DEFAULT_STD, register_model


@register_model("unet2d")
class UNet2D(SegmentationModel):
    """UNet-ResNet for one-channel images.

    Args:
        arch: encoder architecture (see :data:`cemcurate.common.archs.ARCHS`).
        num_classes: number of classes including background (2 = binary).
        mean, std: input normalisation applied to images scaled to [0, 1].

    ``forward(x)``: ``x`` is ``(B, 1, H, W)`` float in [0, 1] with ``H`` and ``W``
    multiples of 32; returns logits ``(B, C, H, W)`` (``C`` from :func:`output_channels`).
    """

    dim = 2
    head_prefix = "net.segmentation_head."

    def __init__(
        self, arch: str = "resnet50", num_classes: int = 2, mean: float = DEFAULT_MEAN, std: float = DEFAULT_STD
    ):
        get_arch(arch)  # unknown names fail here with the list of valid ones
        super().__init__(arch, num_classes, mean, std)
        self.net = smp.Unet(
            encoder_name=arch, encoder_weights=None, in_channels=1, classes=output_channels(num_classes)
        )

    @property
    def encoder(self) -> nn.Module:
        """The ResNet encoder (timm/torchvision key names, no ``fc``)."""
        return self.net.encoder

    @property
    def decoder(self) -> nn.Module:
        """The smp UNet decoder (five blocks, without the output head)."""
        return self.net.decoder

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.normalise(x))

    def config(self) -> dict:
        """Everything :func:`build_model` needs to rebuild this model (weights aside)."""
        return {
            "model": "unet2d",
            "arch": self.arch,
            "num_classes": self.num_classes,
            "mean": float(self.norm_mean),
            "std": float(self.norm_std),
        }

"""2D U-Net with a ResNet encoder (the paper's UNet-ResNet50), one grey input channel.

The network is ``segmentation_models_pytorch.Unet`` built with ``encoder_weights=None``
(weights come from :mod:`finetune.encoders`, loaded strictly). Input normalisation is
part of the model (two buffers saved in the state dict), so a saved model predicts
correctly from images scaled to [0, 1] without any side information.

A binary task (two classes: background + foreground) has one output channel read
through a sigmoid; a task with K > 2 classes has K channels read through a softmax.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from finetune.models.registry import get_arch, register_model

# Fallback input normalisation for encoders that carry none (random init, files without
# a config.json): maps [0, 1] to [-1, 1], a reasonable range for BatchNorm-ed ResNets
# on 8-bit EM whose mean is near mid-grey.
DEFAULT_MEAN = 0.5
DEFAULT_STD = 0.5


def output_channels(num_classes: int) -> int:
    """Logit channels for ``num_classes`` classes (1 for binary, else ``num_classes``)."""
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2 (background + at least one class), got {num_classes}")
    return 1 if num_classes == 2 else num_classes


def logits_to_probs(logits: torch.Tensor) -> torch.Tensor:
    """Class probabilities from logits.

    Args:
        logits: ``(B, C, H, W)`` float; ``C == 1`` means a binary task.

    Returns:
        ``(B, C, H, W)`` float32 in [0, 1]: the foreground probability for ``C == 1``,
        otherwise a softmax over the ``C`` classes.
    """
    logits = logits.float()
    return torch.sigmoid(logits) if logits.shape[1] == 1 else torch.softmax(logits, dim=1)


class UNet2D(nn.Module):
    """UNet-ResNet for one-channel images.

    Args:
        arch: encoder architecture (see :data:`finetune.models.registry.ARCHS`).
        num_classes: number of classes including background (2 = binary).
        mean, std: input normalisation applied to images scaled to [0, 1].

    ``forward(x)``: ``x`` is ``(B, 1, H, W)`` float in [0, 1] with ``H`` and ``W``
    multiples of 32; returns logits ``(B, C, H, W)`` (``C`` from :func:`output_channels`).
    """

    def __init__(self, arch: str = "resnet50", num_classes: int = 2, mean: float = DEFAULT_MEAN,
                 std: float = DEFAULT_STD):
        super().__init__()
        import segmentation_models_pytorch as smp

        get_arch(arch)  # unknown names fail here with the list of valid ones
        if not std > 0:
            raise ValueError(f"normalisation std must be > 0, got {std}")
        self.arch = arch
        self.num_classes = num_classes
        self.net = smp.Unet(encoder_name=arch, encoder_weights=None, in_channels=1,
                            classes=output_channels(num_classes))
        self.register_buffer("norm_mean", torch.tensor(float(mean)))
        self.register_buffer("norm_std", torch.tensor(float(std)))
        self.encoder_frozen = False

    @property
    def encoder(self) -> nn.Module:
        """The ResNet encoder (timm/torchvision key names, no ``fc``)."""
        return self.net.encoder

    def freeze_encoder(self, frozen: bool = True) -> None:
        """Freeze (or unfreeze) the encoder: no gradients and BatchNorm statistics fixed.

        A frozen encoder stays in eval mode even when the model is put in train mode, so
        its BatchNorm layers use and keep their running statistics, as in the paper,
        where the pre-trained encoder is not updated at all.
        """
        self.encoder_frozen = frozen
        for p in self.encoder.parameters():
            p.requires_grad_(not frozen)
        self.train(self.training)

    def train(self, mode: bool = True) -> "UNet2D":
        super().train(mode)
        if self.encoder_frozen:
            self.encoder.eval()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net((x - self.norm_mean) / self.norm_std)

    def config(self) -> dict:
        """Everything :func:`build_model` needs to rebuild this model (weights aside)."""
        return {"model": "unet2d", "arch": self.arch, "num_classes": self.num_classes,
                "mean": float(self.norm_mean), "std": float(self.norm_std)}


@register_model("unet2d")
def build_unet2d(arch: str = "resnet50", num_classes: int = 2, mean: float = DEFAULT_MEAN,
                 std: float = DEFAULT_STD) -> UNet2D:
    return UNet2D(arch=arch, num_classes=num_classes, mean=mean, std=std)

"""Segmentation models: the registry with its one ``build_model`` (2D and 3D), the 2D UNet-ResNet,
the 3D UNet with an inflatable ResNet encoder, Xie et al.'s residual symmetric anisotropic
3D U-Net and ASEM's valid-convolution 3D U-Net. Importing this package registers all four."""

from finetune.models import asem_unet, rsunet, unet2d, unet3d
from finetune.models.asem_unet import ASEMUNet
from finetune.models.base import SegmentationModel, logits_to_probs, output_channels
from finetune.models.registry import DEFAULT_MEAN, DEFAULT_STD, MODELS, build_model
from finetune.models.rsunet import RSUNet
from finetune.models.unet2d import UNet2D
from finetune.models.unet3d import UNet3D

# Archs that name a whole 3D network without a ResNet encoder (``--arch rsunet``): trained from
# scratch or from a whole trained model, never from ``--encoder`` weights.
NETWORK_ARCHS = tuple(sorted(name for name, cls in MODELS.items() if not cls.takes_encoder_weights))

__all__ = [
    "ASEMUNet",
    "NETWORK_ARCHS",
    "DEFAULT_MEAN",
    "DEFAULT_STD",
    "MODELS",
    "RSUNet",
    "SegmentationModel",
    "UNet2D",
    "UNet3D",
    "build_model",
    "logits_to_probs",
    "asem_unet",
    "output_channels",
    "rsunet",
    "unet2d",
    "unet3d",
]

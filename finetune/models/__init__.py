"""Segmentation models: the registry with its one ``build_model`` (2D and 3D), the 2D UNet-ResNet,
the 3D UNet with an inflatable ResNet encoder and Xie et al.'s residual symmetric anisotropic
3D U-Net. Importing this package registers all three."""

from finetune.models import rsunet, unet2d, unet3d
from finetune.models.base import SegmentationModel, logits_to_probs, output_channels
from finetune.models.registry import DEFAULT_MEAN, DEFAULT_STD, MODELS, build_model
from finetune.models.rsunet import RSUNet
from finetune.models.unet2d import UNet2D
from finetune.models.unet3d import UNet3D

__all__ = [
    "DEFAULT_MEAN",
    "DEFAULT_STD",
    "MODELS",
    "RSUNet",
    "SegmentationModel",
    "UNet2D",
    "UNet3D",
    "build_model",
    "logits_to_probs",
    "output_channels",
    "rsunet",
    "unet2d",
    "unet3d",
]

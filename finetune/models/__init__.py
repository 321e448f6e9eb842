"""Segmentation models: a registry (``build_model``) and the 2D UNet-ResNet."""

from finetune.models.registry import ARCHS, MODELS, arch_from_state_dict, build_model, get_arch
from finetune.models.unet2d import DEFAULT_MEAN, DEFAULT_STD, UNet2D, logits_to_probs, output_channels

__all__ = ["ARCHS", "MODELS", "DEFAULT_MEAN", "DEFAULT_STD", "UNet2D", "arch_from_state_dict", "build_model",
           "get_arch", "logits_to_probs", "output_channels"]

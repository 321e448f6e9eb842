"""Encoder weight files: one place that knows every checkpoint layout we accept.

Every layout is normalised to the key names of a timm/torchvision ResNet without its
classification head (``conv1.weight``, ``bn1.*``, ``layer1.0.conv1.weight``, ...), which is
also what ``segmentation_models_pytorch`` ResNet encoders use, so one state dict loads with
``strict=True`` into ``timm.create_model(arch, in_chans=1, num_classes=0)`` and into
``smp.Unet(arch, in_channels=1).encoder``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

import torch

# Prefixes found in the wild, longest first so the most specific one wins:
# released CEM500K MoCoV2 checkpoints (DataParallel around MoCo), our own MoCo
# checkpoints, smp UNet state dicts and DataParallel-wrapped plain models.
_ENCODER_PREFIXES = ("module.encoder_q.", "encoder_q.", "module.encoder.", "encoder.", "module.")
# Keys that belong to heads, not to the backbone.
_HEAD_PREFIXES = ("fc.", "head.", "classifier.")


class WeightsError(ValueError):
    """A weights file is missing, unreadable or not an encoder we understand."""


def encoder_state_dict(state: Mapping[str, object], source: str = "<state dict>") -> dict[str, torch.Tensor]:
    """Extract a plain ResNet-encoder state dict from any accepted checkpoint layout.

    Args:
        state: a loaded checkpoint: a state dict, or a dict holding one under
            ``"state_dict"``, ``"model"`` or ``"encoder"``.
        source: name used in error messages (usually the file path).

    Returns:
        ``{name: tensor}`` with timm/torchvision ResNet key names and no head keys.
    """
    for wrapper in ("state_dict", "model", "encoder"):
        inner = state.get(wrapper) if isinstance(state, Mapping) else None
        if isinstance(inner, Mapping) and inner and all(isinstance(k, str) for k in inner):
            state = inner
            break
    tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise WeightsError(f"{source}: no tensors found; expected a ResNet encoder state dict")
    for prefix in _ENCODER_PREFIXES:
        if any(k.startswith(prefix) for k in tensors):
            tensors = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
            break
    tensors = {k: v for k, v in tensors.items() if not k.startswith(_HEAD_PREFIXES)}
    if "conv1.weight" not in tensors:
        raise WeightsError(
            f"{source}: no 'conv1.weight' after mapping keys (first keys: {list(state)[:5]}); "
            "expected a ResNet encoder (our export, a CEM500K MoCoV2 checkpoint or a timm ResNet)"
        )
    return tensors


def load_encoder_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read ``.safetensors``, ``.pth``/``.pt``/``.pth.tar`` weights and map them with :func:`encoder_state_dict`."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: weights file not found")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt or foreign files raise many different types
        raise WeightsError(f"{path}: cannot read weights ({type(exc).__name__}: {exc})") from exc
    if not isinstance(state, Mapping):
        raise WeightsError(f"{path}: expected a dict of tensors, found {type(state).__name__}")
    return encoder_state_dict(state, source=str(path))

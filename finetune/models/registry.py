"""Registries of encoder architectures and segmentation models, with helpful errors.

An *arch* is a ResNet variant whose state-dict layout is shared by timm, torchvision and
``segmentation_models_pytorch`` (``conv1``, ``bn1``, ``layer1.0.conv1``, ...), so weights
move between them by name. A *model* is a segmentation network built around an arch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch.nn as nn


@dataclass(frozen=True)
class ArchInfo:
    """What we need to know about an encoder architecture.

    Attributes:
        name: the name used by timm and segmentation_models_pytorch.
        block: ``"basic"`` (two 3x3 convs) or ``"bottleneck"`` (1x1-3x3-1x1).
        layers: number of residual blocks in ``layer1..layer4``.
    """

    name: str
    block: str
    layers: tuple[int, int, int, int]


ARCHS: dict[str, ArchInfo] = {
    info.name: info
    for info in (
        ArchInfo("resnet18", "basic", (2, 2, 2, 2)),
        ArchInfo("resnet34", "basic", (3, 4, 6, 3)),
        ArchInfo("resnet50", "bottleneck", (3, 4, 6, 3)),
        ArchInfo("resnet101", "bottleneck", (3, 4, 23, 3)),
        ArchInfo("resnet152", "bottleneck", (3, 8, 36, 3)),
    )
}


def get_arch(name: str) -> ArchInfo:
    """Look up an encoder architecture; an unknown name lists the valid ones."""
    try:
        return ARCHS[name]
    except KeyError:
        raise ValueError(f"unknown encoder arch {name!r}; valid archs: {', '.join(ARCHS)}") from None


def arch_from_state_dict(state: dict) -> str | None:
    """Guess which registered arch produced a ResNet state dict (``None`` if none matches).

    Used only to turn a shape-mismatch error into "this file holds a resnet18".
    """
    block = "bottleneck" if any(k.startswith("layer1.0.conv3.") for k in state) else "basic"
    counts = []
    for layer in range(1, 5):
        ids = {k.split(".")[1] for k in state if k.startswith(f"layer{layer}.")}
        counts.append(len(ids))
    for info in ARCHS.values():
        if info.block == block and tuple(counts) == info.layers:
            return info.name
    return None


MODELS: dict[str, Callable[..., nn.Module]] = {}


def register_model(name: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator: make a model builder available to :func:`build_model` under ``name``."""

    def wrap(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in MODELS:
            raise ValueError(f"model {name!r} registered twice")
        MODELS[name] = fn
        return fn

    return wrap


def build_model(name: str = "unet2d", **kwargs) -> nn.Module:
    """Build a registered segmentation model; an unknown name lists the valid ones."""
    # Importing the modules registers their builders; done here so the registry has no
    # import-order pitfalls for callers.
    from finetune.models import unet2d, unet3d  # noqa: F401

    try:
        builder = MODELS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; valid models: {', '.join(sorted(MODELS))}") from None
    return builder(**kwargs)

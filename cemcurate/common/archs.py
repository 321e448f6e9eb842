"""The one table of encoder architectures, shared by the filter, pretraining and fine-tuning.

An *arch* is a ResNet whose state-dict layout (``conv1``, ``bn1``, ``layer1.0.conv1``,
``layer2.0.downsample.0``, ...) is the same in timm, torchvision and
``segmentation_models_pytorch``, and which our inflated 3D encoder
(:class:`finetune.models.unet3d.ResNetEncoder`) mirrors, so weights move between every
stage by name: ``pretrain moco`` trains it, ``pretrain export`` publishes it for timm and
smp, ``finetune train`` loads it into a 2D UNet or inflates it into a 3D one, and the
filter classifier fine-tunes it. Other timm ResNets (e.g. ``resnext50_32x4d``, grouped
convolutions) are refused up front with this list; ``tests/test_archs.py`` derives the
set of ResNets that timm and smp both build with one key layout from the libraries
themselves and checks this table against it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping


@dataclass(frozen=True)
class ArchInfo:
    """What every stage needs to know about an encoder architecture.

    Attributes:
        name: the name timm and segmentation_models_pytorch use.
        block: ``"basic"`` (two 3x3 convolutions) or ``"bottleneck"`` (1x1-3x3-1x1, x4 channels).
        layers: residual blocks in ``layer1..layer4``.
    """

    name: str
    block: str
    layers: tuple[int, int, int, int]

    @property
    def num_features(self) -> int:
        """Channels of the last stage (the pooled feature size): 512 (basic) or 2048 (bottleneck)."""
        return 512 * (4 if self.block == "bottleneck" else 1)


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
    """Look up an architecture; an unknown name lists the ones every stage supports."""
    try:
        return ARCHS[name]
    except KeyError:
        raise ValueError(
            f"unknown encoder arch {name!r}; valid archs: {', '.join(ARCHS)} (the ones every stage "
            "supports: filter, pretraining, export, 2D and 3D fine-tuning)"
        ) from None


def infer_arch(state: Mapping[str, object]) -> str | None:
    """The registered arch whose block layout a ResNet state dict has (timm key names), or None.

    Used to turn a shape mismatch into "this file holds a resnet18".
    """
    block = "bottleneck" if any(k.startswith("layer1.0.conv3.") for k in state) else "basic"
    counts = []
    for layer in range(1, 5):
        ids = {k.split(".")[1] for k in state if k.startswith(f"layer{layer}.") and k.split(".")[1].isdigit()}
        counts.append(len(ids))
    for info in ARCHS.values():
        if info.block == block and tuple(counts) == info.layers:
            return info.name
    return None

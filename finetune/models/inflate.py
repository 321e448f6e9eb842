"""Inflation of 2D ResNet weights into 3D (pure functions).

A 2D ResNet state dict (timm/torchvision/smp key names: ``conv1.weight``, ``bn1.*``,
``layer1.0.conv1.weight``, ``layer2.0.downsample.0.weight``, ...) becomes the state dict
of the 3D ResNet encoder in :mod:`finetune.models.unet3d`, which uses the same names:

* a ``k x k`` convolution kernel ``(out, in, k, k)`` becomes ``(out, in, k_z, k, k)``:

  - ``"i3d"`` (Carreira & Zisserman 2017): the 2D kernel repeated ``k_z`` times along
    depth and divided by ``k_z``. On a volume that is constant along z the 3D
    convolution then computes exactly the 2D one, so the pretrained features are
    reproduced and training starts from the 2D model's behaviour.
  - ``"center"``: the 2D kernel in the middle slice, zeros elsewhere. The 3D network
    is then exactly the 2D network applied slice by slice (for any input), and z
    context is learned from there;

* a ``1 x 1`` kernel becomes ``1 x 1 x 1`` (the downsample shortcuts, bottleneck 1x1s);
* the stem ``conv1`` takes one grey channel: an RGB kernel ``(64, 3, k, k)`` is summed
  over its input channels, which is exact for a grey image replicated to RGB;
* BatchNorm weights, biases, running statistics, ``num_batches_tracked`` and any other
  non-kernel tensor carry over unchanged.

The kernel depth of each encoder stage comes from a
:class:`~finetune.models.geometry.StageGeometry` (or a mapping or sequence of depths).
"""

from __future__ import annotations

import re
from typing import Mapping, Sequence

import torch

from cemcurate.common.weights import adapt_input_conv
from finetune.models.geometry import STAGES, StageGeometry, per_stage

INFLATE_MODES = ("i3d", "center")

_LAYER_RE = re.compile(r"(?:^|\.)(layer[1-4])\.")


def stage_of(key: str) -> str | None:
    """Encoder stage of a ResNet state-dict key (``"stem"``, ``"layer1"``, ...), or None.

    ``layer3.1.conv2.weight`` -> ``layer3``; the top-level ``conv1.weight`` (optionally
    behind a prefix such as ``encoder.``) -> ``stem``.
    """
    m = _LAYER_RE.search(key)
    if m:
        return m.group(1)
    if key == "conv1.weight" or key.endswith(".conv1.weight"):
        return "stem"
    return None


def _depths(depths: int | Mapping[str, int] | Sequence[int] | StageGeometry) -> dict[str, int]:
    if isinstance(depths, StageGeometry):
        values = depths.kernel_depth
    elif isinstance(depths, Mapping):
        unknown = set(depths) - set(STAGES)
        if unknown:
            raise ValueError(f"depths: unknown stage(s) {sorted(unknown)}; valid stages: {', '.join(STAGES)}")
        # Stages left out keep the default depth 3.
        values = tuple(int(depths.get(s, 3)) for s in STAGES)
    else:
        values = per_stage(depths, "depths")
    bad = [f"{s}={d}" for s, d in zip(STAGES, values) if d < 1 or d % 2 == 0]
    if bad:
        raise ValueError(f"kernel depths must be odd and >= 1, got {', '.join(bad)}")
    return dict(zip(STAGES, values))


def inflate_kernel(weight: torch.Tensor, depth: int, mode: str = "i3d") -> torch.Tensor:
    """Inflate one 2D kernel ``(out, in, kh, kw)`` to ``(out, in, depth, kh, kw)`` (same dtype).

    ``i3d``: repeated along depth and divided by ``depth`` (the sum over depth is the 2D
    kernel). ``center``: the 2D kernel at index ``depth // 2``, zeros elsewhere.
    """
    if weight.ndim != 4:
        raise ValueError(f"expected a 2D convolution kernel (out, in, kh, kw), got shape {tuple(weight.shape)}")
    if depth < 1 or depth % 2 == 0:
        raise ValueError(f"kernel depth must be odd and >= 1, got {depth}")
    if mode == "i3d":
        return weight.unsqueeze(2).repeat(1, 1, depth, 1, 1) / depth
    if mode == "center":
        out = weight.new_zeros(weight.shape[:2] + (depth,) + weight.shape[2:])
        out[:, :, depth // 2] = weight
        return out
    raise ValueError(f"unknown inflation mode {mode!r}; valid modes: {', '.join(INFLATE_MODES)}")


def inflate_state_dict(
    state2d: Mapping[str, torch.Tensor],
    depths: int | Mapping[str, int] | Sequence[int] | StageGeometry = 3,
    mode: str = "i3d",
) -> dict[str, torch.Tensor]:
    """Turn a 2D ResNet state dict into the state dict of the 3D ResNet encoder.

    Args:
        state2d: ``{name: tensor}`` with timm/torchvision ResNet names. Convolution
            kernels are ``(out, in, kh, kw)``; ``conv1.weight`` may have 1 or 3 input
            channels. Not modified.
        depths: kernel depth ``k_z`` of the ``k x k`` (k > 1) convolutions: one odd int
            for every stage, a sequence of 5 in :data:`STAGES` order, a mapping
            ``{stage: k_z}`` (stages left out get 3) or a :class:`StageGeometry`.
        mode: ``"i3d"`` (repeat and divide) or ``"center"`` (middle slice); see the
            module docstring.

    Returns:
        A new dict with the same keys: kernels ``(out, in, k_z, kh, kw)`` (``1x1`` ->
        ``(out, in, 1, 1, 1)``), ``conv1.weight`` with one input channel, every other
        tensor (BatchNorm weight/bias/running_mean/running_var/num_batches_tracked,
        biases, head weights) cloned unchanged. Dtypes are preserved.

    Raises:
        ValueError: bad depths or mode, or a ``k x k`` kernel whose stage cannot be told
            from its name (the message names the key).
    """
    if mode not in INFLATE_MODES:
        raise ValueError(f"unknown inflation mode {mode!r}; valid modes: {', '.join(INFLATE_MODES)}")
    stage_depths = _depths(depths)
    out: dict[str, torch.Tensor] = {}
    for key, value in state2d.items():
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"{key}: expected a tensor, got {type(value).__name__}")
        if value.ndim != 4:
            out[key] = value.detach().clone()
            continue
        stage = stage_of(key)
        weight = value.detach()
        if stage == "stem":
            weight = adapt_input_conv(weight, 1)  # an RGB stem sees grey EM as a replicated grey image
        if weight.shape[2:] == (1, 1):
            out[key] = weight.unsqueeze(2).clone()
            continue
        if stage is None:
            raise ValueError(
                f"{key}: cannot tell which encoder stage this {tuple(weight.shape[2:])} kernel "
                "belongs to (expected conv1.weight or layer1-4.*); pass an encoder state dict with "
                "ResNet key names"
            )
        out[key] = inflate_kernel(weight, stage_depths[stage], mode)
    return out

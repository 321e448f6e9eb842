"""The registry of segmentation models and the one builder for 2D and 3D: ``build_model``.

A *model* is a segmentation network built around an encoder arch of
:data:`cemcurate.common.archs.ARCHS`. Builders register under a name
(``@register_model("unet2d")``) and construct a randomly initialised network;
:func:`build_model` then loads encoder weights itself, strictly (2D weights as they are
into a 2D model, inflated to 3D for a 3D one, :mod:`finetune.models.inflate`), and
freezes the encoder as asked, so weight loading sits above the models and no model
module imports it. Importing :mod:`finetune.models` registers every model.
"""

from __future__ import annotations

import inspect
from typing import Callable, Mapping

import torch
import torch.nn as nn

from cemcurate.common.weights import RANDOM, ResolvedWeights, check_arch_of, load_encoder_weights
from finetune.models.inflate import inflate_state_dict

MODELS: dict[str, Callable[..., nn.Module]] = {}
# Input normalisation for encoders that carry none (random init, files without a config.json):
# maps [0, 1] to [-1, 1], a reasonable range for BatchNorm-ed ResNets on 8-bit EM whose mean
# is near mid-grey.
DEFAULT_MEAN = 0.5
DEFAULT_STD = 0.5


def register_model(name: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator: make a model class (or builder function) available to :func:`build_model` under ``name``."""

    def wrap(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in MODELS:
            raise ValueError(f"model {name!r} registered twice")
        MODELS[name] = fn
        return fn

    return wrap


def _as_weights(weights: ResolvedWeights | Mapping[str, torch.Tensor] | None) -> ResolvedWeights:
    if weights is None:
        return RANDOM
    if isinstance(weights, ResolvedWeights):
        return weights
    if isinstance(weights, Mapping):
        return ResolvedWeights("file", dict(weights), source="<2D state dict>")
    raise ValueError(f"weights must be ResolvedWeights, a 2D state dict or None, got {type(weights).__name__}")


def build_model(
    name: str = "unet2d",
    *,
    weights: ResolvedWeights | Mapping[str, torch.Tensor] | None = None,
    freeze_encoder: bool = False,
    inflate: str | None = None,
    **kwargs,
) -> nn.Module:
    """Build a registered segmentation model, load its encoder weights and freeze it as asked.

    Args:
        name: a registered model (``unet2d``, ``unet3d``); an unknown name lists the valid ones.
        weights: 2D encoder weights: :class:`~cemcurate.common.weights.ResolvedWeights` from
            :func:`cemcurate.common.weights.resolve` (its mean/std become the model's input
            normalisation unless ``mean``/``std`` are given), a plain 2D ResNet state dict, or
            None (random initialisation).
        freeze_encoder: no gradients to the encoder, its BatchNorm kept in eval mode.
        inflate: ``i3d`` (default) or ``center``, how 2D kernels become 3D; 3D models only.
        **kwargs: the builder's arguments (``arch``, ``num_classes``, ``geometry``, ...).

    Raises:
        ValueError: unknown model, or the weights do not fit the arch (names their source and
            the arch they hold; checked before the network is built).
    """
    try:
        builder = MODELS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; valid models: {', '.join(sorted(MODELS))}") from None
    weights = _as_weights(weights)
    if weights.state is not None and not getattr(builder, "takes_encoder_weights", True):
        raise ValueError(
            f"{name} has no ResNet encoder to load {weights.source} into: it trains from scratch "
            "(--encoder random) or from a whole trained model (--init-model)"
        )
    if weights.state is not None:
        arch = kwargs.get("arch", inspect.signature(builder).parameters["arch"].default)
        check_arch_of(weights.state, arch, weights.source)  # before building: a 3D ResNet is large
    for key, value, default in (("mean", weights.mean, DEFAULT_MEAN), ("std", weights.std, DEFAULT_STD)):
        if kwargs.get(key) is None:
            kwargs[key] = default if value is None else value
    model = builder(**kwargs)
    if inflate is not None and model.dim != 3:
        raise ValueError(f"inflate={inflate!r} applies to 3D models; {name} is {model.dim}D")
    if weights.state is not None:
        state = weights.state if model.dim == 2 else inflate_state_dict(weights.state, model.geometry, inflate or "i3d")
        load_encoder_weights(model.encoder, state, model.arch, weights.source)
    model.freeze_encoder(freeze_encoder)
    return model

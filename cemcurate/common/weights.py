"""Encoder weights for every stage: one spec syntax, one resolver, one input-conv adapter.

A *weight spec* is the string users pass as ``finetune train --encoder``, ``cemcurate filter
train --weights`` (and benchmark initialisations):

* ``random`` (also ``none`` or empty): no pretrained weights;
* ``imagenet``: timm's ImageNet weights (``timm.create_model(arch, pretrained=True)``; timm
  needs its Hugging Face cache or internet access);
* ``cem500k:PATH``: a released CEM500K MoCoV2 checkpoint (``module.encoder_q.*`` keys, MLP
  head dropped); its ``norms`` entry gives the normalisation, else the CEM500K statistics;
* ``PATH``: a weights file (``.safetensors``, ``.pth``, ``.pt``, ``.pth.tar``) or a folder
  holding one (``encoder.safetensors`` preferred), e.g. a ``pretrain export`` folder; a
  ``config.json`` beside it may give the normalisation (``mean``/``std``, a ``norm`` mapping or
  timm's ``pretrained_cfg``) and the architecture (``arch``/``architecture``).

:func:`resolve` turns a spec into :class:`ResolvedWeights`: a state dict with the key names
of a timm ResNet without its head (the layout of :mod:`cemcurate.common.archs`) and a
one-channel ``conv1`` (:func:`adapt_input_conv`), the intensity normalisation the weights
expect, and where they came from. Every stage loads that state dict strictly
(:func:`load_encoder_weights`); a file of another architecture fails naming the file and
the arch it holds.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch

from cemcurate.common.archs import get_arch, infer_arch
from cemcurate.common.lazy import lazy_import

timm = lazy_import("timm")
safetensors_torch = lazy_import("safetensors.torch")

# Intensity mean and std (pixel / 255) of CEM500K, which the released MoCoV2 weights were
# trained with; used when an imported checkpoint does not carry its own "norms".
CEM500K_MEAN, CEM500K_STD = 0.58331613, 0.09966064
# ImageNet statistics of the (R, G, B) channels, and their averages for one grey channel.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGENET_GRAY_MEAN = sum(IMAGENET_MEAN) / 3
IMAGENET_GRAY_STD = sum(IMAGENET_STD) / 3

SPEC_HELP = "random, imagenet, cem500k:PATH or PATH (a weights file or a `pretrain export` folder)"
_WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".tar")
# Prefixes found in the wild, most specific first: released CEM500K MoCoV2 checkpoints
# (DataParallel around MoCo), our MoCo checkpoints, smp UNet state dicts, DataParallel.
_ENCODER_PREFIXES = ("module.encoder_q.", "encoder_q.", "module.encoder.", "encoder.", "module.")
# Keys of classification or projection heads, not of the backbone.
_HEAD_PREFIXES = ("fc.", "head.", "classifier.")


class WeightsError(ValueError):
    """A weight spec cannot be resolved, or its weights do not fit the model (the message says why)."""


@dataclass(frozen=True)
class WeightSpec:
    """A parsed weight spec: ``kind`` is ``random``, ``imagenet``, ``cem500k`` or ``file``."""

    kind: str
    path: Path | None = None

    @classmethod
    def parse(cls, text: str | Path) -> "WeightSpec":
        text = str(text).strip()
        if text in ("random", "none", ""):
            return cls("random")
        if text == "imagenet":
            return cls("imagenet")
        if text.startswith("cem500k:"):
            if not text[len("cem500k:") :]:
                raise WeightsError(
                    "weight spec 'cem500k:' needs a checkpoint path, "
                    "e.g. cem500k:weights/cem500k_mocov2_resnet50.pth.tar"
                )
            return cls("cem500k", Path(text[len("cem500k:") :]))
        return cls("file", Path(text))

    def __str__(self) -> str:
        return {"random": "random", "imagenet": "imagenet"}.get(self.kind) or (
            f"cem500k:{self.path}" if self.kind == "cem500k" else str(self.path)
        )


@dataclass
class ResolvedWeights:
    """Encoder weights ready to load.

    Attributes:
        kind: ``random``, ``imagenet``, ``cem500k`` or ``file``.
        state: ResNet state dict (timm keys, one-channel ``conv1``, no head); None for random.
        mean, std: normalisation of intensities in [0, 1] the weights expect; None when unknown.
        source: provenance for messages, configs and model cards (a file path or ``timm:<arch> (ImageNet)``).
    """

    kind: str
    state: dict[str, torch.Tensor] | None
    mean: float | None = None
    std: float | None = None
    source: str = ""


RANDOM = ResolvedWeights("random", None, source="random")


def adapt_input_conv(weight: torch.Tensor, in_chans: int = 1) -> torch.Tensor:
    """A first-convolution kernel ``(out, c, k, k)`` for ``in_chans`` input channels (as timm's).

    One channel: the kernel summed over its input channels, which for a grey image
    replicated to every channel gives exactly the original response (how RGB-trained
    encoders see EM). More channels: the kernel repeated and rescaled so the response to a
    replicated grey image is unchanged. A kernel that already has ``in_chans`` is returned.
    """
    if weight.ndim not in (4, 5):
        raise ValueError(f"expected a convolution kernel (out, in, ...), got shape {tuple(weight.shape)}")
    c = weight.shape[1]
    if c == in_chans:
        return weight
    if in_chans == 1:
        return weight.sum(dim=1, keepdim=True)
    repeats = -(-in_chans // c)
    return weight.repeat(1, repeats, *([1] * (weight.ndim - 2)))[:, :in_chans] * (c / in_chans)


def fold_input_normalisation(
    state: Mapping[str, torch.Tensor], channel_mean, channel_std, mean: float, std: float
) -> dict[str, torch.Tensor]:
    """Fold a per-channel input normalisation into ``conv1`` and ``bn1`` for one grey channel.

    A network applied to grey images replicated to RGB and normalised per channel,
    ``(x - m_c) / s_c``, equals one applied to the grey image normalised once,
    ``(x - mean) / std``, if its RGB kernel ``W[o, c]`` becomes ``std * sum_c W[o, c] / s_c``
    (:func:`adapt_input_conv` of ``W * std / s_c``) and the constant left over per output
    channel, ``d[o] = sum_{c,k} W[o, c, k] (mean - m_c) / s_c``, is taken out of
    ``bn1.running_mean``. Outputs then agree except within the kernel radius of the border,
    where zero padding of the two inputs differs. Returns a new state dict (float32).
    """
    out = dict(state)
    w = state["conv1.weight"].double()
    m_c = torch.tensor(channel_mean, dtype=torch.float64).view(1, -1, 1, 1)
    s_c = torch.tensor(channel_std, dtype=torch.float64).view(1, -1, 1, 1)
    out["conv1.weight"] = adapt_input_conv(w * (std / s_c), 1).float()
    shift = (w * (mean - m_c) / s_c).sum(dim=(1, 2, 3))
    out["bn1.running_mean"] = (state["bn1.running_mean"].double() - shift).float()
    return out


def read_weights_file(path: str | Path) -> Mapping[str, Any]:
    """A ``.safetensors`` file or a ``torch.save`` file (read with ``weights_only=True``: no code runs)."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: weights file not found")
    try:
        if path.suffix == ".safetensors":
            state = safetensors_torch.load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt or foreign files raise many different types
        raise WeightsError(f"{path}: cannot read weights ({type(exc).__name__}: {exc})") from exc
    if not isinstance(state, Mapping):
        raise WeightsError(f"{path}: expected a dict of tensors, found {type(state).__name__}")
    return state


def encoder_state_dict(state: Mapping[str, Any], source: str = "<state dict>") -> dict[str, torch.Tensor]:
    """Extract a plain ResNet-encoder state dict (timm key names, no head) from any accepted layout.

    ``state`` is a loaded checkpoint: a state dict, or a dict holding one under
    ``"state_dict"``, ``"model"`` or ``"encoder"``; known wrapper prefixes
    (``module.encoder_q.``, ``encoder_q.``, ``encoder.``, ``module.``) are stripped.
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
            tensors = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
            break
    tensors = {k: v for k, v in tensors.items() if not k.startswith(_HEAD_PREFIXES)}
    if "conv1.weight" not in tensors:
        raise WeightsError(
            f"{source}: no 'conv1.weight' after mapping keys (first keys: {list(state)[:5]}); "
            "expected a ResNet encoder (our export, a CEM500K MoCoV2 checkpoint or a timm ResNet)"
        )
    return tensors


def find_weights_file(path: Path) -> Path:
    """``path`` itself, or the single weights file in the folder ``path`` (``.safetensors`` preferred:
    a `pretrain export` folder holds the same tensors as ``encoder.safetensors`` and ``encoder.pth``)."""
    if path.is_dir():
        found = sorted(p for p in path.iterdir() if p.is_file() and p.name.endswith(_WEIGHT_SUFFIXES))
        safetensors = [p for p in found if p.suffix == ".safetensors"]
        pick = safetensors if safetensors else found
        if len(pick) != 1:
            raise WeightsError(
                f"{path}: expected one weights file ({', '.join(_WEIGHT_SUFFIXES)}) "
                f"in this folder, found {[p.name for p in found]}; pass the file itself"
            )
        return pick[0]
    if not path.exists():
        raise WeightsError(f"{path}: weights file not found (use {SPEC_HELP})")
    return path


def _scalar(value: Any, what: str, source: Path | str) -> float:
    """A normalisation constant from a number or a per-channel list (averaged: we use one grey channel)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, (int, float)) for v in value):
        return float(sum(value) / len(value))
    raise WeightsError(f"{source}: {what} must be a number or a list of numbers, found {value!r}")


def read_config_json(weights_file: Path) -> tuple[float | None, float | None, str | None]:
    """``(mean, std, arch)`` from the ``config.json`` beside a weights file (all None if absent)."""
    cfg_path = weights_file.parent / "config.json"
    if not cfg_path.is_file():
        return None, None, None
    try:
        cfg = json.loads(cfg_path.read_text())
    except (OSError, ValueError) as exc:
        raise WeightsError(f"{cfg_path}: cannot read encoder config ({exc})") from exc
    if not isinstance(cfg, dict):
        raise WeightsError(f"{cfg_path}: expected a JSON object")
    holder = cfg
    for key in ("norm", "normalization", "pretrained_cfg"):
        if isinstance(cfg.get(key), dict) and "mean" in cfg[key]:
            holder = cfg[key]
            break
    mean = _scalar(holder["mean"], "mean", cfg_path) if "mean" in holder else None
    std = _scalar(holder["std"], "std", cfg_path) if "std" in holder else None
    arch = cfg.get("arch") or cfg.get("architecture")
    return mean, std, arch if isinstance(arch, str) else None


def checkpoint_norms(checkpoint: Mapping[str, Any]) -> tuple[float | None, float | None]:
    """Normalisation a CEM500K-style checkpoint stores under ``norms`` (``[mean, std]`` or a mapping)."""
    norms = checkpoint.get("norms")
    if isinstance(norms, Mapping):
        mean, std = norms.get("mean"), norms.get("std", norms.get("stdev"))
    elif isinstance(norms, (list, tuple)) and len(norms) == 2:
        mean, std = norms
    else:
        return None, None
    try:
        return _scalar(mean, "norms mean", "checkpoint"), _scalar(std, "norms std", "checkpoint")
    except WeightsError:
        return None, None


def imagenet_weights(arch: str, flag: str = "--encoder") -> ResolvedWeights:
    """timm's ImageNet weights of ``arch`` with a one-channel ``conv1`` and the grey ImageNet normalisation.

    Raises:
        WeightsError: timm cannot get them (typically no internet and no cached copy); the
            message says what to do, naming ``flag``.
    """
    try:
        net = timm.create_model(arch, pretrained=True, num_classes=0)
    except Exception as exc:  # offline: huggingface_hub / urllib raise many different types
        raise WeightsError(
            f"cannot get ImageNet weights for {arch} through timm ({type(exc).__name__}: {exc}). "
            "timm downloads them from the Hugging Face Hub on first use and caches them: run once with "
            "internet access (or copy ~/.cache/huggingface from a machine that has them), or pass "
            f"{flag} random, or {flag} PATH with a local weights file"
        ) from exc
    cfg = getattr(net, "pretrained_cfg", {}) or {}
    mean = _scalar(cfg["mean"], "mean", "timm") if "mean" in cfg else IMAGENET_GRAY_MEAN
    std = _scalar(cfg["std"], "std", "timm") if "std" in cfg else IMAGENET_GRAY_STD
    state = net.state_dict()
    state["conv1.weight"] = adapt_input_conv(state["conv1.weight"], 1)
    return ResolvedWeights("imagenet", state, mean, std, f"timm:{arch} (ImageNet)")


def check_arch_of(state: Mapping[str, torch.Tensor], arch: str, source: str) -> None:
    """Raise :class:`WeightsError` when ``state`` holds another registered arch than ``arch``."""
    found = infer_arch(state)
    if found is not None and found != arch:
        raise WeightsError(
            f"{source}: cannot load into a {arch} encoder: it holds a {found} encoder; pass --arch {found}"
        )


def resolve(spec: str | WeightSpec, arch: str, flag: str = "--encoder") -> ResolvedWeights:
    """Resolve a weight spec for encoder ``arch`` (see the module docstring); nothing is loaded yet.

    Args:
        spec: the spec string or a parsed :class:`WeightSpec`.
        arch: the architecture the weights are for (checked against what a file holds).
        flag: the command-line option the spec came from, for messages.

    Raises:
        ValueError: unknown arch. WeightsError: missing or unreadable file, a file of another
            arch, or ImageNet weights timm cannot get.
    """
    get_arch(arch)
    spec = spec if isinstance(spec, WeightSpec) else WeightSpec.parse(spec)
    if spec.kind == "random":
        return RANDOM
    if spec.kind == "imagenet":
        return imagenet_weights(arch, flag)
    assert spec.path is not None
    path = find_weights_file(spec.path)
    return weights_from_checkpoint(read_weights_file(path), path, spec.kind, arch)


def weights_from_checkpoint(raw: Mapping[str, Any], path: Path, kind: str, arch: str) -> ResolvedWeights:
    """The encoder weights in a loaded weights file (``kind`` ``cem500k`` or ``file``; see :func:`resolve`)."""
    mean, std, file_arch = read_config_json(path) if kind == "file" else (None, None, None)
    if file_arch is not None and file_arch != arch:
        raise WeightsError(
            f"{path}: its config.json says arch {file_arch!r} but the model is {arch!r}; pass --arch {file_arch}"
        )
    state = encoder_state_dict(raw, source=str(path))
    state["conv1.weight"] = adapt_input_conv(state["conv1.weight"], 1)
    check_arch_of(state, arch, str(path))
    if kind == "cem500k":
        mean, std = checkpoint_norms(raw)
        if mean is None or std is None:
            # The released weights were trained on CEM500K intensities; without "norms" in
            # the file, use that dataset's statistics (as `pretrain export` does).
            mean, std = CEM500K_MEAN, CEM500K_STD
    return ResolvedWeights(kind, state, mean, std, str(path))


def load_encoder_weights(
    encoder: torch.nn.Module, state: Mapping[str, torch.Tensor], arch: str, source: str = "<state dict>"
) -> None:
    """Load ``state`` into ``encoder`` with ``strict=True``.

    Raises:
        WeightsError: keys or shapes do not match; names ``source`` and, when it can be
            recognised, the arch the state dict holds.
    """
    try:
        encoder.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        found = infer_arch(state)
        hint = (
            f"it holds a {found} encoder; pass --arch {found}"
            if found and found != arch
            else "its keys or shapes do not match"
        )
        first = str(exc).splitlines()
        raise WeightsError(
            f"{source}: cannot load into a {arch} encoder: {hint} ({first[1].strip() if len(first) > 1 else first[0]})"
        ) from exc

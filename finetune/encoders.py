"""Encoder weight sources for the UNet: random, ImageNet (timm), our export, CEM500K.

An encoder spec is a string:

* ``random``: keep the seeded random initialisation.
* ``imagenet``: ``timm.create_model(arch, pretrained=True)``; needs the weights in the
  local Hugging Face cache or internet access. The RGB ``conv1`` is summed over its
  three input channels, which is exact for a grey image replicated to RGB.
* ``cem500k:PATH``: a released CEM500K MoCoV2 checkpoint (``module.encoder_q.*`` keys,
  MLP head dropped); a ``norms`` entry in the checkpoint gives the normalisation, else
  the CEM500K intensity statistics of :mod:`pretrain.export`.
* ``PATH``: our pretraining export (``.safetensors``/``.pth`` with timm ResNet keys), or its
  folder (``encoder.safetensors`` preferred). A ``config.json`` beside the weights may give the
  normalisation (``mean``/``std``, a ``norm`` mapping or timm's ``pretrained_cfg``) and
  the architecture (``arch`` or ``architecture``), which is checked against the model.

Every loaded state dict goes into the UNet encoder with ``strict=True``; a file of another
architecture fails with a message naming the file and the arch it actually holds.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch

from finetune.models.registry import arch_from_state_dict, get_arch
from pretrain.weights import WeightsError, load_encoder_state_dict

_WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".tar")


class EncoderError(ValueError):
    """An encoder spec cannot be resolved or its weights do not fit the model."""


@dataclass
class EncoderWeights:
    """Resolved encoder weights.

    Attributes:
        kind: ``"random"``, ``"imagenet"``, ``"cem500k"`` or ``"file"``.
        state: ResNet state dict (timm keys, one-channel ``conv1``) or ``None`` for random.
        mean, std: input normalisation for images in [0, 1], ``None`` when the source has none.
        source: human-readable origin (file path or ``timm:<arch>``).
    """

    kind: str
    state: dict[str, torch.Tensor] | None
    mean: float | None = None
    std: float | None = None
    source: str = ""


def parse_encoder_spec(spec: str) -> tuple[str, Path | None]:
    """Split an encoder spec into ``(kind, path)``; see the module docstring."""
    spec = spec.strip()
    if spec in ("random", "none", ""):
        return "random", None
    if spec == "imagenet":
        return "imagenet", None
    if spec.startswith("cem500k:"):
        path = spec[len("cem500k:"):]
        if not path:
            raise EncoderError("encoder spec 'cem500k:' needs a checkpoint path, e.g. cem500k:weights/cem500k_mocov2_resnet50.pth.tar")
        return "cem500k", Path(path)
    return "file", Path(spec)


def _find_weights_file(path: Path) -> Path:
    """``path`` itself, or the weights file inside the folder ``path``.

    A pretraining export folder holds ``encoder.safetensors`` and ``encoder.pth`` with the
    same tensors: the single ``.safetensors`` file is preferred, else the single other one.
    """
    if path.is_dir():
        found = sorted(p for p in path.iterdir() if p.is_file() and p.name.endswith(_WEIGHT_SUFFIXES))
        safetensors = [p for p in found if p.suffix == ".safetensors"]
        pick = safetensors if safetensors else found
        if len(pick) != 1:
            raise EncoderError(f"{path}: expected one weights file ({', '.join(_WEIGHT_SUFFIXES)}) "
                               f"in this folder, found {[p.name for p in found]}; pass the file itself")
        return pick[0]
    if not path.exists():
        raise EncoderError(f"{path}: encoder weights file not found (use 'random', 'imagenet', "
                           "'cem500k:PATH' or a path to exported weights)")
    return path


def _scalar(value: Any, what: str, source: Path) -> float:
    """A normalisation constant from a number or a per-channel list (averaged: we use one grey channel)."""
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, (int, float)) for v in value):
        return float(sum(value) / len(value))
    raise EncoderError(f"{source}: {what} must be a number or a list of numbers, found {value!r}")


def read_norm_config(path: Path) -> tuple[float | None, float | None, str | None]:
    """``(mean, std, arch)`` from the ``config.json`` beside a weights file (all ``None`` if absent)."""
    cfg_path = path.parent / "config.json"
    if not cfg_path.is_file():
        return None, None, None
    try:
        cfg = json.loads(cfg_path.read_text())
    except (OSError, ValueError) as exc:
        raise EncoderError(f"{cfg_path}: cannot read encoder config ({exc})") from exc
    if not isinstance(cfg, dict):
        raise EncoderError(f"{cfg_path}: expected a JSON object")
    holder = cfg
    for key in ("norm", "normalization", "pretrained_cfg"):
        if isinstance(cfg.get(key), dict) and "mean" in cfg[key]:
            holder = cfg[key]
            break
    mean = _scalar(holder["mean"], "mean", cfg_path) if "mean" in holder else None
    std = _scalar(holder["std"], "std", cfg_path) if "std" in holder else None
    arch = cfg.get("arch") or cfg.get("architecture")
    return mean, std, arch if isinstance(arch, str) else None


def _checkpoint_norms(path: Path) -> tuple[float | None, float | None]:
    """Normalisation stored in a CEM500K-style checkpoint under ``norms``, if any."""
    if path.suffix == ".safetensors":
        return None, None
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # already validated by load_encoder_state_dict; norms are optional
        return None, None
    norms = ckpt.get("norms") if isinstance(ckpt, Mapping) else None
    if isinstance(norms, Mapping):
        mean, std = norms.get("mean"), norms.get("std", norms.get("stdev"))
    elif isinstance(norms, (list, tuple)) and len(norms) == 2:
        mean, std = norms
    else:
        return None, None
    try:
        return _scalar(mean, "norms mean", path), _scalar(std, "norms std", path)
    except EncoderError:
        return None, None


def to_one_channel(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Sum an RGB ``conv1.weight`` ``(64, 3, k, k)`` over its input channels to ``(64, 1, k, k)``.

    For a grey image replicated to three channels the result is identical, which is how
    ImageNet (and any RGB-trained) encoders are applied to EM.
    """
    w = state.get("conv1.weight")
    if w is not None and w.ndim == 4 and w.shape[1] == 3:
        state = dict(state)
        state["conv1.weight"] = w.sum(dim=1, keepdim=True)
    return state


def _imagenet_weights(arch: str) -> EncoderWeights:
    import timm

    try:
        net = timm.create_model(arch, pretrained=True, num_classes=0)
    except Exception as exc:  # offline: huggingface_hub / urllib raise many different types
        raise EncoderError(
            f"cannot get ImageNet weights for {arch} through timm ({type(exc).__name__}: {exc}). "
            "timm downloads them from the Hugging Face Hub on first use: run once with internet access "
            "(they are then cached), or save them to a file and pass --encoder PATH"
        ) from exc
    cfg = getattr(net, "pretrained_cfg", {}) or {}
    mean = _scalar(cfg["mean"], "mean", Path("timm")) if "mean" in cfg else None
    std = _scalar(cfg["std"], "std", Path("timm")) if "std" in cfg else None
    return EncoderWeights("imagenet", to_one_channel(net.state_dict()), mean, std, f"timm:{arch} (ImageNet)")


def resolve_encoder(spec: str, arch: str) -> EncoderWeights:
    """Turn an encoder spec into weights for ``arch`` (not yet loaded into a model)."""
    get_arch(arch)
    kind, path = parse_encoder_spec(spec)
    if kind == "random":
        return EncoderWeights("random", None, source="random")
    if kind == "imagenet":
        return _imagenet_weights(arch)
    assert path is not None
    path = _find_weights_file(path)
    try:
        state = to_one_channel(load_encoder_state_dict(path))
    except WeightsError as exc:
        raise EncoderError(str(exc)) from exc
    if kind == "cem500k":
        mean, std = _checkpoint_norms(path)
        if mean is None or std is None:
            # The released weights were trained on CEM500K intensities; without "norms" in
            # the file, use that dataset's statistics (as the pretraining export does).
            from pretrain.export import CEM500K_MEAN, CEM500K_STD

            mean, std = CEM500K_MEAN, CEM500K_STD
        return EncoderWeights("cem500k", state, mean, std, str(path))
    mean, std, file_arch = read_norm_config(path)
    if file_arch is not None and file_arch != arch:
        raise EncoderError(f"{path}: its config.json says arch {file_arch!r} but the model is {arch!r}; "
                           f"pass --arch {file_arch}")
    return EncoderWeights("file", state, mean, std, str(path))


def load_into_encoder(encoder: torch.nn.Module, weights: EncoderWeights, arch: str) -> None:
    """Load ``weights.state`` into ``encoder`` strictly; no-op for random init.

    Raises:
        EncoderError: the state dict does not match ``arch`` (names the file and, when it
            can be recognised, the arch it holds).
    """
    if weights.state is None:
        return
    try:
        encoder.load_state_dict(weights.state, strict=True)
    except RuntimeError as exc:
        found = arch_from_state_dict(weights.state)
        hint = (f"it holds a {found} encoder; pass --arch {found}" if found and found != arch
                else "its keys or shapes do not match")
        first = str(exc).splitlines()
        raise EncoderError(f"{weights.source}: cannot load into a {arch} encoder: {hint} "
                           f"({first[1].strip() if len(first) > 1 else first[0]})") from exc

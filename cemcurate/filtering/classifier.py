"""The ResNet informative-patch classifier: weights, the classifier file and batched inference.

CEM500K fine-tuned an ImageNet ResNet34 - its fourth residual stage and a one-logit head -
with Adam (lr 0.001, 30 epochs) and kept patches whose sigmoid output exceeds 0.5. Here
the network is a timm ResNet with a one-channel ``conv1`` (EM is grey; an RGB ``conv1``
is summed over its input channels) and one output logit (informative).

Initial weights (``--weights``):

* ``imagenet``: timm's normal ``pretrained=True`` loading (Hugging Face Hub or its local
  cache);
* ``random``: no pretraining;
* a file: our classifier file (continue training), the released CEM500K filter (a
  torchvision ``resnet34`` state dict with ``fc`` of one output), or a ResNet encoder in any
  layout :mod:`pretrain.weights` understands (our pretraining exports, MoCo checkpoints,
  plain timm/torchvision ResNets). Head weights of encoders are not used.

The classifier file (``.pth``, written atomically) is a dict::

    {"kind": "cemcurate-filter-classifier", "format": 1, "arch": "resnet34", "in_chans": 1,
     "state_dict": {...}, "input_size": 224, "mean": m, "std": s, "threshold": 0.5,
     "config": {...}, "metrics": {...}}

Input convention: ``x = uint8 / 255`` resized (bilinear, antialiased) to ``input_size``,
then ``(x - mean) / std``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import numpy as np
import torch

from cemcurate.common.atomic import atomic_path
from cemcurate.common.device import select_device

CLASSIFIER_KIND = "cemcurate-filter-classifier"
CLASSIFIER_FORMAT = 1

# ImageNet statistics of the (R, G, B) channels; a grey image replicated to RGB is
# normalised with these by torchvision-style models such as the released CEM500K filter.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# One grey channel: their averages.
IMAGENET_GRAY_MEAN = float(np.mean(IMAGENET_MEAN))
IMAGENET_GRAY_STD = float(np.mean(IMAGENET_STD))

# Block depths of the torchvision/timm ResNets, to recognise the arch of a bare state dict.
_RESNET_DEPTHS = {((2, 2, 2, 2), False): "resnet18", ((3, 4, 6, 3), False): "resnet34",
                  ((3, 4, 6, 3), True): "resnet50", ((3, 4, 23, 3), True): "resnet101",
                  ((3, 8, 36, 3), True): "resnet152"}


class FilterError(ValueError):
    """A classifier file, weights spec or training input is missing or invalid."""


# ----------------------------------------------------------------------------- models

def check_arch(arch: str) -> None:
    """Raise :class:`FilterError` unless ``arch`` is a timm ResNet (``layer4`` + ``fc``)."""
    import timm

    if not timm.is_model(arch):
        family = [m for m in timm.list_models("resnet*") if m.count("_") == 0][:12]
        raise FilterError(f"unknown arch {arch!r}; use a timm ResNet such as {', '.join(family)} "
                          "(`timm.list_models('resnet*')` lists them all)")


def create_model(arch: str, pretrained: bool = False) -> torch.nn.Module:
    """A timm ``arch`` with one input channel and one output logit.

    ``pretrained=True`` uses timm's normal ImageNet loading (it sums the RGB ``conv1`` to
    one channel and re-initialises the head); failures - typically no internet and no
    cached copy - raise :class:`FilterError` with what to do instead.
    """
    import timm

    check_arch(arch)
    try:
        model = timm.create_model(arch, pretrained=pretrained, in_chans=1, num_classes=1)
    except Exception as exc:  # offline: huggingface_hub / urllib raise many different types
        if not pretrained:
            raise
        raise FilterError(
            f"cannot load ImageNet weights for {arch} through timm ({type(exc).__name__}: {exc}). "
            "timm downloads them from the Hugging Face Hub on first use and caches them: run once with "
            "internet access (or copy ~/.cache/huggingface from a machine that has them), or pass "
            "--weights random, or --weights PATH with a local weights file"
        ) from exc
    for name in ("layer4", "fc"):
        if not hasattr(model, name):
            raise FilterError(f"arch {arch!r} has no '{name}' module; the filter needs a ResNet-style model")
    return model


def infer_resnet_arch(state: Mapping[str, torch.Tensor]) -> str | None:
    """The torchvision/timm ResNet name matching a state dict's block layout, or ``None``."""
    depths = []
    for layer in range(1, 5):
        blocks = {int(k.split(".")[1]) for k in state if k.startswith(f"layer{layer}.") and k.split(".")[1].isdigit()}
        depths.append(max(blocks) + 1 if blocks else 0)
    bottleneck = any(k.endswith("conv3.weight") for k in state)
    return _RESNET_DEPTHS.get((tuple(depths), bottleneck))


def _strip_prefix(state: Mapping[str, torch.Tensor], prefix: str = "module.") -> dict[str, torch.Tensor]:
    if state and all(k.startswith(prefix) for k in state):
        return {k[len(prefix):]: v for k, v in state.items()}
    return dict(state)


def is_torchvision_classifier(state: Mapping[str, object]) -> bool:
    """A plain ResNet state dict that includes a one-logit ``fc`` head (e.g. the CEM500K filter)."""
    if not isinstance(state, Mapping) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        return False
    plain = _strip_prefix(state)  # type: ignore[arg-type]
    return "conv1.weight" in plain and "fc.weight" in plain and "bn1.running_mean" in plain


def convert_torchvision_classifier(state: Mapping[str, torch.Tensor], source: str = "<state dict>"
                                   ) -> tuple[dict[str, torch.Tensor], float, float]:
    """Map a torchvision-style ResNet classifier state dict to our one-channel timm model.

    The released CEM500K filter is a torchvision ``resnet34`` whose ``fc`` has one output,
    applied to grey patches replicated to RGB and normalised with the ImageNet per-channel
    mean/std. torchvision and timm ResNets use the same key names, so only ``conv1``
    changes. With one grey input normalised by ``(x - m) / s`` (``m``, ``s`` the channel
    averages), the RGB kernel ``W[o, c]`` becomes ``s * sum_c W[o, c] / s_c``; the remaining
    difference, ``d[o] = sum_{c,k} W[o, c, k] (m - m_c) / s_c``, is a constant per output
    channel that is folded into ``bn1.running_mean`` (``-= d``). The outputs are then
    identical except within 3 px of the border, where the zero padding of the two inputs
    differs slightly. A one-channel ``conv1`` is used as is, with the same grey ``m``, ``s``.

    Returns:
        ``(state_dict, mean, std)``.

    Raises:
        FilterError: the head does not have exactly one output.
    """
    plain = {k: v.detach().clone().float() if v.is_floating_point() else v.clone()
             for k, v in _strip_prefix(state).items()}
    fc = plain.get("fc.weight")
    if fc is None or fc.ndim != 2 or fc.shape[0] != 1:
        raise FilterError(f"{source}: fc.weight has shape {None if fc is None else tuple(fc.shape)}; "
                          "expected one output (the informative logit)")
    w = plain["conv1.weight"]
    mean, std = IMAGENET_GRAY_MEAN, IMAGENET_GRAY_STD
    if w.shape[1] == 3:
        m_c = torch.tensor(IMAGENET_MEAN, dtype=torch.float64).view(1, 3, 1, 1)
        s_c = torch.tensor(IMAGENET_STD, dtype=torch.float64).view(1, 3, 1, 1)
        w64 = w.double()
        plain["conv1.weight"] = (std * (w64 / s_c).sum(dim=1, keepdim=True)).float()
        shift = (w64 * (mean - m_c) / s_c).sum(dim=(1, 2, 3))
        plain["bn1.running_mean"] = (plain["bn1.running_mean"].double() - shift).float()
    elif w.shape[1] != 1:
        raise FilterError(f"{source}: conv1 has {w.shape[1]} input channels; expected 3 (RGB) or 1 (grey)")
    return plain, mean, std


@dataclass
class InitWeights:
    """Resolved initial weights for training.

    Attributes:
        kind: ``imagenet``, ``random``, ``classifier`` (our file), ``torchvision-classifier``
            (e.g. the CEM500K filter) or ``encoder``.
        state: state dict for ``load_state_dict`` (``None`` for imagenet/random).
        mean, std: the normalisation these weights expect, ``None`` when unknown.
        source: where they came from, for messages and metrics.
    """

    kind: str
    state: dict[str, torch.Tensor] | None = None
    mean: float | None = None
    std: float | None = None
    source: str = ""


def _read_weights(path: Path) -> Mapping[str, object]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        # weights_only: a weights file must not be able to run code when loaded.
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt or foreign files raise many different types
        raise FilterError(f"{path}: cannot read weights ({type(exc).__name__}: {exc})") from exc


def _config_norm(path: Path) -> tuple[float | None, float | None]:
    """``mean``/``std`` from a ``config.json`` beside an exported encoder, if present."""
    cfg_path = path.parent / "config.json"
    if not cfg_path.is_file():
        return None, None
    try:
        cfg = json.loads(cfg_path.read_text())
        return float(cfg["mean"]), float(cfg["std"])
    except (ValueError, KeyError, TypeError):
        return None, None


def resolve_init(spec: str, arch: str) -> InitWeights:
    """Turn ``--weights`` (``imagenet``, ``random`` or a file path) into :class:`InitWeights`."""
    from pretrain.weights import WeightsError, encoder_state_dict

    spec = str(spec).strip()
    if spec == "imagenet":
        return InitWeights("imagenet", None, IMAGENET_GRAY_MEAN, IMAGENET_GRAY_STD, f"timm:{arch} (ImageNet)")
    if spec in ("random", "none", ""):
        return InitWeights("random", source="random")
    path = Path(spec)
    if not path.is_file():
        raise FilterError(f"{path}: weights file not found (use --weights imagenet, random or a path)")
    raw = _read_weights(path)
    if isinstance(raw, Mapping) and raw.get("kind") == CLASSIFIER_KIND:
        if raw.get("arch") != arch:
            raise FilterError(f"{path}: holds a {raw.get('arch')} classifier but --arch is {arch}; pass --arch {raw.get('arch')}")
        return InitWeights("classifier", dict(raw["state_dict"]), float(raw["mean"]), float(raw["std"]), str(path))
    if is_torchvision_classifier(raw):
        state, mean, std = convert_torchvision_classifier(raw, str(path))  # type: ignore[arg-type]
        found = infer_resnet_arch(state)
        if found is not None and found != arch:
            raise FilterError(f"{path}: holds a {found} but --arch is {arch}; pass --arch {found}")
        return InitWeights("torchvision-classifier", state, mean, std, str(path))
    try:
        state = encoder_state_dict(raw, source=str(path))  # type: ignore[arg-type]
    except WeightsError as exc:
        raise FilterError(str(exc)) from exc
    w = state["conv1.weight"]
    if w.ndim == 4 and w.shape[1] == 3:
        state = dict(state)
        state["conv1.weight"] = w.sum(dim=1, keepdim=True)  # exact for a grey image replicated to RGB
    found = infer_resnet_arch(state)
    if found is not None and found != arch:
        raise FilterError(f"{path}: holds a {found} encoder but --arch is {arch}; pass --arch {found}")
    mean, std = _config_norm(path)
    return InitWeights("encoder", state, mean, std, str(path))


def load_init_weights(model: torch.nn.Module, init: InitWeights) -> None:
    """Load ``init.state`` into ``model``; only the head may be missing (encoders have none)."""
    if init.state is None:
        return
    result = model.load_state_dict(init.state, strict=False)
    missing = [k for k in result.missing_keys if not k.startswith("fc.")]
    if missing or result.unexpected_keys:
        raise FilterError(f"{init.source}: weights do not fit the model (missing {missing[:4]}, "
                          f"unexpected {list(result.unexpected_keys)[:4]})")


# ----------------------------------------------------------------------------- classifier file

@dataclass
class Classifier:
    """A loaded filter classifier, ready for :func:`predict_informative`.

    Attributes:
        model: the network (eval mode), one input channel, one logit.
        arch: timm architecture name.
        input_size: edge the patches are resized to, in pixels.
        mean, std: input normalisation of ``uint8 / 255``.
        threshold: informative when the probability is at least this.
        source: the file it was loaded from.
    """

    model: torch.nn.Module
    arch: str
    input_size: int
    mean: float
    std: float
    threshold: float = 0.5
    source: str = ""


def save_classifier(path: str | Path, model: torch.nn.Module, arch: str, input_size: int, mean: float, std: float,
                    threshold: float = 0.5, config: dict | None = None, metrics: dict | None = None) -> None:
    """Write a classifier file (see the module docstring), atomically."""
    blob = {"kind": CLASSIFIER_KIND, "format": CLASSIFIER_FORMAT, "arch": arch, "in_chans": 1,
            "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
            "input_size": int(input_size), "mean": float(mean), "std": float(std),
            "threshold": float(threshold), "config": config or {}, "metrics": metrics or {}}
    with atomic_path(path) as tmp:
        torch.save(blob, tmp)


def load_classifier(path: str | Path) -> Classifier:
    """Read our classifier file or a torchvision-style ResNet classifier (the CEM500K filter).

    A bare torchvision state dict has no metadata: its arch is recognised from the block
    layout, its input size is 224 and its normalisation the ImageNet one (see
    :func:`convert_torchvision_classifier`).
    """
    path = Path(path)
    if not path.is_file():
        raise FilterError(f"{path}: classifier file not found")
    raw = _read_weights(path)
    if isinstance(raw, Mapping) and raw.get("kind") == CLASSIFIER_KIND:
        if raw.get("format") != CLASSIFIER_FORMAT:
            raise FilterError(f"{path}: classifier format {raw.get('format')} is not supported (expected {CLASSIFIER_FORMAT})")
        model = create_model(str(raw["arch"]))
        try:
            model.load_state_dict(raw["state_dict"], strict=True)
        except RuntimeError as exc:
            raise FilterError(f"{path}: state dict does not match its arch {raw['arch']} ({str(exc).splitlines()[0]})") from exc
        return Classifier(model.eval(), str(raw["arch"]), int(raw["input_size"]), float(raw["mean"]),
                          float(raw["std"]), float(raw.get("threshold", 0.5)), str(path))
    if is_torchvision_classifier(raw):
        state, mean, std = convert_torchvision_classifier(raw, str(path))  # type: ignore[arg-type]
        arch = infer_resnet_arch(state)
        if arch is None:
            raise FilterError(f"{path}: a ResNet classifier state dict with an unrecognised block layout")
        model = create_model(arch)
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise FilterError(f"{path}: cannot load into timm {arch} ({str(exc).splitlines()[0]})") from exc
        return Classifier(model.eval(), arch, 224, mean, std, 0.5, str(path))
    raise FilterError(f"{path}: not a filter classifier (expected a file from `cemcurate filter train` or a "
                      "torchvision ResNet state dict with a one-output fc, like the released CEM500K filter)")


# ----------------------------------------------------------------------------- inference

def prepare_batch(batch: torch.Tensor, input_size: int, mean: float, std: float) -> torch.Tensor:
    """uint8 ``(n, p, p)`` or ``(n, 1, p, p)`` tensor -> normalised float32 ``(n, 1, S, S)`` on its device."""
    x = batch.float().div_(255.0)
    if x.ndim == 3:
        x = x.unsqueeze(1)
    if x.shape[-1] != input_size or x.shape[-2] != input_size:
        x = torch.nn.functional.interpolate(x, size=(input_size, input_size), mode="bilinear",
                                            align_corners=False, antialias=True)
    return (x - mean) / std


def predict_logits(model: torch.nn.Module, patches: np.ndarray, input_size: int, mean: float, std: float,
                   batch_size: int = 256, device: str | torch.device | None = None, progress: bool = True,
                   amp: bool = True) -> np.ndarray:
    """Logits (float32 ``(n,)``) of a one-logit model for uint8 ``(n, p, p)`` patches."""
    from tqdm import tqdm

    patches = np.asarray(patches)
    if patches.dtype != np.uint8 or patches.ndim != 3:
        raise ValueError(f"expected uint8 patches (n, p, p), got {patches.dtype} {patches.shape}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    dev = select_device(device)
    # channels_last lets oneDNN (CPU) and cuDNN (GPU, with AMP) pick faster convolution
    # kernels: ~20% more patches/s for a ResNet34 on the CPU here.
    model = model.to(dev, memory_format=torch.channels_last).eval()
    out = np.empty(len(patches), np.float32)
    use_amp = amp and dev.type == "cuda"
    bar = tqdm(total=len(patches), desc="filter", unit="patch", disable=not progress or len(patches) == 0)
    with torch.inference_mode():
        for start in range(0, len(patches), batch_size):
            chunk = torch.from_numpy(np.ascontiguousarray(patches[start:start + batch_size])).to(dev, non_blocking=True)
            x = prepare_batch(chunk, input_size, mean, std).contiguous(memory_format=torch.channels_last)
            with torch.autocast(device_type=dev.type, dtype=torch.float16, enabled=use_amp):
                logits = model(x).reshape(-1)
            out[start:start + len(chunk)] = logits.float().cpu().numpy()
            bar.update(len(chunk))
    bar.close()
    return out


def predict_informative(classifier: Classifier | str | Path, patches: np.ndarray, batch_size: int = 256,
                        device: str | torch.device | None = None, progress: bool = True) -> np.ndarray:
    """Informative probability of each patch.

    Args:
        classifier: a :class:`Classifier` or the path of a classifier file.
        patches: uint8 ``(n, p, p)``; resized to the classifier's input size when ``p`` differs.
        batch_size: patches per forward pass.
        device: ``None`` = CUDA when available (with float16 autocast), else CPU.
        progress: show a tqdm bar.

    Returns:
        float32 ``(n,)`` in [0, 1] (sigmoid of the logit).
    """
    if not isinstance(classifier, Classifier):
        classifier = load_classifier(classifier)
    logits = predict_logits(classifier.model, patches, classifier.input_size, classifier.mean, classifier.std,
                            batch_size=batch_size, device=device, progress=progress)
    from scipy.special import expit

    return expit(logits.astype(np.float64)).astype(np.float32)


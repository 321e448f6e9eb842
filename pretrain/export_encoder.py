"""Publish a pre-trained query encoder: weights, loading config and a model card.

``export_encoder(CKPT, DIR)`` writes into ``DIR``:

* ``encoder.safetensors`` and ``encoder.pth``: the ResNet backbone with timm/torchvision key
  names and no head; both load with ``strict=True`` into
  ``timm.create_model(arch, in_chans=1, num_classes=0)`` and into the encoder of
  ``segmentation_models_pytorch.Unet(arch, in_channels=1, encoder_weights=None)``;
* ``config.json``: arch, in_chans and the normalisation (mean/std of intensities in [0, 1]);
* ``model_card.md``: architecture, normalisation, training data, hyperparameters, git commit.

``CKPT`` is either a ``pretrain moco`` checkpoint or the released CEM500K MoCoV2 checkpoint
(keys ``module.encoder_q.*`` with an ``fc`` MLP head, a one-channel ResNet50, possibly under
``"state_dict"``); the layout is detected, or forced with ``from_cem500k``. Key mapping is
:func:`cemcurate.common.weights.encoder_state_dict`'s job; this module only checks and writes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch
import yaml

from cemcurate.common.archs import get_arch
from cemcurate.common.atomic import atomic_path, file_sha256
from cemcurate.common.lazy import lazy_import
from cemcurate.common.runstate import git_commit, read_checkpoint
from cemcurate.common.weights import CEM500K_MEAN, CEM500K_STD, checkpoint_norms, encoder_state_dict
from pretrain.checkpoint import CHECKPOINT_FORMAT, load_checkpoint

timm = lazy_import("timm")
smp_encoders = lazy_import("segmentation_models_pytorch.encoders")
safetensors_torch = lazy_import("safetensors.torch")

CEM500K_PAPER = "Conrad & Narayan, eLife 2021, doi:10.7554/eLife.65894"


class ExportError(ValueError):
    """The checkpoint cannot be turned into a publishable encoder (the message says why)."""


@dataclass
class ExportResult:
    out_dir: Path
    arch: str
    mean: float
    std: float
    source: str  # "pretrain-moco" or "cem500k"
    files: list[Path]


def detect_layout(state: Any) -> str:
    """``"pretrain-moco"`` for our checkpoints, ``"cem500k"`` for the released CEM500K layout, else ``"unknown"``."""
    if isinstance(state, Mapping) and state.get("format") == CHECKPOINT_FORMAT:
        return "pretrain-moco"
    inner = state.get("state_dict", state) if isinstance(state, Mapping) else None
    if isinstance(inner, Mapping) and any(isinstance(k, str) and k.startswith("module.encoder_q.") for k in inner):
        return "cem500k"
    return "unknown"


def verify_encoder(state: Mapping[str, torch.Tensor], arch: str, source: str) -> int:
    """Load ``state`` with ``strict=True`` into timm and into smp's encoder of ``arch``; return num_features.

    Every arch of :data:`cemcurate.common.archs.ARCHS` is built by both with the same keys.
    Raises :class:`ExportError` with the missing/unexpected keys when either load fails.
    """
    try:
        get_arch(arch)
    except ValueError as exc:
        raise ExportError(f"{source}: {exc}") from exc
    model = timm.create_model(arch, pretrained=False, in_chans=1, num_classes=0)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ExportError(
            f"{source}: the encoder does not load into timm {arch!r} with in_chans=1: "
            f"{str(exc).splitlines()[0]} ... (pass the right --arch?)"
        ) from exc
    try:
        smp_encoders.get_encoder(arch, in_channels=1, weights=None).load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ExportError(
            f"{source}: the encoder loads into timm but not into smp's {arch!r} encoder: {str(exc).splitlines()[0]}"
        ) from exc
    return int(model.num_features)


def export_encoder(
    checkpoint: str | Path,
    out_dir: str | Path,
    *,
    from_cem500k: bool | None = None,
    arch: str | None = None,
    mean: float | None = None,
    std: float | None = None,
) -> ExportResult:
    """Write the publishable encoder of ``checkpoint`` into ``out_dir`` (see module docstring).

    Args:
        from_cem500k: True to require the released CEM500K layout, False to require ours,
            None to detect.
        arch, mean, std: override what the checkpoint says (for imports that lack them).
    """
    checkpoint, out_dir = Path(checkpoint), Path(out_dir)
    raw = read_checkpoint(checkpoint)
    layout = detect_layout(raw)
    if layout == "unknown":
        raise ExportError(
            f"{checkpoint}: neither a `pretrain moco` checkpoint nor a CEM500K MoCoV2 checkpoint "
            "(no format marker and no 'module.encoder_q.*' keys)"
        )
    if from_cem500k is True and layout != "cem500k":
        raise ExportError(
            f"{checkpoint}: --from-cem500k given, but this is a `pretrain moco` checkpoint; drop the flag"
        )
    if from_cem500k is False and layout != "pretrain-moco":
        raise ExportError(
            f"{checkpoint}: this is a CEM500K-format checkpoint; pass --from-cem500k (or let it be detected)"
        )

    if layout == "pretrain-moco":
        ckpt = load_checkpoint(checkpoint)
        arch = arch or ckpt["arch"]
        mean = ckpt["data"]["mean"] if mean is None else mean
        std = ckpt["data"]["std"] if std is None else std
        provenance = {
            "source": "pretrain-moco",
            "step": ckpt["step"],
            "epoch": ckpt["step"] / ckpt["steps_per_epoch"],
            "trained_at_commit": ckpt.get("git_commit", "unknown"),
            "config": ckpt["config"],
            "data": ckpt["data"],
        }
    else:
        ckpt = raw
        arch = arch or str(ckpt.get("arch", "resnet50"))
        norm_mean, norm_std = checkpoint_norms(ckpt)
        mean = (CEM500K_MEAN if norm_mean is None else norm_mean) if mean is None else mean
        std = (CEM500K_STD if norm_std is None else norm_std) if std is None else std
        provenance = {"source": "cem500k", "epoch": ckpt.get("epoch"), "checkpoint_sha256": file_sha256(checkpoint)}
    if not (std and std > 0):
        raise ExportError(f"{checkpoint}: normalisation std must be positive, got {std}")

    state = encoder_state_dict(ckpt, source=str(checkpoint))
    # safetensors refuses views and shared storage; give every tensor its own contiguous copy.
    state = {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}
    num_features = verify_encoder(state, arch, str(checkpoint))

    out_dir.mkdir(parents=True, exist_ok=True)
    meta = {
        "arch": arch,
        "in_chans": 1,
        "num_features": num_features,
        "mean": float(mean),
        "std": float(std),
        "normalisation": "x = uint8 / 255; x = (x - mean) / std (one channel)",
        "timm": f"timm.create_model({arch!r}, in_chans=1, num_classes=0)",
        "timm_pretrained": (
            f"timm.create_model({arch!r}, pretrained=True, in_chans=1, num_classes=0, "
            "pretrained_cfg_overlay=dict(file='<folder>/encoder.safetensors', **config['pretrained_cfg']))"
        ),
        # timm's own keys (its Hugging Face Hub config.json layout), so timm tools read the folder.
        "architecture": arch,
        "num_classes": 0,
        "pretrained_cfg": timm_pretrained_cfg(mean, std, int((provenance.get("data") or {}).get("patch_size", 224))),
        "smp_encoder": arch,
        "source": provenance["source"],
        "exported_at_commit": git_commit(),
    }
    for key in ("step", "epoch", "trained_at_commit", "checkpoint_sha256"):
        if provenance.get(key) is not None:
            meta[key] = provenance[key]

    files = [
        out_dir / "encoder.safetensors",
        out_dir / "encoder.pth",
        out_dir / "config.json",
        out_dir / "model_card.md",
    ]
    with atomic_path(files[0]) as tmp:
        safetensors_torch.save_file(state, str(tmp), metadata={k: json.dumps(v) for k, v in meta.items()})
    with atomic_path(files[1]) as tmp:
        torch.save(state, tmp)
    with atomic_path(files[2]) as tmp:
        tmp.write_text(json.dumps(meta, indent=2) + "\n")
    with atomic_path(files[3]) as tmp:
        tmp.write_text(model_card(meta, provenance, sum(v.numel() for v in state.values() if v.is_floating_point())))
    return ExportResult(
        out_dir=out_dir, arch=arch, mean=float(mean), std=float(std), source=provenance["source"], files=files
    )


def timm_pretrained_cfg(mean: float, std: float, patch_size: int = 224) -> dict:
    """timm's ``pretrained_cfg`` for our one-channel encoders: input size, normalisation (of
    intensities in [0, 1]), interpolation, and where the stem and the (absent) classifier are."""
    return {
        "input_size": [1, patch_size, patch_size],
        "interpolation": "bilinear",
        "crop_pct": 1.0,
        "crop_mode": "center",
        "mean": [float(mean)],
        "std": [float(std)],
        "num_classes": 0,
        "first_conv": "conv1",
        "classifier": "fc",
    }


def model_card(meta: dict, provenance: dict, n_params: int) -> str:
    """Markdown model card for an exported encoder, with Hugging Face model-card front matter."""
    arch, mean, std = meta["arch"], meta["mean"], meta["std"]
    front = {
        "library_name": "timm",
        "pipeline_tag": "image-feature-extraction",
        # The weights inherit the terms of the images they were trained on (listed below).
        "license": "other",
        "tags": ["timm", "electron-microscopy", "self-supervised", "mocov2", arch],
    }
    if provenance["source"] == "cem500k":
        front["datasets"] = ["CEM500K"]
    lines = [
        "---",
        yaml.safe_dump(front, sort_keys=False).rstrip(),
        "---",
        f"# {arch} encoder pre-trained with MoCoV2 on cellular electron microscopy",
        "",
        "## Architecture",
        f"- Backbone: `{arch}` (timm ResNet family), **1 input channel**, no classification head; "
        f"outputs {meta['num_features']} features after global average pooling.",
        f"- Parameters and buffers (floating point values): {n_params:,}.",
        f"- timm: `{meta['timm']}` then `load_state_dict(..., strict=True)`, or, reading the folder "
        f"with no network access, `{meta['timm_pretrained']}` (`config` is this folder's `config.json`).",
        f"- segmentation_models_pytorch: `smp.Unet({meta['smp_encoder']!r}, in_channels=1, encoder_weights=None)` "
        "then `model.encoder.load_state_dict(..., strict=True)`.",
        "- Files: `encoder.safetensors` (preferred), `encoder.pth` (same tensors), `config.json`.",
        "",
        "## Normalisation",
        f"Scale uint8 grayscale images to [0, 1], then `(x - {mean:.6g}) / {std:.6g}`.",
        "",
        "## Training",
    ]
    if provenance["source"] == "cem500k":
        lines += [
            f"Imported from the released CEM500K MoCoV2 checkpoint ({CEM500K_PAPER}); sha256 of the "
            f"imported file: `{provenance['checkpoint_sha256']}`.",
            "",
            "- Data: CEM500K, about 500,000 curated 224 x 224 patches from cellular EM volumes and images.",
            "- Recipe (paper): MoCoV2, ResNet50, batch 128 on 4 GPUs, queue 65,536, lr 0.015 divided by 10 "
            "at epochs 120 and 160, 200 epochs, MoCoV2 augmentations plus 360 degree rotations and Gaussian noise.",
        ]
        if provenance.get("epoch") is not None:
            lines.append(f"- Epochs recorded in the checkpoint: {provenance['epoch']}.")
    else:
        data, cfg = provenance["data"], provenance["config"]
        lines += [
            f"Trained with `pretrain moco` for {provenance['step']} optimizer steps "
            f"({provenance['epoch']:.2f} epochs) at git commit `{provenance['trained_at_commit']}`.",
            "",
            "### Data",
            f"{data['n_patches']:,} curated {data['patch_size']} x {data['patch_size']} patches "
            f"(store `{data['path']}`; intensity mean {data['mean']:.4f}, std {data['std']:.4f}).",
            "",
            "| source | patches |",
            "|---|---:|",
            *[f"| {name} | {count:,} |" for name, count in data["sources"].items()],
            "",
            "### Hyperparameters",
            "```yaml",
            yaml.safe_dump(cfg, sort_keys=False).rstrip(),
            "```",
        ]
    lines += [
        "",
        "## Provenance",
        f"- Exported at git commit `{meta['exported_at_commit']}`.",
        "- Method: Conrad & Narayan (2021), CEM500K, a large-scale heterogeneous unlabeled cellular "
        "electron microscopy image dataset for deep learning, eLife 10:e65894.",
        "",
    ]
    return "\n".join(lines)

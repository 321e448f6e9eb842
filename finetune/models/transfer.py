"""Whole-model transfer: start a segmentation model from another trained one (pure functions and reading).

Xie et al. (2025) and ASEM (Gallusser et al. 2023) train a network on a labelled source
(another tissue, cell type or organelle) and fine-tune the *whole* network, encoder and
decoder, on a small labelled target. This module reads a model that ``finetune train``
saved (``RUN/model.pth`` or ``RUN/model_best.pth``) and maps its state dict onto a new
model:

* same dimension (2D -> 2D, 3D -> 3D): every tensor carries over unchanged;
* a 2D UNet into a 3D one: the smp names become ours (``net.encoder.`` -> ``encoder.``,
  ``net.decoder.`` -> ``decoder.``, ``net.segmentation_head.0.`` -> ``head.``) and every
  ``k x k`` kernel is inflated to the depth the 3D model has at that place
  (:func:`finetune.models.inflate.inflate_kernel`), decoder and head included; with
  ``center`` inflation and nearest upsampling the 3D model computes exactly the 2D one on
  every slice of any volume;
* classes that differ in number or names: the output head keeps the new model's (seeded
  random) initialisation and the rest transfers; the returned notes say so.

The input normalisation is the new model's own (the caller builds it with the source's
mean and std unless told otherwise), so a flag can still override it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch

from cemcurate.common.atomic import file_sha256
from cemcurate.common.weights import WeightsError
from finetune.models.base import SegmentationModel
from finetune.models.inflate import INFLATE_MODES, inflate_kernel
from finetune.models.registry import MODELS

MODEL_FILE = "model.pth"
_NORM_KEYS = ("norm_mean", "norm_std")
# smp's 2D UNet names -> the 3D UNet's (its blocks mirror smp's one to one).
_RENAMES_2D_TO_3D = (("net.encoder.", "encoder."), ("net.decoder.", "decoder."), ("net.segmentation_head.0.", "head."))


def model_file(path: str | Path) -> Path:
    """``RUN/model.pth`` for a run folder, else ``path`` itself (a model file)."""
    path = Path(path)
    if path.is_dir():
        candidate = path / MODEL_FILE
        if not candidate.is_file():
            raise FileNotFoundError(
                f"{path}: no {MODEL_FILE} in this run folder; has training finished? "
                "(checkpoint.pth is resumable state, not a final model)"
            )
        return candidate
    if not path.is_file():
        raise FileNotFoundError(f"{path}: model file not found")
    return path


@dataclass(frozen=True)
class SavedModel:
    """A model file written by ``finetune train``.

    Attributes:
        path: the file.
        state: its state dict (CPU tensors).
        model_config: what :func:`finetune.models.build_model` needs to rebuild it
            (``model``, ``arch``, ``num_classes``, ...).
        info: the rest of the payload (``classes``, the training ``config``, ``iterations``,
            ``val``, ``voxel_size``, ...).
    """

    path: Path
    state: dict[str, torch.Tensor]
    model_config: dict[str, Any]
    info: dict[str, Any]

    @property
    def dim(self) -> int:
        """2 or 3."""
        return MODELS[self.model_config["model"]].dim

    @property
    def classes(self) -> list[str]:
        return list(self.info.get("classes") or [])


def read_saved_model(path: str | Path) -> SavedModel:
    """Read ``RUN`` or a model file (``torch.load`` with ``weights_only=True``: no code runs).

    Raises:
        FileNotFoundError: no such file, or a run folder without ``model.pth``.
        ValueError: unreadable, or not a ``finetune train`` model file (names the file).
    """
    path = model_file(path)
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt or foreign files raise many different types
        raise ValueError(f"{path}: cannot read model file ({type(exc).__name__}: {exc})") from exc
    if not isinstance(payload, dict) or "state_dict" not in payload or "model_config" not in payload:
        raise ValueError(
            f"{path}: not a finetune model file (expected keys state_dict and model_config); "
            "an encoder file goes to --encoder, a finetune model to --init-model"
        )
    if payload["model_config"].get("model") not in MODELS:
        raise ValueError(
            f"{path}: holds an unknown model {payload['model_config'].get('model')!r}; "
            f"known models: {', '.join(sorted(MODELS))}"
        )
    info = {k: v for k, v in payload.items() if k != "state_dict"}
    return SavedModel(path, dict(payload["state_dict"]), dict(payload["model_config"]), info)


def check_can_start(source: SavedModel, arch: str, dim: int) -> None:
    """Raise :class:`WeightsError` naming what to pass when ``source`` cannot start a ``dim``-D
    model of ``arch``: another arch, or a 3D source for a 2D model (a 2D source inflates)."""
    found = source.model_config.get("arch")
    if found != arch:
        raise WeightsError(f"{source.path}: holds a {found} model, not {arch}; pass --arch {found}")
    if source.dim == 3 and dim == 2:
        raise WeightsError(f"{source.path}: is a 3D model; train with --dim 3d to start from it")


def inflate_model_state(
    state2d: Mapping[str, torch.Tensor], target: Mapping[str, torch.Tensor], mode: str = "i3d"
) -> dict[str, torch.Tensor]:
    """The state dict of a 2D UNet (smp names) mapped onto a 3D UNet's names and shapes.

    Args:
        state2d: a :class:`~finetune.models.unet2d.UNet2D` state dict; not modified.
        target: the 3D model's state dict (only its names and shapes are used): each 2D
            kernel ``(out, in, k, k)`` becomes ``(out, in, k_z, k, k)`` with the ``k_z`` the
            target has under that name (``i3d`` or ``center``, see
            :func:`~finetune.models.inflate.inflate_kernel`).

    Returns:
        A new dict with the 3D names. Keys of ``state2d`` outside the encoder, decoder, head
        and normalisation, and keys of ``target`` with no 2D counterpart (the learned
        upsampling of ``transpose``), are left to the caller to report.
    """
    if mode not in INFLATE_MODES:
        raise ValueError(f"unknown inflation mode {mode!r}; valid modes: {', '.join(INFLATE_MODES)}")
    out: dict[str, torch.Tensor] = {}
    for key, value in state2d.items():
        name = key if key in _NORM_KEYS else None
        for old, new in _RENAMES_2D_TO_3D:
            if key.startswith(old):
                name = new + key[len(old) :]
        if name is None:
            out[key] = value.detach().clone()  # unknown: reported by the caller as unexpected
            continue
        want = target.get(name)
        if value.ndim == 4 and want is not None and want.ndim == 5:
            out[name] = inflate_kernel(value.detach(), int(want.shape[2]), mode).clone()
        else:
            out[name] = value.detach().clone()
    return out


def transferred_state(
    source: SavedModel, model: SegmentationModel, classes: list[str], inflate: str = "i3d"
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The state dict that starts ``model`` from ``source``, and notes for the user.

    Args:
        source: the trained model.
        model: the freshly built (seeded random) model to start; its ``arch`` must be the
            source's, its dimension the same or 3D for a 2D source.
        classes: the new task's class names, index 0 first.
        inflate: how 2D kernels become 3D (2D source, 3D model).

    Returns:
        ``(state, notes)``: ``state`` loads into ``model`` with ``strict=True``; it holds the
        model's own normalisation buffers, and its own head when the classes differ.

    Raises:
        WeightsError: another arch, a 3D source for a 2D model, or shapes that do not match
            (names the first key and the settings to pass).
    """
    where = str(source.path)
    check_can_start(source, model.arch, model.dim)
    target = model.state_dict()
    if source.dim == model.dim:
        state = {k: v.detach().clone() for k, v in source.state.items()}
    else:
        state = inflate_model_state(source.state, target, inflate)
    notes = []
    for key in _NORM_KEYS:
        state[key] = target[key]
    if source.classes != list(classes):
        state = {k: v for k, v in state.items() if not k.startswith(model.head_prefix)}
        state.update({k: v for k, v in target.items() if k.startswith(model.head_prefix)})
        notes.append(
            f"{where} was trained for classes {source.classes}, this run has {list(classes)}: "
            "the output head is re-initialised, encoder and decoder are transferred"
        )
    unexpected = sorted(set(state) - set(target))
    missing = sorted(set(target) - set(state))
    learned_up = [k for k in missing if ".up." in k and source.dim == 2]
    if learned_up:
        state.update({k: target[k] for k in learned_up})
        notes.append(
            f"{where} is a 2D model: the 3D decoder's transposed-convolution upsampling starts random "
            "(--upsample nearest or trilinear has no weights of its own)"
        )
        missing = [k for k in missing if k not in learned_up]
    if unexpected or missing:
        raise WeightsError(
            f"{where}: does not fit the new {model.dim}D model: "
            f"unexpected keys {unexpected[:3]}, missing keys {missing[:3]}"
        )
    for key, value in state.items():
        if value.shape != target[key].shape:
            raise WeightsError(
                f"{where}: {key} has shape {tuple(value.shape)}, the new model {tuple(target[key].shape)}; "
                f"build it as the source was built ({structure_hint(source.model_config)})"
            )
    return state, notes


def structure_hint(model_config: Mapping[str, Any]) -> str:
    """The settings that fix a saved model's tensor shapes, as flags (``--decoder-channels 64 32 ...``)."""
    parts = [f"--arch {model_config.get('arch')}"]
    if "decoder_channels" in model_config:
        parts.append("--decoder-channels " + " ".join(str(c) for c in model_config["decoder_channels"]))
    for key in ("widths", "num_fmaps"):  # whole-network archs: set through --width-scale
        if key in model_config:
            parts.append(f"--width-scale giving {key} {model_config[key]}")
    return ", ".join(parts)


def provenance(source: SavedModel) -> dict[str, Any]:
    """Where a transferred model came from: file and digest, its model, classes, data and training.

    Recorded in the new run's ``model.pth`` (``init_model``), ``init_model.yaml`` and model card,
    so a model trained on a target still says what source task it started from.
    """
    cfg = source.info.get("config") or {}
    data = cfg.get("data", {}) if isinstance(cfg, Mapping) else {}
    return {
        "path": str(source.path.resolve()),
        "sha256": file_sha256(source.path),
        "model": dict(source.model_config),
        "classes": source.classes,
        "images": list(data.get("images", [])),
        "masks": list(data.get("masks", [])),
        "data_dir": data.get("data_dir", ""),
        "voxel_size": source.info.get("voxel_size"),
        "iterations": source.info.get("iterations"),
        "val": source.info.get("val"),
        "init_model": source.info.get("init_model"),
    }

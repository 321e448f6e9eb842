"""``finetune predict`` as a function: load a run's model, pick the mode, stream inputs to outputs.

The one module of :mod:`finetune.predict` that knows the command's config
(:class:`~finetune.config.PredictConfig`); the compute modules below it take plain values.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from cemcurate.common.dask_cluster import dask_client
from cemcurate.common.device import select_device
from cemcurate.io import ZARR_SUFFIXES, suffix_of
from finetune.config import PredictConfig
from finetune.models import MODELS
from finetune.models.transfer import read_saved_model
from finetune.predict.blockwise import PredictSettings, check_output, load_model, predict_blockwise
from finetune.predict.orthoplane import predict_orthoplane, predict_stack
from finetune.predict.output import PredictionWriter
from finetune.predict.predictor import batch_for
from finetune.predict.slices import SlicePredictor
from finetune.predict.sliding import predict_sliding
from finetune.volumes import expand_patterns, open_input


def sliding_batch(cfg: PredictConfig, device: torch.device) -> int:
    """Windows per forward pass: ``batch_size``, capped by ``batch_pixels`` voxels, at least 1."""
    return batch_for(cfg.window[0] * cfg.window[1] * cfg.window[2], cfg.batch_size, cfg.batch_pixels, device)


def _is_folder_output(output: str) -> bool:
    return output.endswith(("/", os.sep)) or (Path(output).is_dir() and not output.lower().endswith(".zarr"))


def resolve_mode(mode: str, model_kind: str, model_path: str | Path = "") -> str:
    """The prediction mode for a registered model (``unet2d``, ``unet3d``, ...): ``auto`` picks stack or
    sliding; a mode the model cannot run is an error naming the model file."""
    is_3d = MODELS[model_kind].dim == 3
    if mode == "auto":
        return "sliding" if is_3d else "stack"
    if is_3d != (mode == "sliding"):
        kind, valid = ("3D", "sliding (or auto)") if is_3d else ("2D", "stack, orthoplane (or auto)")
        raise ValueError(f"{model_path}: a {kind} model cannot predict in {mode} mode; use --mode {valid}")
    return mode


def predict_path(
    model_path: str | Path, input_spec: str, output: str, cfg: PredictConfig, progress: bool = True
) -> list[Path]:
    """Predict ``input_spec`` with the model in ``model_path`` and write ``output``.

    Args:
        model_path: a run folder or its ``model.pth``.
        input_spec: a volume file, a folder or glob of 2D images (see :mod:`finetune.volumes`).
        output: a file whose suffix picks the format, or a folder (ending in ``/`` or
            existing) to predict each input file separately into ``<folder>/<stem><suffix>``,
            which also handles 2D images of different sizes.

    With ``cfg.scheduler`` the prediction runs blockwise on that Dask cluster
    (:func:`finetune.predict.blockwise.predict_blockwise`) into one ``.zarr`` output.

    Returns:
        The files written.
    """
    if cfg.scheduler:
        return predict_on_dask(model_path, input_spec, output, cfg, progress)
    device = select_device(cfg.device)
    model, info = load_model(model_path, device)
    mode = resolve_mode(cfg.mode, info["model_config"]["model"], model_path)
    classes = list(info.get("classes") or [str(i) for i in range(max(2, model.num_classes))])
    predictor = (
        None
        if mode == "sliding"
        else SlicePredictor(model, device, cfg.amp, cfg.tile, cfg.overlap, cfg.batch_size, cfg.batch_pixels)
    )
    channels = 1 if len(classes) == 2 else len(classes)
    if _is_folder_output(output):
        jobs = []
        for path in expand_patterns([input_spec], what="input"):
            stem = path.name.split(".")[0]
            jobs.append((str(path), Path(output) / f"{stem}{cfg.suffix}"))
    else:
        jobs = [(input_spec, Path(output))]
    written: list[Path] = []
    for spec, out_path in jobs:
        source = open_input(spec)
        if mode == "orthoplane" and min(source.shape) < 2:
            raise ValueError(
                f"{spec}: orthoplane prediction needs a 3D volume, got shape {source.shape}; use --mode stack"
            )
        is_zarr = suffix_of(out_path) in ZARR_SUFFIXES
        if cfg.with_input and not is_zarr:
            raise ValueError(f"{out_path}: --with-input needs a .zarr / .ome.zarr output")
        if cfg.pyramid_levels > 1 and not is_zarr:
            raise ValueError(f"{out_path}: --pyramid-levels needs a .zarr / .ome.zarr output")
        with PredictionWriter(
            out_path,
            source.shape,
            classes,
            cfg.output_type,
            cfg.prob_dtype,
            cfg.threshold,
            source.voxel_size,
            pyramid_levels=(None if cfg.pyramid_levels == 0 else cfg.pyramid_levels) if is_zarr else 1,
            input_image=source.read_uint8 if cfg.with_input else None,
        ) as writer:
            if mode == "stack":
                predict_stack(source, predictor, writer.write, cfg.chunk, progress)
            elif mode == "sliding":
                predict_sliding(
                    model,
                    source,
                    cfg.window,
                    cfg.window_overlap,
                    sliding_batch(cfg, device),
                    writer.write,
                    device,
                    cfg.amp,
                    progress=progress,
                )
            else:
                predict_orthoplane(
                    source,
                    predictor,
                    writer.write,
                    channels,
                    cfg.chunk,
                    cfg.memory_limit_gb * 2**30,
                    out_path.parent,
                    progress,
                )
        written += writer.paths
    return written


def predict_on_dask(
    model_path: str | Path, input_spec: str, output: str, cfg: PredictConfig, progress: bool = True
) -> list[Path]:
    """``finetune predict --scheduler``: check everything the client can, then predict blockwise on the
    cluster ``cfg.scheduler`` names (its dashboard address is printed unless ``progress`` is off)."""
    if _is_folder_output(output):
        raise ValueError(f"{output}: --scheduler predicts one input into one .zarr / .ome.zarr OUTPUT, not a folder")
    check_output(output)
    saved = read_saved_model(model_path)
    mode = resolve_mode(cfg.mode, saved.model_config["model"], model_path)
    num_classes = int(saved.model_config.get("num_classes", 2))
    classes = list(saved.info.get("classes") or [str(i) for i in range(max(2, num_classes))])
    settings = PredictSettings(
        model_path=str(model_path),
        input_spec=str(input_spec),
        mode=mode,
        output_type=cfg.output_type,
        prob_dtype=cfg.prob_dtype,
        threshold=cfg.threshold,
        tile=cfg.tile,
        overlap=cfg.overlap,
        window=tuple(cfg.window),
        window_overlap=tuple(cfg.window_overlap),
        batch_size=cfg.batch_size,
        batch_pixels=cfg.batch_pixels,
        chunk=cfg.chunk,
        device=cfg.device,
        amp=cfg.amp,
    )
    with dask_client(cfg.scheduler, quiet=not progress) as client:
        return predict_blockwise(
            client,
            settings,
            output,
            classes,
            pyramid_levels=None if cfg.pyramid_levels == 0 else cfg.pyramid_levels,
            with_input=cfg.with_input,
            progress=progress,
        )

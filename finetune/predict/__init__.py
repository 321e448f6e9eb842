"""Prediction: tiling (pure), slice predictor, stack/orthoplane volume passes, writers.

:func:`predict_path` is the whole ``finetune predict`` command as a function.
"""

from __future__ import annotations

import os
from pathlib import Path

from finetune.config import PredictConfig
from finetune.predict.orthoplane import predict_orthoplane, predict_stack
from finetune.predict.output import PredictionWriter
from finetune.predict.predictor import SlicePredictor, load_model, select_device
from finetune.predict.tiling import plan_tiles, predict_tiled

__all__ = ["PredictionWriter", "SlicePredictor", "load_model", "plan_tiles", "predict_orthoplane", "predict_path",
           "predict_stack", "predict_tiled", "select_device"]


def _is_folder_output(output: str) -> bool:
    return output.endswith(("/", os.sep)) or (Path(output).is_dir() and not output.lower().endswith(".zarr"))


def predict_path(model_path: str | Path, input_spec: str, output: str, cfg: PredictConfig,
                 progress: bool = True) -> list[Path]:
    """Predict ``input_spec`` with the model in ``model_path`` and write ``output``.

    Args:
        model_path: a run folder or its ``model.pth``.
        input_spec: a volume file, a folder or glob of 2D images (see :mod:`finetune.volumes`).
        output: a file whose suffix picks the format, or a folder (ending in ``/`` or
            existing) to predict each input file separately into ``<folder>/<stem><suffix>``,
            which also handles 2D images of different sizes.

    Returns:
        The files written.
    """
    from finetune.volumes import expand_patterns, open_input

    device = select_device(cfg.device)
    model, info = load_model(model_path, device)
    classes = list(info.get("classes") or [str(i) for i in range(max(2, model.num_classes))])
    predictor = SlicePredictor(model, device, cfg.amp, cfg.tile, cfg.overlap, cfg.batch_size, cfg.batch_pixels)
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
        if cfg.mode == "orthoplane" and min(source.shape) < 2:
            raise ValueError(f"{spec}: orthoplane prediction needs a 3D volume, got shape {source.shape}; use --mode stack")
        with PredictionWriter(out_path, source.shape, classes, cfg.output_type, cfg.prob_dtype, cfg.threshold,
                              source.voxel_size) as writer:
            if cfg.mode == "stack":
                predict_stack(source, predictor, writer.write, cfg.chunk, progress)
            else:
                predict_orthoplane(source, predictor, writer.write, channels, cfg.chunk,
                                   cfg.memory_limit_gb * 2**30, out_path.parent, progress)
        written += writer.paths
    return written

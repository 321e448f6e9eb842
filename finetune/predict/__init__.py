"""Prediction: one N-d window engine (pure plan, blend, encoding), the predictor on top of it,
2D slices (stack / orthoplane), 3D sliding windows, and the writers.

Modules, from the bottom up: :mod:`~finetune.predict.windows` (window starts, padding,
blend weights, weight sums, the uint8 encoding), :mod:`~finetune.predict.predictor`
(blend a model's windows, streaming), :mod:`~finetune.predict.slices` (2D tiles,
:class:`SlicePredictor`), :mod:`~finetune.predict.orthoplane` (stack and orthoplane
passes), :mod:`~finetune.predict.sliding` (3D windows), :mod:`~finetune.predict.output`
(:class:`PredictionWriter`). :func:`finetune.predict.command.predict_path` is the whole
``finetune predict`` command as a function (the only module here that reads a config).
"""

from __future__ import annotations

from finetune.predict.orthoplane import predict_orthoplane, predict_stack
from finetune.predict.output import PredictionWriter
from finetune.predict.predictor import ModelWindows, batch_for, default_batch_pixels, predict_windows
from finetune.predict.slices import SlicePredictor, plan_tiles, predict_tiled
from finetune.predict.sliding import DEFAULT_WINDOW, plan_sliding, predict_sliding
from finetune.predict.windows import WindowPlan, plan_windows

__all__ = [
    "DEFAULT_WINDOW",
    "ModelWindows",
    "PredictionWriter",
    "SlicePredictor",
    "WindowPlan",
    "batch_for",
    "default_batch_pixels",
    "plan_sliding",
    "plan_tiles",
    "plan_windows",
    "predict_orthoplane",
    "predict_sliding",
    "predict_stack",
    "predict_tiled",
    "predict_windows",
]

"""``finetune evaluate``: per-class IoU, F1 (Dice), precision and recall of predictions against
labels, from files (IoU is what CEM500K and Xie et al. report; F1, precision and recall what ASEM
reports).

The compute is :mod:`finetune.metrics`; this module reads files, turns predictions and
labels into class maps and accumulates confusion matrices:

* one volume against one volume (or a stack of 2D images against a stack): IoU over the
  whole volume, read in slabs so the volume never has to fit in memory (except with
  ``instances_only``, whose 3D connected regions need the whole volume);
* several 2D images against as many label images (paired in natural order): IoU per
  image and over the whole set (pixels pooled, as the paper scores a test set).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from cemcurate.common.atomic import atomic_path
from cemcurate.io import open_series
from finetune.config import EvaluateConfig
from finetune.labels import LabelSpec, to_class_map
from finetune.metrics import confusion_matrix, iou_from_confusion, scores_from_confusion, unlabelled_prediction_mask
from finetune.volumes import expand_patterns, input_files, open_volume

_SLAB = 32


def prediction_kind(dtype: np.dtype, max_value: float, num_classes: int, kind: str = "auto") -> str:
    """``"labels"`` or ``"probs"`` for a prediction array (see ``EvaluateConfig.pred_kind``)."""
    if kind != "auto":
        return kind
    if np.issubdtype(dtype, np.floating):
        return "probs"
    return "labels" if max_value < num_classes else "probs"


def prediction_classes(pred: np.ndarray, kind: str, threshold: float, num_classes: int, source: str) -> np.ndarray:
    """Class map (uint8) from a label or binary-probability prediction."""
    if kind == "labels":
        return pred  # any integer type; values outside 0..K-1 are reported by confusion_matrix
    if num_classes != 2:
        raise ValueError(
            f"{source}: probability maps can be scored for binary tasks only; "
            "predict with --output-type labels for multi-class"
        )
    if np.issubdtype(pred.dtype, np.floating):
        return (pred >= threshold).astype(np.uint8)
    if pred.dtype != np.uint8:
        raise ValueError(f"{source}: integer probability maps must be uint8 (0-255), got {pred.dtype}")
    return (pred.astype(np.float32) / 255.0 >= threshold).astype(np.uint8)


def _open(spec: str | list[Path]):
    paths = spec if isinstance(spec, list) else expand_patterns([spec], what="input")
    return open_volume(paths[0]) if len(paths) == 1 else open_series(paths)


def _max_value(vol) -> float:
    return max(float(vol.read_slices(z0, min(vol.shape[0], z0 + _SLAB)).max()) for z0 in range(0, vol.shape[0], _SLAB))


def score_volume(pred_vol, label_vol, cfg: EvaluateConfig, ignore_vol=None, name: str = "") -> np.ndarray:
    """Confusion matrix of one prediction volume against one label volume (lazy volumes)."""
    spec = LabelSpec.from_settings(cfg.classes, cfg.label_threshold, cfg.label_map, cfg.ignore_label, cfg.unmapped)
    k = spec.num_classes
    if tuple(pred_vol.shape) != tuple(label_vol.shape):
        raise ValueError(f"{name}: prediction shape {pred_vol.shape} (z, y, x) does not match labels {label_vol.shape}")
    if ignore_vol is not None and tuple(ignore_vol.shape) != tuple(label_vol.shape):
        raise ValueError(f"{name}: ignore mask shape {ignore_vol.shape} does not match labels {label_vol.shape}")
    if 0 in tuple(label_vol.shape):
        raise ValueError(f"{name}: empty volume {label_vol.shape}")
    kind = prediction_kind(
        pred_vol.dtype,
        _max_value(pred_vol) if cfg.pred_kind == "auto" and np.issubdtype(pred_vol.dtype, np.integer) else 0,
        k,
        cfg.pred_kind,
    )
    z = label_vol.shape[0]
    slab = z if cfg.instances_only else _SLAB
    cm = np.zeros((k, k), np.int64)
    for z0 in range(0, z, slab):
        z1 = min(z, z0 + slab)
        pred = prediction_classes(pred_vol.read_slices(z0, z1), kind, cfg.pred_threshold, k, name)
        target = to_class_map(label_vol.read_slices(z0, z1), spec, source=name)
        ignore = ignore_vol.read_slices(z0, z1) != 0 if ignore_vol is not None else None
        if cfg.instances_only:
            extra = unlabelled_prediction_mask(pred if z > 1 else pred[0], target if z > 1 else target[0], k)
            extra = extra.reshape(pred.shape)
            ignore = extra if ignore is None else (ignore | extra)
        cm += confusion_matrix(pred, target, k, ignore)
    return cm


def _iou_dict(cm: np.ndarray, classes: list[str]) -> dict[str, float | None]:
    return {c: (None if math.isnan(v) else float(v)) for c, v in zip(classes, iou_from_confusion(cm))}


def evaluate_paths(pred: str, labels: str, cfg: EvaluateConfig) -> dict:
    """Score ``pred`` against ``labels`` (files, folders or globs); see the module docstring.

    Returns:
        A JSON-ready dict: ``iou``, ``f1``, ``precision`` and ``recall`` per class (None where
        undefined), ``mean_foreground_iou`` (and ``_f1``, ``_precision``, ``_recall``: means
        over the classes after the first), ``confusion`` (rows = true class), ``per_image``
        (2D sets: IoU per image) and the inputs.
    """
    pred_paths = input_files(pred)
    label_paths = input_files(labels)
    ignore_paths = input_files(cfg.ignore_mask) if cfg.ignore_mask else None
    single_images = len(label_paths) > 1 and all(open_volume(p).shape[0] == 1 for p in label_paths)
    k = len(cfg.classes)
    per_image = []
    if single_images:
        if len(pred_paths) != len(label_paths):
            raise ValueError(
                f"{len(pred_paths)} prediction files but {len(label_paths)} label files; "
                "they are paired in natural order"
            )
        if ignore_paths is not None and len(ignore_paths) != len(label_paths):
            raise ValueError(f"{len(ignore_paths)} ignore masks but {len(label_paths)} label files")
        cm = np.zeros((k, k), np.int64)
        for i, (p, t) in enumerate(zip(pred_paths, label_paths)):
            ign = open_volume(ignore_paths[i]) if ignore_paths is not None else None
            cm_i = score_volume(open_volume(p), open_volume(t), cfg, ign, name=f"{p} vs {t}")
            per_image.append({"pred": str(p), "labels": str(t), "iou": _iou_dict(cm_i, cfg.classes)})
            cm += cm_i
    else:
        ign = _open(ignore_paths) if ignore_paths is not None else None
        cm = score_volume(_open(pred_paths), _open(label_paths), cfg, ign, name=f"{pred} vs {labels}")
    scores = {
        name: {c: (None if math.isnan(v) else float(v)) for c, v in zip(cfg.classes, values)}
        for name, values in scores_from_confusion(cm).items()
    }
    means = {}
    for name, per_class in scores.items():
        fg = [v for v in list(per_class.values())[1:] if v is not None]
        means[f"mean_foreground_{name}"] = float(np.mean(fg)) if fg else None
    return {
        "pred": str(pred),
        "labels": str(labels),
        "classes": list(cfg.classes),
        **scores,
        **means,
        "confusion": cm.tolist(),
        "scored_pixels": int(cm.sum()),
        "instances_only": cfg.instances_only,
        "per_image": per_image,
    }


def format_table(result: dict) -> str:
    """Plain-text table of a result from :func:`evaluate_paths`."""

    def fmt(v):
        return "   n/a" if v is None else f"{v:6.4f}"

    classes = result["classes"]
    lines = []
    if result["per_image"]:
        lines.append("image".ljust(32) + "".join(c[:12].rjust(13) for c in classes))
        for row in result["per_image"]:
            lines.append(Path(row["pred"]).name[:32].ljust(32) + "".join(fmt(row["iou"][c]).rjust(13) for c in classes))
        lines.append("")
    metrics = [("iou", "IoU"), ("f1", "F1/Dice"), ("precision", "precision"), ("recall", "recall")]
    lines.append("class".ljust(20) + "".join(title.rjust(11) for _, title in metrics))
    for c in classes:
        lines.append(c[:20].ljust(20) + "".join(fmt(result[key][c]).rjust(11) for key, _ in metrics))
    mean_row = "".join(fmt(result[f"mean_foreground_{key}"]).rjust(11) for key, _ in metrics)
    lines.append("mean (foreground)".ljust(20) + mean_row)
    return "\n".join(lines)


def write_json(result: dict, path: str | Path) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(result, indent=2))

"""Intersection-over-Union, F1 (Dice), precision and recall from class maps (pure functions).

Scores are accumulated as a confusion matrix, so a volume can be scored chunk by chunk
and a 2D set image by image with the same code: sum the matrices, then take the IoU.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from finetune.losses import IGNORE_INDEX


def confusion_matrix(
    pred: np.ndarray, target: np.ndarray, num_classes: int, ignore: np.ndarray | None = None
) -> np.ndarray:
    """Confusion counts between predicted and true classes.

    Args:
        pred: integer class indices, any shape.
        target: class map of the same shape; :data:`IGNORE_INDEX` pixels are skipped.
        num_classes: K.
        ignore: optional bool mask of extra pixels to skip.

    Returns:
        ``int64[K, K]``, rows = true class, columns = predicted class.
    """
    pred = np.asarray(pred)
    target = np.asarray(target)
    if pred.shape != target.shape:
        raise ValueError(f"prediction shape {pred.shape} does not match label shape {target.shape}")
    keep = target != IGNORE_INDEX
    if ignore is not None:
        if ignore.shape != target.shape:
            raise ValueError(f"ignore mask shape {ignore.shape} does not match label shape {target.shape}")
        keep &= ~ignore.astype(bool)
    t = target[keep].astype(np.int64)
    p = pred[keep].astype(np.int64)
    if p.size and (p.min() < 0 or p.max() >= num_classes):
        raise ValueError(
            f"predicted classes {np.unique(p[(p < 0) | (p >= num_classes)])[:10].tolist()} outside 0..{num_classes - 1}"
        )
    if t.size and t.max() >= num_classes:
        raise ValueError(f"label classes {np.unique(t[t >= num_classes])[:10].tolist()} outside 0..{num_classes - 1}")
    return np.bincount(t * num_classes + p, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def cross_entropy_sum(probs: np.ndarray, target: np.ndarray, eps: float = 1e-6) -> tuple[float, int]:
    """Cross-entropy of predicted probabilities, summable chunk by chunk: the sum over labelled
    voxels of ``-log(probability of the true class)`` (clipped at ``eps``), and their number.

    Args:
        probs: float ``(C, ...)`` in [0, 1]: ``C == 1`` is a binary task's foreground
            probability, otherwise one probability per class.
        target: class map ``(...)``; :data:`IGNORE_INDEX` voxels are skipped.
    """
    probs = np.asarray(probs, np.float64)
    target = np.asarray(target)
    if probs.shape[1:] != target.shape:
        raise ValueError(f"probability shape {probs.shape[1:]} does not match label shape {target.shape}")
    keep = target != IGNORE_INDEX
    t = target[keep].astype(np.int64)
    if probs.shape[0] == 1:
        p_fg = probs[0][keep]
        p_true = np.where(t == 1, p_fg, 1.0 - p_fg)
    else:
        p_true = np.take_along_axis(probs[:, keep], t[None], axis=0)[0]
    return float(-np.log(np.clip(p_true, eps, 1.0)).sum()), int(t.size)


def iou_from_confusion(cm: np.ndarray) -> np.ndarray:
    """Per-class IoU ``TP / (TP + FP + FN)``; NaN for a class absent from both prediction and labels."""
    cm = np.asarray(cm, dtype=np.float64)
    tp = np.diag(cm)
    union = cm.sum(axis=0) + cm.sum(axis=1) - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, tp / np.where(union > 0, union, 1), np.nan)


def scores_from_confusion(cm: np.ndarray) -> dict[str, np.ndarray]:
    """Per-class scores from a confusion matrix (rows = true class), float64 ``(K,)`` each:
    ``iou`` TP / (TP + FP + FN); ``f1`` (the Dice coefficient) 2 TP / (2 TP + FP + FN);
    ``precision`` TP / (TP + FP); ``recall`` TP / (TP + FN). NaN where the denominator is 0
    (a class never predicted has no precision, a class absent from the labels no recall)."""
    cm = np.asarray(cm, dtype=np.float64)
    tp = np.diag(cm)
    predicted, true = cm.sum(axis=0), cm.sum(axis=1)

    def ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(den > 0, num / np.where(den > 0, den, 1), np.nan)

    return {
        "iou": iou_from_confusion(cm),
        "f1": ratio(2 * tp, predicted + true),
        "precision": ratio(tp, predicted),
        "recall": ratio(tp, true),
    }


def unlabelled_prediction_mask(pred: np.ndarray, target: np.ndarray, num_classes: int) -> np.ndarray:
    """Pixels of predicted regions that touch no labelled instance (Perez-style scoring).

    Some benchmarks (Perez et al. 2014) label only some instances per image. Following
    the paper, a connected predicted region of class c that overlaps no pixel labelled c
    is left out of the score instead of counting as a false positive. Connectivity is
    full (8 neighbours in 2D, 26 in 3D).

    Args:
        pred, target: class maps of the same shape (2D image or 3D volume).

    Returns:
        bool array of ``pred.shape``: pixels to ignore.
    """
    if pred.shape != target.shape:
        raise ValueError(f"prediction shape {pred.shape} does not match label shape {target.shape}")
    structure = np.ones((3,) * pred.ndim, dtype=bool)
    out = np.zeros(pred.shape, dtype=bool)
    for c in range(1, num_classes):  # class 0 is background
        regions, n = ndimage.label(pred == c, structure=structure)
        if n == 0:
            continue
        touched = np.zeros(n + 1, dtype=bool)
        touched[np.unique(regions[(target == c) & (regions > 0)])] = True
        touched[0] = True  # label 0 is "not predicted c", never ignored here
        out |= ~touched[regions]
    return out


def probs_to_classes(probs: np.ndarray, threshold: float = 0.5) -> np.ndarray:
    """Class map from probabilities.

    Args:
        probs: ``(C, ...)`` float in [0, 1]; ``C == 1`` is a binary foreground probability.
        threshold: foreground threshold for ``C == 1``.

    Returns:
        uint8 class indices of shape ``probs.shape[1:]``.
    """
    if probs.shape[0] == 1:
        return (probs[0] >= threshold).astype(np.uint8)
    return np.argmax(probs, axis=0).astype(np.uint8)

"""Segmentation losses and the paper's prevalence-based class weights.

Targets are class maps: integer class indices with :data:`IGNORE_INDEX` marking pixels
that are excluded from the loss (and from metrics).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

# Class index for "not labelled / do not score". Class maps are stored as uint8, so real
# classes are 0-254.
IGNORE_INDEX = 255
# ASEM clips its inverse-frequency class weights at 1:100.
BALANCE_MAX_RATIO = 100.0


def count_classes(class_maps: Sequence[np.ndarray] | np.ndarray, num_classes: int) -> np.ndarray:
    """Pixel count of every class over a set of class maps.

    Args:
        class_maps: arrays of any shape (uint8 class indices, :data:`IGNORE_INDEX` ignored).
        num_classes: number of classes K.

    Returns:
        ``int64[K]``. Raises ValueError for indices >= K other than the ignore index.
    """
    maps = [class_maps] if isinstance(class_maps, np.ndarray) else list(class_maps)
    counts = np.zeros(max(num_classes, IGNORE_INDEX + 1), dtype=np.int64)
    for m in maps:
        counts += np.bincount(np.asarray(m, dtype=np.uint8).ravel(), minlength=counts.size)[: counts.size]
    extra = np.flatnonzero(counts[num_classes:IGNORE_INDEX]) + num_classes
    if extra.size:
        raise ValueError(
            f"class maps contain class indices {extra.tolist()} but only {num_classes} classes are configured"
        )
    return counts[:num_classes]


def prevalence_weights(
    counts: Sequence[int] | np.ndarray,
    background: Sequence[int] = (0,),
    rare_fraction: float = 0.1,
    rare_weight: float = 3.0,
    common_weight: float = 1.0,
    background_weight: float = 0.1,
    class_names: Sequence[str] | None = None,
) -> np.ndarray:
    """Cross-entropy class weights from class prevalence, as in the paper.

    A class with less than ``rare_fraction`` of all labelled pixels gets ``rare_weight``,
    one with more gets ``common_weight``, and every background class gets
    ``background_weight`` whatever its prevalence.

    Args:
        counts: labelled pixel count per class, length K (from :func:`count_classes`).
        background: indices of background classes.
        class_names: names used in error messages.

    Returns:
        ``float32[K]`` weights.

    Raises:
        ValueError: no labelled pixels at all, a class absent from the labels (the
            weights, and training, would be meaningless), or a bad background index.
    """
    counts = np.asarray(counts, dtype=np.float64)
    names = list(class_names) if class_names is not None else [str(i) for i in range(counts.size)]
    total = counts.sum()
    if total <= 0:
        raise ValueError("no labelled pixels in the training labels: cannot compute class weights")
    missing = [f"{i} ({names[i]})" for i in np.flatnonzero(counts == 0)]
    if missing:
        raise ValueError(
            f"class(es) {', '.join(missing)} have no pixels in the training labels; "
            "check classes/label_map against the mask values"
        )
    bad = [b for b in background if not 0 <= b < counts.size]
    if bad:
        raise ValueError(f"background class indices {bad} out of range for {counts.size} classes")
    weights = np.where(counts / total < rare_fraction, rare_weight, common_weight).astype(np.float32)
    weights[list(background)] = background_weight
    return weights


def balanced_weights(target: torch.Tensor, num_classes: int, max_ratio: float = BALANCE_MAX_RATIO) -> torch.Tensor:
    """ASEM's class weights for one batch: inversely proportional to each class's share of the
    batch's labelled voxels, clipped at ``max_ratio`` times the smallest weight.

    Args:
        target: ``(B, ...)`` integer class indices; :data:`IGNORE_INDEX` not counted.
        num_classes: K (2 for a binary task).

    Returns:
        ``float32[K]`` on ``target``'s device, the most frequent class weighing 1. A class
        absent from the batch gets ``max_ratio`` (it has no voxels to weigh); a batch with
        no labelled voxel gets all ones.
    """
    labelled = target[target != IGNORE_INDEX].long().flatten()
    counts = torch.bincount(labelled, minlength=num_classes)[:num_classes].float()
    if counts.sum() == 0:
        return torch.ones(num_classes, device=target.device)
    inverse = counts.max() / counts  # inf for an absent class, clipped below
    return torch.clamp(inverse, max=max_ratio)


def segmentation_loss(
    logits: torch.Tensor, target: torch.Tensor, class_weights: torch.Tensor | None = None
) -> torch.Tensor:
    """Binary or multi-class cross-entropy with ignored pixels.

    Args:
        logits: ``(B, C, ...)`` float (2D or 3D). ``C == 1``: binary, BCE-with-logits against
            ``target == 1``. ``C > 1``: cross-entropy over C classes.
        target: ``(B, ...)`` integer class indices; :data:`IGNORE_INDEX` excluded.
        class_weights: per-class weights (``(2,)`` for binary, ``(C,)`` for multi-class):
            the loss is the weighted mean, the sum of weighted pixel losses divided by the
            sum of the weights of the scored pixels (PyTorch's convention). ``None``: plain mean.

    Returns:
        Scalar loss. Zero (with a gradient path) when every pixel is ignored.
    """
    target = target.long()
    if logits.shape[1] == 1:
        valid = target != IGNORE_INDEX
        per_pixel = F.binary_cross_entropy_with_logits(logits[:, 0].float(), (target == 1).float(), reduction="none")
        if class_weights is None:
            weight = valid.float()
        else:
            w = class_weights.to(logits.device, torch.float32)
            weight = torch.where(target == 1, w[1], w[0]) * valid
        return (per_pixel * weight).sum() / weight.sum().clamp(min=1e-12)
    if not (target != IGNORE_INDEX).any():
        return logits.sum() * 0.0
    weight = class_weights.to(logits.device, torch.float32) if class_weights is not None else None
    return F.cross_entropy(logits.float(), target, weight=weight, ignore_index=IGNORE_INDEX)


def dice_loss(logits: torch.Tensor, target: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """Soft Dice loss over the batch, ignoring :data:`IGNORE_INDEX` pixels (2D or 3D).

    Args:
        logits: ``(B, C, ...)``; ``C == 1``: binary (sigmoid, Dice of class 1); ``C > 1``:
            softmax, Dice averaged over the foreground classes ``1..C-1`` (background is
            dominant and would dilute the loss).
        target: ``(B, ...)`` integer class indices.
        smooth: added to numerator and denominator (a class absent from both prediction
            and target scores 1, not NaN).

    Returns:
        Scalar ``1 - Dice`` in [0, 1].
    """
    target = target.long()
    valid = (target != IGNORE_INDEX).unsqueeze(1).float()
    if logits.shape[1] == 1:
        probs = torch.sigmoid(logits.float())
        onehot = (target == 1).unsqueeze(1).float()
    else:
        probs = torch.softmax(logits.float(), dim=1)[:, 1:]
        onehot = (
            F.one_hot(torch.where(target == IGNORE_INDEX, 0, target), logits.shape[1]).movedim(-1, 1)[:, 1:].float()
        )
    dims = [0] + list(range(2, logits.ndim))
    inter = (probs * onehot * valid).sum(dims)
    denom = (probs * valid).sum(dims) + (onehot * valid).sum(dims)
    return 1.0 - ((2.0 * inter + smooth) / (denom + smooth)).mean()


LOSSES = ("ce", "dice_ce")


def training_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    kind: str = "ce",
    class_weights: torch.Tensor | None = None,
    balanced: bool = False,
) -> torch.Tensor:
    """The loss ``finetune train`` minimises, for 2D ``(B, C, y, x)`` or 3D ``(B, C, z, y, x)`` logits.

    ``kind``: ``ce`` = :func:`segmentation_loss` (BCE-with-logits for one channel, weighted
    cross-entropy otherwise; the paper's); ``dice_ce`` = that plus :func:`dice_loss`, which
    counters a rare foreground such as thin membranes. ``balanced``: the cross-entropy's class
    weights come from this batch (:func:`balanced_weights`, ASEM's) instead of ``class_weights``.
    """
    if kind not in LOSSES:
        raise ValueError(f"unknown loss {kind!r}; valid losses: {', '.join(LOSSES)}")
    if balanced:
        class_weights = balanced_weights(target, max(2, logits.shape[1]))
    loss = segmentation_loss(logits, target, class_weights)
    if kind == "dice_ce":
        loss = loss + dice_loss(logits, target)
    return loss

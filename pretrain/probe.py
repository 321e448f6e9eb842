"""Linear probe and kNN on frozen encoder features: does an encoder separate an organelle?

``pretrain probe`` cuts the images of a labelled split into a grid of ``crop`` x ``crop``
tiles (no overlap, native resolution), labels each tile from its mask (positive: at least
``positive_fraction`` of its pixels are foreground; negative: below ``negative_fraction``;
tiles in between are ambiguous and left out), embeds every tile with each encoder (the
global-average-pooled last stage, as :mod:`pretrain.analyze` does) and scores two frozen
read-outs on the test split:

* **linear probe**: logistic regression on the standardised features of the training tiles
  (L2, ``C``; class-balanced weights, since organelles cover few tiles); test AUROC and
  balanced accuracy at 0.5;
* **kNN**: the ``k`` nearest training tiles by cosine similarity vote; test balanced accuracy.

Balanced accuracy is the mean of the per-class recalls, so a read-out that always answers the
majority class scores 0.5. Training and test tiles come from different files, so no tile
overlaps one it is scored against.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from cemcurate.common.atomic import atomic_path
from cemcurate.common.device import select_device
from cemcurate.common.lazy import lazy_import
from pretrain.analyze import image_files, load_encoder, read_image

sklearn_linear_model = lazy_import("sklearn.linear_model")
sklearn_metrics = lazy_import("sklearn.metrics")

AMBIGUOUS = -1


@dataclass
class ProbeSettings:
    """What :func:`probe` measures and on what (see ``pretrain probe --help``)."""

    crop: int = 112
    positive_fraction: float = 0.05
    negative_fraction: float = 0.005
    mask_threshold: float = 0.0
    k: int = 5
    c: float = 1.0
    arch: str = "resnet50"
    device: str = "auto"
    seed: int = 0
    batch_size: int = 64

    def __post_init__(self) -> None:
        if self.crop < 32:
            raise ValueError(f"crop must be at least 32 px (a ResNet downsamples 32x), got {self.crop}")
        if not 0 <= self.negative_fraction < self.positive_fraction <= 1:
            raise ValueError(
                "need 0 <= negative_fraction < positive_fraction <= 1, got "
                f"{self.negative_fraction} and {self.positive_fraction}"
            )
        if self.k < 1:
            raise ValueError(f"k must be at least 1, got {self.k}")


def tile_grid(image: np.ndarray, crop: int) -> np.ndarray:
    """Non-overlapping ``crop`` x ``crop`` tiles of ``image`` ``(H, W)``, row by row: ``(n, crop, crop)``
    (the right and bottom remainders are dropped)."""
    h, w = image.shape
    rows, cols = h // crop, w // crop
    cut = image[: rows * crop, : cols * crop]
    return cut.reshape(rows, crop, cols, crop).swapaxes(1, 2).reshape(rows * cols, crop, crop)


def tile_labels(mask: np.ndarray, crop: int, positive_fraction: float, negative_fraction: float) -> np.ndarray:
    """Per tile of :func:`tile_grid` (same order): 1 if at least ``positive_fraction`` of a boolean
    ``mask``'s pixels are set, 0 if fewer than ``negative_fraction``, else :data:`AMBIGUOUS` (int8 ``(n,)``)."""
    share = tile_grid(mask.astype(np.float32), crop).mean(axis=(1, 2))
    labels = np.full(len(share), AMBIGUOUS, np.int8)
    labels[share >= positive_fraction] = 1
    labels[share < negative_fraction] = 0
    return labels


def balanced_accuracy(truth: np.ndarray, predicted: np.ndarray) -> float:
    """Mean per-class recall of 0/1 arrays (0.5 for a constant answer)."""
    truth, predicted = np.asarray(truth).astype(bool), np.asarray(predicted).astype(bool)
    recalls = [float(np.mean(predicted[truth == c] == c)) for c in (False, True) if np.any(truth == c)]
    return float(np.mean(recalls))


def linear_probe(
    train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray, c: float = 1.0
) -> dict:
    """Logistic regression on standardised features ``(n, d)``; test ``auroc`` and ``balanced_accuracy``."""
    mean, std = train_x.mean(axis=0), train_x.std(axis=0) + 1e-8
    model = sklearn_linear_model.LogisticRegression(C=c, class_weight="balanced", max_iter=2000)
    model.fit((train_x - mean) / std, train_y)
    prob = model.predict_proba((test_x - mean) / std)[:, 1]
    return {
        "auroc": float(sklearn_metrics.roc_auc_score(test_y, prob)),
        "balanced_accuracy": balanced_accuracy(test_y, prob >= 0.5),
    }


def knn_probe(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray, k: int = 5) -> dict:
    """Majority vote of the ``k`` training features with the highest cosine similarity; test ``balanced_accuracy``.

    The vote is class-balanced (each neighbour weighs 1 / its class's training share), so a rare
    class is not outvoted by its prevalence alone."""

    def unit(x: np.ndarray) -> np.ndarray:
        return x / (np.linalg.norm(x, axis=1, keepdims=True) + 1e-12)

    nearest = np.argsort(-(unit(test_x) @ unit(train_x).T), axis=1)[:, :k]
    is_pos = train_y[nearest] == 1
    share_pos = float(np.mean(train_y == 1))
    positive = is_pos.sum(axis=1) / share_pos > (~is_pos).sum(axis=1) / (1.0 - share_pos)
    return {"balanced_accuracy": balanced_accuracy(test_y, positive)}


def _files(patterns: Sequence[str]) -> list[Path]:
    return sorted({f for pattern in patterns for f in image_files(pattern)})


def pair_files(images: Sequence[str], masks: Sequence[str]) -> list[tuple[Path, Path]]:
    """Image and mask files of globs, folders or files, paired in sorted order (equal counts required)."""
    im, ma = _files(images), _files(masks)
    if not im:
        raise ValueError(f"{' '.join(images)}: no image files")
    if len(im) != len(ma):
        raise ValueError(
            f"{' '.join(images)} gives {len(im)} image files but {' '.join(masks)} gives {len(ma)} masks; "
            "they pair in sorted order"
        )
    return list(zip(im, ma))


def labelled_tiles(pairs: Sequence[tuple[Path, Path]], settings: ProbeSettings) -> tuple[np.ndarray, np.ndarray]:
    """Tiles ``(n, crop, crop)`` float32 in [0, 1] and labels ``(n,)`` of the non-ambiguous tiles of ``pairs``."""
    tiles, labels = [], []
    for image_path, mask_path in pairs:
        image, mask = read_image(image_path), read_image(mask_path)
        if image.shape != mask.shape:
            raise ValueError(f"{mask_path}: mask shape {mask.shape} differs from {image_path}'s {image.shape}")
        lab = tile_labels(
            mask > settings.mask_threshold, settings.crop, settings.positive_fraction, settings.negative_fraction
        )
        keep = lab != AMBIGUOUS
        tiles.append(tile_grid(image, settings.crop)[keep].astype(np.float32) / 255.0)
        labels.append(lab[keep])
    x, y = np.concatenate(tiles), np.concatenate(labels).astype(np.int64)
    return x, y


def _check_both_classes(y: np.ndarray, split: str) -> None:
    n_pos = int(y.sum())
    if n_pos == 0 or n_pos == len(y):
        raise ValueError(
            f"the {split} split has {n_pos} positive tiles of {len(y)}: a probe needs both classes "
            "(change --positive-fraction/--negative-fraction or --crop)"
        )


def probe(
    encoder_args: Iterable[tuple[str, str]],
    train_pairs: Sequence[tuple[Path, Path]],
    test_pairs: Sequence[tuple[Path, Path]],
    out_dir: str | Path,
    settings: ProbeSettings,
) -> dict:
    """Score every encoder's frozen features; write ``probe.json`` into ``out_dir`` and return it."""
    train_x, train_y = labelled_tiles(train_pairs, settings)
    test_x, test_y = labelled_tiles(test_pairs, settings)
    _check_both_classes(train_y, "training")
    _check_both_classes(test_y, "test")
    device = select_device(settings.device)
    results = {}
    for i, (name, spec) in enumerate(encoder_args):
        encoder = load_encoder(name, spec, settings.arch, device, seed=settings.seed + i)
        ftrain = encoder.embed(train_x, settings.batch_size)
        ftest = encoder.embed(test_x, settings.batch_size)
        results[name] = {
            "spec": spec,
            "arch": encoder.arch,
            "source": encoder.source,
            "linear": linear_probe(ftrain, train_y, ftest, test_y, settings.c),
            "knn": knn_probe(ftrain, train_y, ftest, test_y, settings.k),
        }
    doc = {
        "settings": dict(vars(settings)),
        "train": {"files": len(train_pairs), "tiles": len(train_y), "positive": int(train_y.sum())},
        "test": {"files": len(test_pairs), "tiles": len(test_y), "positive": int(test_y.sum())},
        "encoders": results,
    }
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / "probe.json") as tmp:
        tmp.write_text(json.dumps(doc, indent=2))
    return doc


def results_table(doc: dict) -> str:
    """A markdown table of :func:`probe`'s results, one row per encoder."""
    lines = [
        "| encoder | linear AUROC | linear balanced acc. | kNN balanced acc. |",
        "|---|---|---|---|",
    ]
    for name, r in doc["encoders"].items():
        lin, knn = r["linear"], r["knn"]
        lines.append(
            f"| {name} | {lin['auroc']:.3f} | {lin['balanced_accuracy']:.3f} | {knn['balanced_accuracy']:.3f} |"
        )
    return "\n".join(lines)

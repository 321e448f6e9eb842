"""``cemcurate filter train OUT``: fit the ResNet filter and the statistics baseline on labels.

Steps: read ``OUT/labels.csv`` and the labelled patches (with ``--bootstrap``, also the patches
the label-free rules are sure of, labelled by them: a start without hand labels); hold out a stratified, seeded test
split; fine-tune the ResNet (by default ``layer4`` and ``fc`` only, as CEM500K did) with
Adam and BCE on one logit, with flips, 90-degree turns, brightness/contrast, Gaussian noise
and blur as augmentations; fit the Random Forest on the four image statistics of the same
training split; evaluate both - and the label-free rules - on the test split; write

* ``OUT/filter/classifier.pth``   the classifier file (see :mod:`cemcurate.filtering.classifier`)
* ``OUT/filter/stats_forest.pkl`` the Random Forest (see :mod:`cemcurate.filtering.forest`)
* ``OUT/filter/metrics.json``     AUROCs, accuracies, split sizes, loss per epoch, test ids
* ``OUT/filter/roc.png``          ROC curves of both classifiers (paper Appendix 1 fig. 1b)
* ``OUT/filter/filter_train.yaml`` the resolved config

The test split is used once, at the end: no epoch or threshold is chosen on it.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch
from scipy.special import expit
from tqdm import tqdm

from cemcurate.common.archs import get_arch
from cemcurate.common.atomic import atomic_path
from cemcurate.common.config import config_to_dict, save_config
from cemcurate.common.device import select_device
from cemcurate.common.lazy import lazy_import
from cemcurate.common.runstate import optimizer_step
from cemcurate.filtering.classifier import (
    FilterError,
    create_model,
    load_init_weights,
    predict_logits,
    prepare_batch,
    resolve_init,
    save_classifier,
)
from cemcurate.filtering.config import FilterTrainConfig
from cemcurate.filtering.evaluation import roc_points, write_roc_png
from cemcurate.filtering.features import image_statistics
from cemcurate.filtering.forest import fit_forest, forest_prob, save_forest
from cemcurate.filtering.labels import LabelPool, bootstrap_labels, labels_path, load_labelled
from cemcurate.filtering.rules import rule_informative_prob
from cemcurate.layout import BuildLayout

albumentations = lazy_import("albumentations")
sklearn_model_selection = lazy_import("sklearn.model_selection")


# ----------------------------------------------------------------------------- data


class LabelledPatches(torch.utils.data.Dataset):
    """uint8 patches with 0/1 labels; items are ``(uint8 tensor (1, p, p), float label)``."""

    def __init__(self, patches: np.ndarray, labels: np.ndarray, transform=None):
        self.patches, self.labels, self.transform = patches, labels.astype(np.float32), transform

    def __len__(self) -> int:
        return len(self.patches)

    def __getitem__(self, i: int):
        image = self.patches[i]
        if self.transform is not None:
            image = self.transform(image=image)["image"]
        return torch.from_numpy(np.ascontiguousarray(image)).unsqueeze(0), torch.tensor(self.labels[i])


def make_augment(seed: int):
    """The training augmentations (albumentations, uint8 grey in and out).

    Intensity changes stay mild so that a low-contrast (uninformative) patch does not turn
    into a contrasty one; geometry changes are free because informativeness has no
    orientation.
    """
    A = albumentations
    return A.Compose(
        [
            A.HorizontalFlip(p=0.5),
            A.VerticalFlip(p=0.5),
            A.RandomRotate90(p=0.5),
            A.RandomBrightnessContrast(brightness_limit=0.15, contrast_limit=0.15, p=0.5),
            A.GaussNoise(std_range=(0.01, 0.04), p=0.3),
            A.GaussianBlur(blur_limit=(3, 5), sigma_limit=(0.3, 1.2), p=0.3),
        ],
        seed=seed,
    )


def stratified_split(labels: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices ``(train, test)`` of a stratified, seeded split; both classes in both parts."""
    labels = np.asarray(labels)
    counts = np.bincount(labels, minlength=2)
    if counts.min() < 4:
        raise FilterError(
            f"need at least 4 labels of each class to train and test, have {counts[1]} informative "
            f"and {counts[0]} uninformative; label more patches with `cemcurate label`"
        )
    n_test = max(2, int(round(test_fraction * len(labels))))
    train, test = sklearn_model_selection.train_test_split(
        np.arange(len(labels)), test_size=n_test, stratify=labels, random_state=seed
    )
    if len(np.unique(labels[test])) < 2 or len(np.unique(labels[train])) < 2:
        raise FilterError("the test split lacks one class; raise --test-fraction or label more patches")
    return np.sort(train), np.sort(test)


def set_trainable(model: torch.nn.Module, layers: list[str]) -> list[torch.nn.Parameter]:
    """Freeze every parameter outside the top-level modules ``layers``; return the trainable ones."""
    if layers == ["all"]:
        for p in model.parameters():
            p.requires_grad_(True)
        return list(model.parameters())
    names = dict(model.named_children())
    unknown = [n for n in layers if n not in names]
    if unknown:
        raise FilterError(f"train_layers {unknown} are not modules of the model; valid: {sorted(names)} or 'all'")
    for p in model.parameters():
        p.requires_grad_(False)
    params = []
    for n in layers:
        for p in names[n].parameters():
            p.requires_grad_(True)
            params.append(p)
    return params


def _train_mode(model: torch.nn.Module, layers: list[str]) -> None:
    """Train mode for the trained modules only: frozen batch norms keep their statistics."""
    model.eval()
    if layers == ["all"]:
        model.train()
        return
    children = dict(model.named_children())
    for n in layers:
        children[n].train()


# ----------------------------------------------------------------------------- training


def _training_labels(
    out_dir: Path, cfg: FilterTrainConfig, pool: LabelPool
) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict | None]:
    """The hand labels and, with ``cfg.bootstrap``, the rules' confident labels of the other patches:
    ``(patches, labels, patch_ids, bootstrap summary or None)``."""
    csv = Path(cfg.labels) if cfg.labels else labels_path(out_dir)
    if cfg.bootstrap and not csv.is_file():
        patches = np.zeros((0, pool.patch_size, pool.patch_size), np.uint8)
        labels, ids = np.zeros(0, np.int64), np.zeros(0, np.int64)
    else:
        patches, labels, ids = load_labelled(out_dir, cfg.labels)
    if not cfg.bootstrap:
        return patches, labels, ids, None
    boot_ids, boot_labels = bootstrap_labels(pool, ids, cfg.bootstrap_low, cfg.bootstrap_high, cfg.bootstrap_max)
    counts = np.bincount(boot_labels, minlength=2)
    if counts.min() < 4:
        raise FilterError(
            f"{out_dir}: the label-free rules are sure of only {counts[0]} uninformative (score <= "
            f"{cfg.bootstrap_low:g}) and {counts[1]} informative (score >= {cfg.bootstrap_high:g}) patch(es) without "
            f"a hand label; label some with `cemcurate label {out_dir}` or widen --bootstrap-low/--bootstrap-high"
        )
    summary = {
        "hand_labels": int(len(ids)),
        "uninformative": int(counts[0]),
        "informative": int(counts[1]),
        "low": cfg.bootstrap_low,
        "high": cfg.bootstrap_high,
    }
    return (
        np.concatenate([patches, pool.patches(boot_ids)]),
        np.concatenate([labels, boot_labels]),
        np.concatenate([ids, boot_ids]),
        summary,
    )


def train_filter(out_dir: str | Path, cfg: FilterTrainConfig | None = None, progress: bool = True) -> dict:
    """Run ``cemcurate filter train OUT``; returns the metrics written to ``metrics.json``."""
    cfg = cfg or FilterTrainConfig()
    out_dir = Path(out_dir)
    dest = Path(cfg.output) if cfg.output else BuildLayout(out_dir).filter_dir
    # Cheap checks first, so a typo fails before minutes of work.
    get_arch(cfg.arch)
    device = select_device(cfg.device)
    init = resolve_init(cfg.weights, cfg.arch)
    pool_info = LabelPool(out_dir)
    patches, labels, ids, bootstrap = _training_labels(out_dir, cfg, pool_info)
    train_idx, test_idx = stratified_split(labels, cfg.test_fraction, cfg.seed)
    input_size = int(cfg.input_size or patches.shape[1])
    mean = init.mean if init.mean is not None else pool_info.mean
    std = init.std if init.std is not None else pool_info.std
    if not std > 0:
        raise FilterError(f"{out_dir}: store std is {std}; cannot normalise (is the store empty?)")

    torch.manual_seed(cfg.seed)
    model = create_model(cfg.arch)
    load_init_weights(model, init)
    params = set_trainable(model, list(cfg.train_layers))
    model.to(device)
    use_amp = cfg.amp and device.type == "cuda"
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed input size: let cuDNN pick the fastest kernels

    train_set = LabelledPatches(patches[train_idx], labels[train_idx], make_augment(cfg.seed) if cfg.augment else None)
    generator = torch.Generator().manual_seed(cfg.seed)
    loader = torch.utils.data.DataLoader(
        train_set,
        batch_size=cfg.batch_size,
        shuffle=True,
        generator=generator,
        num_workers=cfg.workers,
        pin_memory=device.type == "cuda",
        # A last batch of one would break batch norm in the trained layers.
        drop_last=len(train_set) % cfg.batch_size == 1,
    )
    optimizer = torch.optim.Adam(params, lr=cfg.lr)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    history = []
    start_time = time.time()
    bar = tqdm(total=cfg.epochs * len(loader), desc="filter train", unit="batch", disable=not progress)
    for epoch in range(cfg.epochs):
        _train_mode(model, list(cfg.train_layers))
        total, seen = 0.0, 0
        for images, targets in loader:
            images = images.to(device, non_blocking=True)
            targets = targets.to(device, non_blocking=True)
            x = prepare_batch(images, input_size, mean, std)
            with torch.autocast(device_type=device.type, dtype=torch.float16, enabled=use_amp):
                logits = model(x).reshape(-1)
            loss = loss_fn(logits.float(), targets)
            optimizer_step(loss, optimizer, scaler)
            total += float(loss.detach()) * len(targets)
            seen += len(targets)
            bar.update()
        history.append(total / max(seen, 1))
        bar.set_postfix(epoch=epoch + 1, loss=f"{history[-1]:.4f}")
    bar.close()
    model.eval()

    # Evaluation on the held-out split.
    y_test = labels[test_idx]
    logits = predict_logits(
        model,
        patches[test_idx],
        input_size,
        mean,
        std,
        batch_size=max(cfg.batch_size, 64),
        device=device,
        progress=False,
        amp=cfg.amp,
    )
    p_resnet = expit(logits.astype(np.float64))
    feats_train = image_statistics(patches[train_idx])
    feats_test = image_statistics(patches[test_idx])
    forest = fit_forest(feats_train, labels[train_idx], seed=cfg.seed, trees=cfg.forest_trees)
    p_forest = forest_prob(forest, feats_test)
    p_rules = rule_informative_prob(patches[test_idx])

    curves = {
        "resnet": {**roc_points(y_test, p_resnet), "label": f"ResNet ({cfg.arch})"},
        "forest": {**roc_points(y_test, p_forest), "label": "Random Forest (4 statistics)"},
        "rules": {**roc_points(y_test, p_rules), "label": "label-free rules"},
    }
    counts = (int((y_test == 0).sum()), int((y_test == 1).sum()))

    def accuracy(p: np.ndarray, thr: float) -> float:
        return float(((p >= thr).astype(int) == y_test).mean())

    metrics = {
        "n_labels": int(len(labels)),
        "bootstrap": bootstrap,
        "n_train": int(len(train_idx)),
        "n_test": int(len(test_idx)),
        "train_informative": int(labels[train_idx].sum()),
        "test_informative": counts[1],
        "test_uninformative": counts[0],
        "auroc": {k: c["auroc"] for k, c in curves.items()},
        "accuracy": {
            "resnet": accuracy(p_resnet, cfg.threshold),
            "forest": accuracy(p_forest, 0.5),
            "rules": accuracy(p_rules, 0.5),
        },
        "threshold": cfg.threshold,
        "epochs": cfg.epochs,
        "train_loss": [round(v, 6) for v in history],
        "train_seconds": round(time.time() - start_time, 1),
        "device": str(device),
        "arch": cfg.arch,
        "weights": init.source,
        "input_size": input_size,
        "mean": mean,
        "std": std,
        "test_patch_ids": ids[test_idx].tolist(),
        "roc": {k: {"fpr": c["fpr"], "tpr": c["tpr"]} for k, c in curves.items()},
    }
    dest.mkdir(parents=True, exist_ok=True)
    summary = {k: v for k, v in metrics.items() if k not in ("roc", "test_patch_ids")}
    save_classifier(
        dest / "classifier.pth",
        model,
        cfg.arch,
        input_size,
        mean,
        std,
        cfg.threshold,
        config=config_to_dict(cfg),
        metrics=summary,
    )
    save_forest(
        dest / "stats_forest.pkl", forest, meta={"n_train": int(len(train_idx)), "auroc": curves["forest"]["auroc"]}
    )
    write_roc_png(
        dest / "roc.png",
        curves,
        f"held-out test set: {len(test_idx)} patches ({counts[1]} inf., {counts[0]} uninf.)",
    )
    with atomic_path(dest / "metrics.json") as tmp:
        tmp.write_text(json.dumps(metrics, indent=1))
    save_config(cfg, dest / "filter_train.yaml")
    return metrics

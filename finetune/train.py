"""``finetune train``: fine-tune a UNet-ResNet (2D, or 3D with inflated encoder weights) resumably.

Recipe (Conrad & Narayan 2021, "Benchmark segmentation tasks"): AdamW, one-cycle
learning rate with maximum 0.003, weight decay 0.1, batch 16, a fixed number of
iterations, BCE-with-logits for binary tasks and prevalence-weighted cross-entropy for
multi-class ones, seed 42, a pre-trained encoder frozen (including BatchNorm statistics) and a random one trained.

``dim: 3d`` keeps that recipe and swaps the model and the data: a
:class:`~finetune.models.unet3d.UNet3D` whose encoder holds the same 2D weights inflated
to 3D (:mod:`finetune.models.inflate`), trained on random ``crop_depth x crop x crop``
sub-volumes (:mod:`finetune.data3d`) with 3D augmentations (:mod:`finetune.augment3d`) and validated by
sliding-window prediction (:mod:`finetune.predict.sliding`).

A run folder ``RUN`` holds:

* ``config.yaml``: the resolved config;
* ``checkpoint.pth``: resumable state (model, optimizer, scheduler, AMP scaler, iteration,
  RNG states, elapsed time, config), written atomically every ``checkpoint_every``
  iterations, at ``stop_at`` and on Ctrl-C. Re-running the same command continues from it
  and ends with the same weights as an uninterrupted run: samples are a pure function of
  ``(seed, sample index)`` (:mod:`finetune.data`), so the data stream resumes exactly too;
* ``model.pth``: the final model (weights + what is needed to rebuild it);
* ``model_best.pth``: with validation data, the model of the validation with the best mean
  foreground IoU so far (``finetune predict RUN/model_best.pth`` uses it), as ASEM selects
  its model by validation score;
* ``train_log.csv``, ``val_log.csv``, ``tensorboard/``: loss, learning rate, validation IoU.
"""

from __future__ import annotations

import csv
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from cemcurate.common.atomic import atomic_path
from cemcurate.common.config import config_to_dict, save_config
from cemcurate.common.device import select_device
from cemcurate.common.lazy import lazy_import
from cemcurate.common.runstate import (
    append_csv,
    capture_rng,
    optimizer_step,
    read_checkpoint,
    refuse_changed_resume,
    restore_rng,
    save_checkpoint,
    trim_csv,
)
from cemcurate.common.weights import ResolvedWeights, resolve
from finetune.config import RESUME_SAFE_KEYS, OptimConfig, TrainConfig
from finetune.data import CropSamples, LabelledVolume, load_labelled, pair_files
from finetune.data3d import SubvolumeSamples
from finetune.losses import count_classes, prevalence_weights, training_loss
from finetune.metrics import confusion_matrix, iou_from_confusion, probs_to_classes
from finetune.models import UNet3D, build_model
from finetune.models.geometry import StageGeometry
from finetune.predict.slices import SlicePredictor
from finetune.predict.sliding import DEFAULT_WINDOW, predict_sliding
from finetune.volumes import open_volume

torch_tensorboard = lazy_import("torch.utils.tensorboard")

CHECKPOINT = "checkpoint.pth"
MODEL = "model.pth"
BEST_MODEL = "model_best.pth"


@dataclass
class TrainResult:
    """Outcome of :func:`train`.

    Attributes:
        run: the run folder.
        iteration: iterations completed so far.
        finished: ``iteration == cfg.optim.iters`` (``model.pth`` written).
        seconds: training wall time summed over all invocations of this run.
        val: last validation scores (``{"iou": {...}, "mean_foreground_iou": ...}``) or None.
    """

    run: Path
    iteration: int
    finished: bool
    seconds: float
    val: dict | None


def resolve_geometry(cfg: TrainConfig, first_image: str | Path | None = None) -> StageGeometry:
    """The 3D stage geometry of ``cfg``: a preset, or for ``auto`` one derived from the voxel
    size of ``first_image`` (isotropic when the file records none)."""
    if cfg.dim3d.geometry != "auto":
        return StageGeometry.preset(cfg.dim3d.geometry)
    voxel = open_volume(first_image).voxel_size if first_image is not None else None
    if voxel is None or not all(np.isfinite(v) and v > 0 for v in voxel):
        return StageGeometry.preset("isotropic")
    return StageGeometry.from_spacing(voxel)


def build_training_model(
    cfg: TrainConfig, geometry: StageGeometry | None = None
) -> tuple[torch.nn.Module, ResolvedWeights]:
    """The 2D or 3D UNet with seeded random init, encoder weights loaded strictly (inflated
    for 3D, with ``geometry``, default isotropic), frozen as configured. The input
    normalisation is the config's, else the encoder source's, else 0.5/0.5."""
    m = cfg.model
    if m.encoder == "random" and m.encoder_frozen:
        warnings.warn(
            "the encoder is random and frozen (--freeze-encoder): only the decoder learns, on features of "
            "random weights - a baseline, not a model to use; leave --freeze-encoder unset to train the encoder",
            stacklevel=2,
        )
    weights = resolve(m.encoder, m.arch)
    # Seeding right before construction makes every randomly initialised parameter the
    # same in every experiment with the same seed (as in the paper), whatever the source.
    torch.manual_seed(cfg.optim.seed)
    common = dict(
        weights=weights,
        freeze_encoder=m.encoder_frozen,
        arch=m.arch,
        num_classes=len(cfg.data.classes),
        mean=m.norm_mean,
        std=m.norm_std,
    )
    if m.dim == "3d":
        d3 = cfg.dim3d
        model = build_model(
            "unet3d",
            **common,
            inflate=d3.inflate,
            geometry=geometry,
            upsample=d3.upsample,
            decoder_channels=d3.decoder_channels,
        )
    else:
        model = build_model("unet2d", **common)
    return model, weights


def class_weights(optim: OptimConfig, classes: list[str], items: list[LabelledVolume]) -> np.ndarray | None:
    """Loss weights from the training labels (None for an unweighted loss).

    Always checks that every class occurs in the training labels: a class that never
    occurs points at a wrong threshold or label map, and cannot be learned.
    """
    counts = count_classes([it.labels for it in items], len(classes))
    missing = [f"{i} ({classes[i]})" for i in np.flatnonzero(counts == 0)]
    if missing:
        raise ValueError(
            f"class(es) {', '.join(missing)} have no pixels in the training labels "
            f"(pixel counts {counts.tolist()}); check classes, mask_threshold and label_map"
        )
    if optim.class_weights:
        return np.asarray(optim.class_weights, np.float32)
    mode = optim.class_weighting
    if mode == "auto":
        mode = "prevalence" if len(classes) > 2 else "none"
    if mode == "none":
        return None
    return prevalence_weights(counts, optim.background_classes, class_names=classes)


def validate(
    model: torch.nn.Module,
    items: list[LabelledVolume],
    num_classes: int,
    device: torch.device,
    amp: bool,
    batch_size: int = 8,
    window: tuple[int, int, int] = DEFAULT_WINDOW,
) -> dict:
    """IoU of the model on ``items`` (pixels pooled over all items).

    A 2D model predicts the xy slices; a :class:`UNet3D` predicts each volume by sliding
    windows of size ``window`` (z, y, x).
    """
    was_training = model.training
    cm = np.zeros((num_classes, num_classes), np.int64)
    try:
        if isinstance(model, UNet3D):
            for item in items:

                def score(z0: int, probs: np.ndarray, labels: np.ndarray = item.labels) -> None:
                    # Scored slab by slab, so a large validation volume needs no full-size probability array.
                    cm[:] += confusion_matrix(probs_to_classes(probs), labels[z0 : z0 + probs.shape[1]], num_classes)

                predict_sliding(model, item.image, window, batch_size=1, out=score, device=device, amp=amp)
        else:
            predictor = SlicePredictor(model, device, amp, tile=512, overlap=64, batch_size=batch_size)
            for item in items:
                for z0 in range(0, item.image.shape[0], 4):
                    x = item.image[z0 : z0 + 4].astype(np.float32) / np.float32(255.0)
                    probs = predictor(x).transpose(1, 0, 2, 3)
                    cm += confusion_matrix(probs_to_classes(probs), item.labels[z0 : z0 + 4], num_classes)
    finally:
        model.train(was_training)
    iou = iou_from_confusion(cm)
    fg = iou[1:][~np.isnan(iou[1:])]
    return {
        "iou": [None if np.isnan(v) else float(v) for v in iou],
        "mean_foreground_iou": float(fg.mean()) if fg.size else None,
    }


def validation_window(cfg: TrainConfig) -> tuple[int, int, int]:
    """3D validation windows: ``finetune predict``'s default, enlarged to the training crop."""
    crop = (cfg.dim3d.crop_depth, cfg.augment.crop, cfg.augment.crop)
    return tuple(max(a, b) for a, b in zip(DEFAULT_WINDOW, crop))  # type: ignore[return-value]


def training_samples(
    cfg: TrainConfig, items: list[LabelledVolume], geometry: StageGeometry | None = None
) -> torch.utils.data.Dataset:
    """2D crops (:class:`CropSamples`) or 3D sub-volumes (:class:`SubvolumeSamples`) of ``items``."""
    length = cfg.optim.iters * cfg.optim.batch_size
    if cfg.model.dim == "2d":
        return CropSamples(items, cfg.dim2d.planes, cfg.augment_2d(), cfg.optim.seed, length)
    flat = [it.name for it in items if it.image.shape[0] < 2]
    if flat:
        raise ValueError(
            f"dim 3d trains on volumes, but {', '.join(flat)} has a single slice; use dim 2d for 2D images"
        )
    # Elastic displacements along z would mix slices that an in-plane first stage keeps apart.
    elastic_z = geometry is None or geometry.kernel_depth[0] > 1
    crop = (cfg.dim3d.crop_depth, cfg.augment.crop, cfg.augment.crop)
    return SubvolumeSamples(items, crop, length, cfg.optim.seed, cfg.augment_3d(elastic_z))


def _save_checkpoint(run: Path, iteration: int, elapsed: float, model, optimizer, scheduler, scaler, cfg) -> None:
    save_checkpoint(
        {
            "iteration": iteration,
            "elapsed": elapsed,
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict(),
            "rng": capture_rng(),
            "config": config_to_dict(cfg),
        },
        run / CHECKPOINT,
    )


def _save_model(
    run: Path,
    model: torch.nn.Module,
    cfg: TrainConfig,
    weights: ResolvedWeights,
    iteration: int,
    elapsed: float,
    val: dict | None,
    name: str = MODEL,
) -> None:
    payload = {
        "state_dict": model.state_dict(),
        "model_config": model.config(),
        "classes": list(cfg.data.classes),
        "config": config_to_dict(cfg),
        "encoder_source": weights.source,
        "iterations": iteration,
        "seconds": elapsed,
        "val": val,
    }
    with atomic_path(run / name) as tmp:
        torch.save(payload, tmp)


def _best_logged(val_log: Path) -> float:
    """The best ``mean_foreground_iou`` in a run's ``val_log.csv`` (-inf when there is none):
    the score ``model_best.pth`` holds, so a resumed run keeps comparing against it."""
    if not val_log.is_file():
        return float("-inf")
    scores = []
    with open(val_log, newline="") as f:
        for row in csv.DictReader(f):
            try:
                scores.append(float(row["mean_foreground_iou"]))
            except (TypeError, ValueError):  # no foreground class scored at that validation
                continue
    return max((v for v in scores if v == v), default=float("-inf"))


def train(cfg: TrainConfig, run: str | Path, stop_at: int | None = None, progress: bool = True) -> TrainResult:
    """Train (or resume training) into the folder ``run``; see the module docstring.

    Args:
        cfg: the resolved config.
        run: run folder (created).
        stop_at: stop with a checkpoint once this many iterations are done (to split a
            run over several jobs); ``None``: train to ``cfg.optim.iters``.
        progress: show a tqdm bar.
    """
    run = Path(run)
    run.mkdir(parents=True, exist_ok=True)
    data, optim, runtime = cfg.data, cfg.optim, cfg.runtime
    device = select_device(runtime.device)
    amp = runtime.amp and device.type == "cuda"
    if device.type == "cuda":
        # Deterministic kernels: a resumed run must equal an uninterrupted one.
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True

    # Everything that can fail on bad input is checked before the first iteration.
    spec = data.label_spec()
    base = data.data_dir or None
    pairs = pair_files(data.images, data.masks, base)
    items = load_labelled(pairs, spec)
    val_items = (
        load_labelled(pair_files(data.val_images, data.val_masks, base, "val "), spec) if data.val_images else []
    )
    weights_np = class_weights(optim, data.classes, items)
    weights_t = torch.from_numpy(weights_np) if weights_np is not None else None
    geometry = resolve_geometry(cfg, pairs[0][0]) if cfg.model.dim == "3d" else None
    dataset = training_samples(cfg, items, geometry)
    model, enc = build_training_model(cfg, geometry)
    model.to(device)

    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=optim.lr, weight_decay=optim.weight_decay)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=optim.lr, total_steps=optim.iters)
    scaler = torch.amp.GradScaler("cuda", enabled=amp)

    start, elapsed, last_val = 0, 0.0, None
    ckpt_path = run / CHECKPOINT
    if ckpt_path.is_file():
        ckpt = read_checkpoint(ckpt_path)
        refuse_changed_resume(ckpt_path, ckpt["config"], config_to_dict(cfg), RESUME_SAFE_KEYS, run / "config.yaml")
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        scaler.load_state_dict(ckpt["scaler"])
        restore_rng(ckpt["rng"])
        start, elapsed = int(ckpt["iteration"]), float(ckpt["elapsed"])
        trim_csv(run / "train_log.csv", start)
        trim_csv(run / "val_log.csv", start)
    save_config(cfg, run / "config.yaml")
    stop = optim.iters if stop_at is None else max(start, min(optim.iters, stop_at))

    if start >= optim.iters and (run / MODEL).is_file():
        return TrainResult(run, start, True, elapsed, None)

    best = _best_logged(run / "val_log.csv")
    tb = torch_tensorboard.SummaryWriter(str(run / "tensorboard"), purge_step=start if start else None)
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=optim.batch_size,
        sampler=range(start * optim.batch_size, stop * optim.batch_size),
        num_workers=runtime.workers,
        pin_memory=device.type == "cuda",
    )
    bar = tqdm(
        total=optim.iters,
        initial=start,
        desc=f"train {runtime.name or run.name}",
        unit="it",
        disable=not progress,
        dynamic_ncols=True,
    )
    it = start
    t0 = time.perf_counter()
    val_header = ["iteration"] + [f"iou_{c}" for c in data.classes] + ["mean_foreground_iou"]
    try:
        model.train()
        for x, y in loader:
            x = x.to(device, non_blocking=True)
            y = y.to(device, non_blocking=True)
            with torch.autocast(device_type=device.type, dtype=torch.float16, enabled=amp):
                logits = model(x)
            loss = training_loss(logits, y, optim.loss, weights_t)
            optimizer_step(loss, optimizer, scaler)
            scheduler.step()
            it += 1
            bar.update(1)
            if it % runtime.log_every == 0 or it == stop:
                loss_v, lr_v = float(loss.detach()), float(scheduler.get_last_lr()[0])
                now = elapsed + time.perf_counter() - t0
                bar.set_postfix(loss=f"{loss_v:.4f}")
                tb.add_scalar("train/loss", loss_v, it)
                tb.add_scalar("train/lr", lr_v, it)
                append_csv(
                    run / "train_log.csv",
                    ["iteration", "loss", "lr", "seconds"],
                    [it, f"{loss_v:.6f}", f"{lr_v:.6g}", f"{now:.1f}"],
                )
            if it % runtime.checkpoint_every == 0 or it == stop:
                if val_items:
                    last_val = validate(model, val_items, len(data.classes), device, amp, window=validation_window(cfg))
                    for c, v in zip(data.classes, last_val["iou"]):
                        if v is not None:
                            tb.add_scalar(f"val/iou_{c}", v, it)
                    append_csv(
                        run / "val_log.csv",
                        val_header,
                        [it]
                        + [("" if v is None else f"{v:.5f}") for v in last_val["iou"]]
                        + [last_val["mean_foreground_iou"]],
                    )
                    score = last_val["mean_foreground_iou"]
                    if score is not None and score > best:  # the validation-selected model (ASEM's choice)
                        best = score
                        _save_model(run, model, cfg, enc, it, elapsed + time.perf_counter() - t0, last_val, BEST_MODEL)
                _save_checkpoint(run, it, elapsed + time.perf_counter() - t0, model, optimizer, scheduler, scaler, cfg)
    except KeyboardInterrupt:
        if it > start:
            _save_checkpoint(run, it, elapsed + time.perf_counter() - t0, model, optimizer, scheduler, scaler, cfg)
        bar.close()
        tb.close()
        raise
    bar.close()
    tb.close()
    elapsed += time.perf_counter() - t0
    finished = it >= optim.iters
    if finished:
        _save_model(run, model, cfg, enc, it, elapsed, last_val)
    return TrainResult(run, it, finished, elapsed, last_val)

"""``finetune train``: fine-tune a UNet-ResNet (2D, or 3D with inflated encoder weights) resumably.

Recipe (Conrad & Narayan 2021, "Benchmark segmentation tasks"): AdamW, one-cycle
learning rate with maximum 0.003, weight decay 0.1, batch 16, a fixed number of
iterations, BCE-with-logits for binary tasks and prevalence-weighted cross-entropy for
multi-class ones, seed 42, a pre-trained encoder frozen (including BatchNorm statistics) and a random one trained.

``dim: 3d`` keeps that recipe and swaps the model and the data: a
:class:`~finetune.models.unet3d.UNet3D` whose encoder holds the same 2D weights inflated
to 3D (:mod:`finetune.models.inflate`), trained on random ``crop_depth x crop x crop``
sub-volumes (:mod:`finetune.data3d`) with 3D augmentations (:mod:`finetune.augment3d`) and validated by
sliding-window prediction (:mod:`finetune.predict.sliding`). The network a run starts from
(encoder weights, or a whole trained model with ``init_model``, or Xie et al.'s RSUNet) is
built by :mod:`finetune.training_model`; crops can be filtered by ASEM's block rejection
(:mod:`finetune.sampling`) and training can stop early (``early_stop``).

A run folder ``RUN`` holds:

* ``config.yaml``: the resolved config;
* ``checkpoint.pth``: resumable state (model, optimizer, scheduler, AMP scaler, iteration,
  RNG states, elapsed time, config), written atomically every ``checkpoint_every``
  iterations, at ``stop_at`` and on Ctrl-C. Re-running the same command continues from it
  and ends with the same weights as an uninterrupted run: samples are a pure function of
  ``(seed, sample index)`` (:mod:`finetune.data`), so the data stream resumes exactly too;
* ``model.pth``: the final model (weights, what is needed to rebuild it, where its weights
  and data came from) and ``model_card.md``, the same in words;
* ``model_best.pth``: with validation data, the model of the validation with the best mean
  foreground IoU so far (``finetune predict RUN/model_best.pth`` uses it), as ASEM selects
  its model by validation score;
* ``train_log.csv``, ``val_log.csv``, ``tensorboard/``: loss, learning rate, validation IoU
  and cross-entropy.
"""

from __future__ import annotations

import csv
import dataclasses
import time
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
from finetune.config import RESUME_SAFE_KEYS, OptimConfig, TrainConfig
from finetune.data import CropSamples, LabelledVolume, load_labelled, pair_files
from finetune.data3d import SubvolumeSamples
from finetune.losses import count_classes, prevalence_weights, training_loss
from finetune.metrics import confusion_matrix, cross_entropy_sum, iou_from_confusion, probs_to_classes
from finetune.models import NETWORK_ARCHS
from finetune.models.geometry import StageGeometry
from finetune.models.transfer import read_saved_model
from finetune.predict.slices import SlicePredictor
from finetune.predict.sliding import DEFAULT_WINDOW, predict_sliding
from finetune.report import pick_slices, write_run_report
from finetune.sampling import SAMPLING_RULES
from finetune.training_model import ModelOrigin, build_training_model, resolve_geometry
from finetune.volumes import expand_patterns, open_volume

torch_tensorboard = lazy_import("torch.utils.tensorboard")

CHECKPOINT = "checkpoint.pth"
MODEL = "model.pth"
BEST_MODEL = "model_best.pth"
MODEL_CARD = "model_card.md"


@dataclass
class TrainResult:
    """Outcome of :func:`train`.

    Attributes:
        run: the run folder.
        iteration: iterations completed so far.
        finished: ``iteration == cfg.optim.iters``, or stopped early by ``early_stop``
            (``model.pth`` written).
        seconds: training wall time summed over all invocations of this run.
        val: last validation scores (``{"iou": {...}, "mean_foreground_iou": ...}``) or None.
    """

    run: Path
    iteration: int
    finished: bool
    seconds: float
    val: dict | None


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
    if mode in ("none", "balanced"):  # balanced weights come from each batch (training_loss)
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
    keep: dict[tuple[int, int], np.ndarray | None] | None = None,
) -> dict:
    """IoU and cross-entropy of the model on ``items`` (pixels pooled over all items).

    A 2D model predicts the xy slices; a 3D model predicts each volume by sliding
    windows of size ``window`` (z, y, x). ``loss`` is the unweighted cross-entropy of the
    blended probabilities over the labelled voxels (ASEM watches it to find the "fit" regime).
    ``keep``: ``{(item, z): None}`` slices whose predicted classes (uint8 ``[y, x]``) are filled
    in on the way (the report's overlays, at no extra cost).
    """
    was_training = model.training
    cm = np.zeros((num_classes, num_classes), np.int64)
    nll = np.zeros(2)  # sum of -log p(true class), labelled voxels

    def score(probs: np.ndarray, labels: np.ndarray, item: int = 0, z0: int = 0) -> None:
        classes = probs_to_classes(probs)
        cm[:] += confusion_matrix(classes, labels, num_classes)
        nll[:] += cross_entropy_sum(probs, labels)
        for i, z in keep or ():
            if i == item and z0 <= z < z0 + classes.shape[0]:
                keep[(i, z)] = classes[z - z0]

    try:
        if model.dim == 3:
            for i, item in enumerate(items):
                # Scored slab by slab, so a large validation volume needs no full-size probability array.
                predict_sliding(
                    model,
                    item.image,
                    window,
                    batch_size=1,
                    out=lambda z0, probs, labels=item.labels, i=i: score(
                        probs, labels[z0 : z0 + probs.shape[1]], i, z0
                    ),
                    device=device,
                    amp=amp,
                )
        else:
            predictor = SlicePredictor(model, device, amp, tile=512, overlap=64, batch_size=batch_size)
            for i, item in enumerate(items):
                for z0 in range(0, item.image.shape[0], 4):
                    x = item.image[z0 : z0 + 4].astype(np.float32) / np.float32(255.0)
                    score(predictor(x).transpose(1, 0, 2, 3), item.labels[z0 : z0 + 4], i, z0)
    finally:
        model.train(was_training)
    iou = iou_from_confusion(cm)
    fg = iou[1:][~np.isnan(iou[1:])]
    return {
        "iou": [None if np.isnan(v) else float(v) for v in iou],
        "mean_foreground_iou": float(fg.mean()) if fg.size else None,
        "loss": float(nll[0] / nll[1]) if nll[1] else None,
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
    rule = SAMPLING_RULES[cfg.augment.sampling]
    if cfg.model.dim == "2d":
        return CropSamples(items, cfg.dim2d.planes, cfg.augment_2d(), cfg.optim.seed, length, rule)
    flat = [it.name for it in items if it.image.shape[0] < 2]
    if flat:
        raise ValueError(
            f"dim 3d trains on volumes, but {', '.join(flat)} has a single slice; use dim 2d for 2D images"
        )
    # Elastic displacements along z would mix slices that an in-plane first stage keeps apart.
    elastic_z = geometry is None or geometry.kernel_depth[0] > 1
    crop = (cfg.dim3d.crop_depth, cfg.augment.crop, cfg.augment.crop)
    return SubvolumeSamples(items, crop, length, cfg.optim.seed, cfg.augment_3d(elastic_z), rule)


def region_masks(patterns: list[str], base: str | None, what: str = "") -> list[Path] | None:
    """The ``mask_volume`` files (globs expanded in order), or None when there are none."""
    return expand_patterns(patterns, base, what=f"{what}mask volumes") if patterns else None


def _save_checkpoint(
    run: Path, iteration: int, elapsed: float, model, optimizer, scheduler, scaler, cfg, early_stopped: bool = False
) -> None:
    save_checkpoint(
        {
            "iteration": iteration,
            "early_stopped": early_stopped,
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
    origin: ModelOrigin,
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
        "encoder_source": origin.encoder_source,
        "init_model": origin.init_model,
        "voxel_size": None if origin.voxel_size is None else list(origin.voxel_size),
        "iterations": iteration,
        "early_stopped": name == MODEL and iteration < cfg.optim.iters,
        "seconds": elapsed,
        "val": val,
    }
    with atomic_path(run / name) as tmp:
        torch.save(payload, tmp)
    if name == MODEL:
        with atomic_path(run / MODEL_CARD) as tmp:
            tmp.write_text(model_card(payload))


def model_card(payload: dict) -> str:
    """A short Markdown description of a saved model: task, network, data, origin, training."""
    cfg, mc = payload["config"], payload["model_config"]
    data = cfg.get("data", {})
    lines = [
        f"# {cfg.get('runtime', {}).get('name') or 'finetune model'}",
        "",
        f"- task: classes {', '.join(payload['classes'])}",
        f"- network: {mc['model']}"
        + (f" ({mc['arch']} encoder)" if mc["arch"] != mc["model"] else "")
        + f", input normalisation mean {mc['mean']:.4g} std {mc['std']:.4g} on [0, 1]",
        f"- training data: images {data.get('images')}, masks {data.get('masks')}"
        + (f" under {data['data_dir']}" if data.get("data_dir") else ""),
        f"- voxel size of the first training volume (z, y, x): {payload['voxel_size'] or 'not recorded in the file'}",
        f"- encoder weights: {payload['encoder_source']}",
    ]
    source = payload.get("init_model")
    while source:  # a chain of transfers, newest first
        lines.append(
            f"- started from the whole model {source['path']} (sha256 {source['sha256'][:12]}...; "
            f"classes {', '.join(source['classes'])}; trained on {source['images']}, "
            f"voxel size {source['voxel_size'] or 'not recorded'})"
        )
        source = source.get("init_model")
    val = payload.get("val") or {}
    score = val.get("mean_foreground_iou")
    lines += [
        f"- training: {payload['iterations']} iterations in {payload['seconds']:.0f} s"
        + (" (stopped early: validation stopped improving)" if payload["early_stopped"] else ""),
        f"- last validation mean foreground IoU: {score:.4f}" if score is not None else "- no validation data",
        "",
    ]
    return "\n".join(lines)


def _best_logged(val_log: Path) -> tuple[float, int]:
    """The best ``mean_foreground_iou`` in a run's ``val_log.csv`` (-inf when there is none),
    the score ``model_best.pth`` holds, and the number of validations logged after it: so a
    resumed run keeps comparing against it and counting towards ``early_stop``."""
    if not val_log.is_file():
        return float("-inf"), 0
    best, stale = float("-inf"), 0
    with open(val_log, newline="") as f:
        for row in csv.DictReader(f):
            try:
                score = float(row["mean_foreground_iou"])
            except (TypeError, ValueError):  # no foreground class scored at that validation
                score = float("nan")
            if score > best:
                best, stale = score, 0
            else:
                stale += 1
    return best, stale


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
    items = load_labelled(pairs, spec, region_masks(data.mask_volume, base))
    val_items = (
        load_labelled(
            pair_files(data.val_images, data.val_masks, base, "val "),
            spec,
            region_masks(data.val_mask_volume, base, "val "),
        )
        if data.val_images
        else []
    )
    weights_np = class_weights(optim, data.classes, items)
    weights_t = torch.from_numpy(weights_np) if weights_np is not None else None
    balanced = optim.class_weighting == "balanced" and not optim.class_weights
    source = read_saved_model(cfg.model.init_model) if cfg.model.init_model else None
    # (Whole networks such as RSUNet have no stage geometry: their kernels are fixed.)
    geometry = (
        resolve_geometry(cfg, pairs[0][0], source)
        if cfg.model.dim == "3d" and cfg.model.arch not in NETWORK_ARCHS
        else None
    )
    dataset = training_samples(cfg, items, geometry)
    model, origin = build_training_model(cfg, geometry, source)
    origin = dataclasses.replace(origin, voxel_size=open_volume(pairs[0][0]).voxel_size)
    model.to(device)

    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=optim.lr, weight_decay=optim.weight_decay)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=optim.lr, total_steps=optim.iters)
    scaler = torch.amp.GradScaler("cuda", enabled=amp)

    start, elapsed, last_val, shown = 0, 0.0, None, {}
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

    if (start >= optim.iters or ckpt_path.is_file() and ckpt.get("early_stopped")) and (run / MODEL).is_file():
        return TrainResult(run, start, True, elapsed, None)

    best, stale = _best_logged(run / "val_log.csv")
    early_stopped = False
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
    val_header = ["iteration"] + [f"iou_{c}" for c in data.classes] + ["mean_foreground_iou", "loss"]
    try:
        model.train()
        for x, y in loader:
            x = x.to(device, non_blocking=True)
            y = y.to(device, non_blocking=True)
            with torch.autocast(device_type=device.type, dtype=torch.float16, enabled=amp):
                logits = model(x)
            loss = training_loss(logits, y, optim.loss, weights_t, balanced)
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
                    shown = dict.fromkeys(pick_slices([item.labels for item in val_items]))
                    last_val = validate(
                        model, val_items, len(data.classes), device, amp, window=validation_window(cfg), keep=shown
                    )
                    for c, v in zip(data.classes, last_val["iou"]):
                        if v is not None:
                            tb.add_scalar(f"val/iou_{c}", v, it)
                    val_loss = "" if last_val["loss"] is None else f"{last_val['loss']:.6f}"
                    append_csv(
                        run / "val_log.csv",
                        val_header,
                        [it]
                        + [("" if v is None else f"{v:.5f}") for v in last_val["iou"]]
                        + [last_val["mean_foreground_iou"], val_loss],
                    )
                    if last_val["loss"] is not None:
                        tb.add_scalar("val/loss", last_val["loss"], it)
                    score = last_val["mean_foreground_iou"]
                    if score is not None and score > best:  # the validation-selected model (ASEM's choice)
                        best, stale = score, 0
                        now = elapsed + time.perf_counter() - t0
                        _save_model(run, model, cfg, origin, it, now, last_val, BEST_MODEL)
                    else:
                        stale += 1
                    early_stopped = bool(optim.early_stop) and stale >= optim.early_stop and it < optim.iters
                now = elapsed + time.perf_counter() - t0
                _save_checkpoint(run, it, now, model, optimizer, scheduler, scaler, cfg, early_stopped)
                if early_stopped:
                    break
    except KeyboardInterrupt:
        if it > start:
            _save_checkpoint(run, it, elapsed + time.perf_counter() - t0, model, optimizer, scheduler, scaler, cfg)
        bar.close()
        tb.close()
        raise
    bar.close()
    tb.close()
    elapsed += time.perf_counter() - t0
    finished = it >= optim.iters or early_stopped
    if finished:
        _save_model(run, model, cfg, origin, it, elapsed, last_val)
    _write_report(run, cfg, model, items, val_items, device, amp, it, origin, last_val, shown)
    return TrainResult(run, it, finished, elapsed, last_val)


def _write_report(
    run: Path,
    cfg: TrainConfig,
    model: torch.nn.Module,
    items: list[LabelledVolume],
    val_items: list[LabelledVolume],
    device: torch.device,
    amp: bool,
    iteration: int,
    origin: ModelOrigin,
    scores: dict | None,
    val_slices: dict[tuple[int, int], np.ndarray | None],
) -> Path:
    """``RUN/report.html``: curves, overlays and the last validation scores.

    The overlays of validation slices come from the last validation (``val_slices``, no extra
    prediction); without a validation set a 2D model predicts training slices (said so), and a
    3D model shows none (its sliding windows would cost minutes on a CPU).
    """
    if val_items and val_slices and all(v is not None for v in val_slices.values()):
        shown, predicted, heading = val_items, lambda item, z: val_slices[(item, z)], "Validation slices"
    elif val_items:
        shown, predicted, heading = val_items, None, "Validation slices: no validation in this invocation"
    elif model.dim == 2:
        shown, heading = items, "Training slices (no validation set: the model has seen these)"
        predicted = _slice_predictor(model, device, amp, items)
    else:
        shown, predicted, heading = items, None, "No overlays: a 3D run shows validation slices (--val-images)"
    start = f"model {origin.init_model['path']}" if origin.init_model else f"encoder {origin.encoder_source}"
    summary = {
        "network": f"{cfg.model.dim} {cfg.model.arch}",
        "started from": start,
        "iterations": f"{iteration} of {cfg.optim.iters}",
        "classes": ", ".join(cfg.data.classes),
        "training volumes": len(items),
        "validation volumes": len(val_items),
    }
    return write_run_report(
        run,
        f"finetune run {cfg.runtime.name or run.name}",
        summary,
        cfg.data.classes,
        [(item.name, item.image, item.labels) for item in shown],
        heading,
        predicted,
        scores=scores,
    )


def _slice_predictor(model, device: torch.device, amp: bool, items: list[LabelledVolume]):
    """``(item, z) -> uint8[y, x]`` classes of one slice of ``items`` by a 2D ``model`` (in eval mode)."""
    predictor = SlicePredictor(model, device, amp, tile=512, overlap=64, batch_size=4)

    def predicted(item: int, z: int) -> np.ndarray:
        x = items[item].image[z : z + 1].astype(np.float32) / np.float32(255.0)
        was_training = model.training
        model.eval()
        try:
            return probs_to_classes(predictor(x).transpose(1, 0, 2, 3))[0]
        finally:
            model.train(was_training)

    return predicted

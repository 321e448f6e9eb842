"""The MoCoV2 training loop: resumable, exact, one process or many.

:func:`plan_run` checks everything cheap (store, batch split, config against an existing
checkpoint) before processes are started; :func:`train` then runs on every rank. A run resumes
from ``RUN/checkpoint.pth`` when it exists and continues exactly as an uninterrupted run would:
the data order and every augmentation are pure functions of ``(seed, epoch, position)``, the
shuffle-BN permutation of ``(seed, step)``, and the checkpoint carries the weights, momentum
encoder, queue and pointer, optimizer, grad scaler, step and every rank's RNG states.
(On CUDA, cuDNN's autotuned kernels are not bitwise deterministic, so resumed GPU runs agree
to float tolerance rather than bit for bit.)
"""

from __future__ import annotations

import hashlib
import math
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from cemcurate.common.archs import get_arch
from cemcurate.common.atomic import atomic_path
from cemcurate.common.config import config_to_dict, save_config
from cemcurate.common.runstate import (
    CheckpointError,
    capture_rng,
    git_commit,
    optimizer_step,
    refuse_changed_resume,
    restore_rng,
    save_checkpoint,
)
from pretrain import distributed
from pretrain.augment import AugmentParams
from pretrain.checkpoint import CHECKPOINT_FORMAT, CHECKPOINT_VERSION, load_checkpoint
from pretrain.config import RESUMABLE_CHANGES, MocoConfig
from pretrain.data import ViewPairs, data_summary, epoch_order, open_store, steps_per_epoch, view_loader
from pretrain.moco import MoCo, MocoOutput
from pretrain.runlog import RunLog

CHECKPOINT_NAME = "checkpoint.pth"


def lr_at(cfg: MocoConfig, step: int, steps_in_epoch: int) -> float:
    """Learning rate for optimizer step ``step`` (0-based).

    ``step`` schedule: ``base_lr`` divided by 10 for each milestone epoch already reached.
    ``cosine``: ``base_lr * (1 + cos(pi * t)) / 2`` with ``t`` the fraction of all epochs done.
    ``base_lr = lr * batch_size / lr_batch``.
    """
    epoch = step / steps_in_epoch
    if cfg.lr_schedule == "cosine":
        return cfg.base_lr * 0.5 * (1.0 + math.cos(math.pi * min(epoch / cfg.epochs, 1.0)))
    return cfg.base_lr * 0.1 ** sum(1 for m in cfg.lr_milestones if int(epoch) >= m)


def shuffle_seed(seed: int, step: int) -> int:
    """Seed of the shuffle-BN permutation of ``step``: identical on every rank, new every step."""
    return (seed * 1_000_003 + step) % (2**63 - 1)


@dataclass
class RunPlan:
    """What a run will do, worked out before any process starts."""

    n_patches: int
    steps_per_epoch: int
    total_steps: int
    start_step: int
    resume_from: Path | None
    data: dict
    notes: list[str]  # things rank 0 should tell the user before training (e.g. why a resume is not exact)


def order_fingerprint(n: int, seed: int, epoch: int) -> str:
    """Short hash of an epoch's data order, to notice if a library update changed it under a resumed run."""
    return hashlib.sha256(epoch_order(n, seed, epoch).astype("<i8").tobytes()).hexdigest()[:16]


def plan_run(cfg: MocoConfig, data_dir: str | Path, run_dir: str | Path, world_size: int, use_cuda: bool) -> RunPlan:
    """Validate a run before heavy work; raise ``ValueError`` subclasses that name the problem.

    Checks the backbone name, that the global batch splits evenly over ``world_size``
    processes, the store (exists, non-empty, fills a batch), CUDA-only options, and, if
    ``RUN/checkpoint.pth`` exists, that it is readable and compatible with ``cfg``.
    """
    run_dir = Path(run_dir)
    get_arch(cfg.arch)  # an arch every later stage (export, 2D and 3D fine-tuning) supports
    if cfg.batch_size % world_size:
        raise ValueError(f"global --batch-size {cfg.batch_size} does not split evenly over {world_size} processes")
    if cfg.key_bn == "sync" and not use_cuda:
        raise ValueError("--key-bn sync needs CUDA (SyncBatchNorm has no CPU implementation); use --key-bn shuffle")
    store = open_store(data_dir, cfg.batch_size)
    summary = data_summary(store, data_dir)
    per_epoch = steps_per_epoch(len(store), cfg.batch_size)
    total = cfg.epochs * per_epoch if cfg.max_steps is None else min(cfg.max_steps, cfg.epochs * per_epoch)
    ckpt_path = run_dir / CHECKPOINT_NAME
    start, resume, notes = 0, None, []
    if ckpt_path.exists():
        ckpt = load_checkpoint(ckpt_path)
        refuse_changed_resume(
            ckpt_path, ckpt["config"], config_to_dict(cfg), RESUMABLE_CHANGES, run_dir / "config.yaml"
        )
        if ckpt["data"]["n_patches"] != len(store):
            raise CheckpointError(
                f"{ckpt_path}: was trained on {ckpt['data']['n_patches']} patches from {ckpt['data']['path']}, "
                f"but {data_dir} holds {len(store)}; resuming would change the data order. Use a new --out"
            )
        start, resume = int(ckpt["step"]), ckpt_path
        if ckpt["world_size"] != world_size:
            notes.append(
                f"the checkpoint was written by {ckpt['world_size']} process(es), this run has {world_size}: "
                "the images and views of every step stay the same, but BatchNorm batches and per-rank "
                "RNG streams change, so the run will not match an uninterrupted one bit for bit"
            )
        saved_order = ckpt.get("data_order", {})
        if saved_order.get("fingerprint") not in (None, order_fingerprint(len(store), cfg.seed, saved_order["epoch"])):
            notes.append(
                "the data order of the checkpoint's epoch differs from what this installation computes "
                "(numpy changed?); training continues with the new order"
            )
    return RunPlan(
        n_patches=len(store),
        steps_per_epoch=per_epoch,
        total_steps=total,
        start_step=start,
        resume_from=resume,
        data=summary,
        notes=notes,
    )


def build_model(cfg: MocoConfig, ctx: distributed.DistContext) -> MoCo:
    """The MoCo model on ``ctx.device``, initialised identically on every rank from ``cfg.seed``."""
    torch.manual_seed(cfg.seed)
    model = MoCo(
        cfg.arch,
        feature_dim=cfg.feature_dim,
        queue_size=cfg.queue_size,
        key_momentum=cfg.key_momentum,
        temperature=cfg.temperature,
        mlp=cfg.mlp,
        in_chans=1,
        shuffle_bn=cfg.key_bn == "shuffle",
        key_bn_groups=cfg.key_bn_groups,
    )
    if cfg.key_bn == "sync" and ctx.world_size > 1:
        model.encoder_q = nn.SyncBatchNorm.convert_sync_batchnorm(model.encoder_q)
        model.encoder_k = nn.SyncBatchNorm.convert_sync_batchnorm(model.encoder_k)
    model = model.to(ctx.device)
    if ctx.device.type == "cuda" and cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def train_step(
    model: MoCo,
    query_net: nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    im_q: torch.Tensor,
    im_k: torch.Tensor,
    lr: float,
    seed: int,
    amp: bool,
) -> MocoOutput:
    """One optimizer step at learning rate ``lr`` on views ``im_q``/``im_k`` (``(n, 1, S, S)``, on the device)."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    with torch.autocast(device_type=im_q.device.type, dtype=torch.float16, enabled=amp):
        out = model(im_q, im_k, shuffle_seed=seed, query_net=query_net)
    optimizer_step(out.loss, optimizer, scaler)
    return out


@dataclass
class TrainResult:
    model: MoCo
    step: int
    checkpoint: Path
    last_loss: float | None


def train(
    cfg: MocoConfig,
    data_dir: str | Path,
    run_dir: str | Path,
    ctx: distributed.DistContext,
    plan: RunPlan | None = None,
) -> TrainResult:
    """Train (or resume) MoCoV2 on the store in ``data_dir``, writing to ``run_dir``; run on every rank."""
    run_dir, data_dir = Path(run_dir), Path(data_dir)
    use_cuda = ctx.device.type == "cuda"
    plan = plan or plan_run(cfg, data_dir, run_dir, ctx.world_size, use_cuda)
    amp = cfg.amp and use_cuda
    if use_cuda:
        torch.backends.cudnn.benchmark = True

    model = build_model(cfg, ctx)
    optimizer = torch.optim.SGD(
        model.query_parameters(), lr=cfg.base_lr, momentum=cfg.sgd_momentum, weight_decay=cfg.weight_decay
    )
    scaler = torch.amp.GradScaler("cuda", enabled=amp)
    # Per-rank global RNG streams (nothing in the loop should need them, but any library code
    # that does draws differently on each rank and is restored exactly on resume).
    _seed_globals(cfg.seed + 1 + ctx.rank)
    ckpt_path = run_dir / CHECKPOINT_NAME
    if plan.resume_from is not None:
        ckpt = load_checkpoint(plan.resume_from)
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scaler.load_state_dict(ckpt["scaler"])
        if ckpt["world_size"] == ctx.world_size:
            restore_rng(ckpt["rng"][ctx.rank])
        del ckpt

    query_net: nn.Module = model.query_branch()
    if ctx.world_size > 1:
        # Only the query branch is trained; DDP averages its gradients and (by default) copies
        # rank 0's BatchNorm statistics to the others before each forward. The key encoder and
        # the 32 MB queue stay out of DDP, which would otherwise broadcast them every step.
        query_net = nn.parallel.DistributedDataParallel(query_net, device_ids=[ctx.device.index] if use_cuda else None)

    if ctx.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
    log = RunLog(run_dir, ctx.is_main, plan.start_step, plan.total_steps, tensorboard=cfg.tensorboard)
    if ctx.is_main:
        save_config(cfg, run_dir / "config.yaml")
        if plan.resume_from is not None:
            log.message(f"resuming {plan.resume_from} at step {plan.start_step} of {plan.total_steps}")
            if plan.start_step >= plan.total_steps:
                log.message("nothing to do: the run has reached its last step (raise --epochs or --max-steps)")
        for note in plan.notes:
            log.message(f"note: {note}")
    params = AugmentParams.from_config(cfg)
    per_epoch, total = plan.steps_per_epoch, plan.total_steps
    step, saved_step, last_loss = plan.start_step, plan.start_step, None
    images_per_step = cfg.batch_size
    window = torch.zeros(2, device=ctx.device)  # running sums of loss and top-1 accuracy
    window_steps, window_t0 = 0, time.perf_counter()

    def checkpoint() -> None:
        nonlocal saved_step
        _write_checkpoint(ckpt_path, cfg, model, optimizer, scaler, step, per_epoch, ctx, plan.data)
        saved_step = step

    dataset = ViewPairs(data_dir, cfg.seed, cfg.batch_size, ctx.rank, ctx.world_size, params)
    try:
        model.train()
        for im_q, im_k in view_loader(dataset, step, total, cfg.workers, pin_memory=use_cuda):
            im_q = im_q.to(ctx.device, non_blocking=True)
            im_k = im_k.to(ctx.device, non_blocking=True)
            if use_cuda and cfg.channels_last:
                im_q = im_q.contiguous(memory_format=torch.channels_last)
                im_k = im_k.contiguous(memory_format=torch.channels_last)
            lr = lr_at(cfg, step, per_epoch)
            out = train_step(model, query_net, optimizer, scaler, im_q, im_k, lr, shuffle_seed(cfg.seed, step), amp)
            step += 1
            window += torch.stack([out.loss.detach().float(), (out.logits.argmax(1) == 0).float().mean()])
            window_steps += 1
            log.step()
            epoch_end = step % per_epoch == 0
            if step % cfg.log_every == 0 or step == total or epoch_end:
                loss, acc = (distributed.all_reduce_mean(window) / window_steps).tolist()
                elapsed = time.perf_counter() - window_t0
                log.log(step, step / per_epoch, loss, acc, lr, window_steps * images_per_step / max(elapsed, 1e-9))
                last_loss = loss
                window.zero_()
                window_steps, window_t0 = 0, time.perf_counter()
            if epoch_end or (cfg.checkpoint_every and step % cfg.checkpoint_every == 0):
                checkpoint()
            if epoch_end and cfg.snapshot_every and (step // per_epoch) % cfg.snapshot_every == 0 and ctx.is_main:
                with atomic_path(run_dir / f"checkpoint_epoch{step // per_epoch:04d}.pth") as tmp:
                    shutil.copyfile(ckpt_path, tmp)
        if saved_step != step:
            checkpoint()
    finally:
        log.close()
    return TrainResult(model=model, step=step, checkpoint=ckpt_path, last_loss=last_loss)


def _seed_globals(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _write_checkpoint(
    path: Path,
    cfg: MocoConfig,
    model: MoCo,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    step: int,
    per_epoch: int,
    ctx: distributed.DistContext,
    data: dict,
) -> None:
    """Gather every rank's RNG state and let rank 0 write the checkpoint atomically."""
    rng = distributed.all_gather_object(capture_rng())  # collective: every rank takes part
    if not ctx.is_main:
        return
    state = {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "config": config_to_dict(cfg),
        "arch": cfg.arch,
        "in_chans": 1,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict(),
        "scheduler": {"kind": cfg.lr_schedule, "base_lr": cfg.base_lr, "lr": lr_at(cfg, step, per_epoch)},
        "step": step,
        "epoch": step // per_epoch,
        "step_in_epoch": step % per_epoch,
        "steps_per_epoch": per_epoch,
        "world_size": ctx.world_size,
        "rng": rng,
        # The order itself is a pure function of (seed, epoch); the fingerprint detects if it changed.
        "data_order": {
            "seed": cfg.seed,
            "epoch": step // per_epoch,
            "step_in_epoch": step % per_epoch,
            "fingerprint": order_fingerprint(data["n_patches"], cfg.seed, step // per_epoch),
        },
        "data": data,
        "git_commit": git_commit(),
        "torch_version": str(torch.__version__),  # TorchVersion would need an unsafe load
    }
    save_checkpoint(state, path)

"""Two-process DDP (gloo, CPU) MoCo on real EM patches: the queue, rank agreement, learning, exact resume."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_pretrain_data import build_real_store, real_patches

from pretrain import distributed
from pretrain.checkpoint import load_checkpoint
from pretrain.cli import main
from pretrain.config import MocoConfig
from pretrain.moco import EmbeddingBranch, MoCo
from pretrain.train import train

pytestmark = [
    pytest.mark.slow,
    pytest.mark.usefixtures("one_torch_thread"),
]  # trains small models (still part of the default suite)

# Small and fast, and chosen so a couple dozen steps reliably learn: a queue of 16 fills with
# real keys after two steps, and temperature 0.07 with key momentum 0.99 let the query encoder
# pull its positives apart from the (at first very similar) queue keys.
SETTINGS = dict(
    arch="resnet18",
    image_size=64,
    batch_size=8,
    queue_size=16,
    temperature=0.07,
    key_momentum=0.99,
    lr=0.03,
    lr_batch=8,
    seed=42,
    workers=0,
    log_every=1,
    checkpoint_every=0,
    snapshot_every=1,
    tensorboard=False,
)
TOTAL_STEPS = 16  # 6 steps per epoch on 48 patches: crosses the epoch ends at steps 6 and 12


def _flags(settings: dict) -> list[str]:
    """The CLI flags that set ``settings``."""
    flags = []
    for key, value in settings.items():
        name = key.replace("_", "-")
        flags.append((f"--{name}" if value else f"--no-{name}") if isinstance(value, bool) else f"--{name}={value}")
    return flags


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory, data_root) -> Path:
    return build_real_store(tmp_path_factory.mktemp("store"), data_root)


def _one_step(ctx: distributed.DistContext, images: torch.Tensor) -> dict:
    """One MoCo forward on this rank's 4 of ``images`` (keys: the same images flipped)."""
    torch.manual_seed(0)
    model = MoCo("resnet18", feature_dim=16, queue_size=32, key_momentum=0.999, temperature=0.2)
    initial_queue = model.queue.clone()
    local = images[ctx.rank * 4 : (ctx.rank + 1) * 4]
    out = model(local, local.flip(-1), shuffle_seed=123)
    return {"keys": out.keys, "queue": model.queue, "ptr": int(model.queue_ptr), "initial_queue": initial_queue}


def _ddp_jobs(ctx: distributed.DistContext, images: torch.Tensor, store: Path, split_run: Path, run: Path) -> dict:
    """The jobs of every test here, in one launch (starting two processes costs more than any job):
    one MoCo step, the first 3 steps of the interrupted run, the uninterrupted run."""
    one_step = _one_step(ctx, images)
    train(MocoConfig(**SETTINGS, max_steps=3), store, split_run, ctx)
    result = train(MocoConfig(**SETTINGS, max_steps=TOTAL_STEPS), store, run, ctx)
    return {
        "one_step": one_step,
        "params": {k: v.detach().clone() for k, v in result.model.named_parameters()},
        "queue": result.model.queue.clone(),
        "queue_ptr": int(result.model.queue_ptr),
    }


def _eight_images(data_root: Path) -> torch.Tensor:
    """8 real patches (VNC and FIB-SEM), 64 x 64 centre crops, standardised: float32 (8, 1, 64, 64)."""
    patches = np.concatenate(list(real_patches(data_root, vnc_slices=1, neuroproof_slices=4).values()))[::2][:8]
    images = torch.from_numpy(patches[:, None, 80:144, 80:144].astype(np.float32) / 255.0)
    return (images - images.mean()) / images.std()


@pytest.fixture(scope="module")
def reference(store_dir, data_root, tmp_path_factory) -> tuple[Path, list[dict]]:
    """An uninterrupted 2-process run of TOTAL_STEPS steps: its folder and each rank's results."""
    run = tmp_path_factory.mktemp("reference")
    split = tmp_path_factory.mktemp("split") / "run"
    ranks = distributed.launch(_ddp_jobs, 2, args=(_eight_images(data_root), store_dir, split, run))
    for r in ranks:
        r["split_run"] = split
    return run, ranks


def _log(run: Path) -> list[dict]:
    with open(run / "log.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_ranks_agree_and_loss_goes_down(reference):
    run, ranks = reference
    assert len(ranks) == 2
    # DDP keeps the trained parameters identical; the momentum encoder follows them identically.
    assert ranks[0]["params"].keys() == ranks[1]["params"].keys()
    assert any(k.startswith("encoder_k.") for k in ranks[0]["params"])
    for name, value in ranks[0]["params"].items():
        assert torch.equal(value, ranks[1]["params"][name]), name
    # Every rank enqueued the same gathered keys.
    assert torch.equal(ranks[0]["queue"], ranks[1]["queue"])
    assert ranks[0]["queue_ptr"] == ranks[1]["queue_ptr"] == (TOTAL_STEPS * 8) % 16

    rows = _log(run)
    assert [int(r["step"]) for r in rows] == list(range(1, TOTAL_STEPS + 1))
    losses = [float(r["loss"]) for r in rows]
    # Steps 1-2 still score against the random initial queue; from step 3 on it holds real keys.
    start, end = np.mean(losses[2:6]), np.mean(losses[-4:])
    assert end < start - 0.1, losses
    assert end < math.log(1 + 16)  # below chance for 16 negatives

    ckpt = load_checkpoint(run / "checkpoint.pth")
    assert ckpt["step"] == TOTAL_STEPS and ckpt["world_size"] == 2 and len(ckpt["rng"]) == 2
    assert torch.equal(ckpt["model"]["queue"], ranks[0]["queue"])


def test_resume_continues_exactly(reference, store_dir):
    """3 steps, processes end, then `pretrain moco` resumes to 6 == 6 steps uninterrupted.

    The interruption is mid-epoch (6 steps per epoch); the reference is the uninterrupted
    run's end-of-epoch-1 snapshot. The resumed command changes a resumable setting.
    """
    ref_run, ranks = reference
    run = ranks[0]["split_run"]
    half = load_checkpoint(run / "checkpoint.pth")
    assert half["step"] == 3 and half["step_in_epoch"] == 3 and half["epoch"] == 0
    base = ["moco", "--data", str(store_dir), "--out", str(run), "--gpus", "0", "--nproc", "2", *_flags(SETTINGS)]
    assert main(base + ["--max-steps=6", "--checkpoint-every=2"]) == 0

    resumed, uninterrupted = (
        load_checkpoint(run / "checkpoint.pth"),
        load_checkpoint(ref_run / "checkpoint_epoch0001.pth"),
    )
    assert resumed["step"] == uninterrupted["step"] == 6
    assert resumed["model"].keys() == uninterrupted["model"].keys()
    for name, value in uninterrupted["model"].items():
        assert torch.equal(resumed["model"][name], value), name
    for a, b in zip(resumed["optimizer"]["state"].values(), uninterrupted["optimizer"]["state"].values()):
        assert torch.equal(a["momentum_buffer"], b["momentum_buffer"])
    # The log reads as one run: the same losses, step for step.
    assert [r["loss"] for r in _log(run)] == [r["loss"] for r in _log(ref_run)][:6]


def test_queue_receives_keys_of_both_ranks_after_shuffle_bn(reference, data_root):
    images = _eight_images(data_root)
    ranks = [r["one_step"] for r in reference[1]]

    queue = ranks[0]["queue"]
    assert torch.equal(queue, ranks[1]["queue"]) and ranks[0]["ptr"] == ranks[1]["ptr"] == 8
    # Rows 0-3 are rank 0's keys, rows 4-7 rank 1's; the rest of the queue is untouched.
    assert torch.equal(queue[:4], ranks[0]["keys"]) and torch.equal(queue[4:8], ranks[1]["keys"])
    assert torch.equal(queue[8:], ranks[0]["initial_queue"][8:])

    # Recompute the keys in one process the way shuffle-BN must produce them: the 8 key images
    # permuted with the step's seed, each rank's 4 through the key encoder (BatchNorm over those
    # 4 only), then put back in the original order.
    torch.manual_seed(0)
    model = MoCo("resnet18", feature_dim=16, queue_size=32, key_momentum=0.999, temperature=0.2)
    model.update_key_encoder()
    key_images = torch.cat([images[:4].flip(-1), images[4:].flip(-1)])
    perm = torch.randperm(8, generator=torch.Generator().manual_seed(123))
    branch = EmbeddingBranch(model.encoder_k, model.head_k).train()
    shuffled_keys = torch.cat([branch(key_images[perm[:4]]), branch(key_images[perm[4:]])]).detach()
    expected = torch.empty_like(shuffled_keys)
    expected[perm] = shuffled_keys
    assert torch.allclose(queue[:8], expected, atol=1e-5)
    # Without the shuffle each rank's BatchNorm would see its own 4 images: different keys.
    unshuffled = torch.cat([branch(key_images[:4]), branch(key_images[4:])]).detach()
    assert not torch.allclose(queue[:8], unshuffled, atol=1e-3)
    assert torch.allclose(queue[:8].norm(dim=1), torch.ones(8), atol=1e-5)
    assert not torch.allclose(F.normalize(queue[:4], dim=1), F.normalize(queue[4:8], dim=1))

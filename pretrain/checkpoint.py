"""Training checkpoints: atomic writes, validated reads, RNG state capture.

A checkpoint (``RUN/checkpoint.pth``) is a dict of tensors and plain Python values, so it loads
with ``torch.load(..., weights_only=True)`` (no pickled code runs when reading it)::

    format, version            "cem-toolkit/moco-checkpoint", 1
    config                     resolved MocoConfig as a dict
    arch, in_chans             backbone name and input channels
    model                      MoCo state dict (encoder_q.*, head_q.*, encoder_k.*, head_k.*, queue, queue_ptr)
    optimizer, scaler          SGD and AMP grad-scaler state dicts
    scheduler                  {"kind", "base_lr", "lr"}: the schedule is a pure function of the step
    step, epoch, step_in_epoch optimizer steps done; where the next step lies
    steps_per_epoch, world_size
    rng                        per rank: python, numpy, torch (and cuda) generator states
    data_order                 seed, epoch, step_in_epoch and a fingerprint of the epoch's order
    data                       store path, patch count, mean/std, patches per source
    git_commit, torch_version
"""

from __future__ import annotations

import random
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cemcurate.common.atomic import atomic_path

CHECKPOINT_FORMAT = "cem-toolkit/moco-checkpoint"
CHECKPOINT_VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint file is missing, unreadable or not one this toolkit wrote."""


def save_checkpoint(state: dict[str, Any], path: str | Path) -> None:
    """Write ``state`` to ``path`` atomically (a crash leaves the previous checkpoint intact)."""
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def read_checkpoint_file(path: str | Path) -> Any:
    """``torch.load`` a file safely (tensors and plain values only), with errors that name it."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated zips, foreign pickles and random bytes raise many types
        raise CheckpointError(
            f"{path}: cannot read checkpoint ({type(exc).__name__}: {_reason(exc)}); "
            "the file is truncated, corrupt or not a PyTorch checkpoint. To resume, restore it from a "
            "snapshot (checkpoint_epochNNNN.pth) or delete it to start the run over") from exc


def _reason(exc: Exception) -> str:
    """The informative line of a torch.load error (weights-only errors bury it under advice)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    for line in lines:
        if "Unsupported global" in line or "WeightsUnpickler error" in line:
            return line[:300]
    return lines[0][:300] if lines else "no message"


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read one of our MoCo checkpoints and check its format; tensors land on the CPU."""
    state = read_checkpoint_file(path)
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path}: not a `pretrain moco` checkpoint (no format marker {CHECKPOINT_FORMAT!r}); "
                              "for a released CEM500K checkpoint use `pretrain export --from-cem500k`")
    if state.get("version") != CHECKPOINT_VERSION:
        raise CheckpointError(f"{path}: checkpoint version {state.get('version')} is not supported "
                              f"(this toolkit reads version {CHECKPOINT_VERSION})")
    missing = [k for k in ("config", "model", "optimizer", "step", "rng", "data") if k not in state]
    if missing:
        raise CheckpointError(f"{path}: checkpoint lacks {missing}; it was not written by `pretrain moco`")
    return state


def capture_rng() -> dict[str, Any]:
    """This process's python, numpy, torch (and CUDA) generator states, as loadable plain values."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss = random.getstate()
    state = {
        "python": {"version": version, "state": list(internal), "gauss": gauss},
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng`."""
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss"]))
    npy = state["numpy"]
    np.random.set_state((npy["kind"], npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"],
                         npy["cached"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def git_commit() -> str:
    """The toolkit's git commit (``<sha>`` or ``<sha>-dirty``), or ``"unknown"`` outside a checkout."""
    repo = Path(__file__).resolve().parents[1]
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True,
                             timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"{sha}-dirty" if dirty else sha

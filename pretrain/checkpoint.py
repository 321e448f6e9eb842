"""The ``pretrain moco`` checkpoint: its layout and the check that a file is one.

Writing, reading, RNG capture and the resume check are the shared run-state toolkit
(:mod:`cemcurate.common.runstate`); this module only knows what a MoCo checkpoint holds.
A checkpoint (``RUN/checkpoint.pth``) is a dict of tensors and plain Python values, so it
loads with ``torch.load(..., weights_only=True)`` (no pickled code runs when reading it)::

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

from pathlib import Path
from typing import Any

from cemcurate.common.runstate import CheckpointError, read_checkpoint

CHECKPOINT_FORMAT = "cem-toolkit/moco-checkpoint"
CHECKPOINT_VERSION = 1


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read one of our MoCo checkpoints and check its format; tensors land on the CPU."""
    state = read_checkpoint(path)
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(
            f"{path}: not a `pretrain moco` checkpoint (no format marker {CHECKPOINT_FORMAT!r}); "
            "for a released CEM500K checkpoint use `pretrain export --from-cem500k`"
        )
    if state.get("version") != CHECKPOINT_VERSION:
        raise CheckpointError(
            f"{path}: checkpoint version {state.get('version')} is not supported "
            f"(this toolkit reads version {CHECKPOINT_VERSION})"
        )
    missing = [k for k in ("config", "model", "optimizer", "step", "rng", "data") if k not in state]
    if missing:
        raise CheckpointError(f"{path}: checkpoint lacks {missing}; it was not written by `pretrain moco`")
    return state

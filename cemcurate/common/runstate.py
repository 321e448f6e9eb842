"""What the three resumable training loops share: checkpoints, RNG states, the resume check,
CSV logs, the AMP optimiser step and the code version.

The loops (``pretrain/train.py``, ``finetune/train.py``, ``cemcurate/filtering/train.py``)
stay explicit, in the manner of facebookresearch/moco's ``main_moco.py``; only this plumbing
is shared:

* :func:`save_checkpoint` / :func:`read_checkpoint`: ``torch.save`` written atomically (a
  crash leaves the previous checkpoint), read back with ``weights_only=True`` (no pickled
  code runs) and errors that name the file;
* :func:`capture_rng` / :func:`restore_rng`: python, numpy, torch and CUDA generator states
  as plain values that survive a weights-only load;
* :func:`resume_changes` / :func:`refuse_changed_resume`: which settings differ between a
  checkpoint and the command that resumes it, minus those a loop declares safe to change;
* :func:`trim_csv` / :func:`append_csv`: logs whose first column is the step, trimmed on
  resume so they read as one uninterrupted run;
* :func:`optimizer_step`: zero the gradients, backward through the AMP grad scaler, step;
* :func:`git_commit`: the toolkit's commit, recorded in checkpoints and model cards.
"""

from __future__ import annotations

import csv
import random
import subprocess
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np
import torch

from cemcurate.common.atomic import atomic_path
from cemcurate.common.config import flat_config


class CheckpointError(ValueError):
    """A checkpoint file is missing, unreadable, of another kind, or does not fit the run."""


def save_checkpoint(state: Mapping[str, Any], path: str | Path) -> None:
    """``torch.save(state)`` to ``path`` atomically (a crash leaves the previous file intact)."""
    with atomic_path(path) as tmp:
        torch.save(dict(state), tmp)


def read_checkpoint(path: str | Path) -> Any:
    """``torch.load`` a file safely (tensors and plain values only) onto the CPU, with errors that name it."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated zips, foreign pickles and random bytes raise many types
        raise CheckpointError(
            f"{path}: cannot read checkpoint ({type(exc).__name__}: {_reason(exc)}); "
            "the file is truncated, corrupt or not a PyTorch checkpoint. To resume, restore it from a "
            "snapshot or delete it to start the run over"
        ) from exc


def _reason(exc: Exception) -> str:
    """The informative line of a torch.load error (weights-only errors bury it under advice)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    for line in lines:
        if "Unsupported global" in line or "WeightsUnpickler error" in line:
            return line[:300]
    return lines[0][:300] if lines else "no message"


def capture_rng() -> dict[str, Any]:
    """This process's python, numpy, torch (and CUDA) generator states, as loadable plain values."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss = random.getstate()
    state = {
        "python": {"version": version, "state": list(internal), "gauss": gauss},
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached": float(cached),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: Mapping[str, Any]) -> None:
    """Inverse of :func:`capture_rng`."""
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss"]))
    npy = state["numpy"]
    np.random.set_state(
        (npy["kind"], npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"], npy["cached"])
    )
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def resume_changes(
    saved: Mapping[str, Any], current: Mapping[str, Any], may_change: Iterable[str]
) -> dict[str, tuple[Any, Any]]:
    """``{key: (saved, current)}`` for the settings that differ and must not.

    ``saved`` and ``current`` are config dicts (:func:`~cemcurate.common.config.config_to_dict`,
    nested by section or flat); ``may_change`` lists the keys a run declares safe to change
    on resume (logging cadence, hardware). A key present on one side only counts as changed.
    """
    a, b = flat_config(saved), flat_config(current)
    allowed = set(may_change)
    return {k: (a.get(k), b.get(k)) for k in sorted((set(a) | set(b)) - allowed) if a.get(k) != b.get(k)}


def refuse_changed_resume(
    checkpoint: Path,
    saved: Mapping[str, Any],
    current: Mapping[str, Any],
    may_change: Iterable[str],
    saved_config: Path,
) -> None:
    """Raise :class:`CheckpointError` naming every changed setting (see :func:`resume_changes`)."""
    may_change = sorted(may_change)
    changed = resume_changes(saved, current, may_change)
    if changed:
        detail = "; ".join(f"{k}: checkpoint {a!r}, now {b!r}" for k, (a, b) in changed.items())
        raise CheckpointError(
            f"{checkpoint}: cannot resume, this run was started with a different config ({detail}). "
            f"Re-run with the checkpoint's settings (saved in {saved_config}) or choose a new --out; "
            f"only {may_change} may change between runs"
        )


def trim_csv(path: Path, last_step: int) -> None:
    """Keep the header and the rows whose first column (the step) is at most ``last_step``.

    Rows logged by an interrupted run after its last checkpoint are dropped; the resumed
    run logs them again.
    """
    if not path.is_file():
        return
    with path.open(newline="") as fh:
        rows = list(csv.reader(fh))
    if not rows:
        return
    kept = [rows[0]] + [r for r in rows[1:] if r and r[0].strip().isdigit() and int(r[0]) <= last_step]
    with atomic_path(path) as tmp, tmp.open("w", newline="") as fh:
        csv.writer(fh).writerows(kept)


def append_csv(path: Path, header: list[str], row: list) -> None:
    """Append ``row`` to the CSV at ``path``, writing ``header`` first when the file is new."""
    new = not path.is_file()
    with path.open("a", newline="") as fh:
        writer = csv.writer(fh)
        if new:
            writer.writerow(header)
        writer.writerow(row)


def optimizer_step(loss: torch.Tensor, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler) -> None:
    """One optimiser step on ``loss``: zero the gradients, backward through the (AMP) grad
    scaler, step and update the scale. With the scaler disabled (CPU) this is plain SGD."""
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()


def git_commit() -> str:
    """The toolkit's git commit (``<sha>`` or ``<sha>-dirty``), or ``"unknown"`` outside a checkout."""
    repo = Path(__file__).resolve().parents[2]
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=repo,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"{sha}-dirty" if dirty else sha

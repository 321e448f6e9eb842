"""Training logs of rank 0: a tqdm progress bar, ``RUN/log.csv`` and TensorBoard in ``RUN/tensorboard``.

``log.csv`` columns: ``step`` (optimizer steps done), ``epoch`` (float, fractional), ``loss``
(InfoNCE averaged over the logging window and all processes), ``acc1`` (fraction of queries
whose positive key scores highest), ``lr``, ``images_per_s`` (global images per second of
wall time over the window), ``time`` (seconds since this process started training).
On resume, rows after the checkpoint's step (logged by the interrupted run but not saved)
are dropped so the file reads as one uninterrupted run.
"""

from __future__ import annotations

import csv
import sys
import time
from pathlib import Path

from tqdm import tqdm

from cemcurate.common.lazy import lazy_import
from cemcurate.common.runstate import trim_csv

# Slow import (it loads TensorFlow's protobufs); only rank 0 with tensorboard on needs it.
torch_tensorboard = lazy_import("torch.utils.tensorboard")

COLUMNS = ("step", "epoch", "loss", "acc1", "lr", "images_per_s", "time")


class RunLog:
    """Console, CSV and TensorBoard logging for rank 0; a silent no-op elsewhere."""

    def __init__(self, run_dir: Path, enabled: bool, start_step: int, total_steps: int, tensorboard: bool = True):
        self.enabled = enabled
        self.t0 = time.perf_counter()
        self._bar = self._writer = self._csv = None
        if not enabled:
            return
        csv_path = run_dir / "log.csv"
        trim_csv(csv_path, start_step)
        new = not csv_path.is_file()
        self._csv_file = open(csv_path, "a", newline="")
        self._csv = csv.DictWriter(self._csv_file, fieldnames=COLUMNS)
        if new:
            self._csv.writeheader()
        if tensorboard:
            # Drop events the interrupted run logged after its checkpoint (the checkpoint's own step stays).
            self._writer = torch_tensorboard.SummaryWriter(
                log_dir=str(run_dir / "tensorboard"), purge_step=start_step + 1 if start_step else None
            )
        self._bar = tqdm(
            total=total_steps, initial=start_step, unit="step", dynamic_ncols=True, file=sys.stderr, disable=None
        )

    def step(self, n: int = 1) -> None:
        if self._bar is not None:
            self._bar.update(n)

    def log(self, step: int, epoch: float, loss: float, acc1: float, lr: float, images_per_s: float) -> None:
        if not self.enabled:
            return
        row = {
            "step": step,
            "epoch": round(epoch, 4),
            "loss": loss,
            "acc1": acc1,
            "lr": lr,
            "images_per_s": round(images_per_s, 2),
            "time": round(time.perf_counter() - self.t0, 2),
        }
        self._csv.writerow(row)
        self._csv_file.flush()
        if self._writer is not None:
            for key in ("loss", "acc1", "lr", "images_per_s"):
                self._writer.add_scalar(f"train/{key}", row[key], step)
        if self._bar is not None and not self._bar.disable:
            self._bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", img_s=f"{images_per_s:.1f}", refresh=False)
        else:
            # No terminal (batch job logs): one line per logging step instead of a bar.
            self.message(
                f"step {step} epoch {epoch:.2f} loss {loss:.4f} acc1 {acc1:.3f} lr {lr:.3e} images/s {images_per_s:.1f}"
            )

    def message(self, text: str) -> None:
        if not self.enabled:
            return
        if self._bar is not None and not self._bar.disable:
            self._bar.write(text, file=sys.stderr)
        else:
            print(text, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._writer is not None:
            self._writer.close()
        if self._csv is not None:
            self._csv_file.close()

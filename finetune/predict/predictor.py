"""A model as a function of N-d inputs, window by window: the one predictor of 2D tiles and 3D windows.

:func:`predict_windows` is pure numpy (the model is any callable of a batch of windows):
it cuts the windows of a :class:`~finetune.predict.windows.WindowPlan` out of ``count``
same-shape inputs, blends the model's outputs with the plan's weights and writes finished
rows of the first axis as soon as no later window touches them. Only one window depth of
rows is in memory (an input slab and a rolling float32 accumulator), so a volume larger
than memory streams from a lazy reader into a chunked output; ``count`` inputs are
predicted together so that small windows (e.g. whole slices) batch across them.

:class:`ModelWindows` makes a torch model such a callable (device, AMP, activation) and
:func:`batch_for` is the one rule for how many windows go into a forward pass.
"""

from __future__ import annotations

import itertools
from typing import Callable

import numpy as np
import torch
from tqdm import tqdm

from finetune.models.base import logits_to_probs
from finetune.predict.windows import WindowPlan, outer, reflect_indices

Read = Callable[[int, int], np.ndarray]
Write = Callable[[int, np.ndarray], None]
WindowFn = Callable[[np.ndarray], np.ndarray]
ACTIVATIONS = ("probs", "none")


def default_batch_pixels(device: torch.device) -> int:
    """Pixels (voxels) per forward pass when not configured: 512^2 on CPU, 8 x 512^2 on CUDA."""
    return 8 * 512 * 512 if device.type == "cuda" else 512 * 512


def batch_for(window_voxels: int, batch_size: int, batch_pixels: int, device: torch.device) -> int:
    """Windows per forward pass: ``batch_size``, capped by ``batch_pixels`` voxels (0: the device
    default, :func:`default_batch_pixels`), at least 1."""
    budget = batch_pixels or default_batch_pixels(device)
    return max(1, min(batch_size, budget // window_voxels))


class ModelWindows:
    """A torch model as a window function: ``float32[B, *window] -> float32[B, C, *window]``.

    Args:
        model: takes ``(B, 1, *window)`` float in [0, 1] and returns ``(B, C, *window)``
            logits; called as it is (move it to ``device`` and set its mode first).
        device: where the windows go.
        amp: float16 autocast on CUDA (ignored elsewhere).
        activation: ``"probs"`` (sigmoid for one channel, else softmax; see
            :func:`finetune.models.logits_to_probs`) or ``"none"`` (raw outputs as float32).
    """

    def __init__(
        self, model: torch.nn.Module, device: str | torch.device = "cpu", amp: bool = True, activation: str = "probs"
    ):
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be 'probs' or 'none', got {activation!r}")
        self.model = model
        self.device = torch.device(device)
        self.amp = amp and self.device.type == "cuda"
        self.activation = activation

    @torch.inference_mode()
    def __call__(self, windows: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(np.ascontiguousarray(windows, dtype=np.float32))[:, None].to(self.device)
        with torch.autocast(device_type=self.device.type, dtype=torch.float16, enabled=self.amp):
            out = self.model(x)
        out = logits_to_probs(out) if self.activation == "probs" else out.float()
        return out.cpu().numpy()


def _take(array: np.ndarray, axis: int, index: np.ndarray) -> np.ndarray:
    """``array`` at ``index`` along ``axis``: a view when ``index`` is a plain range (nothing reflected)."""
    first = int(index[0])
    if first >= 0 and np.array_equal(index, np.arange(first, first + index.size)):
        return array[(slice(None),) * axis + (slice(first, first + index.size),)]
    return np.take(array, index, axis=axis)


def _box(corner: tuple[int, ...], size: tuple[int, ...]) -> tuple[slice, ...]:
    return tuple(slice(c, c + s) for c, s in zip(corner, size))


def predict_windows(
    read: Read,
    plan: WindowPlan,
    model_fn: WindowFn,
    write: Write,
    count: int = 1,
    batch_size: int = 1,
    progress: bool = False,
    desc: str = "predict",
) -> None:
    """Blend the windows of ``plan`` over ``count`` same-shape inputs, streaming along their first axis.

    Args:
        read: ``read(a0, a1) -> float32[count, a1 - a0, *plan.shape[1:]]``, rows ``a0..a1-1``
            of the first axis of every input (called once per window start on that axis,
            for at most one window depth of rows).
        plan: the windows of one input (:func:`~finetune.predict.windows.plan_windows`).
        model_fn: ``float32[B, *plan.window] -> float32[B, C, *plan.window]``.
        write: receives ``(a0, float32[count, C, n, *plan.shape[1:]])``: blended rows
            ``a0..a0+n-1``, in increasing ``a0``, every row exactly once.
        count: inputs predicted together.
        batch_size: most windows per ``model_fn`` call; a call holds windows of one start
            on the first axis (from any of the inputs).
        progress: show a tqdm bar over windows.

    A plan with a single window writes the model's output as it is (no weights to apply).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    w0, (p0, _), n0 = plan.window[0], plan.pad[0], plan.shape[0]
    rest_window, rest_pad = plan.window[1:], ((0, 0), (0, 0)) + plan.pad[1:]
    rest_crop = tuple(slice(a, a + n) for n, (a, _) in zip(plan.shape[1:], plan.pad[1:]))
    rest_norm = outer([norm[crop] for norm, crop in zip(plan.norm[1:], rest_crop)])
    blend = plan.num_windows > 1
    weight = plan.window_weight()
    # (window in the slab, its target in the accumulator) for every window of one first-axis start
    boxes = [_box(corner, rest_window) for corner in itertools.product(*plan.starts[1:])]
    jobs = [((i, slice(None)) + box, (i, slice(None), slice(None)) + box) for i in range(count) for box in boxes]
    acc: np.ndarray | None = None
    base = 0  # padded first-axis row of acc[:, :, 0]

    def flush(upto: int) -> None:
        """Normalise and write padded rows ``[base, upto)`` (those inside the input)."""
        lo, hi = max(base, p0), min(upto, p0 + n0)
        if hi <= lo or acc is None:
            return
        block = acc[(slice(None), slice(None), slice(lo - base, hi - base)) + rest_crop]
        if blend:
            block = block / outer([plan.norm[0][lo:hi], rest_norm])
        write(lo - p0, np.ascontiguousarray(block, dtype=np.float32))

    bar = tqdm(total=plan.num_windows * count, desc=desc, unit="win", disable=not progress)
    try:
        for s0 in plan.starts[0]:
            if acc is not None and s0 > base:
                flush(s0)
                shift = s0 - base
                acc[:, :, : w0 - shift] = acc[:, :, shift:].copy()
                acc[:, :, w0 - shift :] = 0
                base = s0
            rows = reflect_indices(s0 - p0, s0 - p0 + w0, n0)
            first = int(rows.min())
            slab = _take(np.asarray(read(first, int(rows.max()) + 1), dtype=np.float32), 1, rows - first)
            if any(sum(rest_pad, ())):  # numpy's reflect is reflect_indices' rule, for any pad size
                slab = np.pad(slab, rest_pad, mode="reflect")  # (count, w0, *padded rest)
            for b0 in range(0, len(jobs), batch_size):
                batch = jobs[b0 : b0 + batch_size]
                windows = np.stack([slab[source] for source, _ in batch])
                pred = np.asarray(model_fn(windows), dtype=np.float32)
                if pred.ndim != plan.ndim + 2 or pred.shape[0] != len(batch) or tuple(pred.shape[2:]) != plan.window:
                    raise ValueError(
                        f"model returned shape {tuple(pred.shape)} for windows {tuple(windows.shape)}; "
                        "expected (B, C) + window"
                    )
                if acc is None:
                    acc = np.zeros((count, pred.shape[1], w0) + plan.padded_shape[1:], np.float32)
                    base = s0
                if blend:
                    pred = pred * weight
                for k, (_, target) in enumerate(batch):
                    if blend:
                        acc[target] += pred[k]
                    else:
                        acc[target] = pred[k]
                bar.update(len(batch))
        flush(base + w0)
    finally:
        bar.close()

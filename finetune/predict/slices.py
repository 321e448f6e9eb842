"""2D models on slices: the tile plan, tiled prediction and :class:`SlicePredictor`.

A slice that fits in one tile is reflection-padded to a multiple of 32 (the UNet's total
stride) and predicted once. A larger slice gets a reflection margin of half the overlap
on every side (so border pixels see context, as interior ones do), is cut into
overlapping tiles, and the tile predictions are blended with a window that ramps down
linearly over ``overlap`` pixels towards tile edges, where a CNN sees the least context.
Dividing by the summed window makes the blend a weighted average, so a model whose output
does not depend on context gives exactly the untiled result. The plan and the blend are
those of the N-d window engine (:mod:`finetune.predict.windows`,
:mod:`finetune.predict.predictor`) with ``blend="linear"``, ``fit="all"`` and size
multiple 32.
"""

from __future__ import annotations

import numpy as np
import torch

from finetune.predict.predictor import ModelWindows, WindowFn, batch_for, predict_windows
from finetune.predict.windows import WindowPlan, plan_windows


def plan_tiles(shape: tuple[int, int], tile: int = 512, overlap: int = 64, multiple: int = 32) -> WindowPlan:
    """Plan the tiling of an ``(H, W)`` slice.

    Args:
        shape: slice shape in pixels.
        tile: largest tile side (rounded up to ``multiple``).
        overlap: overlap between neighbouring tiles, in pixels (< tile).
        multiple: the network's required size multiple.

    Returns:
        The plan; ``plan.window`` is the ``(th, tw)`` tile, multiples of ``multiple``.
    """
    shape = tuple(int(n) for n in shape)
    if len(shape) != 2:
        raise ValueError(f"a slice shape is (H, W), got {shape}")
    if min(shape) < 1:
        raise ValueError(f"cannot tile an empty slice of shape {shape}")
    return plan_windows(shape, tile, overlap, multiple, blend="linear", fit="all")


def predict_tiled(slices: np.ndarray, model_fn: WindowFn, plan: WindowPlan, batch_size: int = 8) -> np.ndarray:
    """Predict same-shape slices tile by tile, batching tiles across slices.

    Args:
        slices: ``(N, H, W)`` float32 model input (already scaled to [0, 1]).
        model_fn: ``(B, th, tw) float32 -> (B, C, th, tw) float32`` probabilities.
        plan: from :func:`plan_tiles` for ``(H, W)``.
        batch_size: tiles per ``model_fn`` call.

    Returns:
        ``(N, C, H, W)`` float32 blended probabilities.
    """
    if slices.ndim != 3 or tuple(slices.shape[1:]) != plan.shape or slices.shape[0] < 1:
        raise ValueError(f"slices of shape {slices.shape} do not match the plan for {plan.shape}")
    slices = np.asarray(slices, dtype=np.float32)
    out: list[np.ndarray] = []

    def write(y0: int, probs: np.ndarray) -> None:
        if not out:  # a block of all rows (one row of tiles) is kept as it is, without a copy
            whole = probs.shape[2] == plan.shape[0]
            out.append(probs if whole else np.empty(probs.shape[:2] + plan.shape, np.float32))
        if out[0] is not probs:
            out[0][:, :, y0 : y0 + probs.shape[2]] = probs

    predict_windows(lambda y0, y1: slices[:, y0:y1], plan, model_fn, write, len(slices), batch_size)
    return out[0]


class SlicePredictor:
    """Probabilities for batches of 2D slices, tiled and batched.

    Args:
        model: a segmentation model taking ``(B, 1, H, W)`` in [0, 1] and returning logits.
        device: where the model runs (the model is moved there and put in eval mode).
        amp: float16 autocast on CUDA.
        tile, overlap: tiling (see :func:`plan_tiles`).
        batch_size: most tiles per forward pass.
        batch_pixels: most pixels per forward pass (0: 512^2 on CPU, 8 x 512^2 on CUDA). On a
            CPU, batching small tiles pays (2.3x per 96^2 slice for a resnet18 UNet) but
            batching 512^2 tiles is 20-30% slower per slice than one at a time (cache), so
            the batch is ``min(batch_size, batch_pixels // tile pixels)``, at least 1
            (:func:`~finetune.predict.predictor.batch_for`).

    ``predictor(slices float32[N, H, W] in [0, 1]) -> float32[N, C, H, W]`` probabilities.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        device: torch.device | str = "cpu",
        amp: bool = True,
        tile: int = 512,
        overlap: int = 64,
        batch_size: int = 8,
        batch_pixels: int = 0,
    ):
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.model_fn = ModelWindows(self.model, self.device, amp)
        self.tile, self.overlap, self.batch_size, self.batch_pixels = tile, overlap, batch_size, batch_pixels
        self._plans: dict[tuple[int, int], WindowPlan] = {}

    def plan(self, shape: tuple[int, int]) -> WindowPlan:
        shape = (int(shape[0]), int(shape[1]))
        if shape not in self._plans:
            self._plans[shape] = plan_tiles(shape, self.tile, self.overlap)
        return self._plans[shape]

    def __call__(self, slices: np.ndarray) -> np.ndarray:
        plan = self.plan(slices.shape[1:])
        batch = batch_for(plan.window[0] * plan.window[1], self.batch_size, self.batch_pixels, self.device)
        return predict_tiled(slices, self.model_fn, plan, batch)

"""Sliding-window prediction of whole volumes with a 3D model, streamed slab by slab.

Windows of a fixed size ``(wz, wy, wx)`` overlap by ``overlap`` voxels per axis; their
predictions are blended with a separable Gaussian weight (high in the window centre, where
a CNN sees the most context, low at its edges) and normalised by the summed weights, so
the result is a weighted average: a model whose output does not depend on context gives
exactly its own output everywhere.

Borders: an axis longer than the window gets a reflection margin of ``overlap // 2``
voxels on both sides, so border voxels see (mirrored) context as interior ones do. An axis
that fits in one window is not padded and the window shrinks to the axis length (the
model must accept that size; :class:`~finetune.models.unet3d.UNet3D` accepts any size).
A volume that fits in one window is thus predicted exactly as the whole volume.

Memory: the input is read one slab of ``wz`` slices at a time and a rolling float32
accumulator ``(C, wz, y, x)`` holds the overlapping sums; finished slices are divided by
the weight sum and written to ``out`` in increasing z. So only ``O(wz * y * x)`` voxels are
in memory, and a volume larger than memory streams from a lazy reader (or a memory map,
zarr or HDF5 array) into a chunked output (numpy memmap, zarr array, or a
:class:`~finetune.predict.output.PredictionWriter`'s ``write``).

The plan and the blend are those of the N-d window engine (:mod:`finetune.predict.windows`,
:mod:`finetune.predict.predictor`) with ``blend="gaussian"`` and ``fit="axis"``.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np
import torch

from finetune.predict.predictor import ModelWindows, predict_windows
from finetune.predict.windows import WindowPlan, decode_uint8, encode_probs, plan_windows

# Sliding-window size (z, y, x): ~1 M voxels, enough context for a UNet3D at a CPU-friendly size.
DEFAULT_WINDOW = (64, 128, 128)


def plan_sliding(
    shape: Sequence[int],
    window: int | Sequence[int],
    overlap: int | Sequence[int] | None = None,
    sigma_scale: float = 0.125,
) -> WindowPlan:
    """Plan the windows of a volume (pure).

    Args:
        shape: ``(z, y, x)`` voxels.
        window: requested window ``(wz, wy, wx)`` (or one int); make it a multiple of the
            model's ``size_multiple`` to avoid padding inside the model.
        overlap: voxels shared by neighbouring windows per axis (default a quarter of the
            window); must be smaller than the window.
        sigma_scale: Gaussian sigma as a fraction of the window (nnU-Net uses 1/8).
    """
    if len(shape) != 3:
        raise ValueError(f"shape must be three ints (z, y, x), got {tuple(shape)!r}")
    return plan_windows(shape, window, overlap, blend="gaussian", sigma_scale=sigma_scale, fit="axis")


def _source_reader(volume: Any) -> tuple[tuple[int, int, int], Callable[[int, int], np.ndarray]]:
    """``(shape, read(z0, z1) -> float32[n, y, x] in [0, 1])`` for a reader or an array-like.

    Readers with ``read_unit(z0, z1)`` (:class:`finetune.volumes.InputVolume`) are used as
    they are. Array-likes (numpy, memmap, zarr, h5py; ``(z, y, x)``) are sliced lazily:
    uint8 is divided by 255, bool becomes 0/1, floats must already be in [0, 1].
    """
    if hasattr(volume, "read_unit"):
        shape = tuple(int(s) for s in volume.shape)
        if len(shape) != 3:
            raise ValueError(f"volume reader has shape {shape}, expected (z, y, x)")
        return shape, lambda z0, z1: np.asarray(volume.read_unit(z0, z1), dtype=np.float32)  # type: ignore
    if not hasattr(volume, "shape") or not hasattr(volume, "dtype"):
        raise ValueError(
            f"volume must be an array-like (z, y, x) or a reader with read_unit(), got {type(volume).__name__}"
        )
    shape = tuple(int(s) for s in volume.shape)
    if len(shape) != 3:
        raise ValueError(f"volume must be 3D (z, y, x), got shape {shape}")
    dtype = np.dtype(volume.dtype)
    if dtype == np.uint8:
        return shape, lambda z0, z1: decode_uint8(volume[z0:z1])  # type: ignore[return-value]
    if dtype == np.bool_ or dtype.kind == "f":
        return shape, lambda z0, z1: np.asarray(volume[z0:z1]).astype(np.float32)  # type: ignore[return-value]
    raise ValueError(
        f"volume dtype {dtype} is not uint8, bool or float in [0, 1]; convert it first "
        "(finetune.volumes.open_input windows any dtype to [0, 1])"
    )


class _Sink:
    """Writes finished ``float32[C, n, y, x]`` slabs to an array-like or a ``write(z0, probs)`` callable."""

    def __init__(self, out: Any, shape: tuple[int, int, int]):
        self.out = out
        self.shape = shape
        if out is not None and not callable(out):
            oshape = tuple(int(s) for s in out.shape)
            if oshape[-3:] != shape or len(oshape) not in (3, 4):
                raise ValueError(f"out has shape {oshape}; expected (C, z, y, x) or (z, y, x) with (z, y, x) = {shape}")

    def write(self, z0: int, probs: np.ndarray) -> None:
        if self.out is None:
            self.out = np.zeros((probs.shape[0],) + self.shape, np.float32)
        if callable(self.out):
            self.out(z0, probs)
            return
        n = probs.shape[1]
        if self.out.ndim == 3:
            if probs.shape[0] != 1:
                raise ValueError(
                    f"model gives {probs.shape[0]} channels but out {tuple(self.out.shape)} has none; "
                    "use out of shape (C, z, y, x)"
                )
            target, data = (slice(z0, z0 + n),), probs[0]
        else:
            if self.out.shape[0] != probs.shape[0]:
                raise ValueError(f"model gives {probs.shape[0]} channels but out has {self.out.shape[0]}")
            target, data = (slice(None), slice(z0, z0 + n)), probs
        self.out[target] = encode_probs(data, self.out.dtype)


def predict_sliding(
    model: torch.nn.Module,
    volume: Any,
    window: int | Sequence[int] = DEFAULT_WINDOW,
    overlap: int | Sequence[int] | None = None,
    batch_size: int = 2,
    out: Any = None,
    device: str | torch.device = "cpu",
    amp: bool = True,
    activation: str = "probs",
    sigma_scale: float = 0.125,
    progress: bool = False,
) -> Any:
    """Predict a whole volume window by window and blend the windows.

    Args:
        model: takes ``(B, 1, wz, wy, wx)`` float in [0, 1] and returns ``(B, C, wz, wy, wx)``
            (logits of a :class:`~finetune.models.unet3d.UNet3D`). It is moved to ``device``
            and put in eval mode for the call (its train/eval mode is restored afterwards).
        volume: ``(z, y, x)`` uint8 (0-255), bool or float in [0, 1] array-like (numpy,
            ``np.memmap``, zarr, h5py), or a reader with ``shape`` and
            ``read_unit(z0, z1) -> float32[n, y, x]`` (:func:`finetune.volumes.open_input`).
        window: window size ``(wz, wy, wx)`` in voxels (or one int).
        overlap: overlap per axis in voxels (default a quarter of the window).
        batch_size: windows per forward pass (windows of one z slab are batched together).
        out: where results go: None (a new ``float32[C, z, y, x]`` array is returned), an
            array-like ``(C, z, y, x)`` (or ``(z, y, x)`` for one channel) written slab by
            slab (float arrays get probabilities, uint8 arrays ``round(255 * p)``), or a
            callable ``write(z0, float32[C, n, y, x])`` such as
            :meth:`finetune.predict.output.PredictionWriter.write`.
        device: where the model runs ("cuda" for a GPU).
        amp: float16 autocast on CUDA (ignored elsewhere).
        activation: ``"probs"`` (sigmoid for one channel, else softmax; see
            :func:`finetune.models.logits_to_probs`) or ``"none"`` (blend raw outputs).
        sigma_scale: Gaussian sigma as a fraction of the window.
        progress: show a tqdm bar over windows.

    Returns:
        ``out`` (the new array when ``out`` was None).
    """
    device = torch.device(device)
    model_fn = ModelWindows(model, device, amp, activation)
    shape, read = _source_reader(volume)
    plan = plan_sliding(shape, window, overlap, sigma_scale)
    sink = _Sink(out, shape)
    was_training = model.training
    # Moved outside inference mode: parameters moved inside it would become inference
    # tensors that a later training step (e.g. after validation) cannot use.
    model.to(device).eval()
    try:
        predict_windows(
            lambda z0, z1: read(z0, z1)[None],
            plan,
            model_fn,
            lambda z0, probs: sink.write(z0, probs[0]),
            count=1,
            batch_size=batch_size,
            progress=progress,
            desc="predict sliding",
        )
    finally:
        model.train(was_training)
    return sink.out

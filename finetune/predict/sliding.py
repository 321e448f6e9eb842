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
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch
from tqdm import tqdm

from finetune.config import DEFAULT_WINDOW
from finetune.models.unet2d import logits_to_probs

# Smallest blend weight: keeps the normalisation well conditioned where only window
# edges cover a voxel.
MIN_WEIGHT = 1e-3


def _triple(value: int | Sequence[int], what: str) -> tuple[int, int, int]:
    if isinstance(value, (int, np.integer)):
        return (int(value),) * 3
    values = tuple(int(v) for v in value)
    if len(values) != 3:
        raise ValueError(f"{what} must be an int or three ints (z, y, x), got {value!r}")
    return values  # type: ignore[return-value]


def gaussian_weights_1d(length: int, sigma_scale: float = 0.125, min_weight: float = MIN_WEIGHT) -> np.ndarray:
    """``float32[length]`` Gaussian centred in the window, sigma ``sigma_scale * length``, max 1, floor ``min_weight``."""
    if length < 1:
        raise ValueError(f"window length must be >= 1, got {length}")
    if not sigma_scale > 0:
        raise ValueError(f"sigma_scale must be > 0, got {sigma_scale}")
    i = np.arange(length, dtype=np.float64) - (length - 1) / 2.0
    g = np.exp(-0.5 * (i / (sigma_scale * length)) ** 2)
    return np.maximum(g / g.max(), min_weight).astype(np.float32)


def gaussian_weights(window: int | Sequence[int], sigma_scale: float = 0.125,
                     min_weight: float = MIN_WEIGHT) -> np.ndarray:
    """Separable Gaussian blend weights ``float32[wz, wy, wx]`` (max 1 at the centre, >= ``min_weight``)."""
    wz, wy, wx = _triple(window, "window")
    gz, gy, gx = (gaussian_weights_1d(n, sigma_scale, min_weight) for n in (wz, wy, wx))
    return gz[:, None, None] * gy[None, :, None] * gx[None, None, :]


def window_starts(length: int, window: int, overlap: int) -> list[int]:
    """Start offsets of windows of size ``window`` covering ``[0, length)``, overlapping by >= ``overlap``.

    Steps are ``window - overlap``; the last window is aligned to the end so none leaves
    the range. Requires ``length >= window`` and ``0 <= overlap < window``.
    """
    if length < window:
        raise ValueError(f"length {length} is smaller than the window {window}")
    if not 0 <= overlap < window:
        raise ValueError(f"overlap must be in [0, window={window}), got {overlap}")
    starts = list(range(0, length - window + 1, window - overlap))
    if starts[-1] != length - window:
        starts.append(length - window)
    return starts


def reflect_indices(start: int, stop: int, n: int) -> np.ndarray:
    """Source indices ``int64[stop - start]`` for positions ``start..stop-1`` of an axis of length ``n``
    reflected at its ends without repeating the edge (numpy's ``reflect``), for any distance."""
    if n < 1:
        raise ValueError("cannot index an empty axis")
    i = np.arange(start, stop, dtype=np.int64)
    if n == 1:
        return np.zeros_like(i)
    period = 2 * (n - 1)
    i = np.mod(i, period)
    return np.where(i < n, i, period - i)


@dataclass(frozen=True)
class SlidingPlan:
    """How a ``(z, y, x)`` volume is padded and cut into windows.

    Attributes:
        shape: volume shape.
        window: ``(wz, wy, wx)`` actual window (shrunk on axes shorter than the request).
        pad: per axis ``(before, after)`` reflection padding.
        starts: per axis, window start offsets in padded coordinates.
        weights: per axis ``float32[w]`` blend weights (all ones on single-window axes).
        norm: per axis ``float32[padded length]`` sum of the weights covering each position;
            the 3D weight sum is their outer product (the windows form a grid).
    """

    shape: tuple[int, int, int]
    window: tuple[int, int, int]
    pad: tuple[tuple[int, int], ...]
    starts: tuple[tuple[int, ...], ...]
    weights: tuple[np.ndarray, ...]
    norm: tuple[np.ndarray, ...]

    @property
    def padded_shape(self) -> tuple[int, int, int]:
        return tuple(n + a + b for n, (a, b) in zip(self.shape, self.pad))  # type: ignore[return-value]

    @property
    def num_windows(self) -> int:
        return len(self.starts[0]) * len(self.starts[1]) * len(self.starts[2])

    def weight_volume(self) -> np.ndarray:
        """``float32[wz, wy, wx]`` weight of one window."""
        wz, wy, wx = self.weights
        return wz[:, None, None] * wy[None, :, None] * wx[None, None, :]


def plan_sliding(shape: Sequence[int], window: int | Sequence[int], overlap: int | Sequence[int] | None = None,
                 sigma_scale: float = 0.125) -> SlidingPlan:
    """Plan the windows of a volume (pure).

    Args:
        shape: ``(z, y, x)`` voxels.
        window: requested window ``(wz, wy, wx)`` (or one int); make it a multiple of the
            model's ``size_multiple`` to avoid padding inside the model.
        overlap: voxels shared by neighbouring windows per axis (default a quarter of the
            window); must be smaller than the window.
        sigma_scale: Gaussian sigma as a fraction of the window (nnU-Net uses 1/8).
    """
    shape3 = _triple(shape, "shape")
    if min(shape3) < 1:
        raise ValueError(f"cannot predict an empty volume of shape {shape3}")
    win = _triple(window, "window")
    if min(win) < 1:
        raise ValueError(f"window sizes must be >= 1, got {win}")
    ov = tuple(w // 4 for w in win) if overlap is None else _triple(overlap, "overlap")
    for w, o in zip(win, ov):
        if not 0 <= o < w:
            raise ValueError(f"overlap {ov} must be >= 0 and smaller than the window {win} on every axis")
    out_win, pads, starts, weights, norms = [], [], [], [], []
    for n, w, o in zip(shape3, win, ov):
        if n <= w:
            out_win.append(n)
            pads.append((0, 0))
            starts.append((0,))
            g = np.ones(n, np.float32)
            weights.append(g)
            norms.append(g.copy())
            continue
        margin = o // 2
        length = n + 2 * margin
        s = window_starts(length, w, o)
        g = gaussian_weights_1d(w, sigma_scale)
        acc = np.zeros(length, np.float32)
        for a in s:
            acc[a:a + w] += g
        out_win.append(w)
        pads.append((margin, margin))
        starts.append(tuple(s))
        weights.append(g)
        norms.append(acc)
    return SlidingPlan(shape3, tuple(out_win), tuple(pads), tuple(starts), tuple(weights), tuple(norms))  # type: ignore[arg-type]


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
        return shape, lambda z0, z1: np.asarray(volume.read_unit(z0, z1), dtype=np.float32)  # type: ignore[return-value]
    if not hasattr(volume, "shape") or not hasattr(volume, "dtype"):
        raise ValueError(f"volume must be an array-like (z, y, x) or a reader with read_unit(), "
                         f"got {type(volume).__name__}")
    shape = tuple(int(s) for s in volume.shape)
    if len(shape) != 3:
        raise ValueError(f"volume must be 3D (z, y, x), got shape {shape}")
    dtype = np.dtype(volume.dtype)
    if dtype == np.uint8:
        scale = np.float32(1.0 / 255.0)
        return shape, lambda z0, z1: np.asarray(volume[z0:z1]).astype(np.float32) * scale  # type: ignore[return-value]
    if dtype == np.bool_ or dtype.kind == "f":
        return shape, lambda z0, z1: np.asarray(volume[z0:z1]).astype(np.float32)  # type: ignore[return-value]
    raise ValueError(f"volume dtype {dtype} is not uint8, bool or float in [0, 1]; convert it first "
                     "(finetune.volumes.open_input windows any dtype to [0, 1])")


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
                raise ValueError(f"model gives {probs.shape[0]} channels but out {tuple(self.out.shape)} has none; "
                                 "use out of shape (C, z, y, x)")
            target, data = (slice(z0, z0 + n),), probs[0]
        else:
            if self.out.shape[0] != probs.shape[0]:
                raise ValueError(f"model gives {probs.shape[0]} channels but out has {self.out.shape[0]}")
            target, data = (slice(None), slice(z0, z0 + n)), probs
        if np.dtype(self.out.dtype) == np.uint8:
            # Probabilities 0-1 stored as 0-255, as finetune.predict.output does.
            data = np.clip(np.rint(data * 255.0), 0, 255).astype(np.uint8)
        self.out[target] = data


def predict_sliding(model: torch.nn.Module, volume: Any, window: int | Sequence[int] = DEFAULT_WINDOW,
                    overlap: int | Sequence[int] | None = None, batch_size: int = 2, out: Any = None,
                    device: str | torch.device = "cpu", amp: bool = True, activation: str = "probs",
                    sigma_scale: float = 0.125, progress: bool = False) -> Any:
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
    if activation not in ("probs", "none"):
        raise ValueError(f"activation must be 'probs' or 'none', got {activation!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    shape, read = _source_reader(volume)
    plan = plan_sliding(shape, window, overlap, sigma_scale)
    sink = _Sink(out, shape)
    device = torch.device(device)
    use_amp = amp and device.type == "cuda"
    was_training = model.training
    # Moved outside inference mode: parameters moved inside it would become inference
    # tensors that a later training step (e.g. after validation) cannot use.
    model.to(device).eval()
    (pz0, _), (py0, _), (px0, _) = plan.pad
    nz, ny, nx = shape
    wz, wy, wx = plan.window
    zp, yp, xp = plan.padded_shape
    y_idx = reflect_indices(-py0, yp - py0, ny)
    x_idx = reflect_indices(-px0, xp - px0, nx)
    weight = torch.from_numpy(plan.weight_volume())
    norm_z, norm_y, norm_x = plan.norm
    ysl, xsl = slice(py0, py0 + ny), slice(px0, px0 + nx)
    yx_norm = norm_y[ysl, None] * norm_x[None, xsl]
    yx_starts = [(y, x) for y in plan.starts[1] for x in plan.starts[2]]
    acc: np.ndarray | None = None
    base = 0  # padded z of acc[:, 0]

    def flush(upto: int) -> None:
        """Normalise and write padded slices ``[base, upto)`` (those inside the volume)."""
        lo, hi = max(base, pz0), min(upto, pz0 + nz)
        if hi <= lo or acc is None:
            return
        block = acc[:, lo - base:hi - base, ysl, xsl] / (norm_z[lo:hi, None, None] * yx_norm[None])
        sink.write(lo - pz0, np.ascontiguousarray(block, dtype=np.float32))

    bar = tqdm(total=plan.num_windows, desc="predict sliding", unit="win", disable=not progress)
    try:
        with torch.inference_mode():
            for zs in plan.starts[0]:
                if acc is not None and zs > base:
                    flush(zs)
                    shift = zs - base
                    acc[:, :wz - shift] = acc[:, shift:].copy()
                    acc[:, wz - shift:] = 0
                    base = zs
                z_idx = reflect_indices(zs - pz0, zs - pz0 + wz, nz)
                z_lo = int(z_idx.min())
                raw = read(z_lo, int(z_idx.max()) + 1)
                slab = raw[z_idx - z_lo][:, y_idx][:, :, x_idx]  # (wz, yp, xp) padded slab
                for b0 in range(0, len(yx_starts), batch_size):
                    batch = yx_starts[b0:b0 + batch_size]
                    tiles = np.stack([slab[:, y:y + wy, x:x + wx] for y, x in batch])[:, None]
                    x_t = torch.from_numpy(np.ascontiguousarray(tiles)).to(device)
                    with torch.autocast(device_type=device.type, dtype=torch.float16, enabled=use_amp):
                        pred = model(x_t)
                    if pred.ndim != 5 or pred.shape[0] != len(batch) or tuple(pred.shape[2:]) != (wz, wy, wx):
                        raise ValueError(f"model returned shape {tuple(pred.shape)} for windows {tuple(x_t.shape)}; "
                                         "expected (B, C) + window")
                    pred = logits_to_probs(pred) if activation == "probs" else pred.float()
                    pred = (pred * weight.to(pred.device)).cpu().numpy()
                    if acc is None:
                        acc = np.zeros((pred.shape[1], wz, yp, xp), np.float32)
                        base = zs
                    for k, (y, x) in enumerate(batch):
                        acc[:, :, y:y + wy, x:x + wx] += pred[k]
                    bar.update(len(batch))
            flush(base + wz)
    finally:
        bar.close()
        model.train(was_training)
    return sink.out

"""Overlapping windows over an N-d array: where they go, how they are blended (pure numpy).

One plan serves 2D tiles of slices and 3D windows of volumes (the layout of nnU-Net's
``compute_steps_for_sliding_window`` and ``compute_gaussian``, with our own start and
border rules):

* **starts**: per axis, windows step by ``window - overlap`` from 0 and the last one is
  flush with the end, so none leaves the (padded) axis (:func:`window_starts`);
* **padding**: an axis longer than its window gets a reflection margin of ``overlap // 2``
  on both sides, so border pixels see (mirrored) context as interior ones do; an axis (or,
  with ``fit="all"``, an input) that fits one window gets one window of its own length,
  rounded up to the model's size ``multiple`` and padded symmetrically (:func:`plan_windows`);
* **blending weights**: separable, one 1-D profile per axis, high in the window centre
  where a CNN sees the most context: a ``"linear"`` ramp over ``overlap`` pixels (2D
  tiles) or a ``"gaussian"`` of sigma ``sigma_scale * window`` (3D windows); all ones on
  axes with a single window;
* **normalisation**: the windows form a grid, so the summed weight at a position is the
  outer product of the per-axis sums (:attr:`WindowPlan.norm`); dividing by it makes the
  blend a weighted average, so a model whose output does not depend on context gives
  exactly its own output everywhere;
* **encoding**: probabilities in [0, 1] stored as uint8 are ``round(255 p)``
  (:func:`encode_probs`), read back as ``u / 255`` (:func:`decode_uint8`).

Axes are in array order (``(y, x)`` for slices, ``(z, y, x)`` for volumes).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import reduce
from typing import Sequence

import numpy as np

# Smallest blend weight: keeps the normalisation finite and well conditioned where only
# window edges cover a position.
MIN_WEIGHT = 1e-3
BLENDS = ("linear", "gaussian")
FITS = ("axis", "all")
UINT8_SCALE = np.float32(1.0 / 255.0)


def padded_size(n: int, multiple: int = 32) -> int:
    """Smallest multiple of ``multiple`` that is >= ``n``."""
    return -(-n // multiple) * multiple


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


def linear_weights_1d(length: int, ramp: int, min_weight: float = MIN_WEIGHT) -> np.ndarray:
    """``float32[length]``: 1 in the middle, falling linearly over ``ramp`` positions to each edge,
    floor ``min_weight`` (all ones for ``ramp <= 0``)."""
    if ramp <= 0:
        return np.ones(length, np.float32)
    i = np.arange(length, dtype=np.float32)
    w = np.minimum(np.minimum((i + 0.5) / ramp, (length - i - 0.5) / ramp), 1.0)
    return np.maximum(w, min_weight).astype(np.float32)


def gaussian_weights_1d(length: int, sigma_scale: float = 0.125, min_weight: float = MIN_WEIGHT) -> np.ndarray:
    """``float32[length]`` Gaussian centred in the window, sigma ``sigma_scale * length``, max 1,
    floor ``min_weight``."""
    if length < 1:
        raise ValueError(f"window length must be >= 1, got {length}")
    if not sigma_scale > 0:
        raise ValueError(f"sigma_scale must be > 0, got {sigma_scale}")
    i = np.arange(length, dtype=np.float64) - (length - 1) / 2.0
    g = np.exp(-0.5 * (i / (sigma_scale * length)) ** 2)
    return np.maximum(g / g.max(), min_weight).astype(np.float32)


def axis_weights(length: int, blend: str, overlap: int = 0, sigma_scale: float = 0.125) -> np.ndarray:
    """``float32[length]`` blend profile of one window axis: ``"linear"`` (ramp ``overlap``) or ``"gaussian"``."""
    if blend == "linear":
        return linear_weights_1d(length, overlap)
    if blend == "gaussian":
        return gaussian_weights_1d(length, sigma_scale)
    raise ValueError(f"blend must be one of {BLENDS}, got {blend!r}")


def outer(vectors: Sequence[np.ndarray]) -> np.ndarray:
    """N-d outer product ``v0[:, None, ...] * v1[None, :, ...] * ...`` (multiplied left to right)."""
    return reduce(np.multiply.outer, vectors) if len(vectors) else np.ones((), np.float32)


def window_weights(
    window: int | Sequence[int], blend: str = "gaussian", overlap: int = 0, sigma_scale: float = 0.125, ndim: int = 3
) -> np.ndarray:
    """Separable blend weights ``float32[window]`` of a window of any dimension (an int means ``ndim`` equal sides)."""
    sides = _per_axis(window, ndim, "window")
    return outer([axis_weights(n, blend, overlap, sigma_scale) for n in sides])


def encode_probs(probs: np.ndarray, dtype: str | np.dtype) -> np.ndarray:
    """Values in [0, 1] (probabilities, or an image scaled to [0, 1]) -> ``uint8`` ``round(255 p)``
    (clipped) for ``dtype`` uint8, else ``float32``. The one encoding of every writer."""
    if np.dtype(dtype) == np.uint8:
        return np.clip(np.rint(probs * 255.0), 0, 255).astype(np.uint8)
    return probs.astype(np.float32, copy=False)


def decode_uint8(data: np.ndarray) -> np.ndarray:
    """``uint8`` 0-255 -> ``float32`` in [0, 1] (``u / 255``); inverse of :func:`encode_probs` on its values."""
    return np.asarray(data).astype(np.float32) * UINT8_SCALE


def _per_axis(value: int | Sequence[int], ndim: int, what: str) -> tuple[int, ...]:
    if isinstance(value, (int, np.integer)):
        return (int(value),) * ndim
    values = tuple(int(v) for v in value)
    if len(values) != ndim:
        raise ValueError(f"{what} must be an int or {ndim} ints, got {value!r}")
    return values


@dataclass(frozen=True)
class WindowPlan:
    """How an N-d input is padded and cut into a grid of overlapping windows.

    Attributes:
        shape: input shape.
        window: actual window per axis (shrunk or grown on axes that fit one window).
        pad: per axis ``(before, after)`` reflection padding.
        starts: per axis, window start offsets in padded coordinates.
        weights: per axis ``float32[window]`` blend profile (all ones on single-window axes).
        norm: per axis ``float32[padded length]`` sum of the profiles covering each
            position; the N-d weight sum is their outer product.
    """

    shape: tuple[int, ...]
    window: tuple[int, ...]
    pad: tuple[tuple[int, int], ...]
    starts: tuple[tuple[int, ...], ...]
    weights: tuple[np.ndarray, ...]
    norm: tuple[np.ndarray, ...]

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def padded_shape(self) -> tuple[int, ...]:
        return tuple(n + a + b for n, (a, b) in zip(self.shape, self.pad))

    @property
    def num_windows(self) -> int:
        return int(np.prod([len(s) for s in self.starts]))

    def window_weight(self) -> np.ndarray:
        """``float32[window]`` weight of one window."""
        return outer(self.weights)

    def weight_sum(self) -> np.ndarray:
        """``float32[padded_shape]`` summed window weights (the normaliser of the blend)."""
        return outer(self.norm)


def plan_windows(
    shape: Sequence[int],
    window: int | Sequence[int],
    overlap: int | Sequence[int] | None = None,
    multiple: int | Sequence[int] = 1,
    blend: str = "gaussian",
    sigma_scale: float = 0.125,
    fit: str = "axis",
) -> WindowPlan:
    """Plan the windows of an N-d input (pure).

    Args:
        shape: input shape (one entry per axis).
        window: requested window (or one int for every axis); rounded up to ``multiple``.
        overlap: positions shared by neighbouring windows per axis (default a quarter of
            the window); must be smaller than the window.
        multiple: size multiple the model needs per axis (32 for a 2D UNet, 1 for a model
            that accepts any size).
        blend: ``"linear"`` (ramp of ``overlap`` positions) or ``"gaussian"``.
        sigma_scale: Gaussian sigma as a fraction of the window (nnU-Net uses 1/8).
        fit: which inputs get one window of their own size: ``"axis"``, every axis no
            longer than its window; ``"all"``, only an input that fits the window on every
            axis (otherwise every axis gets the margin, and an axis whose margined length
            fits gets one window of that length, rounded up to ``multiple``, extra padding
            at its end).
    """
    shape = tuple(int(n) for n in shape)
    ndim = len(shape)
    if ndim < 1 or min(shape) < 1:
        raise ValueError(f"cannot predict an empty input of shape {shape}")
    if blend not in BLENDS or fit not in FITS:
        raise ValueError(f"blend must be one of {BLENDS} and fit one of {FITS}, got {blend!r}, {fit!r}")
    mult = _per_axis(multiple, ndim, "multiple")
    requested = _per_axis(window, ndim, "window")
    if min(requested) < 1 or min(mult) < 1:
        raise ValueError(f"window sizes and multiples must be >= 1, got {requested} and {mult}")
    win = tuple(padded_size(w, m) for w, m in zip(requested, mult))
    ov = tuple(w // 4 for w in win) if overlap is None else _per_axis(overlap, ndim, "overlap")
    if any(not 0 <= o < w for w, o in zip(win, ov)):
        raise ValueError(f"overlap {ov} must be >= 0 and smaller than the window {win} on every axis")
    fits = [n <= w for n, w in zip(shape, win)]
    if fit == "all":
        fits = [all(fits)] * ndim
    out_win, pads, starts, weights, norms = [], [], [], [], []
    for n, w, o, m, fits_axis in zip(shape, win, ov, mult, fits):
        margin = 0 if fits_axis else o // 2
        length = n + 2 * margin
        if length <= w:  # one window of the (margined) axis, rounded up to the multiple
            size = padded_size(length, m)
            before = (size - n) // 2 if fits_axis else margin
            out_win.append(size)
            pads.append((before, size - n - before))
            starts.append((0,))
            weights.append(np.ones(size, np.float32))
            norms.append(np.ones(size, np.float32))
            continue
        s = window_starts(length, w, o)
        g = axis_weights(w, blend, o, sigma_scale)
        acc = np.zeros(length, np.float32)
        for a in s:
            acc[a : a + w] += g
        out_win.append(w)
        pads.append((margin, margin))
        starts.append(tuple(s))
        weights.append(g)
        norms.append(acc)
    return WindowPlan(shape, tuple(out_win), tuple(pads), tuple(starts), tuple(weights), tuple(norms))

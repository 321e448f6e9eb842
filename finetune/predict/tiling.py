"""Tiled prediction of 2D slices (pure numpy; the model is any callable).

A slice that fits in one tile is reflection-padded to a multiple of 32 (the UNet's total
stride) and predicted once. A larger slice gets a reflection margin of half the overlap
on every side (so border pixels see context, as interior ones do), is cut into
overlapping tiles, and the tile predictions are blended with a window that ramps down
towards tile edges, where a CNN sees the least context. Dividing by the summed window
makes the blend a weighted average, so a model whose output does not depend on context
gives exactly the untiled result.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

# Smallest blend weight: keeps the normalisation finite where only a tile edge covers a pixel.
_MIN_WEIGHT = 1e-3


def padded_size(n: int, multiple: int = 32) -> int:
    """Smallest multiple of ``multiple`` that is >= ``n``."""
    return -(-n // multiple) * multiple


def tile_starts(length: int, tile: int, stride: int) -> list[int]:
    """Start offsets of tiles of size ``tile`` covering ``[0, length)`` with step <= ``stride``.

    The last tile is aligned to the end, so no tile leaves the range; requires ``length >= tile``.
    """
    if length < tile:
        raise ValueError(f"length {length} is smaller than the tile {tile}")
    if stride < 1:
        raise ValueError(f"tile stride must be >= 1, got {stride}")
    starts = list(range(0, length - tile + 1, stride))
    if starts[-1] != length - tile:
        starts.append(length - tile)
    return starts


def blend_window(shape: tuple[int, int], ramp: int) -> np.ndarray:
    """``float32[shape]`` weights: 1 in the middle, falling linearly over ``ramp`` pixels to each edge."""
    def axis(n: int) -> np.ndarray:
        if ramp <= 0:
            return np.ones(n, np.float32)
        i = np.arange(n, dtype=np.float32)
        w = np.minimum(np.minimum((i + 0.5) / ramp, (n - i - 0.5) / ramp), 1.0)
        return np.maximum(w, _MIN_WEIGHT).astype(np.float32)

    return np.outer(axis(shape[0]), axis(shape[1]))


@dataclass(frozen=True)
class TilePlan:
    """How one slice shape is padded and tiled.

    Attributes:
        shape: ``(H, W)`` of the slice.
        pad: ``((top, bottom), (left, right))`` reflection padding.
        tile: ``(th, tw)``, multiples of 32.
        starts: ``[(y0, x0), ...]`` tile offsets in the padded slice.
        window: ``float32[th, tw]`` blend weights.
    """

    shape: tuple[int, int]
    pad: tuple[tuple[int, int], tuple[int, int]]
    tile: tuple[int, int]
    starts: tuple[tuple[int, int], ...]
    window: np.ndarray

    @property
    def padded_shape(self) -> tuple[int, int]:
        return (self.shape[0] + sum(self.pad[0]), self.shape[1] + sum(self.pad[1]))


def plan_tiles(shape: tuple[int, int], tile: int = 512, overlap: int = 64, multiple: int = 32) -> TilePlan:
    """Plan the tiling of an ``(H, W)`` slice.

    Args:
        shape: slice shape in pixels.
        tile: largest tile side (rounded up to ``multiple``).
        overlap: overlap between neighbouring tiles, in pixels (< tile).
        multiple: the network's required size multiple.
    """
    h, w = int(shape[0]), int(shape[1])
    if h < 1 or w < 1:
        raise ValueError(f"cannot tile an empty slice of shape {shape}")
    tile = padded_size(tile, multiple)
    if not 0 <= overlap < tile:
        raise ValueError(f"overlap must be in [0, tile={tile}), got {overlap}")
    if h <= tile and w <= tile:
        th, tw = padded_size(h, multiple), padded_size(w, multiple)
        pad = (((th - h) // 2, th - h - (th - h) // 2), ((tw - w) // 2, tw - w - (tw - w) // 2))
        return TilePlan((h, w), pad, (th, tw), ((0, 0),), np.ones((th, tw), np.float32))
    margin = overlap // 2
    pads, tiles, axis_starts = [], [], []
    for n in (h, w):
        ext = n + 2 * margin
        if ext <= tile:
            t = padded_size(ext, multiple)
            pads.append((margin, t - n - margin))
            tiles.append(t)
            axis_starts.append([0])
        else:
            pads.append((margin, margin))
            tiles.append(tile)
            axis_starts.append(tile_starts(ext, tile, tile - overlap))
    starts = tuple((y, x) for y in axis_starts[0] for x in axis_starts[1])
    return TilePlan((h, w), (pads[0], pads[1]), (tiles[0], tiles[1]), starts, blend_window((tiles[0], tiles[1]), overlap))


def reflect_pad(slices: np.ndarray, pad: tuple[tuple[int, int], tuple[int, int]]) -> np.ndarray:
    """Reflection-pad the last two axes of ``(N, H, W)`` (works for pads larger than the slice)."""
    return np.pad(slices, ((0, 0), pad[0], pad[1]), mode="reflect") if any(sum(pad, ())) else slices


def predict_tiled(slices: np.ndarray, model_fn: Callable[[np.ndarray], np.ndarray], plan: TilePlan,
                  batch_size: int = 8) -> np.ndarray:
    """Predict same-shape slices tile by tile, batching tiles across slices.

    Args:
        slices: ``(N, H, W)`` float32 model input (already scaled to [0, 1]).
        model_fn: ``(B, th, tw) float32 -> (B, C, th, tw) float32`` probabilities.
        plan: from :func:`plan_tiles` for ``(H, W)``.
        batch_size: tiles per ``model_fn`` call.

    Returns:
        ``(N, C, H, W)`` float32 blended probabilities.
    """
    if slices.ndim != 3 or tuple(slices.shape[1:]) != plan.shape:
        raise ValueError(f"slices of shape {slices.shape} do not match the plan for {plan.shape}")
    n = slices.shape[0]
    padded = reflect_pad(np.asarray(slices, dtype=np.float32), plan.pad)
    th, tw = plan.tile
    jobs = [(i, y, x) for i in range(n) for (y, x) in plan.starts]
    acc: np.ndarray | None = None
    single = len(plan.starts) == 1
    wsum = np.zeros(padded.shape[1:], np.float32)
    for y, x in plan.starts:
        wsum[y:y + th, x:x + tw] += plan.window
    for b0 in range(0, len(jobs), batch_size):
        batch = jobs[b0:b0 + batch_size]
        tiles = np.stack([padded[i, y:y + th, x:x + tw] for i, y, x in batch])
        probs = np.asarray(model_fn(tiles), dtype=np.float32)
        if probs.ndim != 4 or probs.shape[0] != len(batch) or probs.shape[2:] != (th, tw):
            raise ValueError(f"model returned shape {probs.shape} for tiles {tiles.shape}")
        if acc is None:
            acc = np.zeros((n, probs.shape[1]) + padded.shape[1:], np.float32)
        for k, (i, y, x) in enumerate(batch):
            if single:
                acc[i, :, y:y + th, x:x + tw] = probs[k]
            else:
                acc[i, :, y:y + th, x:x + tw] += probs[k] * plan.window
    assert acc is not None
    if not single:
        acc /= wsum
    (top, _), (left, _) = plan.pad
    h, w = plan.shape
    return np.ascontiguousarray(acc[:, :, top:top + h, left:left + w])

"""Intensity standardisation: any dtype in, uint8 out, one mapping per source.

uint8 data pass through unchanged. Every other integer or float type is windowed by
robust percentiles computed from a sample of the whole volume (so every slice of a
volume uses the same mapping) and scaled linearly to 0-255. Non-finite values are
ignored when computing the window; NaN maps to 0, +inf to 255 and -inf to 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class IntensityWindow:
    """A linear map ``[low, high] -> [0, 255]`` (clipped), optionally inverted.

    ``low``/``high`` are in the source's native units; ``None`` for uint8 pass-through.
    """

    low: float | None
    high: float | None
    invert: bool = False

    @classmethod
    def from_bounds(cls, low: float | None, high: float | None, invert: bool = False) -> "IntensityWindow":
        """The window recorded as ``low``/``high`` in a source table, where NaN (or None) means
        the uint8 pass-through."""

        def bound(value: float | None) -> float | None:
            return None if value is None or math.isnan(value) else float(value)

        return cls(bound(low), bound(high), bool(invert))

    def apply(self, arr: np.ndarray) -> np.ndarray:
        """Map ``arr`` (any shape, any real dtype) to uint8 of the same shape."""
        if self.low is None or self.high is None:
            if arr.dtype != np.uint8:
                raise ValueError(f"a pass-through window needs uint8 data, got {arr.dtype}")
            out = arr
        else:
            scale = 255.0 / (self.high - self.low) if self.high > self.low else 0.0
            # float32 is exact for (u)int8/16 and keeps memory at 4 bytes per voxel; wider
            # types need float64 so that large offsets do not swamp the window. NaN -> 0.
            work = np.float32 if arr.dtype.itemsize <= 2 or arr.dtype == np.float32 else np.float64
            scaled = arr.astype(work)
            scaled -= work(self.low)
            scaled *= work(scale)
            np.rint(scaled, out=scaled)
            np.clip(scaled, 0, 255, out=scaled)
            out = np.nan_to_num(scaled, nan=0.0, copy=False).astype(np.uint8)
        return 255 - out if self.invert else np.ascontiguousarray(out)


def sample_slice_indices(depth: int, max_slices: int = 32) -> np.ndarray:
    """Up to ``max_slices`` z indices spread evenly over ``range(depth)``."""
    if depth <= max_slices:
        return np.arange(depth)
    return np.unique(np.linspace(0, depth - 1, max_slices).round().astype(np.int64))


def compute_window(
    sample: np.ndarray, low_percentile: float = 0.1, high_percentile: float = 99.9, invert: bool = False
) -> IntensityWindow:
    """Choose the intensity window for a source from a sample of its voxels.

    Args:
        sample: any-shape array of the source's voxels, native dtype.
        low_percentile, high_percentile: percentiles (0-100) mapped to 0 and 255.
        invert: flip intensities after windowing (for data with bright membranes).

    Returns:
        A pass-through window for uint8, else the percentiles of the finite values. A
        sample with no finite value gives ``low == high == 0`` (everything maps to 0).
    """
    if not 0 <= low_percentile < high_percentile <= 100:
        raise ValueError(f"percentiles must satisfy 0 <= low < high <= 100, got {low_percentile}, {high_percentile}")
    if sample.dtype == np.uint8:
        return IntensityWindow(None, None, invert)
    if sample.dtype == np.bool_:
        return IntensityWindow(0.0, 1.0, invert)
    if not (np.issubdtype(sample.dtype, np.integer) or np.issubdtype(sample.dtype, np.floating)):
        raise ValueError(f"cannot standardise data of dtype {sample.dtype}")
    values = sample.ravel()
    if np.issubdtype(values.dtype, np.floating):
        values = values[np.isfinite(values)]
    if values.size == 0:
        return IntensityWindow(0.0, 0.0, invert)
    low, high = np.percentile(values, [low_percentile, high_percentile])
    return IntensityWindow(float(low), float(high), invert)

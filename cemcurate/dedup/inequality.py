"""Inequality of patches per source: the Lorenz curve and the Gini coefficient (paper,
Appendix 1 figure 6)."""

from __future__ import annotations

import numpy as np


def _as_counts(counts) -> np.ndarray:
    values = np.asarray(counts)
    if values.ndim != 1 or values.size == 0:
        raise ValueError(f"counts must be a non-empty 1-D array of patches per source, got shape {values.shape}")
    if not (np.issubdtype(values.dtype, np.integer) or np.issubdtype(values.dtype, np.floating)):
        raise ValueError(f"counts must be numeric, got dtype {values.dtype}")
    values = values.astype(np.float64)
    if not np.all(np.isfinite(values)) or values.min() < 0:
        raise ValueError("counts must be finite and non-negative")
    if values.sum() == 0:
        raise ValueError("counts sum to zero: the Lorenz curve and Gini coefficient are undefined")
    return values


def lorenz_curve(counts) -> tuple[np.ndarray, np.ndarray]:
    """Lorenz curve of patches per source (paper, Appendix 1 figure 6).

    ``counts``: non-negative numbers of shape (S,), one per source, not all zero. Returns
    float64 arrays ``x, y`` of shape (S + 1,): after sorting sources by ascending count,
    ``x[i] = i / S`` is the fraction of sources and ``y[i]`` the fraction of all patches they
    hold; both run from 0 to 1, and ``y == x`` is perfect equality.
    """
    values = np.sort(_as_counts(counts))
    x = np.arange(len(values) + 1, dtype=np.float64) / len(values)
    y = np.concatenate([[0.0], np.cumsum(values) / values.sum()])
    return x, y


def gini(counts) -> float:
    """Gini coefficient of patches per source: twice the area between the diagonal and the
    Lorenz curve (trapezoids between its points). 0 is perfect equality; all patches in one of S
    sources gives 1 - 1/S.
    """
    x, y = lorenz_curve(counts)
    area_under_curve = float(np.sum((y[1:] + y[:-1]) * np.diff(x)) / 2.0)
    return 1.0 - 2.0 * area_under_curve

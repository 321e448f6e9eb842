"""Small grey-level charts for the build report (a histogram, line curves), drawn with Pillow.

The report is written by every build, so it must not import matplotlib (half a second of
start-up, more than the report itself takes). Each function returns a uint8 2D image for
:func:`cemcurate.montage.png_data_uri`.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw

# Plot area inside the image, pixels: left, top, right and bottom margins leave room for labels.
_MARGIN = (44, 22, 12, 34)
_INK, _GREY, _LIGHT = 0, 140, 215


def _frame(width: int, height: int, xlabel: str, ylabel: str, xticks, yticks) -> tuple[Image.Image, tuple]:
    """A white canvas with axes, ticks and labels; returns it and the plot box (x0, y0, x1, y1)."""
    image = Image.new("L", (width, height), 255)
    draw = ImageDraw.Draw(image)
    left, top, right, bottom = _MARGIN
    box = (left, top, width - right, height - bottom)
    draw.rectangle(box, outline=_INK)
    for value, text in xticks:
        x = box[0] + value * (box[2] - box[0])
        draw.line([(x, box[3]), (x, box[3] + 3)], fill=_INK)
        draw.text((x - 3 * len(text), box[3] + 5), text, fill=_INK)
    for value, text in yticks:
        y = box[3] - value * (box[3] - box[1])
        draw.line([(box[0] - 3, y), (box[0], y)], fill=_INK)
        draw.text((box[0] - 6 - 6 * len(text), y - 5), text, fill=_INK)
    draw.text(((box[0] + box[2]) // 2 - 3 * len(xlabel), height - 14), xlabel, fill=_INK)
    draw.text((2, 0), ylabel, fill=_INK)
    return image, box


def histogram_image(
    values: np.ndarray,
    bins: int = 20,
    value_range: tuple[float, float] = (0.0, 1.0),
    marker: float | None = None,
    xlabel: str = "",
    size: tuple[int, int] = (420, 180),
) -> np.ndarray:
    """Bars of the counts of ``values`` (float ``(n,)``, NaN ignored) in ``bins`` equal bins over
    ``value_range``, a dashed vertical line at ``marker`` (e.g. a threshold); y axis: counts."""
    values = np.asarray(values, np.float64)
    counts, _ = np.histogram(values[np.isfinite(values)], bins=bins, range=value_range)
    top = max(int(counts.max()) if counts.size else 0, 1)
    lo, hi = value_range
    xticks = [(t, f"{lo + t * (hi - lo):g}") for t in (0.0, 0.5, 1.0)]
    image, box = _frame(*size, xlabel, f"patches (max {top})", xticks, [(0.0, "0"), (1.0, str(top))])
    draw = ImageDraw.Draw(image)
    width = (box[2] - box[0]) / bins
    for i, count in enumerate(counts):
        if count:
            # At least one pixel tall: a bin of a few patches among many must still show.
            y = min(box[3] - count / top * (box[3] - box[1]), box[3] - 2)
            draw.rectangle([box[0] + i * width + 1, y, box[0] + (i + 1) * width - 1, box[3] - 1], fill=_GREY)
    if marker is not None and lo <= marker <= hi:
        x = box[0] + (marker - lo) / (hi - lo) * (box[2] - box[0])
        for y in range(box[1], box[3], 6):
            draw.line([(x, y), (x, min(y + 3, box[3]))], fill=_INK, width=2)
    return np.asarray(image)


def curves_image(
    curves: Sequence[tuple[np.ndarray, np.ndarray]],
    xlabel: str = "",
    ylabel: str = "",
    diagonal: bool = True,
    size: tuple[int, int] = (300, 280),
) -> np.ndarray:
    """Line curves ``(x, y)`` with both coordinates in [0, 1], the first black, the others in
    lighter greys, over a light diagonal when ``diagonal`` (e.g. a Lorenz curve's equality)."""
    ticks = [(t, f"{t:g}") for t in (0.0, 0.5, 1.0)]
    image, box = _frame(*size, xlabel, ylabel, ticks, ticks)
    draw = ImageDraw.Draw(image)

    def point(x: float, y: float) -> tuple[float, float]:
        return box[0] + x * (box[2] - box[0]), box[3] - y * (box[3] - box[1])

    if diagonal:  # dotted, so that it reads apart from the curves
        for t in np.arange(0.0, 1.0, 0.04):
            draw.line([point(t, t), point(t + 0.02, t + 0.02)], fill=_GREY, width=1)
    shades = [_INK, _GREY, _LIGHT]
    for i, (x, y) in enumerate(curves):
        draw.line([point(a, b) for a, b in zip(x, y)], fill=shades[min(i, len(shades) - 1)], width=2)
    return np.asarray(image)

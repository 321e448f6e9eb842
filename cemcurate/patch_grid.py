"""Cutting 2D images into non-overlapping square patches.

Tiles start at the top-left corner. Where an image side is not a multiple of the patch
size, the leftover strip yields a crop only if both of that crop's sides are at least
``min_edge`` (112 for 224 patches, as in CEM500K); such an edge crop is resized to the
patch size with bilinear interpolation (Pillow's ``BILINEAR``, as the CEM500K reference
code does before hashing) so every stored patch has one shape.
"""

from __future__ import annotations

import numpy as np
from PIL import Image


def tile_spans(length: int, patch_size: int = 224, min_edge: int = 112) -> list[tuple[int, int]]:
    """``(start, size)`` of each tile along one axis of ``length`` pixels."""
    if patch_size < 1 or not 1 <= min_edge <= patch_size:
        raise ValueError(f"need patch_size >= 1 and 1 <= min_edge <= patch_size, got {patch_size}, {min_edge}")
    full = length // patch_size
    spans = [(i * patch_size, patch_size) for i in range(full)]
    rest = length - full * patch_size
    if rest >= min_edge:
        spans.append((full * patch_size, rest))
    return spans


def tile_grid(height: int, width: int, patch_size: int = 224, min_edge: int = 112) -> np.ndarray:
    """All crops of a ``height x width`` image as an int64 array of rows ``(y, x, h, w)``."""
    rows = [
        (y, x, h, w)
        for y, h in tile_spans(height, patch_size, min_edge)
        for x, w in tile_spans(width, patch_size, min_edge)
    ]
    return np.array(rows, dtype=np.int64).reshape(-1, 4)


def crop_patches(
    image: np.ndarray, grid: np.ndarray, patch_size: int = 224, out: np.ndarray | None = None
) -> np.ndarray:
    """Cut ``image`` (uint8, ``(rows, cols)``) at ``grid`` rows ``(y, x, h, w)``.

    Returns uint8 ``(len(grid), patch_size, patch_size)``, written into ``out`` when given
    (e.g. a slice of a batch buffer); full-size crops are exact copies of the source pixels,
    edge crops are resized bilinearly.
    """
    if out is None:
        out = np.empty((len(grid), patch_size, patch_size), np.uint8)
    elif out.shape != (len(grid), patch_size, patch_size) or out.dtype != np.uint8:
        raise ValueError(f"out must be uint8 {(len(grid), patch_size, patch_size)}, got {out.dtype} {out.shape}")
    for i, (y, x, h, w) in enumerate(grid):
        crop = image[y : y + h, x : x + w]
        if h == patch_size and w == patch_size:
            out[i] = crop
        else:
            out[i] = np.asarray(
                Image.fromarray(np.ascontiguousarray(crop)).resize((patch_size, patch_size), resample=Image.BILINEAR)
            )
    return out

"""The four image-level statistics of the CEM500K Random Forest baseline, batched.

Conrad & Narayan (2021, "Uninformative patch filtering") compared their ResNet34 filter
with a Random Forest on four statistics per patch: the standard deviations of the local
binary pattern (LBP) image and of the local entropy image, the median of the (local)
geometric mean and the mean of a Canny edge map. The paper names them without
parameters; the exact definitions used here are:

==================  =========================================================================
``lbp_std``         std of the rotation-invariant *uniform* LBP image with P=8 neighbours on a
                    circle of radius R=1 px (values 0..9; Ojala et al. 2002), neighbours
                    bilinearly interpolated, zero outside the patch. Equals
                    ``skimage.feature.local_binary_pattern(patch, 8, 1, "uniform").std()``.
``entropy_std``     std of the local Shannon entropy image (bits): the histogram of the grey
                    levels quantised to 32 (``value >> 3``) in a 9x9 window, clipped at the
                    patch border. Equals the std of
                    ``skimage.filters.rank.entropy(patch >> 3, np.ones((9, 9)))``.
``geomean_median``  median over the patch of the local geometric mean in a 9x9 window
                    clipped at the border, ``exp(mean(log(1 + x))) - 1`` in grey levels
                    (the ``+1`` keeps black pixels finite); skimage's
                    ``filters.rank.geometric_mean`` is the same filter rounded to uint8.
``canny_mean``      fraction of pixels on a Canny edge (``skimage.feature.canny`` with
                    sigma=1 px, hysteresis thresholds 0.1/0.2 of the [0, 1] intensity range).
==================  =========================================================================

Everything is computed on whole batches with NumPy except Canny, whose hysteresis step is
per image; skimage's compiled implementation is then the fastest correct choice.
"""

from __future__ import annotations

import numpy as np

from cemcurate.common.lazy import lazy_import

skimage_feature = lazy_import("skimage.feature")

FEATURE_NAMES = ("lbp_std", "entropy_std", "geomean_median", "canny_mean")

LBP_POINTS = 8
LBP_RADIUS = 1.0
ENTROPY_WINDOW = 9
ENTROPY_SHIFT = 3  # 256 grey levels >> 3 = 32 histogram bins
GEOMEAN_WINDOW = 9
CANNY_SIGMA = 1.0
CANNY_LOW, CANNY_HIGH = 0.1, 0.2

# Patches per internal chunk: keeps the (chunk, p, p) temporaries in the CPU cache range
# instead of allocating gigabytes for a large batch.
_CHUNK = 8


def check_patches(patches: np.ndarray) -> np.ndarray:
    """Validate a batch: uint8, shape ``(n, p, p)`` with ``p >= 16``; returns it unchanged."""
    patches = np.asarray(patches)
    if patches.dtype != np.uint8 or patches.ndim != 3 or patches.shape[1] != patches.shape[2]:
        raise ValueError(f"expected uint8 patches of shape (n, p, p), got {patches.dtype} {patches.shape}")
    if patches.shape[1] < 16:
        raise ValueError(f"patches must be at least 16x16 pixels, got {patches.shape[1]}x{patches.shape[2]}")
    return patches


def box_sum_u8(mask: np.ndarray, window: int) -> np.ndarray:
    """Sum of ``mask`` over a ``window x window`` square around each pixel, clipped at the border.

    Args:
        mask: uint8 ``(n, h, w)`` with small non-negative values.
        window: odd window edge in pixels, at most 15 so that sums of a 0/1 mask fit uint8.

    Returns:
        uint8 ``(n, h, w)``. Separable shifted additions in uint8 are SIMD-friendly and an
        order of magnitude faster than cumulative sums for windows this small.
    """
    r = window // 2
    n, h, w = mask.shape
    padded = np.zeros((n, h + 2 * r, w + 2 * r), np.uint8)
    padded[:, r : r + h, r : r + w] = mask
    rows = padded[:, 0:h].copy()
    for i in range(1, window):
        rows += padded[:, i : i + h]
    out = rows[:, :, 0:w].copy()
    for j in range(1, window):
        out += rows[:, :, j : j + w]
    return out


def lbp_uniform(patches: np.ndarray, points: int = LBP_POINTS, radius: float = LBP_RADIUS) -> np.ndarray:
    """Rotation-invariant uniform LBP codes of a batch (float64 ``(n, p, p)``, values ``0..points+1``).

    A neighbour bit is 1 when the bilinearly interpolated neighbour is >= the centre. A
    pattern with at most two 0/1 transitions around the circle ("uniform") is coded by
    its number of ones, every other pattern by ``points + 1``. The interpolation weights
    are computed per row and column exactly as a per-pixel loop would, so the codes match
    ``skimage.feature.local_binary_pattern(..., method="uniform")`` bit for bit.
    """
    img = check_patches(patches).astype(np.float64)
    n, h, w = img.shape
    angles = 2 * np.pi * np.arange(points) / points
    # Rounded to 5 decimals so that axis-aligned neighbours land exactly on pixels.
    d_row = np.round(-radius * np.sin(angles), 5)
    d_col = np.round(radius * np.cos(angles), 5)
    pad = int(np.ceil(radius)) + 1
    padded = np.zeros((n, h + 2 * pad, w + 2 * pad))
    padded[:, pad : pad + h, pad : pad + w] = img
    rows, cols = np.arange(h, dtype=np.float64), np.arange(w, dtype=np.float64)
    ones = np.zeros((n, h, w), np.int8)
    transitions = np.zeros((n, h, w), np.int8)
    first = previous = None
    for i in range(points):
        rr, cc = rows + d_row[i], cols + d_col[i]
        r0, c0 = np.floor(rr), np.floor(cc)
        dr, dc = (rr - r0)[:, None], (cc - c0)[None, :]
        # floor/ceil of r + offset differ from r by a constant for every row, so the four
        # corner images are plain slices of the zero-padded batch.
        lo_r, hi_r = int(r0[0]) + pad, int(np.ceil(rr[0])) + pad
        lo_c, hi_c = int(c0[0]) + pad, int(np.ceil(cc[0])) + pad
        a = padded[:, lo_r : lo_r + h, lo_c : lo_c + w]
        if not dr.any() and not dc.any():
            # A neighbour exactly on a pixel: the interpolation would return it unchanged.
            value = a
        else:
            b = padded[:, lo_r : lo_r + h, hi_c : hi_c + w]
            c = padded[:, hi_r : hi_r + h, lo_c : lo_c + w]
            d = padded[:, hi_r : hi_r + h, hi_c : hi_c + w]
            top = (1 - dc) * a + dc * b
            bottom = (1 - dc) * c + dc * d
            value = (1 - dr) * top + dr * bottom
        bit = (value - img >= 0).astype(np.int8)
        ones += bit
        if previous is None:
            first = bit
        else:
            transitions += bit != previous
        previous = bit
    transitions += previous != first  # close the circle
    return np.where(transitions <= 2, ones, points + 1).astype(np.float64)


_XLOGX = np.zeros(256, np.float64)
_XLOGX[1:] = np.arange(1, 256) * np.log2(np.arange(1, 256))


def local_entropy(patches: np.ndarray, window: int = ENTROPY_WINDOW, shift: int = ENTROPY_SHIFT) -> np.ndarray:
    """Local Shannon entropy in bits (float64 ``(n, p, p)``) of ``patches >> shift`` in a square window.

    With ``c_k`` pixels of level ``k`` among the ``N`` window pixels inside the patch,
    ``H = log2 N - sum_k c_k log2 c_k / N``; the counts are exact integers.
    """
    if window % 2 == 0 or not 1 <= window <= 15:
        raise ValueError(f"entropy window must be odd and at most 15, got {window}")
    q = check_patches(patches) >> shift
    n, h, w = q.shape
    pop = box_sum_u8(np.ones((1, h, w), np.uint8), window).astype(np.float64)
    acc = np.zeros((n, h, w), np.float64)
    for level in np.unique(q):
        acc += _XLOGX[box_sum_u8((q == level).view(np.uint8), window)]
    return np.log2(pop) - acc / pop


def local_geometric_mean(patches: np.ndarray, window: int = GEOMEAN_WINDOW) -> np.ndarray:
    """Local geometric mean ``exp(mean(log(1 + x))) - 1`` in grey levels (float64 ``(n, p, p)``).

    The mean is over the part of the ``window x window`` square inside the patch.
    """
    if window % 2 == 0 or not 1 <= window <= 15:
        raise ValueError(f"geometric-mean window must be odd and at most 15, got {window}")
    logs = np.log1p(check_patches(patches).astype(np.float64))
    n, h, w = logs.shape
    r = window // 2
    # Integral image in float64: exact enough (sums of <= 81 logs <= 5.6) and O(1) per pixel.
    integral = np.zeros((n, h + 2 * r + 1, w + 2 * r + 1))
    integral[:, r + 1 : r + 1 + h, r + 1 : r + 1 + w] = logs
    np.cumsum(integral, 1, out=integral)
    np.cumsum(integral, 2, out=integral)
    k = window
    sums = integral[:, k:, k:] - integral[:, :-k, k:] - integral[:, k:, :-k] + integral[:, :-k, :-k]
    pop = box_sum_u8(np.ones((1, h, w), np.uint8), window).astype(np.float64)
    return np.expm1(sums / pop)


def canny_fraction(patches: np.ndarray, sigma: float = CANNY_SIGMA) -> np.ndarray:
    """Fraction of pixels on a Canny edge per patch (float64 ``(n,)``, in [0, 1])."""
    patches = check_patches(patches)
    out = np.empty(len(patches), np.float64)
    for i, patch in enumerate(patches):
        edges = skimage_feature.canny(
            patch.astype(np.float64) / 255.0, sigma=sigma, low_threshold=CANNY_LOW, high_threshold=CANNY_HIGH
        )
        out[i] = edges.mean()
    return out


def image_statistics(patches: np.ndarray) -> np.ndarray:
    """The four CEM500K statistics of each patch.

    Args:
        patches: uint8 ``(n, p, p)``.

    Returns:
        float64 ``(n, 4)``, columns in :data:`FEATURE_NAMES` order: LBP std (code units),
        entropy std (bits), median local geometric mean (grey levels 0-255), Canny edge
        fraction (0-1). See the module docstring for the definitions.
    """
    patches = check_patches(patches)
    out = np.empty((len(patches), len(FEATURE_NAMES)), np.float64)
    for start in range(0, len(patches), _CHUNK):
        chunk = patches[start : start + _CHUNK]
        sl = slice(start, start + len(chunk))
        out[sl, 0] = lbp_uniform(chunk).reshape(len(chunk), -1).std(1)
        out[sl, 1] = local_entropy(chunk).reshape(len(chunk), -1).std(1)
        out[sl, 2] = np.median(local_geometric_mean(chunk).reshape(len(chunk), -1), axis=1)
        out[sl, 3] = canny_fraction(chunk)
    return out

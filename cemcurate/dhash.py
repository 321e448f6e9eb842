"""Batched 64-bit difference hashes, bit-identical to ``imagehash.dhash(..., hash_size=8)``.

The paper (Conrad & Narayan 2021, "Deduplication") hashes every 224 x 224 patch with the
difference hash of imagehash at hash size 8. imagehash does, per image::

    pixels = np.asarray(image.convert("L").resize((9, 8), Image.LANCZOS))
    bits = pixels[:, 1:] > pixels[:, :-1]          # (8, 8) bool, row-major

and its hex string reads the 64 bits row-major, most significant first. Calling Pillow once
per patch costs far more than the arithmetic, so this module reproduces Pillow's resampler
for 8-bit single-band images exactly and runs it on a whole batch with two matrix products.

Facts of Pillow's resampler that the emulation depends on (``src/libImaging/Resample.c``
and ``Image.resize`` of Pillow >= 7; checked against the installed Pillow by the tests):

* ``Image.resize`` does no box pre-reduction unless ``reducing_gap`` is given, and imagehash
  does not give it. An image already 9 x 8 is returned unchanged.
* Lanczos is ``sinc(x) * sinc(x / 3)`` on ``[-3, 3)``. For a reduction by ``scale =
  in / out`` the support is widened to ``3 * max(scale, 1)`` input pixels and the filter is
  evaluated at ``(i - center + 0.5) * (1 / max(scale, 1))`` for input pixel ``i`` and
  ``center = (o + 0.5) * scale``. The window is ``[int(center - support + 0.5),
  int(center + support + 0.5))`` (C casts truncate toward zero), clamped to the image.
* Each output's weights are divided by their sum, then turned into fixed point with 22
  fraction bits, rounding half away from zero.
* A pass is skipped when that axis keeps its size. Up to Pillow 12 the horizontal pass
  always runs first. Pillow 13 (python-pillow/Pillow#9549, "If height is scaled down
  significantly more than width, resize vertically first") runs the vertical pass first
  when ``H > 8 and H - 8 > 2 * (W - 9)`` for a 9 x 8 target; we determined that rule by
  comparing both orders with the installed Pillow 13.0.0 over ~800 sizes from 1 to 3000
  pixels (e.g. a 224 x 112 edge crop goes vertical-first, 224 x 224 horizontal-first).
  The order changes the result because of the next point.
* Each pass accumulates ``2**21 + sum(pixel * weight)`` in integers, shifts right by 22
  (an arithmetic shift, i.e. floor) and clips to 0..255, so the intermediate image is
  rounded to uint8 before the second pass.

The integer sums are formed with float64 BLAS products, which is exact: every product and
partial sum is an integer below 2**53 as long as H and W stay below about 6 million pixels.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache

import numpy as np

from cemcurate.common.lazy import lazy_import

try:
    from PIL import __version__ as _PILLOW_VERSION
except ImportError:  # Pillow is only needed to choose the pass order of the version in use
    _PILLOW_VERSION = "13"

threadpoolctl = lazy_import("threadpoolctl")

__all__ = ["dhash64", "dhash_hex", "hex_to_dhash", "HASH_WIDTH", "HASH_HEIGHT"]

# imagehash.dhash(hash_size=8) resizes to (width 9, height 8) and compares neighbouring columns.
HASH_WIDTH = 9
HASH_HEIGHT = 8

# Whether to follow Pillow >= 13 in resizing tall images vertically first (see above).
PILLOW_VERTICAL_FIRST = int(_PILLOW_VERSION.split(".")[0]) >= 13

# Beyond this side length float64 sums of pixel x weight products could exceed 2**53.
_MAX_SIDE = 1 << 22

_HEX64 = re.compile(r"[0-9a-fA-F]{16}")

_PRECISION_BITS = 22  # Pillow: 32 bits minus 8 for the pixel minus 2 for overshoot
_LANCZOS_SUPPORT = 3.0

# Patches are converted to float64 chunk by chunk; a chunk this size (about 6 MB of float64
# for 224 x 224 patches) was the fastest of 2 to 32 patches per chunk.
_CHUNK_PIXELS = 16 * 224 * 224


def _sinc(x: float) -> float:
    # Same operation order as Pillow's sinc_filter so weights agree to the last bit.
    if x == 0.0:
        return 1.0
    x = x * math.pi
    return math.sin(x) / x


def _lanczos3(x: float) -> float:
    if -3.0 <= x < 3.0:
        return _sinc(x) * _sinc(x / 3)
    return 0.0


@lru_cache(maxsize=64)
def _resample_matrix(in_size: int, out_size: int) -> np.ndarray:
    """Pillow's fixed-point Lanczos weights as a dense (out_size, in_size) float64 matrix.

    Entries are integers (weights scaled by 2**22); zeros outside each output's window.
    Cached because a curation run sees only a handful of patch sizes.
    """
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support = _LANCZOS_SUPPORT * filterscale
    inverse_filterscale = 1.0 / filterscale
    matrix = np.zeros((out_size, in_size), dtype=np.float64)
    for out_index in range(out_size):
        center = (out_index + 0.5) * scale
        # int() truncates toward zero like the C cast; negatives are clamped anyway.
        first = max(int(center - support + 0.5), 0)
        stop = min(int(center + support + 0.5), in_size)
        weights = [_lanczos3((i - center + 0.5) * inverse_filterscale) for i in range(first, stop)]
        total = 0.0
        for w in weights:  # sequential sum, as in C, for the same rounding
            total += w
        if total != 0.0:
            weights = [w / total for w in weights]
        scaled = [w * (1 << _PRECISION_BITS) for w in weights]
        fixed = [int(s - 0.5) if s < 0 else int(s + 0.5) for s in scaled]
        matrix[out_index, first:stop] = fixed
    matrix.setflags(write=False)
    return matrix


def _fixed_point_to_uint8(sums: np.ndarray) -> np.ndarray:
    """Pillow's clip8: floor((sum + 2**21) / 2**22) clipped to 0..255, on float64 integers."""
    shifted = np.floor((sums + float(1 << (_PRECISION_BITS - 1))) * (1.0 / (1 << _PRECISION_BITS)))
    return np.clip(shifted, 0.0, 255.0, out=shifted)


def _vertical_pass_first(height: int, width: int) -> bool:
    return PILLOW_VERTICAL_FIRST and height > HASH_HEIGHT and height - HASH_HEIGHT > 2 * (width - HASH_WIDTH)


def _resize_to_hash_grid(patches: np.ndarray) -> np.ndarray:
    """Pillow LANCZOS resize of uint8 (N, H, W) to (N, 8, 9), as float64 values 0..255."""
    n, height, width = patches.shape
    pixels = patches.astype(np.float64)
    if _vertical_pass_first(height, width):  # tall patches only (Pillow >= 13)
        pixels = _fixed_point_to_uint8(np.matmul(_resample_matrix(height, HASH_HEIGHT), pixels))
        if width != HASH_WIDTH:
            pixels = _fixed_point_to_uint8(pixels @ _resample_matrix(width, HASH_WIDTH).T)
        return pixels
    # Horizontal pass first, as one (9, W) x (W, N * H) product: BLAS is faster with the long
    # dimension last than with a (N * H, W) x (W, 9) product. Result is laid out (9, N, H).
    if width != HASH_WIDTH:
        columns = _fixed_point_to_uint8(_resample_matrix(width, HASH_WIDTH) @ pixels.reshape(n * height, width).T)
    else:
        columns = np.ascontiguousarray(pixels.reshape(n * height, width).T)
    if height != HASH_HEIGHT:
        resized = _fixed_point_to_uint8(
            columns.reshape(HASH_WIDTH * n, height) @ _resample_matrix(height, HASH_HEIGHT).T
        )
    else:
        resized = columns.reshape(HASH_WIDTH * n, height)
    return resized.reshape(HASH_WIDTH, n, HASH_HEIGHT).transpose(1, 2, 0)  # (N, 8, 9)


# Bit weight of each of the 64 comparisons: row-major, first comparison most significant,
# which is the order of imagehash's hex string.
_BIT_WEIGHTS = (np.uint64(1) << np.arange(63, -1, -1, dtype=np.uint64)).reshape(HASH_HEIGHT, HASH_WIDTH - 1)


def _dhash_chunk(patches: np.ndarray) -> np.ndarray:
    grid = _resize_to_hash_grid(patches)
    brighter_than_left = grid[:, :, 1:] > grid[:, :, :-1]  # (N, 8, 8)
    return np.where(brighter_than_left, _BIT_WEIGHTS, np.uint64(0)).sum(axis=(1, 2), dtype=np.uint64)


@lru_cache(maxsize=1)
def _blas_controller():
    """threadpoolctl's view of the BLAS libraries loaded (numpy's OpenBLAS), or None without threadpoolctl."""
    try:
        return threadpoolctl.ThreadpoolController()
    except ImportError:
        return None


def _one_blas_thread():
    """A context in which BLAS runs on one thread.

    The resampling products are skinny ((9, W) x (W, N * H)); OpenBLAS threads cost more
    than they give there: with 2 threads on 2 cores, 2074 patches took 0.71-0.92 s instead
    of 0.24 s (measured), and a build runs one such process per core anyway.
    """
    controller = _blas_controller()
    return controller.limit(limits=1, user_api="blas") if controller is not None else contextlib.nullcontext()


def dhash64(patches: np.ndarray, workers: int = 1) -> np.ndarray:
    """Difference hashes of a batch of grey patches, identical to imagehash's dhash.

    Parameters
    ----------
    patches : np.ndarray
        uint8 array of shape (N, H, W), H >= 1 and W >= 1 pixels (typically 224 x 224).
        N may be 0.
    workers : int
        Number of threads to split the batch across (>= 1). The heavy steps (dtype
        conversion and BLAS products) release the GIL. BLAS itself runs on one thread
        during the call (see :func:`_one_blas_thread`).

    Returns
    -------
    np.ndarray
        uint64 array of shape (N,). Hash ``h`` equals
        ``int(str(imagehash.dhash(PIL.Image.fromarray(p), hash_size=8)), 16)``:
        bit ``63 - (8 * row + col)`` is set when pixel ``(row, col + 1)`` of the 9 x 8
        Lanczos thumbnail is brighter than pixel ``(row, col)``.
    """
    if not isinstance(patches, np.ndarray):
        raise ValueError(f"patches must be a numpy array, got {type(patches).__name__}")
    if patches.dtype != np.uint8:
        raise ValueError(f"patches must be uint8 (standardise intensities first), got dtype {patches.dtype}")
    if patches.ndim != 3:
        raise ValueError(
            f"patches must have shape (N, H, W), got {patches.ndim} dimension(s) {patches.shape};"
            " wrap a single patch with patches[None]"
        )
    n, height, width = patches.shape
    if height < 1 or width < 1:
        raise ValueError(f"patches must be at least 1 x 1 pixels, got H={height}, W={width}")
    if max(height, width) >= _MAX_SIDE:
        raise ValueError(
            f"patches of {height} x {width} pixels are too large to hash exactly; cut them into patches first"
        )
    if isinstance(workers, bool) or not isinstance(workers, (int, np.integer)) or workers < 1:
        raise ValueError(f"workers must be a positive integer, got {workers!r}")
    if n == 0:
        return np.zeros(0, dtype=np.uint64)

    chunk = max(1, _CHUNK_PIXELS // (height * width))
    starts = range(0, n, chunk)
    with _one_blas_thread():
        if workers == 1 or n <= chunk:
            return np.concatenate([_dhash_chunk(patches[s : s + chunk]) for s in starts])
        hashes = np.empty(n, dtype=np.uint64)

        def run(start: int) -> None:
            hashes[start : start + chunk] = _dhash_chunk(patches[start : start + chunk])

        with ThreadPoolExecutor(max_workers=min(int(workers), os.cpu_count() or 1, len(starts))) as pool:
            list(pool.map(run, starts))
        return hashes


def dhash_hex(hashes: np.ndarray) -> list[str]:
    """16-character lower-case hex strings, identical to ``str(imagehash.dhash(...))``.

    ``hashes``: uint64 array of shape (N,) (a 0-d array or numpy scalar counts as N=1).
    """
    values = np.asarray(hashes)
    if values.dtype != np.uint64:
        raise ValueError(f"hashes must be uint64, got dtype {values.dtype}")
    if values.ndim > 1:
        raise ValueError(f"hashes must be one-dimensional, got shape {values.shape}")
    return [f"{int(v):016x}" for v in values.reshape(-1)]


def hex_to_dhash(strings) -> np.ndarray:
    """Inverse of :func:`dhash_hex`: an iterable of 16-hex-digit strings to uint64 of shape (N,)."""
    if isinstance(strings, str):
        raise ValueError("hex_to_dhash expects a list of strings, not a single string; wrap it in a list")
    values = []
    for s in strings:
        # fullmatch, because int(s, 16) alone would also take "0x", "_", signs and spaces
        if not isinstance(s, str) or _HEX64.fullmatch(s) is None:
            raise ValueError(f"a 64-bit dhash is exactly 16 hex digits, got {s!r}")
        values.append(int(s, 16))
    return np.array(values, dtype=np.uint64)

"""2D raster images: PNG (8/16 bit), JPEG, BMP, read with Pillow.

Opening reads only the header; the pixels are decoded by ``read_slices``. Colour becomes
gray with :func:`to_grayscale`. Pillow reduces 16-bit colour PNGs to 8 bit, so those
(rare) files are decoded with OpenCV instead. These formats carry no trustworthy voxel
size (a PNG ``pHYs`` or JPEG DPI is print resolution, typically 72 dpi), so
``voxel_size`` is always ``None``.
"""

from __future__ import annotations

import contextlib
import struct
import threading
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from cemcurate.common.lazy import lazy_import

from .base import ReadError, Slicer, Volume, to_grayscale

cv2 = lazy_import("cv2")

_FORMAT_OF_SUFFIX = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".bmp": "BMP"}
_DTYPE_OF_MODE = {
    "I;16": np.uint16,
    "I;16L": np.uint16,
    "I;16B": np.uint16,
    "I;16N": np.uint16,
    "I": np.int32,
    "F": np.float32,
}
_PIL_LOCK = threading.Lock()


@contextlib.contextmanager
def open_pil_image(path: Path | str):
    """Pillow image without its decompression-bomb limit: EM montages are legitimately huge."""
    with _PIL_LOCK:
        saved, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
        try:
            im = Image.open(path)
        except UnidentifiedImageError as exc:
            raise ReadError(
                path,
                "not a readable image (Pillow cannot identify its content); the file is corrupt "
                "or its extension does not match its content",
            ) from exc
        finally:
            Image.MAX_IMAGE_PIXELS = saved
    try:
        yield im
    finally:
        im.close()


def _png_header(path: Path | str) -> tuple[int, int] | None:
    """``(bit_depth, colour_type)`` from a PNG's IHDR chunk, or ``None`` if not a PNG."""
    with open(path, "rb") as fh:
        head = fh.read(26)
    if len(head) < 26 or head[:8] != b"\x89PNG\r\n\x1a\n" or head[12:16] != b"IHDR":
        return None
    return struct.unpack(">BB", head[24:26])


def read_image(path: Path, dataset: str | None = None) -> list[Volume]:
    """One ``(1, y, x)`` volume from a PNG, JPEG or BMP file.

    dtype: uint8, or uint16 for 16-bit PNG; Pillow's 32-bit integer/float modes give
    int32/float32.
    """
    notes: list[str] = []
    with open_pil_image(path) as im:
        fmt, mode, (width, height) = im.format, im.mode, im.size
        frames = getattr(im, "n_frames", 1)
    expected = _FORMAT_OF_SUFFIX.get(path.suffix.lower())
    if expected and fmt != expected:
        notes.append(f"content is {fmt} although the name says {expected}")
    if frames > 1:
        notes.append(f"image has {frames} frames; only the first is read")
    png = _png_header(path) if fmt == "PNG" else None
    use_cv2 = png is not None and png[0] == 16 and png[1] in (2, 4, 6)
    if use_cv2:
        dtype = np.dtype(np.uint16)
    else:
        dtype = np.dtype(_DTYPE_OF_MODE.get(mode, np.uint8))
    slicer = _ImageSlicer(path, (1, height, width), dtype, use_cv2)
    return [Volume(shape=(1, height, width), dtype=dtype, read_slices=slicer, reader="image", notes=notes)]


class _ImageSlicer(Slicer):
    def __init__(self, path, shape, dtype, use_cv2: bool):
        super().__init__(path, shape, dtype)
        self.use_cv2 = use_cv2

    def _read(self, z0: int, z1: int) -> np.ndarray:
        arr = self._decode_cv2() if self.use_cv2 else self._decode_pil()
        return to_grayscale(arr, self.path)[np.newaxis]

    def _decode_pil(self) -> np.ndarray:
        with open_pil_image(self.path) as im:
            im.seek(0)
            if im.mode == "1" or im.mode in ("P", "PA", "CMYK", "YCbCr", "LAB", "HSV", "RGBa", "RGBX"):
                im = im.convert("L" if im.mode == "1" else "RGB")
            elif im.mode == "La":
                im = im.convert("LA")
            return np.asarray(im)

    def _decode_cv2(self) -> np.ndarray:
        arr = cv2.imdecode(np.fromfile(self.path, dtype=np.uint8), cv2.IMREAD_UNCHANGED)
        if arr is None:
            raise ReadError(self.path, "OpenCV could not decode this 16-bit colour PNG")
        if arr.ndim == 3 and arr.shape[-1] in (3, 4):
            arr = np.concatenate([arr[..., 2::-1], arr[..., 3:]], axis=-1)  # BGR(A) -> RGB(A)
        return arr

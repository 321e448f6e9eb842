"""Lazy readers for EM image formats, one small module per format, dispatched by suffix.

>>> from cemcurate.io import open_file
>>> [vol] = open_file("tomo.mrc")          # only the header is read
>>> vol.shape, vol.dtype, vol.voxel_size   # (z, y, x), native dtype, nm or None
>>> block = vol.read_slices(10, 20)        # (10, y, x) ndarray

See :mod:`cemcurate.io.base` for the :class:`Volume` contract and each format module
for its metadata sources.
"""

from .base import ReadError, Volume, nm_per_unit, to_grayscale
from .formats import SUPPORTED_SUFFIXES, ZARR_SUFFIXES, is_supported, open_file, suffix_of
from .handles import close_all as close_cached_files
from .series import natural_sort_key, open_series
from .writers import WRITABLE_SUFFIXES, ChunkedOutput, open_chunked_output, write_volume

__all__ = [
    "SUPPORTED_SUFFIXES",
    "WRITABLE_SUFFIXES",
    "ZARR_SUFFIXES",
    "ChunkedOutput",
    "ReadError",
    "Volume",
    "close_cached_files",
    "is_supported",
    "natural_sort_key",
    "nm_per_unit",
    "open_chunked_output",
    "open_file",
    "open_series",
    "suffix_of",
    "to_grayscale",
    "write_volume",
]

"""TIFF: single pages, multi-page stacks, ImageJ and OME hyperstacks (tifffile).

Every image series in the file becomes one volume, split further by channel/time as
described in :mod:`cemcurate.io.axes`. How pixels are read, fastest first:

* uncompressed data stored contiguously are memory-mapped (``read_slices`` touches only
  the requested pages);
* a series whose pages each hold one 2D plane (compressed, tiled or scattered pages: the
  stacks microscopes and Fiji write) is decoded page by page by tifffile, each page
  straight into the output array;
* anything else (planar-separate colour, SGI depth pages) goes through tifffile's zarr
  view.

The open file (and the zarr view) is kept in :mod:`cemcurate.io.handles`. Codecs tifffile
cannot decode without the optional ``imagecodecs`` package (LZW, JPEG) are decoded page by
page with Pillow.

Voxel size, in order: OME-XML ``PhysicalSizeX/Y/Z`` with their units (default µm);
ImageJ ``unit`` with the X/YResolution tags (pixels per unit) and ``spacing`` (z);
otherwise the X/YResolution tags only when ResolutionUnit is centimetre (an inch
resolution is print DPI and is ignored).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np

from cemcurate.common.lazy import lazy_import

from . import handles
from .axes import AxisPlan, plan_axes
from .base import NAN, ReadError, Slicer, Volume, lateral_only, nm_per_unit, spacing_nm, to_grayscale
from .images import open_pil_image

tifffile = lazy_import("tifffile")
zarr = lazy_import("zarr")


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@contextlib.contextmanager
def _tifffile_log():
    """Capture tifffile's log: it reports broken page chains only there, not as exceptions."""
    log = logging.getLogger("tifffile")
    handler = _Collect()
    log.addHandler(handler)
    try:
        yield handler.records
    finally:
        log.removeHandler(handler)


def read_tiff(path: Path, dataset: str | None = None) -> list[Volume]:
    """Volumes from a TIFF file; see the module docstring for axes and voxel size."""
    size = os.path.getsize(path)
    with _tifffile_log() as log:
        try:
            tif = tifffile.TiffFile(path)
        except tifffile.TiffFileError as exc:
            raise ReadError(path, f"not a valid TIFF file ({exc}); the file is corrupt or not a TIFF") from exc
        with tif:
            all_series = [s for s in tif.series if s.shape and len(s.shape) >= 2]
            errors = [r.getMessage() for r in log if r.levelno >= logging.ERROR]
            if errors:
                raise ReadError(
                    path,
                    "the TIFF structure is damaged ("
                    + "; ".join(errors)[:400]
                    + "); the file is probably truncated or corrupt",
                )
            if not all_series:
                raise ReadError(path, "the TIFF holds no image data")
            notes = [f"tifffile: {r.getMessage()}"[:200] for r in log]
            volumes: list[Volume] = []
            for index, series in enumerate(all_series):
                prefix = f"series{index}" if len(all_series) > 1 else None
                volumes += _series_volumes(path, tif, index, series, size, prefix, list(notes))
    return volumes


def _series_volumes(path, tif, index, series, file_size, prefix, notes) -> list[Volume]:
    axes, shape = series.axes, tuple(series.shape)
    dtype = np.dtype(series.dtype)
    offset = series.dataoffset
    if offset is not None:
        need = offset + int(np.prod(shape)) * dtype.itemsize
        if need > file_size:
            raise ReadError(
                path, f"truncated: the header promises pixel data up to byte {need} but the file has {file_size} bytes"
            )
        source = ("memmap", int(offset), dtype.newbyteorder(tif.byteorder).str, shape)
    else:
        _check_pages(path, series, file_size)
        if not _tifffile_decodes(series.keyframe):
            source = _pillow_source(path, tif, series)
        elif _one_plane_per_page(series):
            lead = len(shape) - len(series.keyframe.shape)
            source = ("pages", index, shape[:lead], tuple(series.keyframe.shape))
        else:
            source = ("zarr", index)
    voxel, vnotes = _voxel_size(tif, index, series)
    volumes = []
    for name, plan, xy_only in plan_axes(axes, shape, path):
        z = plan.z_size(shape)
        vshape = (z, shape[axes.index("Y")], shape[axes.index("X")])
        slicer = _TiffSlicer(path, vshape, dtype, source, plan)
        key = ":".join(p for p in (prefix, name) if p) or None
        volumes.append(
            Volume(
                shape=vshape,
                dtype=dtype,
                read_slices=slicer,
                reader="tiff",
                voxel_size=lateral_only(voxel) if xy_only else voxel,
                xy_only=xy_only,
                dataset=key,
                notes=notes + vnotes,
            )
        )
    return volumes


def _check_pages(path, series, file_size: int) -> None:
    for i, page in enumerate(series.pages):
        if page is None:
            raise ReadError(path, f"page {i} of the image series is missing; the file is truncated or corrupt")
        ends = [o + c for o, c in zip(page.dataoffsets, page.databytecounts)]
        if ends and max(ends) > file_size:
            raise ReadError(
                path, f"truncated: page {i} needs bytes up to {max(ends)} but the file has {file_size} bytes"
            )


def _one_plane_per_page(series) -> bool:
    """Whether every page of ``series`` holds one ``YX`` (or ``YXS``) plane, in C order over the
    series' leading axes: then page ``i`` is plane ``i`` of the series."""
    page_axes = series.keyframe.axes
    lead = len(series.axes) - len(page_axes)
    return (
        page_axes in ("YX", "YXS")
        and lead >= 0
        and series.axes[lead:] == page_axes
        and not set(series.axes[:lead]) & set("YXS")
        and tuple(series.shape[lead:]) == tuple(series.keyframe.shape)
        and int(np.prod(series.shape[:lead])) == len(series)
    )


def _tifffile_decodes(page) -> bool:
    return page.compression in tifffile.TIFF.DECOMPRESSORS and page.predictor in tifffile.TIFF.UNPREDICTORS


def _pillow_source(path, tif, series) -> tuple:
    """Decode with Pillow when tifffile lacks the codec (LZW, JPEG need 'imagecodecs').

    Pillow numbers pages by their order in the file, so this works when the series is
    the whole file, which is the case for the stacks microscopes and Fiji write.
    """
    codec = f"{series.keyframe.compression!r}"
    if len(tif.series) != 1 or len(series.pages) != len(tif.pages) or series.keyframe.planarconfig != 1:
        raise ReadError(
            path,
            f"{codec} TIFF data need the 'imagecodecs' package, which is not installed; "
            "install it or re-save the file uncompressed",
        )
    page_shape = tuple(n for a, n in zip(series.axes, series.shape) if a not in "YXS")
    return ("pillow", page_shape)


class _TiffSlicer(Slicer):
    def __init__(self, path, shape, dtype, source: tuple, plan: AxisPlan):
        super().__init__(path, shape, dtype)
        self.source, self.plan = source, plan

    def _read(self, z0: int, z1: int) -> np.ndarray:
        if self.source[0] == "memmap":
            _, offset, file_dtype, stored_shape = self.source
            data = np.memmap(self.path, dtype=np.dtype(file_dtype), mode="r", offset=offset, shape=stored_shape)
            part = np.array(data[self.plan.index(z0, z1)])
            del data
        elif self.source[0] == "pillow":
            return self._read_pillow(z0, z1)
        elif self.source[0] == "pages":
            part = self._read_pages(z0, z1)
        else:
            array = handles.get("tiff", self.path, self._open_zarr, self.source[1])
            part = np.asarray(array[self.plan.index(z0, z1)])
        return self.plan.arrange(part, self.path)

    def _read_pages(self, z0: int, z1: int) -> np.ndarray:
        """Planes ``z0:z1``, each decoded by tifffile from its own page into the result: the
        array ``series[plan.index(z0, z1)]`` would be (stack axis first, then the page's axes)."""
        _, index, lead_shape, page_shape = self.source
        series = handles.get("tiff-pages", self.path, self._open_series, index)
        stacked = self.plan.stack is not None
        part = np.empty(((z1 - z0,) if stacked else ()) + tuple(page_shape), self.dtype)
        for k, z in enumerate(range(z0, z1)):
            # Leading axes are fixed (a channel, a singleton) or the stack: one page per z.
            lead = [i.start if isinstance(i, slice) else i for i in self.plan.index(z, z + 1)[: len(lead_shape)]]
            page = series[int(np.ravel_multi_index(lead, lead_shape))] if lead_shape else series[0]
            page.asarray(out=part[k] if stacked else part)
        return part

    def _read_pillow(self, z0: int, z1: int) -> np.ndarray:
        page_shape = self.source[1]  # pages in file order = C order over the non-YXS axes

        def open_image():
            ctx = open_pil_image(self.path)
            return ctx.__enter__(), lambda: ctx.__exit__(None, None, None)

        image = handles.get("tiff-pillow", self.path, open_image)
        planes = []
        for z in range(z0, z1):
            index = self.plan.index(z, z + 1)
            page = [i.start if isinstance(i, slice) else i for a, i in zip(self.plan.axes, index) if a not in "YXS"]
            image.seek(int(np.ravel_multi_index(page, page_shape)) if page_shape else 0)
            planes.append(np.asarray(image))
        return to_grayscale(np.stack(planes), self.path)

    def _open_series(self):
        tif = tifffile.TiffFile(self.path)
        try:
            series = tif.series[self.source[1]]
        except Exception:
            tif.close()
            raise
        return series, tif.close

    def _open_zarr(self):
        tif = tifffile.TiffFile(self.path)
        try:
            store = tif.series[self.source[1]].aszarr(level=0)
            array = zarr.open(store, mode="r")
        except Exception:
            tif.close()
            raise

        def close():
            store.close()
            tif.close()

        return array, close


def _voxel_size(tif, index: int, series) -> tuple[tuple[float, float, float] | None, list[str]]:
    if tif.is_ome and tif.ome_metadata:
        return _ome_voxel_size(tif.ome_metadata, index)
    page = series.keyframe
    if tif.is_imagej:
        md = tif.imagej_metadata or {}
        unit = md.get("unit")
        scale = nm_per_unit(unit)
        if scale is None:
            note = (
                [f"ImageJ unit {unit!r} is not a length; voxel size unknown"]
                if unit not in (None, "", "pixel", "pixels")
                else []
            )
            return None, note
        y, x = _resolution(page, "YResolution"), _resolution(page, "XResolution")
        if y is None or x is None:
            return None, ["ImageJ unit given without X/YResolution tags; voxel size unknown"]
        z = float(md["spacing"]) if "spacing" in md else NAN
        notes = (
            [] if "spacing" in md or "Z" not in series.axes else ["ImageJ metadata has no 'spacing'; z spacing unknown"]
        )
        return spacing_nm((z, y, x), scale), notes
    unit_tag = page.tags.get("ResolutionUnit")
    if unit_tag is not None and int(unit_tag.value) == 3:  # centimetre
        y, x = _resolution(page, "YResolution"), _resolution(page, "XResolution")
        if y is not None and x is not None:
            return spacing_nm((y, x), 1e7), ["pixel size from TIFF X/YResolution tags (centimetre)"]
    return None, []


def _resolution(page, tag: str) -> float | None:
    """Pixel size in the file's unit from a pixels-per-unit rational tag."""
    t = page.tags.get(tag)
    if t is None:
        return None
    value = t.value
    num, den = value if isinstance(value, tuple) else (value, 1)
    if not num or not den:
        return None
    size = den / num
    return size if math.isfinite(size) and size > 0 else None


def _ome_voxel_size(xml: str, index: int) -> tuple[tuple[float, float, float] | None, list[str]]:
    try:
        root = ET.fromstring(xml)
    except ET.ParseError as exc:
        return None, [f"OME-XML unreadable ({exc}); voxel size unknown"]
    pixels = [el for el in root.iter() if el.tag.rsplit("}", 1)[-1] == "Pixels"]
    if not pixels:
        return None, ["OME-XML has no Pixels element; voxel size unknown"]
    px = pixels[index] if index < len(pixels) else pixels[0]
    sizes = []
    for axis in "ZYX":
        value = px.get(f"PhysicalSize{axis}")
        scale = nm_per_unit(px.get(f"PhysicalSize{axis}Unit", "µm"))
        sizes.append(float(value) * scale if value is not None and scale is not None else NAN)
    result = spacing_nm(tuple(sizes), 1.0)
    return result, ([] if result is not None else ["OME-XML gives no usable PhysicalSizeX/Y; voxel size unknown"])

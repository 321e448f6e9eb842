"""What HDF5 files and zarr stores share: picking arrays and finding voxel sizes in attributes.

Voxel-size attributes are looked up on the array, then on its parent groups up to the
root, first match wins:

- ``element_size_um``: (z, y, x) or (y, x) in micrometres (Fiji HDF5, ilastik);
- ``resolution``, ``voxel_size``, ``pixel_size``, ``spacing``: (z, y, x) or (y, x) in the
  unit named by a ``unit``/``units`` attribute next to it, or nanometres when none is
  given (CREMI convention; a note says it was assumed).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np

from .axes import plan_axes, plan_plain
from .base import ReadError, Slicer, Volume, nm_per_unit, spacing_nm

_SIZE_KEYS = ("resolution", "voxel_size", "pixel_size", "spacing")


def attrs_voxel_size(
    attr_chain: list[Mapping], spatial_ndim: int
) -> tuple[tuple[float, float, float] | None, list[str]]:
    """``(z, y, x)`` nm from the first usable attribute in ``attr_chain`` (array first)."""
    for attrs in attr_chain:
        if "element_size_um" in attrs:
            voxel = _sizes(attrs["element_size_um"], spatial_ndim, 1000.0)
            if voxel is not None:
                return voxel, []
        for key in _SIZE_KEYS:
            if key not in attrs:
                continue
            unit = attrs.get("unit", attrs.get("units"))
            if isinstance(unit, (list, tuple, np.ndarray)) and len(unit):
                unit = unit[-1]
            if isinstance(unit, bytes):
                unit = unit.decode(errors="replace")
            scale = 1.0 if unit is None else nm_per_unit(unit)
            voxel = _sizes(attrs[key], spatial_ndim, scale)
            if voxel is not None:
                return voxel, ([f"attribute '{key}' has no unit; assumed nanometres"] if unit is None else [])
    return None, []


def _sizes(value, spatial_ndim: int, scale: float | None):
    try:
        vals = [float(v) for v in np.atleast_1d(np.asarray(value, dtype=float))]
    except (TypeError, ValueError):
        return None
    if len(vals) not in (2, 3):
        return None
    if spatial_ndim == 3 and len(vals) == 2:
        vals = [float("nan")] + vals
    return spacing_nm(tuple(vals), scale)


def array_volumes(
    path: Path,
    key: str,
    shape: tuple[int, ...],
    dtype: np.dtype,
    attr_chain: list[Mapping],
    reader: str,
    open_array: Callable[[], object],
    explicit: bool,
) -> tuple[list[Volume], str | None]:
    """Volumes for one unlabelled array inside a container, or ``([], reason)`` to skip it.

    ``open_array`` is a picklable callable returning an indexable array (h5py dataset or
    zarr array). With ``explicit`` (the caller asked for this key) an unusable array is a
    :class:`ReadError` instead of a skip.
    """
    dtype = np.dtype(dtype)
    reason = None
    if not (np.issubdtype(dtype, np.number) or dtype == np.bool_) or np.issubdtype(dtype, np.complexfloating):
        reason = f"'{key}' has data type {dtype}, not image intensities"
        axes = ""
    else:
        axes, reason = plan_plain(shape, path, f"'{key}'")
    if reason:
        if explicit:
            raise ReadError(path, reason)
        return [], reason
    spatial = 3 if "Z" in axes else 2
    voxel, notes = attrs_voxel_size(attr_chain, spatial)
    if "S" in axes:
        notes.append("trailing colour axis converted to gray")
    volumes = []
    for name, plan, _ in plan_axes(axes, shape, path):
        vshape = (plan.z_size(shape), shape[axes.index("Y")], shape[axes.index("X")])
        slicer = ContainerSlicer(path, vshape, dtype, open_array, plan)
        volumes.append(
            Volume(
                shape=vshape,
                dtype=dtype,
                read_slices=slicer,
                reader=reader,
                voxel_size=voxel,
                dataset=key if name is None else f"{key}:{name}",
                notes=list(notes),
            )
        )
    return volumes, None


class ContainerSlicer(Slicer):
    """Reads ``plan.index(z0, z1)`` from the array ``open_array()`` returns."""

    def __init__(self, path, shape, dtype, open_array: Callable[[], object], plan):
        super().__init__(path, shape, dtype)
        self.open_array, self.plan = open_array, plan

    def _read(self, z0: int, z1: int) -> np.ndarray:
        array = self.open_array()
        return self.plan.arrange(np.asarray(array[self.plan.index(z0, z1)]), self.path)


def not_found(path: Path, dataset: str, available: list[str]) -> ReadError:
    listing = ", ".join(repr(a) for a in available[:20]) or "none"
    more = f" (and {len(available) - 20} more)" if len(available) > 20 else ""
    return ReadError(path, f"dataset {dataset!r} not found; available image datasets: {listing}{more}")


def finish_volumes(path: Path, volumes: list[Volume], skipped: list[str], what: str, empty: str) -> list[Volume]:
    """The volumes found in a container, or a ReadError if none; skipped entries become notes.

    ``what`` names the kind of entry (``"dataset"``, ``"array"``), ``empty`` what an empty
    container is called (``"the file holds no datasets"``).
    """
    if not volumes:
        why = "; ".join(skipped) if skipped else empty
        raise ReadError(path, f"no 2D/3D image {what} found ({why})")
    if skipped:
        for v in volumes:
            v.notes.append("skipped: " + "; ".join(skipped)[:300])
    return volumes

"""Zarr stores (``*.zarr`` directories, zarr format 2 or 3) and OME-Zarr (NGFF 0.1-0.5).

OME-Zarr: every group carrying ``multiscales`` metadata (``attrs["multiscales"]`` up to
0.4, ``attrs["ome"]["multiscales"]`` in 0.5) is one image, except images under a
``labels`` group (segmentations, not raw data). Only resolution level 0 is read. Its
axes (t, c, z, y, x, by name and type) follow :mod:`cemcurate.io.axes`; the voxel size
is the level-0 ``scale`` transformation (times the multiscale-wide one, if any) in the
axes' units; an axis without a unit has unknown spacing. ``dataset`` is the array path
(``"0"``, ``"plate/A/1/0"``).

Plain zarr: every array that is 2D or 3D (optionally with a trailing RGB axis) is a
volume, as for HDF5 (:mod:`cemcurate.io.containers`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cemcurate.common.lazy import lazy_import

from . import handles
from .axes import plan_axes
from .base import ReadError, Volume, lateral_only, nm_per_unit, spacing_nm
from .containers import ContainerSlicer, array_volumes, finish_volumes, not_found

zarr = lazy_import("zarr")

_AXIS_LETTER = {"t": "T", "c": "C", "z": "Z", "y": "Y", "x": "X"}


def _open_root(path):
    try:
        return zarr.open(store=str(path), mode="r")
    except Exception as exc:
        raise ReadError(
            path,
            f"not a readable zarr store ({type(exc).__name__}: {exc}); a zarr directory holds "
            "'.zgroup'/'.zarray' (format 2) or 'zarr.json' (format 3)",
        ) from exc


class _ZarrArray:
    """Picklable opener: the zarr array at ``key`` inside the store ``path``."""

    def __init__(self, path: str, key: str):
        self.path, self.key = path, key

    def __call__(self):
        return handles.get("zarr", self.path, self._open, self.key)

    def _open(self):
        root = _open_root(self.path)
        return (root if isinstance(root, zarr.Array) else root[self.key]), (lambda: None)


def read_zarr(path: Path, dataset: str | None = None) -> list[Volume]:
    """Volumes of a zarr or OME-Zarr directory; see the module docstring."""
    root = _open_root(path)
    wanted = dataset.strip("/").split(":")[0] if dataset else None
    if isinstance(root, zarr.Array):
        items = [("", root, [dict(root.attrs)])]
        images = []
    else:
        images = _ome_images(root)
        items = [] if images else _plain_arrays(root)
    volumes: list[Volume] = []
    skipped: list[str] = []
    if images:
        available = [key for key, *_ in images]
        if wanted is not None:
            images = [im for im in images if im[0] == wanted]
            if not images:
                raise not_found(path, dataset, available)
        for key, array, ms in images:
            volumes += _ome_volumes(path, key, array, ms)
    else:
        available = [key for key, arr, _ in items if arr.ndim >= 2]
        if wanted is not None:
            items = [it for it in items if it[0] == wanted]
            if not items:
                raise not_found(path, dataset, available)
        for key, array, chain in items:
            vols, reason = array_volumes(
                path,
                key,
                array.shape,
                array.dtype,
                chain,
                "zarr",
                _ZarrArray(str(path), key),
                explicit=wanted is not None,
            )
            volumes += vols
            if reason:
                skipped.append(reason)
        for v in volumes:
            if v.dataset == "":
                v.dataset = None
    return finish_volumes(path, volumes, skipped, "array", "the store holds no arrays")


def _plain_arrays(root) -> list[tuple[str, object, list[dict]]]:
    out = []
    for name, node in root.members(max_depth=None):
        if isinstance(node, zarr.Array):
            chain = [dict(node.attrs)]
            parts = name.split("/")[:-1]
            for i in range(len(parts), 0, -1):
                chain.append(dict(root["/".join(parts[:i])].attrs))
            chain.append(dict(root.attrs))
            out.append((name, node, chain))
    return sorted(out, key=lambda item: item[0])


def _multiscales(attrs: dict) -> list | None:
    ms = attrs.get("ome", {}).get("multiscales") if isinstance(attrs.get("ome"), dict) else None
    return ms if ms is not None else attrs.get("multiscales")


def _ome_images(root) -> list[tuple[str, object, dict]]:
    """``[(array key, level-0 array, multiscale dict)]`` for every OME image in the store."""
    groups = [("", root)] + [(n, g) for n, g in root.members(max_depth=None) if isinstance(g, zarr.Group)]
    images = []
    for name, group in groups:
        if "labels" in name.split("/"):
            continue
        for ms in _multiscales(dict(group.attrs)) or []:
            datasets = ms.get("datasets") or []
            if not datasets:
                continue
            level0 = datasets[0]["path"]
            key = f"{name}/{level0}" if name else level0
            images.append((key, group[level0], ms))
    return images


def _ome_volumes(path: Path, key: str, array, ms: dict) -> list[Volume]:
    axes_meta = ms.get("axes")
    ndim = array.ndim
    if axes_meta is None:  # NGFF 0.1/0.2: always 5D (t, c, z, y, x)
        axes_meta = ["t", "c", "z", "y", "x"][-ndim:]
    names = [a if isinstance(a, str) else a.get("name", "") for a in axes_meta]
    units = [None if isinstance(a, str) else a.get("unit") for a in axes_meta]
    letters = "".join(_AXIS_LETTER.get(n.lower(), "Q") for n in names)
    if len(letters) != ndim:
        raise ReadError(path, f"OME-Zarr image '{key}' declares axes {names} for a {ndim}D array")
    scale = _scale(ms.get("datasets")[0].get("coordinateTransformations"), ndim)
    global_scale = _scale(ms.get("coordinateTransformations"), ndim)
    scale = [a * b for a, b in zip(scale, global_scale)]
    sizes = []
    notes = []
    for letter in "ZYX":
        if letter not in letters:
            sizes.append(float("nan"))
            continue
        i = letters.index(letter)
        factor = nm_per_unit(units[i]) if units[i] else None
        sizes.append(scale[i] * factor if factor is not None else float("nan"))
    voxel = spacing_nm(tuple(sizes), 1.0)
    if voxel is None:
        notes.append("OME-Zarr axes have no length units; voxel size unknown")
    shape = tuple(int(s) for s in array.shape)
    dtype = np.dtype(array.dtype)
    volumes = []
    for name, plan, xy_only in plan_axes(letters, shape, path):
        vshape = (plan.z_size(shape), shape[letters.index("Y")], shape[letters.index("X")])
        slicer = ContainerSlicer(path, vshape, dtype, _ZarrArray(str(path), key), plan)
        volumes.append(
            Volume(
                shape=vshape,
                dtype=dtype,
                read_slices=slicer,
                reader="ome-zarr",
                voxel_size=lateral_only(voxel) if xy_only else voxel,
                xy_only=xy_only,
                dataset=key if name is None else f"{key}:{name}",
                notes=list(notes),
            )
        )
    return volumes


def _scale(transforms, ndim: int) -> list[float]:
    for t in transforms or []:
        if t.get("type") == "scale" and len(t.get("scale", [])) == ndim:
            return [float(v) for v in t["scale"]]
    return [1.0] * ndim

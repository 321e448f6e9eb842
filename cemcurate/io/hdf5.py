"""HDF5 (``.h5 .hdf5 .hdf``) via h5py.

Every dataset that is 2D or 3D (optionally with a trailing RGB axis or leading
singleton axes) becomes a volume with ``dataset`` set to its key (``"stack"``,
``"volumes/raw"``); other datasets are skipped with a note, or are a
:class:`ReadError` when asked for by name. Opening reads only the metadata; chunks are
read by ``read_slices`` through an h5py file kept open in :mod:`cemcurate.io.handles`.
Voxel-size attributes: see :mod:`cemcurate.io.containers`.
"""

from __future__ import annotations

from pathlib import Path

from cemcurate.common.lazy import lazy_import

from . import handles
from .base import ReadError, Volume
from .containers import array_volumes, finish_volumes, not_found

h5py = lazy_import("h5py")


def _open_file(path):
    try:
        return h5py.File(path, "r")
    except OSError as exc:
        raise ReadError(path, f"h5py could not open it as HDF5 ({exc}); the file is corrupt or not HDF5") from exc


class _H5Array:
    """Picklable opener: the h5py dataset ``key`` of ``path`` from the handle cache."""

    def __init__(self, path: str, key: str):
        self.path, self.key = path, key

    def __call__(self):
        f = handles.get("hdf5", self.path, lambda: (lambda h: (h, h.close))(_open_file(self.path)))
        return f[self.key]


def read_hdf5(path: Path, dataset: str | None = None) -> list[Volume]:
    """Volumes for the 2D/3D datasets of an HDF5 file (or just ``dataset``)."""
    wanted = dataset.strip("/").split(":")[0] if dataset else None
    with _open_file(path) as f:
        found: list[tuple[str, h5py.Dataset]] = []
        f.visititems(lambda name, obj: found.append((name, obj)) if isinstance(obj, h5py.Dataset) else None)
        if wanted is not None:
            chosen = [(n, d) for n, d in found if n == wanted]
            if not chosen:
                raise not_found(path, dataset, [n for n, d in found if d.ndim >= 2])
        else:
            chosen = found
        volumes, skipped = [], []
        for name, ds in chosen:
            chain = [ds.attrs]
            parent = ds.parent
            while True:
                chain.append(parent.attrs)
                if parent.name == "/":
                    break
                parent = parent.parent
            chain = [_readable_attrs(a) for a in chain]
            vols, reason = array_volumes(
                path, name, ds.shape, ds.dtype, chain, "hdf5", _H5Array(str(path), name), explicit=wanted is not None
            )
            volumes += vols
            if reason:
                skipped.append(reason)
    return finish_volumes(path, volumes, skipped, "dataset", "the file holds no datasets")


def _readable_attrs(attrs) -> dict:
    """Attributes as a dict, leaving out those h5py cannot decode (references, odd types)."""
    out = {}
    for key in attrs:
        try:
            out[key] = attrs[key]
        except Exception:  # one undecodable attribute must not make the image unreadable
            continue
    return out

"""OME-Zarr (NGFF 0.4, zarr format 2) stores written block by block: pyramids, labels, several images.

An :class:`NgffStore` is built in a temporary sibling directory and renamed into place when
it is finalised, so a crash never leaves a half-written store under the final name. Each
image is a ``multiscales`` group: level ``"0"`` is written by the caller (any order of
chunk-aligned blocks), the coarser levels are computed from it at :meth:`NgffStore.finalize`,
slab by slab, so a volume larger than memory never has to be held.

Pyramid levels halve y and x; z is halved too only where its spacing is known and would
not exceed the lateral spacing of that level (anisotropic serial-section data keep their
z until the lateral spacing has caught up). Intensities and probabilities are averaged
(each coarse voxel is the mean of the voxels it covers, so its centre shifts by half the
factor: the levels carry that ``translation``); labels are subsampled (the box's first
voxel, no shift), never blended into classes that do not exist.

Label images live under ``labels/<name>`` of the image they segment, with NGFF
``image-label`` metadata (a colour and the class name per value), which napari, Fiji
(MoBIE) and neuroglancer's OME-Zarr source overlay on the image.
"""

from __future__ import annotations

import math
import os
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cemcurate.common.atomic import PublishOnExit, remove_path, replace_path
from cemcurate.common.lazy import lazy_import

zarr = lazy_import("zarr")

NGFF_VERSION = "0.4"
AUTO_MIN_SIDE = 256  # auto pyramids stop at the first level whose largest lateral side is <= this
MAX_LEVELS = 10
DOWNSAMPLE_METHODS = ("mean", "nearest")
# Label colours (RGBA) by class index; 0 (background) is transparent.
_LABEL_COLOURS = [
    (0, 0, 0, 0),
    (255, 0, 255, 255),
    (0, 255, 0, 255),
    (255, 255, 0, 255),
    (0, 255, 255, 255),
    (255, 128, 0, 255),
    (128, 128, 255, 255),
    (255, 0, 0, 255),
]


def default_chunks(shape: tuple[int, int, int]) -> tuple[int, int, int]:
    """``(16, 512, 512)`` clipped to ``shape``: whole-slice slabs for streaming writers."""
    return (min(shape[0], 16), min(shape[1], 512), min(shape[2], 512))


def array_path(array) -> Path:
    """The folder of a zarr array in a local directory store (e.g. a level ``"0"`` inside
    :attr:`NgffStore.tmp`): what another process on the same (shared) file system opens with
    ``zarr.open_array(path, mode="r+")`` to write its blocks.

    Raises:
        ValueError: the array is not in a local directory store.
    """
    root = getattr(getattr(array, "store", None), "root", None)
    if root is None:
        raise ValueError(f"{array!r} is not in a local directory store")
    return Path(root) / array.path


def pyramid_factors(
    shape: tuple[int, int, int], voxel_size: tuple[float, float, float] | None, levels: int | None = None
) -> list[tuple[int, int, int]]:
    """Downsampling factors ``(z, y, x)`` of every level relative to level 0 (level 0 is ``(1, 1, 1)``).

    Args:
        shape: level-0 ``(z, y, x)``.
        voxel_size: ``(z, y, x)`` nm (z may be NaN: never halved), or ``None`` (z never halved).
        levels: number of levels; ``None``: halve until the largest lateral side is at most
            :data:`AUTO_MIN_SIDE` pixels (at most :data:`MAX_LEVELS`).

    Raises:
        ValueError: ``levels`` below 1, or more levels than halving down to 1 pixel allows.
    """
    if levels is not None and levels < 1:
        raise ValueError(f"a pyramid has at least 1 level, got {levels}")
    z_nm = voxel_size[0] if voxel_size is not None and math.isfinite(voxel_size[0]) else math.nan
    xy_nm = voxel_size[2] if voxel_size is not None else math.nan
    factors = [(1, 1, 1)]
    while True:
        fz, fy, _ = factors[-1]
        side = max(shape[1], shape[2]) / fy
        if levels is None and (side <= AUTO_MIN_SIDE or len(factors) >= MAX_LEVELS):
            break
        if levels is not None and len(factors) >= levels:
            break
        if side <= 1:
            raise ValueError(f"a ({shape[1]}, {shape[2]})-pixel image has at most {len(factors)} pyramid levels")
        fy *= 2
        if math.isfinite(z_nm) and shape[0] / fz >= 2 and 2 * fz * z_nm <= 1.2 * fy * xy_nm:
            fz *= 2
        factors.append((fz, fy, fy))
    return factors


def downsample(block: np.ndarray, factors: tuple[int, int, int], method: str) -> np.ndarray:
    """Reduce a ``(z, y, x)`` block by integer ``factors`` (the last boxes may be partial).

    Returns:
        ``(ceil(z / fz), ceil(y / fy), ceil(x / fx))`` of ``block``'s dtype. ``mean``: the
        average of each box (partial boxes over the voxels they hold; rounded for integers);
        ``nearest``: each box's first voxel.
    """
    if method == "nearest":
        return np.ascontiguousarray(block[:: factors[0], :: factors[1], :: factors[2]])
    if method != "mean":
        raise ValueError(f"downsample method must be one of {DOWNSAMPLE_METHODS}, got {method!r}")
    total = block.astype(np.float64)
    count = np.ones(1, dtype=np.float64)
    for axis, f in enumerate(factors):
        if f == 1:
            continue
        starts = np.arange(0, block.shape[axis], f)
        total = np.add.reduceat(total, starts, axis=axis)
        sizes = np.diff(np.append(starts, block.shape[axis])).astype(np.float64)
        count = count * sizes.reshape([-1 if a == axis else 1 for a in range(3)])
    mean = total / count
    if np.issubdtype(block.dtype, np.integer):
        info = np.iinfo(block.dtype)
        return np.clip(np.rint(mean), info.min, info.max).astype(block.dtype)
    return mean.astype(block.dtype)


def multiscales_attrs(
    name: str,
    voxel_size: tuple[float, float, float] | None,
    factors: list[tuple[int, int, int]],
    method: str,
) -> dict:
    """The NGFF 0.4 ``multiscales`` entry of an image with these levels (``"0"``, ``"1"``, ...).

    Axes are z, y, x of type space, in nanometres where the spacing is known (an axis without
    a unit has unknown spacing, scale 1). Averaged levels carry the half-box ``translation``.
    """
    spacing = [1.0, 1.0, 1.0]
    axes = [{"name": n, "type": "space"} for n in "zyx"]
    if voxel_size is not None:
        for i, value in enumerate(voxel_size):
            if math.isfinite(value):
                spacing[i] = float(value)
                axes[i]["unit"] = "nanometer"
    datasets = []
    for level, fac in enumerate(factors):
        transforms: list[dict] = [{"type": "scale", "scale": [s * f for s, f in zip(spacing, fac)]}]
        if method == "mean" and level > 0:
            transforms.append({"type": "translation", "translation": [s * (f - 1) / 2 for s, f in zip(spacing, fac)]})
        datasets.append({"path": str(level), "coordinateTransformations": transforms})
    kind = {"mean": "local_mean", "nearest": "subsample"}[method]
    return {"version": NGFF_VERSION, "name": name, "axes": axes, "datasets": datasets, "type": kind}


def label_attrs(class_names: list[str]) -> dict:
    """NGFF ``image-label`` metadata: a colour and a ``class`` name per label value, background clear."""
    colours = [
        {"label-value": i, "rgba": list(_LABEL_COLOURS[i % len(_LABEL_COLOURS)] if i else _LABEL_COLOURS[0])}
        for i in range(len(class_names))
    ]
    properties = [{"label-value": i, "class": name} for i, name in enumerate(class_names)]
    return {"version": NGFF_VERSION, "colors": colours, "properties": properties, "source": {"image": "../../"}}


@dataclass
class _Image:
    key: str
    shape: tuple[int, int, int]
    dtype: np.dtype
    chunks: tuple[int, int, int]
    voxel_size: tuple[float, float, float] | None
    levels: int | None
    method: str
    class_names: list[str] | None = None
    factors: list[tuple[int, int, int]] = field(default_factory=list)


class NgffStore(PublishOnExit):
    """An OME-Zarr store written in a temporary directory, published under ``path`` by :meth:`finalize`.

    Args:
        path: the final ``.zarr``/``.ome.zarr`` directory (replaced if it exists).

    Add images with :meth:`add_image` (the root image has key ``""``) and label images with
    :meth:`add_labels`; write their level-0 arrays; :meth:`finalize` computes the pyramids,
    writes the metadata and renames the store into place. Use as a context manager: an
    exception discards everything and leaves ``path`` untouched.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = self.path.with_name(f".{self.path.name}.{uuid.uuid4().hex[:8]}.partial")
        self._root = zarr.open_group(str(self.tmp), mode="w", zarr_format=2)
        self._images: list[_Image] = []
        self.done = False

    def add_image(
        self,
        key: str,
        shape: tuple[int, int, int],
        dtype,
        chunks: tuple[int, int, int] | None = None,
        voxel_size: tuple[float, float, float] | None = None,
        levels: int | None = 1,
        method: str = "mean",
    ):
        """Start an image at group ``key`` (``""``: the root) and return its writable level-0 array.

        ``levels``: pyramid levels (``None``: automatic, see :func:`pyramid_factors`);
        ``method``: ``mean`` (intensities, probabilities) or ``nearest`` (labels).
        """
        if method not in DOWNSAMPLE_METHODS:
            raise ValueError(f"downsample method must be one of {DOWNSAMPLE_METHODS}, got {method!r}")
        shape = tuple(int(s) for s in shape)
        image = _Image(key, shape, np.dtype(dtype), tuple(chunks or default_chunks(shape)), voxel_size, levels, method)
        image.factors = pyramid_factors(shape, voxel_size, levels)
        self._images.append(image)
        group = self._root.require_group(key) if key else self._root
        return group.create_array("0", shape=shape, chunks=image.chunks, dtype=image.dtype, fill_value=0)

    def add_labels(
        self,
        name: str,
        shape: tuple[int, int, int],
        class_names: list[str],
        chunks: tuple[int, int, int] | None = None,
        voxel_size: tuple[float, float, float] | None = None,
        levels: int | None = 1,
    ):
        """Start the uint8 label image ``labels/<name>`` of the root image; return its level-0 array."""
        array = self.add_image(f"labels/{name}", shape, np.uint8, chunks, voxel_size, levels, "nearest")
        self._images[-1].class_names = list(class_names)
        return array

    def finalize(self) -> Path:
        """Write every image's pyramid and metadata, then publish the store under :attr:`path`."""
        if self.done:
            return self.path
        try:
            labels = []
            for image in self._images:
                group = self._root[image.key] if image.key else self._root
                _write_levels(group, image)
                name = image.key.rpartition("/")[2] or self.path.name
                group.attrs["multiscales"] = [multiscales_attrs(name, image.voxel_size, image.factors, image.method)]
                if image.class_names is not None:
                    group.attrs["image-label"] = label_attrs(image.class_names)
                    labels.append(image.key.rpartition("/")[2])
            if labels:
                self._root["labels"].attrs["labels"] = labels
            replace_path(self.tmp, self.path)
        finally:
            remove_path(self.tmp)
        self.done = True
        return self.path

    def discard(self) -> None:
        """Drop the temporary store; :attr:`path` is left untouched."""
        remove_path(self.tmp)
        self.done = True


def _write_levels(group, image: _Image) -> None:
    """Levels 1.. from the level above, in z slabs that cover whole chunks of the level written."""
    for level in range(1, len(image.factors)):
        above, here = image.factors[level - 1], image.factors[level]
        step = tuple(h // a for h, a in zip(here, above))
        source = group[str(level - 1)]
        shape = tuple(-(-s // f) for s, f in zip(source.shape, step))
        chunks = tuple(min(c, s) for c, s in zip(image.chunks, shape))
        target = group.create_array(str(level), shape=shape, chunks=chunks, dtype=image.dtype, fill_value=0)
        for z0 in range(0, shape[0], chunks[0]):
            z1 = min(shape[0], z0 + chunks[0])
            block = np.asarray(source[z0 * step[0] : z1 * step[0]])
            target[z0:z1] = downsample(block, step, image.method)

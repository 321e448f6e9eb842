"""From a stored array's named axes to one or more ``(z, y, x)`` volumes.

Stored arrays name their axes with one letter each (tifffile's convention):
``Y``/``X`` image plane, ``Z`` depth, ``S`` colour samples, ``C`` channel, ``T`` time,
``Q``/``I`` an unnamed stack of planes. The policy, applied identically to TIFF
hyperstacks, OME-Zarr and HDF5/zarr arrays:

- singleton axes are dropped;
- ``S`` of size 2/3/4 is collapsed to gray (:func:`to_grayscale`);
- the stack axis (the volume's z) is ``Z`` if present, else the first non-singleton of
  ``Q``, ``I``, ``T`` (``T`` makes the volume ``xy_only`` with a ``NaN`` z spacing: time
  is not a spatial axis);
- every other non-singleton ``C`` or ``T`` axis (a real channel axis, or time next to
  ``Z``) is split: one volume per index, named ``"c0"``, ``"c1"``, ``"t0:c1"`` ... in
  ``Volume.dataset``;
- any other non-singleton axis (e.g. a second unnamed stack axis, as in a 4D array
  without metadata) is a :class:`ReadError`.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .base import ReadError, to_grayscale

MAX_SPLITS = 256
_STACK_PREFERENCE = "QIT"
_SPLIT_LETTERS = "CT"


@dataclass(frozen=True)
class AxisPlan:
    """How to cut one ``(z, y, x)`` volume out of an array with named axes.

    Attributes:
        axes: one letter per stored axis, e.g. ``"TZCYXS"``.
        fixed: per stored axis, the index to take, or ``None`` for a kept axis.
        stack: position of the axis that becomes z, or ``None`` (a single 2D plane).
    """

    axes: str
    fixed: tuple[int | None, ...]
    stack: int | None

    def index(self, z0: int, z1: int) -> tuple:
        """The indexing tuple for stored slices ``z0:z1`` (works on numpy, h5py, zarr)."""
        out: list = []
        for pos, fix in enumerate(self.fixed):
            if fix is not None:
                out.append(fix)
            elif pos == self.stack:
                out.append(slice(z0, z1))
            else:
                out.append(slice(None))
        return tuple(out)

    def arrange(self, arr: np.ndarray, path: Path | str) -> np.ndarray:
        """Reorder an array indexed with :meth:`index` to ``(z, y, x)`` and make it gray."""
        kept = [a for a, f in zip(self.axes, self.fixed) if f is None]
        order = [kept.index(a) for a in "ZQITYXS" if a in kept and self._is_kept_role(a)]
        if order != sorted(order):  # stored in another order: a transposed view
            arr = np.transpose(arr, order)
        if self.stack is None:
            arr = arr[np.newaxis]
        if "S" in kept:
            arr = to_grayscale(arr, path)
        return arr

    def _is_kept_role(self, letter: str) -> bool:
        if letter in "YXS":
            return True
        return self.stack is not None and self.axes[self.stack] == letter

    def z_size(self, shape: tuple[int, ...]) -> int:
        return 1 if self.stack is None else int(shape[self.stack])


def plan_axes(axes: str, shape: tuple[int, ...], path: Path | str) -> list[tuple[str | None, AxisPlan, bool]]:
    """Split an array with named ``axes`` into volumes.

    Args:
        axes: one upper-case letter per axis of ``shape`` (see the module docstring).
        shape: the stored array shape.
        path: the file, for error messages.

    Returns:
        ``[(name, plan, xy_only), ...]``; ``name`` is ``None`` when nothing was split.

    Raises:
        ReadError: no ``Y``/``X`` plane, an unsupported sample count, or more than
            ``MAX_SPLITS`` channel/time combinations.
    """
    axes = axes.upper()
    if len(axes) != len(shape):
        raise ReadError(path, f"axes {axes!r} do not match the array shape {tuple(shape)}")
    if axes.count("Y") != 1 or axes.count("X") != 1:
        raise ReadError(
            path,
            f"array with axes {axes!r} and shape {tuple(shape)} has no single Y and X "
            "image plane; only (z, y, x) image data are read",
        )
    if "S" in axes and shape[axes.index("S")] not in (1, 2, 3, 4):
        raise ReadError(
            path,
            f"{shape[axes.index('S')]} colour samples per pixel (shape {tuple(shape)}) "
            "are not supported; expected gray, gray+alpha, RGB or RGBA",
        )
    extra = [i for i, a in enumerate(axes) if a not in "YXS" and shape[i] > 1]
    stack = None
    if "Z" in axes:
        stack = axes.index("Z")
    else:
        for letter in _STACK_PREFERENCE:
            hits = [i for i in extra if axes[i] == letter]
            if hits:
                stack = hits[0]
                break
    split = [i for i in extra if i != stack]
    unknown = [axes[i] for i in split if axes[i] not in _SPLIT_LETTERS]
    if unknown:
        raise ReadError(
            path,
            f"{len(shape)}D data with axes {axes!r} and shape {tuple(shape)} are not supported: "
            f"besides y, x and one stack axis only channel (C) and time (T) axes can be split, "
            f"not {''.join(unknown)!r}; save one 3D volume per file",
        )
    combos = int(np.prod([shape[i] for i in split])) if split else 1
    if combos > MAX_SPLITS:
        raise ReadError(
            path,
            f"axes {axes!r} with shape {tuple(shape)} would split into {combos} volumes "
            f"(more than {MAX_SPLITS}); convert it to separate 3D files first",
        )
    xy_only = stack is not None and axes[stack] == "T"
    plans = []
    for idx in itertools.product(*(range(shape[i]) for i in split)):
        chosen = dict(zip(split, idx))
        fixed = tuple(
            chosen.get(i, 0) if (i in chosen or (shape[i] == 1 and a not in "YX" and i != stack)) else None
            for i, a in enumerate(axes)
        )
        name = ":".join(f"{axes[i].lower()}{chosen[i]}" for i in split) or None
        plans.append((name, AxisPlan(axes, fixed, stack), xy_only))
    return plans


def plan_plain(shape: tuple[int, ...], path: Path | str, what: str) -> tuple[str, str | None]:
    """Axis letters for an unlabelled array (HDF5, plain zarr), or a reason to skip it.

    2D -> ``YX``; 3D -> ``ZYX``, or ``YXS`` when the last axis is 3/4 and the others are
    larger than 4 (an RGB image); 4D -> ``ZYXS`` with a trailing 2/3/4; leading singleton
    axes are allowed (``Q``, dropped). Anything else returns ``("", reason)``.
    """
    shape = tuple(int(s) for s in shape)
    lead = 0
    while len(shape) - lead > 3 and shape[lead] == 1:
        lead += 1
    core = shape[lead:]
    prefix = "Q" * lead
    if len(core) == 2:
        return prefix + "YX", None
    if len(core) == 3:
        if core[2] in (3, 4) and min(core[:2]) > 4:
            return prefix + "YXS", None
        return prefix + "ZYX", None
    if len(core) == 4 and core[3] in (2, 3, 4):
        return prefix + "ZYXS", None
    return "", (
        f"{what} has shape {shape} ({len(shape)}D); only 2D and 3D arrays (optionally with a trailing "
        "RGB axis) are read; export one 3D volume per channel/time point"
    )

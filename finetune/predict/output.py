"""Where predictions go: probabilities (uint8 0-255 or float32) or labels, streamed by slabs.

The format is chosen by the output's suffix (``.tif``, ``.zarr``, ``.nii.gz``, ``.mrc``,
``.npy``, ...; see :mod:`cemcurate.io.writers`; ``.zarr`` outputs are OME-Zarr with a
resolution pyramid and optionally the input beside the prediction, see
:mod:`cemcurate.io.ngff`). Data are written slab by slab into a
chunked output (a zarr store or a memory map) and published atomically at the end, so a
volume larger than memory is never held at once and an interrupted run leaves no
half-written file.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from cemcurate.common.atomic import PublishOnExit
from cemcurate.io import ZARR_SUFFIXES, open_chunked_output, suffix_of
from cemcurate.io.ngff import NgffStore, default_chunks
from finetune.metrics import probs_to_classes
from finetune.predict.windows import encode_probs


def class_output_path(path: Path, class_name: str) -> Path:
    """``seg.tif`` + ``mito`` -> ``seg_mito.tif`` (compound suffixes kept whole)."""
    suffix = suffix_of(path)
    stem = path.name[: len(path.name) - len(suffix)] if suffix else path.name
    return path.with_name(f"{stem}_{class_name}{suffix}")


class PredictionWriter(PublishOnExit):
    """Stream ``(C, n, y, x)`` probability slabs into one or more output volumes.

    Args:
        path: output file.
        shape: ``(z, y, x)`` of the volume.
        class_names: the model's classes (index 0 first).
        output_type: ``"probs"`` or ``"labels"``.
        prob_dtype: ``"uint8"`` or ``"float32"`` for probabilities.
        threshold: binary foreground threshold for labels.
        voxel_size: ``(z, y, x)`` nm stored where the format allows.
        pyramid_levels: ``.zarr`` outputs: resolution levels of every image (``None``:
            automatic, see :func:`cemcurate.io.ngff.pyramid_factors`).
        input_image: ``.zarr`` outputs: ``read(z0, z1) -> uint8[z1 - z0, y, x]``, the input as
            the model saw it, written as the store's root image with the prediction inside it.

    Binary probabilities are one volume (foreground); multi-class probabilities are one
    volume per class (``path`` with ``_<class>`` before the suffix); labels are one uint8
    volume of class indices. With ``input_image`` a ``.zarr`` output is one NGFF image of
    the input holding the prediction: labels as the label image ``labels/prediction``,
    probabilities as the image ``prediction`` (multi-class: ``prediction_<class>``). Use as a
    context manager: an exception discards everything.
    """

    def __init__(
        self,
        path: str | Path,
        shape: tuple[int, int, int],
        class_names: list[str],
        output_type: str = "probs",
        prob_dtype: str = "uint8",
        threshold: float = 0.5,
        voxel_size: tuple[float, float, float] | None = None,
        pyramid_levels: int | None = 1,
        input_image: Callable[[int, int], np.ndarray] | None = None,
    ):
        self.path = Path(path)
        self.shape = tuple(int(s) for s in shape)
        is_zarr = suffix_of(self.path) in ZARR_SUFFIXES
        if not is_zarr and (pyramid_levels != 1 or input_image is not None):
            raise ValueError(
                f"{self.path}: resolution pyramids and the input image are written to .zarr / .ome.zarr outputs "
                f"only, not '{suffix_of(self.path) or self.path.name}'"
            )
        if (
            voxel_size is not None
            and suffix_of(self.path) in (".nii", ".nii.gz")
            and not math.isfinite(voxel_size[0])
            and self.shape[0] > 1
        ):
            voxel_size = None  # NIfTI cannot store an unknown z spacing (e.g. a stack of 2D images)
        self.output_type, self.prob_dtype, self.threshold = output_type, prob_dtype, threshold
        self.input_image = input_image
        binary = len(class_names) == 2
        if output_type == "labels":
            targets = [("prediction", self.path, "uint8")]
        elif binary:
            targets = [("prediction", self.path, prob_dtype)]
        else:
            targets = [(f"prediction_{c}", class_output_path(self.path, c), prob_dtype) for c in class_names]
        chunks = default_chunks(self.shape)
        self.outputs, self.store, self.input_array = [], None, None
        if input_image is not None:
            self.paths = [self.path]
            self.store = NgffStore(self.path)
            self.input_array = self.store.add_image("", self.shape, np.uint8, chunks, voxel_size, pyramid_levels)
            for key, _, dtype in targets:
                if output_type == "labels":
                    array = self.store.add_labels(key, self.shape, class_names, chunks, voxel_size, pyramid_levels)
                else:
                    array = self.store.add_image(key, self.shape, dtype, chunks, voxel_size, pyramid_levels)
                self.outputs.append(_Target(array))
            return
        self.paths = [p for _, p, _ in targets]
        method = "nearest" if output_type == "labels" else "mean"
        try:
            for _, p, dtype in targets:
                self.outputs.append(
                    open_chunked_output(p, self.shape, dtype, chunks, voxel_size, levels=pyramid_levels, method=method)
                )
        except Exception:
            self.discard()
            raise

    def write(self, z0: int, probs: np.ndarray) -> None:
        """Write probabilities ``float32[C, n, y, x]`` for slices ``z0 .. z0 + n``."""
        n = probs.shape[1]
        if self.output_type == "labels":
            self.outputs[0].array[z0 : z0 + n] = probs_to_classes(probs, self.threshold)
        else:
            for c, out in enumerate(self.outputs):
                out.array[z0 : z0 + n] = encode_probs(probs[c], self.prob_dtype)

    def finalize(self) -> list[Path]:
        if self.store is None:
            return [out.finalize() for out in self.outputs]
        for z0 in range(0, self.shape[0], self.input_array.chunks[0]):
            z1 = min(self.shape[0], z0 + self.input_array.chunks[0])
            self.input_array[z0:z1] = self.input_image(z0, z1)
        return [self.store.finalize()]

    def discard(self) -> None:
        if self.store is not None:
            self.store.discard()
        for out in self.outputs:
            out.discard()


@dataclass
class _Target:
    """An image inside the output's :class:`NgffStore`: written like a ChunkedOutput, published with the store."""

    array: object

    def discard(self) -> None:
        self.array = None

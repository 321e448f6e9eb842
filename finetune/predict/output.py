"""Where predictions go: probabilities (uint8 0-255 or float32) or labels, streamed by slabs.

The format is chosen by the output's suffix (``.tif``, ``.zarr``, ``.nii.gz``, ``.mrc``,
``.npy``, ...; see :mod:`cemcurate.io.writers`). Data are written slab by slab into a
chunked output (a zarr store or a memory map) and published atomically at the end, so a
volume larger than memory is never held at once and an interrupted run leaves no
half-written file.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from cemcurate.common.atomic import PublishOnExit
from cemcurate.io import open_chunked_output, suffix_of
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

    Binary probabilities are one volume (foreground); multi-class probabilities are one
    volume per class (``path`` with ``_<class>`` before the suffix); labels are one uint8
    volume of class indices. Use as a context manager: an exception discards everything.
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
    ):
        self.path = Path(path)
        self.shape = tuple(int(s) for s in shape)
        if (
            voxel_size is not None
            and suffix_of(self.path) in (".nii", ".nii.gz")
            and not math.isfinite(voxel_size[0])
            and self.shape[0] > 1
        ):
            voxel_size = None  # NIfTI cannot store an unknown z spacing (e.g. a stack of 2D images)
        self.output_type, self.prob_dtype, self.threshold = output_type, prob_dtype, threshold
        binary = len(class_names) == 2
        if output_type == "labels":
            targets = [(self.path, "uint8")]
        elif binary:
            targets = [(self.path, prob_dtype)]
        else:
            targets = [(class_output_path(self.path, c), prob_dtype) for c in class_names]
        self.paths = [p for p, _ in targets]
        chunks = (min(self.shape[0], 16), min(self.shape[1], 512), min(self.shape[2], 512))
        self.outputs = []
        try:
            for p, dtype in targets:
                self.outputs.append(open_chunked_output(p, self.shape, dtype, chunks=chunks, voxel_size=voxel_size))
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
        return [out.finalize() for out in self.outputs]

    def discard(self) -> None:
        for out in self.outputs:
            out.discard()

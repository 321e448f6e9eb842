"""Training data: labelled images/volumes in memory, slice index, seeded crop sampler.

2D images are volumes with one slice. A 3D volume contributes every slice along each
configured plane (``xy`` = fixed z, ``xz`` = fixed y, ``yz`` = fixed x). Sample ``k`` of a
run is a pure function of ``(seed, k)``: which slice, where, and how it is augmented.
So any number of data-loader workers, and any interruption and resumption, give the same
batches.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from finetune.augment2d import Augment2D, Augmenter
from finetune.labels import LabelSpec, to_class_map
from finetune.volumes import expand_patterns, read_array, read_uint8

# Slicing planes of a volume, named by the axes they span: xy = fixed z, xz = fixed y, yz = fixed x.
PLANES = ("xy", "xz", "yz")


@dataclass
class LabelledVolume:
    """One training item.

    Attributes:
        image: ``uint8[z, y, x]``.
        labels: ``uint8[z, y, x]`` class map (255 = ignore).
        name: image file name, for messages.
    """

    image: np.ndarray
    labels: np.ndarray
    name: str


def pair_files(images: list[str], masks: list[str], base: str | None, what: str = "") -> list[tuple[Path, Path]]:
    """Expand image and mask globs and pair them in order; counts must match."""
    img_paths = expand_patterns(images, base, what=f"{what}images")
    mask_paths = expand_patterns(masks, base, what=f"{what}masks")
    if len(img_paths) != len(mask_paths):
        raise ValueError(
            f"{len(img_paths)} {what}images but {len(mask_paths)} {what}masks "
            f"(first image {img_paths[0]}, first mask {mask_paths[0]}); they are paired in order"
        )
    return list(zip(img_paths, mask_paths))


def load_labelled(pairs: list[tuple[Path, Path]], spec: LabelSpec) -> list[LabelledVolume]:
    """Read image/label pairs and check them before any training starts.

    Raises:
        ValueError: image and labels of different shapes, empty files or label values
            that the spec cannot map (each message names the files).
    """
    items = []
    for img_path, mask_path in pairs:
        image = read_uint8(img_path)
        raw = read_array(mask_path)
        if image.shape != raw.shape:
            raise ValueError(
                f"{mask_path}: label shape {raw.shape} (z, y, x) does not match image {img_path} shape {image.shape}"
            )
        items.append(LabelledVolume(image, to_class_map(raw, spec, source=str(mask_path)), Path(img_path).name))
    return items


def slice_index(items: list[LabelledVolume], planes: list[str]) -> np.ndarray:
    """Every trainable 2D slice as rows ``(item, plane, index)`` of an ``int64[n, 3]`` array.

    ``plane`` indexes :data:`PLANES`; single-slice items contribute their
    one xy slice whatever ``planes`` says.
    """
    rows = []
    for i, item in enumerate(items):
        z, y, x = item.image.shape
        for plane in ["xy"] if z == 1 else planes:
            p = PLANES.index(plane)
            n = (z, y, x)[p]
            rows += [(i, p, k) for k in range(n)]
    if not rows:
        raise ValueError("no training slices")
    return np.asarray(rows, dtype=np.int64)


def get_slice(item: LabelledVolume, plane: int, index: int) -> tuple[np.ndarray, np.ndarray]:
    """``(image, labels)`` 2D views of one slice of ``item`` along ``PLANES[plane]``."""
    if plane == 0:
        return item.image[index], item.labels[index]
    if plane == 1:
        return item.image[:, index, :], item.labels[:, index, :]
    return item.image[:, :, index], item.labels[:, :, index]


class CropSamples(torch.utils.data.Dataset):
    """Sample ``k`` -> ``(image float32[1, crop, crop] in [0, 1], labels uint8[crop, crop])``.

    Args:
        items: the training images/volumes.
        planes: planes volumes are sliced along (see :func:`slice_index`).
        augment: the 2D augmentation settings.
        seed: base seed; sample ``k`` is a pure function of ``(seed, k)``.
        length: number of samples, ``iters * batch_size`` (sample ``k`` belongs to iteration
            ``k // batch_size``).
    """

    def __init__(self, items: list[LabelledVolume], planes: list[str], augment: Augment2D, seed: int, length: int):
        self.items = items
        self.index = slice_index(items, planes)
        self.augment = Augmenter(augment)
        self.seed = seed
        self.length = length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        rng = np.random.default_rng([self.seed, int(k)])
        item, plane, index = self.index[rng.integers(len(self.index))]
        image, labels = get_slice(self.items[item], int(plane), int(index))
        image, labels = self.augment(image, labels, int(rng.integers(2**63 - 1)))
        x = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32) / np.float32(255.0))[None]
        return x, torch.from_numpy(np.ascontiguousarray(labels))

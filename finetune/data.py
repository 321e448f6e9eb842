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
from finetune.losses import IGNORE_INDEX
from finetune.sampling import MAX_DRAWS, SamplingRule
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


def load_labelled(
    pairs: list[tuple[Path, Path]], spec: LabelSpec, region_masks: list[Path] | None = None
) -> list[LabelledVolume]:
    """Read image/label pairs and check them before any training starts.

    Args:
        pairs: ``(image, labels)`` files.
        spec: how label values become classes.
        region_masks: optional labelled-region masks, one per pair, of the image's shape:
            voxels where the mask is 0 become :data:`~finetune.losses.IGNORE_INDEX`, so
            unlabelled voxels never count as background (``--mask-volume``).

    Raises:
        ValueError: image, labels or mask of different shapes, empty files or label values
            that the spec cannot map (each message names the files).
    """
    if region_masks is not None and len(region_masks) != len(pairs):
        raise ValueError(
            f"{len(pairs)} images but {len(region_masks)} mask volumes (first {region_masks[:1]}); "
            "they are paired in order"
        )
    items = []
    for i, (img_path, mask_path) in enumerate(pairs):
        image = read_uint8(img_path)
        raw = read_array(mask_path)
        if image.shape != raw.shape:
            raise ValueError(
                f"{mask_path}: label shape {raw.shape} (z, y, x) does not match image {img_path} shape {image.shape}"
            )
        labels = to_class_map(raw, spec, source=str(mask_path))
        if region_masks is not None:
            region = read_array(region_masks[i])
            if region.shape != image.shape:
                raise ValueError(
                    f"{region_masks[i]}: mask volume shape {region.shape} does not match image {img_path} "
                    f"shape {image.shape}"
                )
            if not np.any(region):
                raise ValueError(f"{region_masks[i]}: mask volume is all zero: no voxel of {img_path} is labelled")
            labels[region == 0] = IGNORE_INDEX
        items.append(LabelledVolume(image, labels, Path(img_path).name))
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
        rule: which crops to keep (:mod:`finetune.sampling`; None: every crop).
    """

    def __init__(
        self,
        items: list[LabelledVolume],
        planes: list[str],
        augment: Augment2D,
        seed: int,
        length: int,
        rule: SamplingRule | None = None,
    ):
        self.items = items
        self.rule = rule
        self.index = slice_index(items, planes)
        self.augment = Augmenter(augment)
        self.seed = seed
        self.length = length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        rng = np.random.default_rng([self.seed, int(k)])
        for _ in range(MAX_DRAWS if self.rule is not None else 1):
            item, plane, index = self.index[rng.integers(len(self.index))]
            image, labels = get_slice(self.items[item], int(plane), int(index))
            image, labels = self.augment(image, labels, int(rng.integers(2**63 - 1)))
            if self.rule is None or self.rule.accepts(labels, rng):
                break
        x = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32) / np.float32(255.0))[None]
        return x, torch.from_numpy(np.ascontiguousarray(labels))

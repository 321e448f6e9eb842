"""3D training data: seeded random sub-volumes (with the 3D augmentations of :mod:`finetune.augment3d`).

Sample ``k`` of :class:`SubvolumeSamples` is a pure function of ``(seed, k)`` (which
volume, where, which augmentation), as in :mod:`finetune.data`, so data-loader workers and
resumed runs see the same stream.

``finetune train --dim 3d`` (:func:`finetune.train.train`) builds its data from
:class:`SubvolumeSamples` and :meth:`finetune.config.TrainConfig.augment_3d`; its losses
(:func:`finetune.losses.training_loss`) work on 3D batches as on 2D ones. NeuroProof
boundary targets are in :mod:`finetune.neuroproof`.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from finetune.augment3d import Augment3D, augment_subvolume
from finetune.sampling import MAX_DRAWS, SamplingRule


def random_crop(
    image: np.ndarray, labels: np.ndarray, size: Sequence[int], rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """A uniformly placed ``size = (d, h, w)`` crop of ``(z, y, x)`` arrays; axes shorter than the crop
    are reflected."""
    starts, pads = [], []
    for n, s in zip(image.shape, size):
        if n >= s:
            starts.append(int(rng.integers(n - s + 1)))
            pads.append((0, 0))
        else:
            starts.append(0)
            pads.append(((s - n) // 2, s - n - (s - n) // 2))
    sl = tuple(slice(a, a + s) for a, s in zip(starts, size))
    img, lab = image[sl], labels[sl]
    if any(a or b for a, b in pads):
        img, lab = np.pad(img, pads, mode="symmetric"), np.pad(lab, pads, mode="symmetric")
    return img, lab


class SubvolumeSamples(torch.utils.data.Dataset):
    """Sample ``k`` -> ``(image float32[1, d, h, w] in [0, 1], labels uint8[d, h, w])``.

    Args:
        items: ``(image uint8[z, y, x], labels uint8[z, y, x])`` pairs (or objects with
            ``image`` and ``labels`` attributes, e.g. :class:`finetune.data.LabelledVolume`).
        size: crop ``(d, h, w)`` (or one int).
        length: number of samples (``iters * batch_size``).
        seed: base seed; sample ``k`` uses ``default_rng([seed, k])``.
        augment: augmentation settings (None: plain crops).
        rule: which crops to keep (:mod:`finetune.sampling`; None: every crop).

    A volume is picked with probability proportional to its voxel count.
    """

    def __init__(
        self,
        items: Sequence,
        size: int | Sequence[int],
        length: int,
        seed: int = 42,
        augment: Augment3D | None = None,
        rule: SamplingRule | None = None,
    ):
        pairs = [(it.image, it.labels) if hasattr(it, "image") else tuple(it) for it in items]
        if not pairs:
            raise ValueError("no training volumes")
        for i, (img, lab) in enumerate(pairs):
            if img.shape != lab.shape or img.ndim != 3:
                raise ValueError(
                    f"training volume {i}: image {img.shape} and labels {lab.shape} must be the same (z, y, x)"
                )
            if img.dtype != np.uint8 or lab.dtype != np.uint8:
                raise ValueError(
                    f"training volume {i}: expected uint8 image and uint8 class map, got {img.dtype}, {lab.dtype}"
                )
        self.pairs = pairs
        self.size = (int(size),) * 3 if isinstance(size, (int, np.integer)) else tuple(int(s) for s in size)
        if len(self.size) != 3 or min(self.size) < 1:
            raise ValueError(f"crop size must be three positive ints (d, h, w), got {size}")
        self.length = int(length)
        self.seed = int(seed)
        self.augment = augment
        self.rule = rule
        sizes = np.array([img.size for img, _ in pairs], np.float64)
        self.p = sizes / sizes.sum()

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        rng = np.random.default_rng([self.seed, int(k)])
        for _ in range(MAX_DRAWS if self.rule is not None else 1):
            image, labels = self.pairs[int(rng.choice(len(self.pairs), p=self.p))]
            img, lab = random_crop(image, labels, self.size, rng)
            if self.rule is None or self.rule.accepts(lab, rng):
                break
        img = img.astype(np.float32) * np.float32(1.0 / 255.0)
        if self.augment is not None:
            img, lab = augment_subvolume(img, lab, rng, self.augment)
        return torch.from_numpy(np.ascontiguousarray(img))[None], torch.from_numpy(np.ascontiguousarray(lab))

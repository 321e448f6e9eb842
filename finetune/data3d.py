"""3D training data: seeded random sub-volumes with 3D augmentations, 3D losses, a compact loop.

Sample ``k`` of :class:`SubvolumeSamples` is a pure function of ``(seed, k)`` (which
volume, where, which augmentation), as in :mod:`finetune.data`, so data-loader workers and
resumed runs see the same stream.

Augmentations (:class:`Augment3D`), applied to a ``(d, h, w)`` crop:

* flips along y and x, and along z (the z flip is valid for any spacing);
* 90-degree rotations in the (y, x) plane only (z may have another spacing); 90 and 270
  degrees need ``h == w``, otherwise only 180 degrees is used;
* intensity jitter: a brightness shift and a contrast scale about the crop mean, optional
  Gaussian noise (intensities in [0, 1], clipped);
* optional elastic deformation: a smooth random displacement field (random control
  points every ``elastic_spacing`` voxels, cubic-spline upsampled), trilinear for the
  image and nearest for labels, so class indices and the ignore index stay exact.

``finetune train --dim 3d`` (:func:`finetune.train.train`) builds its data from
:class:`SubvolumeSamples` and :func:`augment_from_config`; its losses
(:func:`finetune.losses.training_loss`) work on 3D batches as on 2D ones.

:func:`neuroproof_sample` and :func:`boundary_map` turn the FlyEM NeuroProof ground truth
into boundary targets for tests and benchmarks.
"""

from __future__ import annotations

import gzip
import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from finetune.config import TrainConfig


# ----------------------------------------------------------------------------- targets

def boundary_map(ids: np.ndarray) -> np.ndarray:
    """Voxels whose id differs from one of their 6 neighbours (both sides of every interface).

    Args:
        ids: ``(z, y, x)`` integer object ids (e.g. neuron body ids).

    Returns:
        ``uint8[z, y, x]``: 1 on boundaries, 0 inside objects.
    """
    ids = np.asarray(ids)
    if ids.ndim != 3:
        raise ValueError(f"expected a (z, y, x) id volume, got shape {ids.shape}")
    out = np.zeros(ids.shape, dtype=bool)
    for axis in range(3):
        differs = np.diff(ids, axis=axis) != 0
        lo = [slice(None)] * 3
        hi = [slice(None)] * 3
        lo[axis] = slice(None, -1)
        hi[axis] = slice(1, None)
        out[tuple(lo)] |= differs
        out[tuple(hi)] |= differs
    return out.astype(np.uint8)


def neuroproof_sample(sample_dir: str | Path, workdir: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Image and neuron body ids of a FlyEM NeuroProof sample (e.g. ``training_sample2``).

    Args:
        sample_dir: folder with ``grayscale_maps/*.png`` and ``groundtruth.h5.gz``.
        workdir: writable folder for the decompressed HDF5 file.

    Returns:
        ``(image uint8[z, y, x], bodies int64[z, y, x])``: the ``stack`` supervoxels mapped
        to bodies through ``transforms`` (``N x 2`` rows ``supervoxel, body``); 10 nm
        isotropic voxels.
    """
    import h5py

    from cemcurate.io import open_series

    sample_dir = Path(sample_dir)
    pngs = sorted((sample_dir / "grayscale_maps").glob("*.png"))
    gz = sample_dir / "groundtruth.h5.gz"
    if not pngs or not gz.is_file():
        raise ValueError(f"{sample_dir}: expected grayscale_maps/*.png and groundtruth.h5.gz (a NeuroProof sample)")
    vol = open_series(pngs)
    image = vol.read_slices(0, vol.shape[0])
    h5_path = Path(workdir) / "groundtruth.h5"
    with gzip.open(gz, "rb") as src, open(h5_path, "wb") as dst:
        shutil.copyfileobj(src, dst)
    with h5py.File(h5_path, "r") as f:
        stack = f["stack"][:]
        transforms = f["transforms"][:]
    if stack.shape != image.shape:
        raise ValueError(f"{gz}: ground truth shape {stack.shape} differs from the image {image.shape}")
    lut = np.arange(int(stack.max()) + 1, dtype=np.int64)
    keep = transforms[:, 0] < lut.size
    lut[transforms[keep, 0]] = transforms[keep, 1]
    return image, lut[stack]


# ----------------------------------------------------------------------------- augmentation

@dataclass
class Augment3D:
    """3D augmentation settings (see the module docstring).

    Attributes:
        flip_z, flip_yx: random flips along z, and along y and x.
        rot90: random multiples of 90 degrees in the (y, x) plane.
        brightness: maximum brightness shift (intensity units, image in [0, 1]).
        contrast: maximum relative contrast change (0.2 = x0.8 to x1.2).
        noise_std: maximum std of additive Gaussian noise (0: off).
        elastic_alpha: std of the control-point displacements in voxels (0: off).
        elastic_spacing: control-point spacing in voxels.
        elastic_z: also displace along z (False for anisotropic stacks).
        p_elastic: probability of applying the elastic deformation.
    """

    flip_z: bool = True
    flip_yx: bool = True
    rot90: bool = True
    brightness: float = 0.1
    contrast: float = 0.2
    noise_std: float = 0.0
    elastic_alpha: float = 0.0
    elastic_spacing: int = 16
    elastic_z: bool = True
    p_elastic: float = 0.5

    def __post_init__(self) -> None:
        if self.brightness < 0 or not 0 <= self.contrast < 1 or self.noise_std < 0:
            raise ValueError("need brightness >= 0, 0 <= contrast < 1 and noise_std >= 0, got "
                             f"{self.brightness}, {self.contrast}, {self.noise_std}")
        if self.elastic_alpha < 0 or self.elastic_spacing < 2 or not 0 <= self.p_elastic <= 1:
            raise ValueError("need elastic_alpha >= 0, elastic_spacing >= 2 and p_elastic in [0, 1], got "
                             f"{self.elastic_alpha}, {self.elastic_spacing}, {self.p_elastic}")


def augment_from_config(cfg: TrainConfig, elastic_z: bool = True) -> Augment3D:
    """The 3D counterpart of the 2D augmentations a :class:`~finetune.config.TrainConfig` asks for.

    ``flips`` -> flips along z, y and x; ``rotate`` -> 90-degree rotations in-plane;
    ``brightness_contrast`` -> brightness shift and contrast change of up to that fraction;
    ``noise_var`` (8-bit grey levels squared) -> noise of std up to ``sqrt(max) / 255``;
    ``elastic_alpha`` -> elastic deformation (``elastic_z=False`` keeps z fixed, for
    geometries that do not mix slices in the first stage).
    """
    a = cfg.augment
    return Augment3D(flip_z=a.flips, flip_yx=a.flips, rot90=a.rotate, brightness=a.brightness_contrast,
                     contrast=a.brightness_contrast,
                     noise_std=math.sqrt(max(a.noise_var)) / 255.0 if a.noise_var else 0.0,
                     elastic_alpha=cfg.dim3d.elastic_alpha, elastic_z=elastic_z)


def elastic_field(shape: Sequence[int], alpha: float, spacing: int, rng: np.random.Generator,
                  along_z: bool = True) -> np.ndarray:
    """Smooth random displacements ``float32[3, z, y, x]`` in voxels (pure given ``rng``).

    Control points every ``spacing`` voxels get N(0, ``alpha``) offsets per axis. A cubic
    spline interpolates them onto a grid 4x finer than the control points and trilinear
    interpolation takes that to every voxel: as smooth as a full cubic zoom to the eye,
    and about 5x faster per training sample (``benchmarks/bench_3d.py --parts samples``).
    ``along_z=False`` leaves z fixed.
    """
    shape = tuple(int(s) for s in shape)
    grid = tuple(max(2, -(-n // spacing) + 1) for n in shape)
    fine = tuple(min(n, 4 * g) for n, g in zip(shape, grid))
    field = np.zeros((3,) + shape, np.float32)
    for axis in range(3):
        if axis == 0 and not along_z:
            continue
        coarse = rng.normal(0.0, alpha, grid)
        mid = ndimage.zoom(coarse, [f / g for f, g in zip(fine, grid)], order=3, mode="nearest")
        full = F.interpolate(torch.from_numpy(mid.astype(np.float32))[None, None], size=shape, mode="trilinear",
                             align_corners=True)
        field[axis] = full[0, 0].numpy()
    return field


def augment_subvolume(image: np.ndarray, labels: np.ndarray, rng: np.random.Generator,
                      aug: Augment3D) -> tuple[np.ndarray, np.ndarray]:
    """Augment one crop (pure given ``rng``).

    Args:
        image: ``float32[d, h, w]`` in [0, 1].
        labels: ``uint8[d, h, w]`` class map (255 = ignore).

    Returns:
        ``(float32[d, h, w] in [0, 1], uint8[d, h, w])``, C-contiguous.
    """
    if image.shape != labels.shape or image.ndim != 3:
        raise ValueError(f"image {image.shape} and labels {labels.shape} must be the same (d, h, w)")
    if aug.elastic_alpha > 0 and rng.random() < aug.p_elastic:
        disp = elastic_field(image.shape, aug.elastic_alpha, aug.elastic_spacing, rng, aug.elastic_z)
        coords = np.indices(image.shape, dtype=np.float32) + disp
        image = ndimage.map_coordinates(image, coords, order=1, mode="reflect").astype(np.float32)
        labels = ndimage.map_coordinates(labels, coords, order=0, mode="reflect").astype(np.uint8)
    if aug.flip_z and rng.random() < 0.5:
        image, labels = image[::-1], labels[::-1]
    if aug.flip_yx:
        if rng.random() < 0.5:
            image, labels = image[:, ::-1], labels[:, ::-1]
        if rng.random() < 0.5:
            image, labels = image[:, :, ::-1], labels[:, :, ::-1]
    if aug.rot90:
        k = int(rng.integers(4)) if image.shape[1] == image.shape[2] else 2 * int(rng.integers(2))
        image, labels = np.rot90(image, k, axes=(1, 2)), np.rot90(labels, k, axes=(1, 2))
    image = np.ascontiguousarray(image, dtype=np.float32)
    if aug.contrast > 0 or aug.brightness > 0:
        scale = 1.0 + rng.uniform(-aug.contrast, aug.contrast)
        shift = rng.uniform(-aug.brightness, aug.brightness)
        mean = float(image.mean())
        image = (image - mean) * np.float32(scale) + np.float32(mean + shift)
    if aug.noise_std > 0:
        image = image + rng.normal(0.0, rng.uniform(0, aug.noise_std), image.shape).astype(np.float32)
    return np.clip(image, 0.0, 1.0).astype(np.float32), np.ascontiguousarray(labels)


def random_crop(image: np.ndarray, labels: np.ndarray, size: Sequence[int],
                rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A uniformly placed ``size = (d, h, w)`` crop of ``(z, y, x)`` arrays; axes shorter than the crop are reflected."""
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

    A volume is picked with probability proportional to its voxel count.
    """

    def __init__(self, items: Sequence, size: int | Sequence[int], length: int, seed: int = 42,
                 augment: Augment3D | None = None):
        pairs = [(it.image, it.labels) if hasattr(it, "image") else tuple(it) for it in items]
        if not pairs:
            raise ValueError("no training volumes")
        for i, (img, lab) in enumerate(pairs):
            if img.shape != lab.shape or img.ndim != 3:
                raise ValueError(f"training volume {i}: image {img.shape} and labels {lab.shape} must be the same (z, y, x)")
            if img.dtype != np.uint8 or lab.dtype != np.uint8:
                raise ValueError(f"training volume {i}: expected uint8 image and uint8 class map, got {img.dtype}, {lab.dtype}")
        self.pairs = pairs
        self.size = (int(size),) * 3 if isinstance(size, (int, np.integer)) else tuple(int(s) for s in size)
        if len(self.size) != 3 or min(self.size) < 1:
            raise ValueError(f"crop size must be three positive ints (d, h, w), got {size}")
        self.length = int(length)
        self.seed = int(seed)
        self.augment = augment
        sizes = np.array([img.size for img, _ in pairs], np.float64)
        self.p = sizes / sizes.sum()

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        rng = np.random.default_rng([self.seed, int(k)])
        image, labels = self.pairs[int(rng.choice(len(self.pairs), p=self.p))]
        img, lab = random_crop(image, labels, self.size, rng)
        img = img.astype(np.float32) * np.float32(1.0 / 255.0)
        if self.augment is not None:
            img, lab = augment_subvolume(img, lab, rng, self.augment)
        return torch.from_numpy(np.ascontiguousarray(img))[None], torch.from_numpy(np.ascontiguousarray(lab))

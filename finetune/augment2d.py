"""2D training augmentations: a random crop (native-scale or the paper's), then albumentations.

Why a native-scale crop is the default: the paper's RandomResizedCrop (0.08-1 of the image
area, aspect 0.5-1.5) was tuned on images about the size of the crop. On large images it
trains mostly on heavily downscaled views, while prediction runs at native resolution; on a
real mitochondria set that scored IoU 0.28 against 0.72 for native-scale crops with a
0.7-1.4x zoom (same model and budget). The native crop samples scale, rotation and
position in one affine warp, so rotation never pulls in padded corners from outside the
crop's context (reflection is used only beyond the image border).

Every sample is a pure function of an integer seed, which is what makes a resumed run
identical to an uninterrupted one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import albumentations as A
import cv2
import numpy as np

CROP_MODES = ("native", "paper")


@dataclass(frozen=True)
class Augment2D:
    """2D augmentation settings (the counterpart of :class:`finetune.augment3d.Augment3D`).

    Attributes:
        crop: output side in pixels.
        crop_mode: ``native`` (native-scale crop with a zoom in ``zoom``, rotated by any angle
            when ``rotate``) or ``paper`` (RandomResizedCrop over ``paper_scale`` of the image
            area and aspect ratios ``paper_ratio``, then a rotation when ``rotate``).
        zoom: ``(min, max)`` magnification relative to native resolution (native mode).
        paper_scale, paper_ratio: ``(min, max)`` crop area fraction and aspect ratio (paper mode).
        rotate: random rotation by any angle.
        flips: random horizontal and vertical flips.
        brightness_contrast: brightness and contrast change limit (0.3 = +-30%), applied with
            probability 0.5; 0 disables.
        noise_var: ``(min, max)`` Gaussian noise variance in 8-bit grey levels squared, applied
            with probability 0.5; empty disables.
        blur_sigma: maximum Gaussian blur sigma in pixels, probability 0.5; 0 disables.
    """

    crop: int = 512
    crop_mode: str = "native"
    zoom: tuple[float, float] = (0.7, 1.4)
    paper_scale: tuple[float, float] = (0.08, 1.0)
    paper_ratio: tuple[float, float] = (0.5, 1.5)
    rotate: bool = True
    flips: bool = True
    brightness_contrast: float = 0.3
    noise_var: tuple[float, ...] = ()
    blur_sigma: float = 0.0

    def __post_init__(self) -> None:
        if self.crop_mode not in CROP_MODES:
            raise ValueError(f"crop_mode must be one of {CROP_MODES}, got {self.crop_mode!r}")
        if self.crop < 1 or self.blur_sigma < 0 or not 0 <= self.brightness_contrast < 1:
            raise ValueError(
                f"need crop >= 1, blur_sigma >= 0 and 0 <= brightness_contrast < 1, got "
                f"{self.crop}, {self.blur_sigma}, {self.brightness_contrast}"
            )


def native_crop_matrix(top_left: tuple[float, float], crop: int, zoom: float, angle_deg: float) -> np.ndarray:
    """Affine map from crop pixel ``(x, y)`` to source pixel ``(x, y)`` (for ``WARP_INVERSE_MAP``).

    The crop shows a source square of side ``crop / zoom`` whose top-left corner is
    ``top_left = (y, x)`` before rotation, rotated by ``angle_deg`` about its centre. With
    ``zoom == 1`` and ``angle_deg == 0`` crop pixel ``(x, y)`` maps to
    ``(x + top_left[1], y + top_left[0])``, so an integer corner gives an exact sub-array.

    Returns:
        ``float64[2, 3]``.
    """
    extent = crop / zoom
    theta = math.radians(angle_deg)
    c, s = math.cos(theta), math.sin(theta)
    a = np.array([[c, -s], [s, c]]) / zoom
    dst_centre = np.array([(crop - 1) / 2, (crop - 1) / 2])
    src_centre = np.array([top_left[1] + (extent - 1) / 2, top_left[0] + (extent - 1) / 2])
    b = src_centre - a @ dst_centre
    return np.hstack([a, b[:, None]])


def native_scale_crop(
    image: np.ndarray, labels: np.ndarray, crop: int, zoom: float, angle_deg: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """A ``crop x crop`` view of a 2D image and its class map at ``zoom`` x native scale.

    Args:
        image: ``(H, W)`` uint8.
        labels: ``(H, W)`` uint8 class map (nearest-neighbour sampled, so classes and the
            ignore index stay exact).
        crop: output side in pixels.
        zoom: magnification relative to native resolution.
        angle_deg: rotation.
        rng: picks the position (uniform over positions keeping the unrotated square
            inside the image; centred ranges when the image is smaller than the square).

    Returns:
        ``(image_crop uint8[crop, crop], labels_crop uint8[crop, crop])``; regions outside
        the image are reflected.
    """
    h, w = image.shape
    extent = crop / zoom
    corner = []
    for n in (h, w):
        lo, hi = sorted((0.0, n - extent))
        corner.append(float(rng.integers(math.floor(lo), math.floor(hi) + 1)) if hi - lo >= 1 else (lo + hi) / 2)
    m = native_crop_matrix((corner[0], corner[1]), crop, zoom, angle_deg)
    flags = cv2.WARP_INVERSE_MAP
    img = cv2.warpAffine(image, m, (crop, crop), flags=flags | cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT_101)
    lab = cv2.warpAffine(labels, m, (crop, crop), flags=flags | cv2.INTER_NEAREST, borderMode=cv2.BORDER_REFLECT_101)
    return img, lab


class Augmenter:
    """Seeded augmentation of one 2D training sample with the settings ``aug``.

    ``augmenter(image uint8[H, W], labels uint8[H, W], seed) -> (uint8[crop, crop], uint8[crop, crop])``.
    """

    def __init__(self, aug: Augment2D):
        self.aug = aug
        reflect = cv2.BORDER_REFLECT_101
        photometric: list[A.BasicTransform] = []
        if aug.flips:
            photometric += [A.HorizontalFlip(p=0.5), A.VerticalFlip(p=0.5)]
        if aug.brightness_contrast > 0:
            lim = aug.brightness_contrast
            photometric.append(A.RandomBrightnessContrast(brightness_limit=lim, contrast_limit=lim, p=0.5))
        if aug.noise_var:
            # albumentations scales the noise std by the dtype maximum (255 for uint8).
            lo, hi = (math.sqrt(v) / 255.0 for v in aug.noise_var)
            photometric.append(A.GaussNoise(std_range=(lo, hi), p=0.5))
        if aug.blur_sigma > 0:
            photometric.append(
                A.GaussianBlur(blur_limit=0, sigma_limit=(min(0.1, aug.blur_sigma), aug.blur_sigma), p=0.5)
            )
        if aug.crop_mode == "paper":
            geometric: list[A.BasicTransform] = [
                A.RandomResizedCrop(
                    size=(aug.crop, aug.crop), scale=tuple(aug.paper_scale), ratio=tuple(aug.paper_ratio)
                )
            ]
            if aug.rotate:
                geometric.append(A.Rotate(limit=180, border_mode=reflect, p=1.0))
            photometric = geometric + photometric
        self.pipeline = A.Compose(photometric)

    def __call__(self, image: np.ndarray, labels: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
        aug = self.aug
        rng = np.random.default_rng(seed)
        if aug.crop_mode == "native":
            zoom = float(np.exp(rng.uniform(math.log(aug.zoom[0]), math.log(aug.zoom[1]))))
            angle = float(rng.uniform(-180.0, 180.0)) if aug.rotate else 0.0
            image, labels = native_scale_crop(image, labels, aug.crop, zoom, angle, rng)
        self.pipeline.set_random_seed(int(rng.integers(2**31 - 1)))
        out = self.pipeline(image=np.ascontiguousarray(image), mask=np.ascontiguousarray(labels))
        return out["image"], out["mask"]

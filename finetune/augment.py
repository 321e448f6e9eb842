"""Training augmentations: a random crop (native-scale or the paper's), then albumentations.

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

import albumentations as A
import cv2
import numpy as np

from finetune.config import TrainConfig


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


def native_scale_crop(image: np.ndarray, labels: np.ndarray, crop: int, zoom: float, angle_deg: float,
                      rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
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
    """Seeded augmentation of one 2D training sample.

    ``augmenter(image uint8[H, W], labels uint8[H, W], seed) -> (uint8[crop, crop], uint8[crop, crop])``.
    """

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        reflect = cv2.BORDER_REFLECT_101
        photometric: list[A.BasicTransform] = []
        if cfg.flips:
            photometric += [A.HorizontalFlip(p=0.5), A.VerticalFlip(p=0.5)]
        if cfg.brightness_contrast > 0:
            lim = cfg.brightness_contrast
            photometric.append(A.RandomBrightnessContrast(brightness_limit=lim, contrast_limit=lim, p=0.5))
        if cfg.noise_var:
            # albumentations scales the noise std by the dtype maximum (255 for uint8).
            lo, hi = (math.sqrt(v) / 255.0 for v in cfg.noise_var)
            photometric.append(A.GaussNoise(std_range=(lo, hi), p=0.5))
        if cfg.blur_sigma > 0:
            photometric.append(A.GaussianBlur(blur_limit=0, sigma_limit=(min(0.1, cfg.blur_sigma), cfg.blur_sigma), p=0.5))
        if cfg.crop_mode == "paper":
            geometric: list[A.BasicTransform] = [A.RandomResizedCrop(
                size=(cfg.crop, cfg.crop), scale=tuple(cfg.paper_scale), ratio=tuple(cfg.paper_ratio))]
            if cfg.rotate:
                geometric.append(A.Rotate(limit=180, border_mode=reflect, p=1.0))
            photometric = geometric + photometric
        self.pipeline = A.Compose(photometric)

    def __call__(self, image: np.ndarray, labels: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
        cfg = self.cfg
        rng = np.random.default_rng(seed)
        if cfg.crop_mode == "native":
            zoom = float(np.exp(rng.uniform(math.log(cfg.zoom[0]), math.log(cfg.zoom[1]))))
            angle = float(rng.uniform(-180.0, 180.0)) if cfg.rotate else 0.0
            image, labels = native_scale_crop(image, labels, cfg.crop, zoom, angle, rng)
        self.pipeline.set_random_seed(int(rng.integers(2**31 - 1)))
        out = self.pipeline(image=np.ascontiguousarray(image), mask=np.ascontiguousarray(labels))
        return out["image"], out["mask"]

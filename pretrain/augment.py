"""MoCoV2 augmentations for one-channel uint8 EM patches, in numpy + OpenCV.

One view is made in four passes over at most ``image_size**2`` pixels:

1. geometry: random resized crop (area ``crop_scale``, aspect ``crop_ratio``), rotation by a
   uniform angle in [-180, 180) degrees and horizontal/vertical flips, composed into one affine
   map and resampled once (bilinear, mirrored borders so rotations leave no black corners);
2. brightness/contrast jitter as one 256-entry lookup table (grayscale: no saturation or hue);
3. separable Gaussian blur (``cv2.GaussianBlur``, sigma in output pixels);
4. additive Gaussian noise on intensities in [0, 1], variance drawn log-uniformly.

Every random number comes from the ``numpy.random.Generator`` passed in (the noise field from
OpenCV's generator, seeded from it, which is 4x faster than numpy's normal sampler), so a view is
a pure function of (image, parameters, generator state). All parameters of a view are drawn whether or
not an operation is applied, so switching one operation off does not change the others' draws.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

# Downscaling by more than this factor first shrinks the source with area averaging, so small
# views of large crops are not aliased (bilinear resampling alone skips pixels).
_ANTIALIAS_ABOVE = 1.5


@dataclass(frozen=True)
class AugmentParams:
    """Distribution of the augmentations; defaults are the CEM500K MoCoV2 recipe.

    Probabilities are in [0, 1]; ``brightness``/``contrast`` ``x`` draw a factor from
    ``[1-x, 1+x]``; ``blur_sigma`` is in output pixels; ``noise_var`` is the variance range for
    intensities scaled to [0, 1] (drawn log-uniformly; the CEM500K release uses 1e-5 to 1e-4).
    """

    image_size: int = 224
    crop_scale: tuple[float, float] = (0.2, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    rotation_p: float = 0.5
    hflip_p: float = 0.5
    vflip_p: float = 0.5
    jitter_p: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    blur_p: float = 0.5
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    noise_p: float = 0.5
    noise_var: tuple[float, float] = (1e-5, 1e-4)

    @classmethod
    def from_config(cls, cfg) -> "AugmentParams":
        """Take the augmentation fields of a :class:`pretrain.config.MocoConfig`."""
        return cls(
            image_size=cfg.image_size,
            crop_scale=tuple(cfg.crop_scale),
            crop_ratio=tuple(cfg.crop_ratio),
            rotation_p=cfg.rotation_p,
            hflip_p=cfg.hflip_p,
            vflip_p=cfg.vflip_p,
            jitter_p=cfg.jitter_p,
            brightness=cfg.brightness,
            contrast=cfg.contrast,
            blur_p=cfg.blur_p,
            blur_sigma=tuple(cfg.blur_sigma),
            noise_p=cfg.noise_p,
            noise_var=tuple(cfg.noise_var),
        )


@dataclass(frozen=True)
class ViewParams:
    """The random draws that define one view.

    ``crop`` is ``(y0, x0, h, w)`` in source pixels (floats; the box before rotation);
    ``angle`` in degrees, counter-clockwise as displayed; factors are 1.0 and sigmas 0.0 when
    the operation is not applied; ``noise_seed`` seeds the noise field.
    """

    crop: tuple[float, float, float, float]
    angle: float = 0.0
    hflip: bool = False
    vflip: bool = False
    brightness: float = 1.0
    contrast: float = 1.0
    contrast_first: bool = False
    blur_sigma: float = 0.0
    noise_std: float = 0.0
    noise_seed: int = 0


def sample_crop(
    rng: np.random.Generator, height: int, width: int, scale: tuple[float, float], ratio: tuple[float, float]
) -> tuple[float, float, float, float]:
    """Draw a crop box ``(y0, x0, h, w)`` (floats, pixels) covering ``scale`` of the area.

    Area fraction is uniform in ``scale``, aspect ratio ``w/h`` log-uniform in ``ratio``. A box
    that does not fit is redrawn (up to 10 times); then the largest box of the clamped ratio
    centred in the image is used, so the result always lies inside the image.
    """
    area = height * width
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        w, h = math.sqrt(target * aspect), math.sqrt(target / aspect)
        if w <= width and h <= height:
            return float(rng.uniform(0, height - h)), float(rng.uniform(0, width - w)), h, w
    aspect = min(max(width / height, ratio[0]), ratio[1])
    w, h = (float(width), width / aspect) if width / height < aspect else (height * aspect, float(height))
    return (height - h) / 2, (width - w) / 2, h, w


def sample_view(rng: np.random.Generator, shape: tuple[int, int], params: AugmentParams) -> ViewParams:
    """Draw the parameters of one view of an image of ``shape`` ``(H, W)``."""
    crop = sample_crop(rng, shape[0], shape[1], params.crop_scale, params.crop_ratio)
    u = rng.random(6)  # one uniform per coin flip, always drawn (see module docstring)
    angle = rng.uniform(-180.0, 180.0)
    b = rng.uniform(1 - params.brightness, 1 + params.brightness)
    c = rng.uniform(1 - params.contrast, 1 + params.contrast)
    contrast_first = bool(rng.random() < 0.5)
    sigma = rng.uniform(*params.blur_sigma)
    log_var = rng.uniform(math.log(params.noise_var[0]), math.log(params.noise_var[1]))
    noise_seed = int(rng.integers(0, 2**31 - 1))
    jitter = u[3] < params.jitter_p
    return ViewParams(
        crop=crop,
        angle=float(angle) if u[0] < params.rotation_p else 0.0,
        hflip=bool(u[1] < params.hflip_p),
        vflip=bool(u[2] < params.vflip_p),
        brightness=float(b) if jitter else 1.0,
        contrast=float(c) if jitter else 1.0,
        contrast_first=contrast_first,
        blur_sigma=float(sigma) if u[4] < params.blur_p else 0.0,
        noise_std=math.sqrt(math.exp(log_var)) if u[5] < params.noise_p else 0.0,
        noise_seed=noise_seed,
    )


def geometry_matrix(view: ViewParams, out_size: int) -> np.ndarray:
    """The affine map from output pixel ``(x, y)`` to source pixel coordinates.

    Returns float64 ``(2, 3)`` for ``cv2.warpAffine(..., flags=WARP_INVERSE_MAP)``. Pixel
    centres sit at integer coordinates. The output shows the crop box, flipped, then rotated
    by ``view.angle`` degrees counter-clockwise about the box centre.
    """
    y0, x0, h, w = view.crop
    sx, sy = w / out_size, h / out_size
    flip = np.diag([-1.0 if view.hflip else 1.0, -1.0 if view.vflip else 1.0])
    t = math.radians(view.angle)
    cos, sin = math.cos(t), math.sin(t)
    # A counter-clockwise turn of the content (y axis down) means each output offset samples
    # the source at the offset turned the other way.
    rot = np.array([[cos, -sin], [sin, cos]])
    linear = rot @ np.diag([sx, sy]) @ flip
    centre_src = np.array([x0 - 0.5 + w / 2, y0 - 0.5 + h / 2])
    centre_out = np.full(2, (out_size - 1) / 2)
    return np.hstack([linear, (centre_src - linear @ centre_out)[:, None]])


def apply_geometry(image: np.ndarray, view: ViewParams, out_size: int) -> np.ndarray:
    """Resample ``image`` (uint8 ``(H, W)``) through the view's crop/rotation/flips.

    Returns uint8 ``(out_size, out_size)``; pixels mapped outside the image mirror it.
    """
    matrix = geometry_matrix(view, out_size)
    shrink = min(view.crop[2], view.crop[3]) / out_size
    if shrink > _ANTIALIAS_ABOVE:
        h, w = image.shape
        new_w, new_h = max(1, round(w / shrink)), max(1, round(h / shrink))
        image = cv2.resize(image, (new_w, new_h), interpolation=cv2.INTER_AREA)
        # Source coordinates x map to (x + 0.5) * f - 0.5 in the shrunken image.
        fx, fy = new_w / w, new_h / h
        scale = np.array([[fx, 0.0, 0.5 * fx - 0.5], [0.0, fy, 0.5 * fy - 0.5]])
        matrix = scale[:, :2] @ matrix + np.hstack([np.zeros((2, 2)), scale[:, 2:]])
    return cv2.warpAffine(
        image,
        matrix,
        (out_size, out_size),
        flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
        borderMode=cv2.BORDER_REFLECT_101,
    )


def jitter_lut(histogram: np.ndarray, brightness: float, contrast: float, contrast_first: bool) -> np.ndarray:
    """A uint8 ``(256,)`` lookup table for brightness then contrast (or the reverse).

    ``histogram`` (``(256,)`` counts of the image) gives the mean grey value that contrast
    scales around, evaluated after brightness when brightness comes first. Values are
    clipped to [0, 255] after each operation, as a uint8 image would be.
    """
    levels = np.arange(256, dtype=np.float64)
    total = max(histogram.sum(), 1)

    def adjust_contrast(v: np.ndarray) -> np.ndarray:
        mean = float(histogram @ v) / total
        return np.clip(mean + contrast * (v - mean), 0, 255)

    def adjust_brightness(v: np.ndarray) -> np.ndarray:
        return np.clip(v * brightness, 0, 255)

    out = adjust_brightness(adjust_contrast(levels)) if contrast_first else adjust_contrast(adjust_brightness(levels))
    return np.rint(out).astype(np.uint8)


def render_view(image: np.ndarray, view: ViewParams, out_size: int) -> np.ndarray:
    """Apply ``view`` to ``image`` (uint8 ``(H, W)``).

    Returns float32 ``(out_size, out_size)`` with intensities in [0, 1].
    """
    out = apply_geometry(image, view, out_size)
    if view.brightness != 1.0 or view.contrast != 1.0:
        hist = cv2.calcHist([out], [0], None, [256], [0, 256]).ravel().astype(np.float64)
        out = cv2.LUT(out, jitter_lut(hist, view.brightness, view.contrast, view.contrast_first))
    if view.blur_sigma > 0:
        out = cv2.GaussianBlur(out, (0, 0), sigmaX=view.blur_sigma, borderType=cv2.BORDER_REFLECT_101)
    result = out.astype(np.float32)
    result *= np.float32(1 / 255)
    if view.noise_std > 0:
        noise = np.empty_like(result)
        cv2.setRNGSeed(view.noise_seed)  # OpenCV's generator is per thread; seeding makes it ours
        cv2.randn(noise, 0.0, view.noise_std)
        result += noise
        np.clip(result, 0.0, 1.0, out=result)
    return result


def augment_view(image: np.ndarray, params: AugmentParams, rng: np.random.Generator) -> np.ndarray:
    """One random view of ``image`` (uint8 ``(H, W)``): float32 ``(S, S)`` in [0, 1], S = image_size."""
    if image.dtype != np.uint8 or image.ndim != 2:
        raise ValueError(f"expected a uint8 (H, W) image, got {image.dtype} {image.shape}")
    return render_view(image, sample_view(rng, image.shape, params), params.image_size)


def two_views(
    images: np.ndarray, seeds: np.ndarray, params: AugmentParams, mean: float, std: float
) -> tuple[np.ndarray, np.ndarray]:
    """Query and key views of a batch, normalised for the network.

    Args:
        images: uint8 ``(n, H, W)``.
        seeds: ``(n, k)`` integer entropy per image; image ``i``'s two views depend only on
            ``images[i]`` and ``seeds[i]``, so they do not change with batch split or worker count.
        mean, std: intensity statistics of the store in [0, 1] units.

    Returns:
        ``(query, key)``, each float32 ``(n, 1, S, S)`` holding ``(view - mean) / std``.
    """
    n, s = len(images), params.image_size
    query = np.empty((n, 1, s, s), np.float32)
    key = np.empty((n, 1, s, s), np.float32)
    for i in range(n):
        rng = np.random.default_rng([int(v) for v in seeds[i]])
        query[i, 0] = augment_view(images[i], params, rng)
        key[i, 0] = augment_view(images[i], params, rng)
    for views in (query, key):
        views -= np.float32(mean)
        views *= np.float32(1.0 / std)
    return query, key

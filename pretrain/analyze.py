"""What an encoder has learned: invariance, selectivity and occlusion (CEM500K paper, Fig. 3).

``pretrain analyze`` runs :func:`analyze` on one or more encoders side by side and writes
``analyze.json`` plus ``invariance.png``, ``selectivity.png`` and ``occlusion.png``.
The measurements are pure functions of arrays, tested on constructed cases:

* **Invariance** (Fig. 3a, after Goodfellow et al. 2009). :func:`distort` applies one
  distortion at one strength to an image in [0, 1]; :func:`firing_thresholds` are the 99th
  percentiles of each neuron's responses to random-noise images; :func:`firing_rates` is
  the paper's mean firing rate: for neuron ``j``, ``Z_j`` are the test images whose
  undistorted response is at or above the neuron's 90th percentile over the test images
  *and* above its threshold; neurons with empty ``Z_j`` are ignored; the neuron's firing
  rate at a strength is the fraction of ``Z_j`` whose distorted versions respond above
  its threshold, and the mean firing rate is the average over the remaining neurons (an
  exactly invariant encoder scores 1 at every strength). :func:`cosine_similarity`
  between the pooled features of an image and of its distorted view is reported too.
  Neurons are the channels of the global-average-pooled output (2048 for resnet50).
* **Selectivity** (Fig. 3b). Feature maps at a finer output stride (the paper removes
  downsampling steps; timm's ResNets offer ``output_stride`` 8 or 16 through dilation:
  8 for ER, mitochondria and canalicular channels, 16 for nuclei; the paper's ER maps had
  stride 2, which timm ResNets do not offer), resized bilinearly to the image size;
  :func:`selectivity` correlates every channel with the binary mask (point-biserial =
  Pearson with the 0/1 mask), averages the ``top_k`` (32) best channels, rescales that
  mean response to [0, 1], and reports its correlation and its IoU with the mask after
  thresholding at 0.3.
* **Occlusion** (Fig. 3c, after Zeiler & Fergus 2014). Two views of an image (random
  square crops, rescaled to 224, seeded); :func:`occlusion_map` zeroes 61 x 61 squares
  every 30 px in one view (zero in the *normalised* input, i.e. the weights' mean
  intensity) and measures the drop of the dot product between its pooled features and
  the other view's; the per-pixel mean drop over the squares covering a pixel is
  normalised to [0, 1].

Encoders are ``NAME=SPEC`` pairs where SPEC is a weight spec of
:mod:`cemcurate.common.weights`; the arch comes from the file (its ``config.json``, else
the state dict's layout) or the default; inputs in [0, 1] are normalised with the
weights' mean/std (CEM500K's when unknown, e.g. ``random``).
"""

from __future__ import annotations

import glob
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from cemcurate.common.archs import get_arch, infer_arch
from cemcurate.common.atomic import atomic_path
from cemcurate.common.device import select_device
from cemcurate.common.lazy import lazy_import
from cemcurate.common.weights import (
    CEM500K_MEAN,
    CEM500K_STD,
    WeightsError,
    WeightSpec,
    encoder_state_dict,
    find_weights_file,
    load_encoder_weights,
    read_config_json,
    read_weights_file,
    resolve,
    weights_from_checkpoint,
)
from cemcurate.io import is_supported, open_file
from cemcurate.standardize import compute_window
from cemcurate.store import open_patches
from pretrain.moco import create_backbone

timm = lazy_import("timm")
ndimage = lazy_import("scipy.ndimage")
matplotlib = lazy_import("matplotlib")
pyplot = lazy_import("matplotlib.pyplot")

IMAGE_SIZE = 224
# Distortions and their strengths (Fig. 3a). rotation: degrees; hflip/vflip: 0 = none,
# 1 = flipped; brightness: shift of intensities in [0, 1]; contrast: factor about the image
# mean; blur: Gaussian sigma in px; noise: Gaussian sigma in [0, 1] units; scale: factor f of
# a centre crop of side 224/f resized back to 224. Results are clipped to [0, 1].
DISTORTIONS: dict[str, tuple[float, ...]] = {
    "rotation": (0, 15, 30, 45, 90, 135, 180, 270),
    "hflip": (0, 1),
    "vflip": (0, 1),
    "brightness": (-0.4, -0.2, -0.1, 0, 0.1, 0.2, 0.4),
    "contrast": (0.25, 0.5, 0.75, 1, 1.5, 2, 3),
    "blur": (0, 1, 2, 4, 8),
    "noise": (0, 0.02, 0.05, 0.1, 0.2, 0.4),
    "scale": (1, 1.25, 1.5, 2, 3, 5),
}
UNITS = {
    "rotation": "degrees",
    "hflip": "flipped",
    "vflip": "flipped",
    "brightness": "shift",
    "contrast": "factor",
    "blur": "sigma (px)",
    "noise": "sigma",
    "scale": "factor",
}
# Output stride of the selectivity feature maps by organelle (prefix of the image name).
SELECTIVITY_STRIDE = {"er": 8, "mitochondria": 8, "canalicular": 8, "nucle": 16}
DEFAULT_STRIDE = 8
FIRING_PERCENTILE = 99.0  # of the responses to noise: the neuron's firing threshold
Z_PERCENTILE = 90.0  # of the responses to the test images: the near-maximal set Z
TOP_K = 32
MASK_THRESHOLD = 0.3
OCCLUSION_SIZE, OCCLUSION_STRIDE = 61, 30
VIEW_SCALE = (0.5, 1.0)  # occlusion views: square crop side as a fraction of the short side


# ---------------------------------------------------------------------------------------
# Measurements (pure functions)


def is_identity(kind: str, strength: float) -> bool:
    """Whether ``distort(image, kind, strength)`` returns the image unchanged."""
    if kind not in DISTORTIONS:
        raise ValueError(f"unknown distortion {kind!r}; choose from {', '.join(DISTORTIONS)}")
    identity = {"rotation": 0, "contrast": 1, "scale": 1}.get(kind, 0)
    return float(strength) == identity or (kind == "rotation" and float(strength) % 360 == 0)


def distort(image: np.ndarray, kind: str, strength: float, rng: np.random.Generator | None = None) -> np.ndarray:
    """``image`` (float ``(H, W)`` in [0, 1]) distorted by ``kind`` at ``strength`` (see :data:`DISTORTIONS`).

    Rotations by multiples of 90 degrees and flips are exact; other angles rotate about the
    centre with bilinear interpolation and reflected borders. ``noise`` draws from ``rng``
    (a fixed seed when None). Returns float32 of the same shape, clipped to [0, 1].
    """
    x = np.asarray(image, np.float32)
    if x.ndim != 2:
        raise ValueError(f"expected a 2D image, got shape {x.shape}")
    s = float(strength)
    if is_identity(kind, s):
        return x.copy()
    if kind == "rotation":
        if s % 90 == 0:
            out = np.rot90(x, k=int(s // 90) % 4)
            if out.shape != x.shape:
                raise ValueError(f"rotating a non-square image {x.shape} by {s} degrees changes its shape")
        else:
            out = ndimage.rotate(x, s, reshape=False, order=1, mode="reflect")
    elif kind == "hflip":
        out = x[:, ::-1]
    elif kind == "vflip":
        out = x[::-1, :]
    elif kind == "brightness":
        out = x + s
    elif kind == "contrast":
        out = (x - x.mean()) * s + x.mean()
    elif kind == "blur":
        out = ndimage.gaussian_filter(x, s, mode="reflect")
    elif kind == "noise":
        rng = rng if rng is not None else np.random.default_rng(0)
        out = x + rng.normal(0.0, s, x.shape).astype(np.float32)
    elif kind == "scale":
        if s < 1:
            raise ValueError(f"scale factor must be >= 1 (a centre crop of side H/f), got {s}")
        h, w = x.shape
        ch, cw = max(1, round(h / s)), max(1, round(w / s))
        y0, x0 = (h - ch) // 2, (w - cw) // 2
        crop = torch.from_numpy(np.ascontiguousarray(x[y0 : y0 + ch, x0 : x0 + cw]))[None, None]
        out = F.interpolate(crop, size=(h, w), mode="bilinear", align_corners=False)[0, 0].numpy()
    else:  # pragma: no cover - is_identity has refused it
        raise AssertionError(kind)
    return np.ascontiguousarray(np.clip(out, 0.0, 1.0), dtype=np.float32)


def firing_thresholds(noise_responses: np.ndarray, percentile: float = FIRING_PERCENTILE) -> np.ndarray:
    """Each neuron's firing threshold: the ``percentile`` of its responses ``(n_noise, C)`` to noise images."""
    return np.percentile(np.asarray(noise_responses, np.float64), percentile, axis=0)


@dataclass
class FiringRate:
    """Mean firing rate at one distortion strength.

    Attributes:
        mean: average of the per-neuron rates over the neurons considered (NaN if none).
        neurons: how many neurons were considered (non-empty ``Z_j``).
        per_neuron: ``(C,)`` rates, NaN for neurons ignored.
    """

    mean: float
    neurons: int
    per_neuron: np.ndarray


def selective_sets(responses_clean: np.ndarray, thresholds: np.ndarray, percentile: float = Z_PERCENTILE) -> np.ndarray:
    """``Z`` as a boolean ``(n, C)``: image i is in ``Z_j`` when its response to neuron j is at or above
    the neuron's ``percentile`` over the test images and above the neuron's threshold."""
    clean = np.asarray(responses_clean, np.float64)
    near_max = clean >= np.percentile(clean, percentile, axis=0, keepdims=True)
    return near_max & (clean > np.asarray(thresholds, np.float64)[None, :])


def firing_rates(
    responses_clean: np.ndarray,
    responses_distorted: np.ndarray,
    thresholds: np.ndarray,
    percentile: float = Z_PERCENTILE,
) -> FiringRate:
    """The paper's mean firing rate of neurons (columns) under a distortion.

    Args:
        responses_clean: ``(n, C)`` responses to the undistorted test images.
        responses_distorted: ``(n, C)`` responses to the same images distorted (row i is image i).
        thresholds: ``(C,)`` firing thresholds (:func:`firing_thresholds`).
        percentile: the near-maximal set is at or above this percentile of the clean responses.
    """
    clean = np.asarray(responses_clean, np.float64)
    distorted = np.asarray(responses_distorted, np.float64)
    if clean.shape != distorted.shape or clean.ndim != 2:
        raise ValueError(f"responses must both be (n, C), got {clean.shape} and {distorted.shape}")
    z = selective_sets(clean, thresholds, percentile)
    size = z.sum(axis=0)
    fired = (z & (distorted > np.asarray(thresholds, np.float64)[None, :])).sum(axis=0)
    per_neuron = np.full(clean.shape[1], np.nan)
    valid = size > 0
    per_neuron[valid] = fired[valid] / size[valid]
    mean = float(per_neuron[valid].mean()) if valid.any() else math.nan
    return FiringRate(mean, int(valid.sum()), per_neuron)


def cosine_similarity(a: np.ndarray, b: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    """Row-wise cosine similarity of two ``(n, C)`` arrays (two zero rows count as identical: 1)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    na, nb = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
    sim = (a * b).sum(axis=1) / np.maximum(na * nb, eps)
    sim[(na < eps) & (nb < eps)] = 1.0
    return sim


def point_biserial(maps: np.ndarray, mask: np.ndarray, chunk: int = 128) -> np.ndarray:
    """Pearson correlation of every channel of ``maps`` ``(C, H, W)`` with a binary ``mask`` ``(H, W)``
    (the point-biserial coefficient); 0 for a constant channel or a constant mask. Computed in
    float64, ``chunk`` channels at a time (2048 maps of 224 x 224 are 400 MB in float32)."""
    maps = np.asarray(maps)
    flat = maps.reshape(len(maps), -1)
    y = np.asarray(mask, bool).ravel().astype(np.float64)
    if flat.shape[1] != y.size:
        raise ValueError(f"feature maps of {flat.shape[1]} pixels do not match a mask of {y.size}")
    y -= y.mean()
    y_norm = np.sqrt((y**2).sum())
    out = np.zeros(len(flat))
    for i in range(0, len(flat), chunk):
        block = flat[i : i + chunk].astype(np.float64)
        block -= block.mean(axis=1, keepdims=True)
        denom = np.sqrt((block**2).sum(axis=1)) * y_norm
        num = block @ y
        out[i : i + chunk] = np.where(denom > 0, num / np.where(denom > 0, denom, 1.0), 0.0)
    return out


def iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two boolean arrays (1 when both are empty)."""
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    union = (a | b).sum()
    return float((a & b).sum() / union) if union else 1.0


@dataclass
class Selectivity:
    """How well feature channels match one organelle mask.

    Attributes:
        correlations: ``(C,)`` point-biserial correlation of each channel with the mask.
        top_channels: the ``top_k`` channels, most correlated first.
        mean_response: ``(H, W)`` mean of the top channels rescaled to [0, 1].
        correlation: the mean response's point-biserial correlation with the mask.
        binary: ``mean_response >= threshold``.
        iou: IoU of ``binary`` with the mask.
    """

    correlations: np.ndarray
    top_channels: np.ndarray
    mean_response: np.ndarray
    correlation: float
    binary: np.ndarray
    iou: float


def rescale01(x: np.ndarray) -> np.ndarray:
    """``x`` min-max rescaled to [0, 1] (all zeros when constant)."""
    x = np.asarray(x, np.float64)
    lo, hi = x.min(), x.max()
    return (x - lo) / (hi - lo) if hi > lo else np.zeros_like(x)


def selectivity(
    feature_maps: np.ndarray, mask: np.ndarray, top_k: int = TOP_K, threshold: float = MASK_THRESHOLD
) -> Selectivity:
    """Correlate every channel of ``feature_maps`` ``(C, H, W)`` (already at the mask's size) with ``mask``.

    The ``top_k`` most positively correlated channels are averaged, rescaled to [0, 1],
    correlated with the mask and thresholded at ``threshold`` (the paper's 32 and 0.3).
    """
    mask = np.asarray(mask, bool)
    if feature_maps.shape[1:] != mask.shape:
        raise ValueError(f"feature maps {feature_maps.shape[1:]} and mask {mask.shape} differ in size")
    corr = point_biserial(feature_maps, mask)
    top = np.argsort(-corr, kind="stable")[: max(1, min(top_k, len(corr)))]
    mean_response = rescale01(np.asarray(feature_maps[top], np.float64).mean(axis=0))
    binary = mean_response >= threshold
    return Selectivity(
        corr, top, mean_response, float(point_biserial(mean_response[None], mask)[0]), binary, iou(binary, mask)
    )


def occlusion_squares(height: int, width: int, size: int = OCCLUSION_SIZE, stride: int = OCCLUSION_STRIDE):
    """Top-left corners ``(y, x)`` of the occluding squares: every ``stride`` px from 0 while the square
    still starts inside the image (squares at the far border are clipped, so every pixel is covered)."""
    ys = list(range(0, max(1, height - size + stride), stride))
    xs = list(range(0, max(1, width - size + stride), stride))
    return ys, xs


@dataclass
class Occlusion:
    """Importance of each region of ``view`` for matching the reference.

    Attributes:
        similarity: dot product of the unoccluded view's features with the reference.
        drops: ``(rows, cols)`` similarity drop for the square at each grid position.
        heatmap: ``(H, W)`` mean drop of the squares covering each pixel, rescaled to [0, 1].
        corners: the squares' top-left ``y`` and ``x`` coordinates.
    """

    similarity: float
    drops: np.ndarray
    heatmap: np.ndarray
    corners: tuple[list[int], list[int]]


def occlusion_map(
    embed: Callable[[np.ndarray], np.ndarray],
    view: np.ndarray,
    reference: np.ndarray,
    size: int = OCCLUSION_SIZE,
    stride: int = OCCLUSION_STRIDE,
    fill: float = 0.0,
) -> Occlusion:
    """Occlusion sensitivity of ``view`` ``(H, W)`` in [0, 1] (Zeiler & Fergus; the paper's Fig. 3c).

    ``embed`` maps a batch ``(n, H, W)`` of images to features ``(n, C)``; ``reference`` is
    the ``(C,)`` feature of the other view. Each ``size`` x ``size`` square (every
    ``stride`` px) is set to ``fill`` in one copy of ``view``; importance is the drop of
    the dot product with ``reference`` it causes.
    """
    view = np.asarray(view, np.float32)
    h, w = view.shape
    reference = np.asarray(reference, np.float64).ravel()
    ys, xs = occlusion_squares(h, w, size, stride)
    copies = np.repeat(view[None], len(ys) * len(xs) + 1, axis=0)
    for i, (y, x) in enumerate((y, x) for y in ys for x in xs):
        copies[i + 1, y : y + size, x : x + size] = fill
    sims = np.asarray(embed(copies), np.float64) @ reference
    drops = (sims[0] - sims[1:]).reshape(len(ys), len(xs))
    total, count = np.zeros((h, w)), np.zeros((h, w))
    for r, y in enumerate(ys):
        for c, x in enumerate(xs):
            total[y : y + size, x : x + size] += drops[r, c]
            count[y : y + size, x : x + size] += 1
    heat = rescale01(total / np.maximum(count, 1))
    return Occlusion(float(sims[0]), drops, heat, (ys, xs))


# ---------------------------------------------------------------------------------------
# Encoders and images


@dataclass
class Encoder:
    """A loaded encoder: ``model`` maps normalised ``(n, 1, H, W)`` to pooled ``(n, C)``."""

    name: str
    spec: str
    arch: str
    source: str
    mean: float
    std: float
    norm_from: str
    model: torch.nn.Module
    device: torch.device
    _strided: dict[int, torch.nn.Module] = field(default_factory=dict)

    def normalise(self, images: np.ndarray) -> torch.Tensor:
        x = torch.as_tensor(np.asarray(images, np.float32))
        return ((x - self.mean) / self.std)[:, None].to(self.device)

    @torch.no_grad()
    def embed(
        self, images: np.ndarray, batch_size: int = 32, on_batch: Callable[[int], object] | None = None
    ) -> np.ndarray:
        """Pooled features ``(n, C)`` (float64) of images ``(n, H, W)`` in [0, 1]; ``on_batch(k)`` after each batch."""
        out = []
        for i in range(0, len(images), batch_size):
            out.append(self.model(self.normalise(images[i : i + batch_size])).double().cpu().numpy())
            if on_batch is not None:
                on_batch(len(out[-1]))
        return np.concatenate(out) if out else np.zeros((0, self.model.num_features))

    @torch.no_grad()
    def feature_maps(self, image: np.ndarray, output_stride: int) -> np.ndarray:
        """The last stage's maps ``(C, H, W)`` of one image ``(H, W)`` at ``output_stride`` (8, 16 or 32),
        resized bilinearly to the image's size."""
        if output_stride not in self._strided:
            model = timm.create_model(
                self.arch,
                pretrained=False,
                in_chans=1,
                num_classes=0,
                zero_init_last=False,
                output_stride=output_stride,
            )
            load_encoder_weights(
                model, self.model.state_dict(), self.arch, f"{self.name} (output stride {output_stride})"
            )
            self._strided[output_stride] = model.eval().to(self.device)
        maps = self._strided[output_stride].forward_features(self.normalise(image[None]))
        maps = F.interpolate(maps.float(), size=image.shape, mode="bilinear", align_corners=False)
        return maps[0].cpu().numpy()


def parse_encoder_arg(text: str) -> tuple[str, str]:
    """``NAME=SPEC`` -> ``(NAME, SPEC)``; a bare SPEC (no ``=`` before any ``/`` or ``:``) is named
    after itself (the last part of its path)."""
    name, sep, spec = text.partition("=")
    if not sep or "/" in name or ":" in name:
        name, spec = Path(text.removeprefix("cem500k:")).name or text, text
    if not name or not spec:
        raise ValueError(f"encoder {text!r}: expected NAME=SPEC, e.g. moco=runs/export or random=random")
    return name, spec


def load_encoder(name: str, spec: str, default_arch: str, device: torch.device, seed: int = 0) -> Encoder:
    """Resolve ``spec`` (see :mod:`cemcurate.common.weights`), build the backbone as ``pretrain moco`` does
    (timm, one input channel, no head) and load the weights strictly. The arch is the file's
    (``config.json`` or the state dict's layout), else ``default_arch``; ``random`` weights
    are initialised from ``seed``.
    """
    parsed = WeightSpec.parse(spec)
    arch = default_arch
    if parsed.kind in ("file", "cem500k"):
        assert parsed.path is not None
        path = find_weights_file(parsed.path)
        raw = read_weights_file(path)
        file_arch = read_config_json(path)[2] if parsed.kind == "file" else None
        arch = file_arch or infer_arch(encoder_state_dict(raw, str(path))) or default_arch
        get_arch(arch)
        resolved = weights_from_checkpoint(raw, path, parsed.kind, arch)
    else:
        resolved = resolve(parsed, arch, flag="--encoder")
    torch.manual_seed(seed)
    model = create_backbone(arch)
    if resolved.state is not None:
        load_encoder_weights(model, resolved.state, arch, resolved.source)
    known = resolved.mean is not None and resolved.std is not None
    mean, std = (resolved.mean, resolved.std) if known else (CEM500K_MEAN, CEM500K_STD)
    return Encoder(
        name,
        spec,
        arch,
        resolved.source,
        float(mean),
        float(std),
        "weights" if known else "CEM500K (weights carry none)",
        model.eval().to(device),
        device,
    )


def read_image(path: str | Path) -> np.ndarray:
    """The first (or only) 2D slice of an image file as uint8 ``(H, W)`` (other dtypes windowed to uint8)."""
    [vol, *_] = open_file(path)
    arr = vol.read_slices(vol.shape[0] // 2, vol.shape[0] // 2 + 1)[0]
    return compute_window(arr).apply(arr) if arr.dtype != np.uint8 else arr


def to_square(image: np.ndarray, size: int = IMAGE_SIZE) -> np.ndarray:
    """A ``size`` x ``size`` float32 image in [0, 1]: the centre crop, after upscaling (bilinear) an image
    whose short side is below ``size`` so that it reaches ``size``."""
    x = np.asarray(image, np.float32) / (255.0 if image.dtype == np.uint8 else 1.0)
    h, w = x.shape
    if min(h, w) < size:
        f = size / min(h, w)
        t = torch.from_numpy(np.ascontiguousarray(x))[None, None]
        x = F.interpolate(t, size=(max(size, round(h * f)), max(size, round(w * f))), mode="bilinear")[0, 0].numpy()
        h, w = x.shape
    y0, x0 = (h - size) // 2, (w - size) // 2
    return np.ascontiguousarray(x[y0 : y0 + size, x0 : x0 + size])


def image_files(where: str | Path) -> list[Path]:
    """The supported image files of a folder (sorted) or matching a glob."""
    path = Path(where)
    if path.is_dir():
        return sorted(p for p in path.iterdir() if p.is_file() and is_supported(p))
    if path.is_file():
        return [path]
    return sorted(Path(p) for p in glob.glob(str(where)) if is_supported(Path(p)))


def load_test_images(
    images: str | Path | None, n_images: int, seed: int, default_files: Sequence[Path]
) -> tuple[np.ndarray, str]:
    """Test images ``(n, 224, 224)`` in [0, 1] and a description of where they came from.

    ``images``: a ``cemcurate build`` folder (``n_images`` random kept patches), a folder
    or glob of image files (``n_images`` of them at random if more, centre 224 crops), or
    None for ``default_files``.
    """
    rng = np.random.default_rng(seed)
    if images is not None and (Path(images) / "store.json").is_file():
        store = open_patches(images)
        if len(store) == 0:
            raise ValueError(f"{images}: the build holds no kept patches")
        pick = np.sort(rng.choice(len(store), size=min(n_images, len(store)), replace=False))
        patches = store[pick]
        return np.stack([to_square(p) for p in patches]), f"{len(pick)} kept patches of the build {images}"
    files = list(default_files) if images is None else image_files(images)
    if not files:
        raise ValueError(f"{images}: no image files found (a folder, a glob or a `cemcurate build` folder)")
    if len(files) > n_images:
        files = [files[i] for i in np.sort(rng.choice(len(files), size=n_images, replace=False))]
    where = "the CEM500K example images (correlation + occlusion)" if images is None else str(images)
    return np.stack([to_square(read_image(f)) for f in files]), f"{len(files)} images of {where}"


def parse_distortions(items: Sequence[str]) -> dict[str, tuple[float, ...]]:
    """``["rotation=90,0", "blur=1,2"]`` -> ``{"rotation": (0, 90), "blur": (1, 2)}`` (strengths sorted; a bare
    KIND takes its default strengths from :data:`DISTORTIONS`)."""
    out: dict[str, tuple[float, ...]] = {}
    for item in items:
        kind, sep, values = item.partition("=")
        if kind not in DISTORTIONS:
            raise ValueError(f"unknown distortion {kind!r} in {item!r}; choose from {', '.join(DISTORTIONS)}")
        try:
            out[kind] = tuple(sorted(float(v) for v in values.split(","))) if sep else DISTORTIONS[kind]
        except ValueError:
            raise ValueError(f"{item!r}: strengths must be numbers separated by commas, e.g. blur=1,2,4") from None
        for v in out[kind]:
            is_identity(kind, v)
            if kind == "scale" and v < 1:
                raise ValueError(f"{item!r}: scale factors must be >= 1")
    return out


def organelle_stride(name: str) -> int:
    """Output stride of the selectivity maps for an image named after its organelle."""
    for prefix, stride in SELECTIVITY_STRIDE.items():
        if name.lower().startswith(prefix):
            return stride
    return DEFAULT_STRIDE


def occlusion_views(image: np.ndarray, rng: np.random.Generator, size: int = IMAGE_SIZE) -> np.ndarray:
    """Two views ``(2, size, size)`` in [0, 1] of ``image``: random square crops (side a uniform fraction
    :data:`VIEW_SCALE` of the short side) rescaled to ``size`` (MoCo's crop-and-rescale)."""
    x = np.asarray(image, np.float32) / (255.0 if image.dtype == np.uint8 else 1.0)
    h, w = x.shape
    views = []
    for _ in range(2):
        side = max(8, int(round(rng.uniform(*VIEW_SCALE) * min(h, w))))
        y0, x0 = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
        crop = torch.from_numpy(np.ascontiguousarray(x[y0 : y0 + side, x0 : x0 + side]))[None, None]
        views.append(F.interpolate(crop, size=(size, size), mode="bilinear", align_corners=False)[0, 0].numpy())
    return np.clip(np.stack(views), 0, 1)


# ---------------------------------------------------------------------------------------
# The whole analysis


@dataclass
class AnalyzeSettings:
    """What :func:`analyze` measures and on what (see ``pretrain analyze --help``)."""

    images: str | None = None
    n_images: int = 100
    noise_images: int = 1000
    correlation_dir: Path | None = None
    occlusion_dir: Path | None = None
    arch: str = "resnet50"
    device: str = "auto"
    seed: int = 0
    batch_size: int = 32
    top_k: int = TOP_K
    threshold: float = MASK_THRESHOLD
    distortions: dict[str, tuple[float, ...]] = field(default_factory=lambda: dict(DISTORTIONS))
    max_occlusion_images: int | None = None
    progress: bool = True


def _examples(folder: Path | None, pattern: str) -> list[Path]:
    return sorted(folder.glob(pattern)) if folder is not None and folder.is_dir() else []


def analyze(encoder_args: Iterable[tuple[str, str]], out_dir: str | Path, settings: AnalyzeSettings) -> dict:
    """Run invariance, selectivity and occlusion for every encoder; write JSON and PNGs into ``out_dir``.

    Returns the JSON document (also written to ``out_dir/analyze.json``).
    """
    out_dir = Path(out_dir)
    device = select_device(settings.device)
    pairs = list(encoder_args)
    names = [n for n, _ in pairs]
    if not pairs:
        raise ValueError("no encoder given: pass one or more NAME=SPEC")
    if len(set(names)) != len(names):
        raise ValueError(f"encoder names must be unique, got {names}")
    if settings.noise_images < 1 or settings.n_images < 1 or settings.batch_size < 1:
        raise ValueError("--noise-images, --n-images and --batch-size must be at least 1")
    corr_images = _examples(settings.correlation_dir, "images/*.png")
    corr_pairs = [(p, settings.correlation_dir / "masks" / p.name) for p in corr_images]  # type: ignore[operator]
    corr_pairs = [(p, m) for p, m in corr_pairs if m.is_file()]
    all_occ_files = _examples(settings.occlusion_dir, "*.tif*")
    occ_files = all_occ_files[: settings.max_occlusion_images]
    encoders = [load_encoder(n, s, settings.arch, device, settings.seed + i) for i, (n, s) in enumerate(pairs)]
    images, images_from = load_test_images(
        settings.images, settings.n_images, settings.seed, [p for p, _ in corr_pairs] + all_occ_files
    )
    noise = np.random.default_rng(settings.seed + 1).random((settings.noise_images, IMAGE_SIZE, IMAGE_SIZE), np.float32)
    strengths = [(k, s) for k, values in settings.distortions.items() for s in values]
    distorted_count = sum(not is_identity(k, s) for k, s in strengths)
    per_encoder = settings.noise_images + len(images) * (1 + distorted_count) + len(corr_pairs)
    per_encoder += len(occ_files) * (3 + len(occlusion_squares(IMAGE_SIZE, IMAGE_SIZE)[0]) ** 2)
    bar = tqdm(total=per_encoder * len(encoders), desc="analyze", unit="img", disable=not settings.progress)

    doc: dict = {
        "format": 1,
        "encoders": [],
        "settings": {
            "images": images_from,
            "n_images": int(len(images)),
            "noise_images": settings.noise_images,
            "firing_threshold_percentile": FIRING_PERCENTILE,
            "z_percentile": Z_PERCENTILE,
            "distortions": {k: list(v) for k, v in settings.distortions.items()},
            "units": {k: UNITS[k] for k in settings.distortions},
            "top_k": settings.top_k,
            "threshold": settings.threshold,
            "occlusion": {"size": OCCLUSION_SIZE, "stride": OCCLUSION_STRIDE, "view_scale": list(VIEW_SCALE)},
            "seed": settings.seed,
            "device": str(device),
        },
        "invariance": {},
        "selectivity": {},
        "occlusion": {},
    }
    figures: dict[str, dict] = {"selectivity": {}, "occlusion": {}}
    # Distorted test images and occlusion views are the same for every encoder.
    views = {
        f.stem: occlusion_views(read_image(f), np.random.default_rng([settings.seed, i]))
        for i, f in enumerate(occ_files)
    }
    corr_data = {p.stem: (to_unit(read_image(p)), read_image(m) > 127) for p, m in corr_pairs}

    def embed_counted(enc: Encoder, batch: np.ndarray) -> np.ndarray:
        return enc.embed(batch, settings.batch_size, bar.update)

    for enc in encoders:
        doc["encoders"].append(
            {
                "name": enc.name,
                "spec": enc.spec,
                "arch": enc.arch,
                "source": enc.source,
                "num_features": int(enc.model.num_features),
                "mean": enc.mean,
                "std": enc.std,
                "normalisation_from": enc.norm_from,
            }
        )
        # (a) invariance
        thresholds = firing_thresholds(embed_counted(enc, noise))
        clean = embed_counted(enc, images)
        inv: dict[str, list] = {}
        for kind, values in settings.distortions.items():
            rows = []
            for s in values:
                if is_identity(kind, s):
                    feats = clean
                else:
                    rng = np.random.default_rng([settings.seed, 7, abs(int(round(float(s) * 1000)))])
                    feats = embed_counted(enc, np.stack([distort(im, kind, s, rng) for im in images]))
                rate = firing_rates(clean, feats, thresholds)
                rows.append(
                    {
                        "strength": float(s),
                        "firing_rate": _num(rate.mean),
                        "neurons": rate.neurons,
                        "cosine_similarity": float(cosine_similarity(clean, feats).mean()),
                    }
                )
            inv[kind] = rows
        doc["invariance"][enc.name] = inv
        # (b) selectivity
        sel, sel_fig = {}, {}
        for stem, (image, mask) in corr_data.items():
            stride = organelle_stride(stem)
            result = selectivity(enc.feature_maps(image, stride), mask, settings.top_k, settings.threshold)
            bar.update(1)
            sel[stem] = {
                "organelle": organelle_of(stem),
                "output_stride": stride,
                "best_channels": [
                    {"channel": int(c), "correlation": float(result.correlations[c])} for c in result.top_channels[:10]
                ],
                "top_k": int(len(result.top_channels)),
                "top_k_mean_channel_correlation": float(result.correlations[result.top_channels].mean()),
                "mean_response_correlation": float(result.correlation),
                "iou": float(result.iou),
            }
            sel_fig[stem] = result
        doc["selectivity"][enc.name] = {"images": sel, "by_organelle": _by_organelle(sel)}
        figures["selectivity"][enc.name] = sel_fig
        # (c) occlusion
        occ, occ_fig = {}, {}
        for stem, pair in views.items():
            feats = embed_counted(enc, pair)
            result = occlusion_map(lambda batch, e=enc: embed_counted(e, batch), pair[1], feats[0], fill=enc.mean)
            peak = np.unravel_index(int(np.argmax(result.drops)), result.drops.shape)
            occ[stem] = {
                "similarity": result.similarity,
                "drops": np.round(result.drops, 6).tolist(),
                "corners_y": result.corners[0],
                "corners_x": result.corners[1],
                "peak_square": [int(result.corners[0][peak[0]]), int(result.corners[1][peak[1]])],
            }
            occ_fig[stem] = result.heatmap
        doc["occlusion"][enc.name] = occ
        figures["occlusion"][enc.name] = occ_fig
    bar.close()

    out_dir.mkdir(parents=True, exist_ok=True)
    written = [plot_invariance(doc, out_dir / "invariance.png")]
    if corr_data:
        written.append(plot_selectivity(corr_data, figures["selectivity"], out_dir / "selectivity.png"))
    if views:
        written.append(plot_occlusion(views, figures["occlusion"], out_dir / "occlusion.png"))
    doc["files"] = [p.name for p in written] + ["analyze.json"]
    with atomic_path(out_dir / "analyze.json") as tmp:
        tmp.write_text(json.dumps(doc, indent=1))
    return doc


def to_unit(image: np.ndarray) -> np.ndarray:
    """uint8 -> float32 in [0, 1]."""
    return np.asarray(image, np.float32) / (255.0 if image.dtype == np.uint8 else 1.0)


def organelle_of(stem: str) -> str:
    """``mitochondria3`` -> ``mitochondria``."""
    return stem.rstrip("0123456789_-") or stem


def _by_organelle(sel: dict) -> dict:
    groups: dict[str, list] = {}
    for row in sel.values():
        groups.setdefault(row["organelle"], []).append(row)
    return {
        org: {
            "images": len(rows),
            "mean_response_correlation": float(np.mean([r["mean_response_correlation"] for r in rows])),
            "iou": float(np.mean([r["iou"] for r in rows])),
            "best_channel_correlation": float(np.mean([r["best_channels"][0]["correlation"] for r in rows])),
        }
        for org, rows in groups.items()
    }


def _num(x: float) -> float | None:
    return None if x is None or not math.isfinite(x) else float(x)


# ---------------------------------------------------------------------------------------
# Figures


def _pyplot():
    matplotlib.use("Agg", force=False)
    return pyplot


def _save(fig, path: Path, dpi: int) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi)
    _pyplot().close(fig)
    return path


def plot_invariance(doc: dict, path: Path) -> Path:
    """One panel per distortion: mean firing rate (solid) and cosine similarity (dashed), a colour per encoder."""
    plt = _pyplot()
    kinds = list(doc["settings"]["distortions"])
    cols = min(4, len(kinds))
    rows = -(-len(kinds) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.6 * rows), squeeze=False)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, kind in zip(axes.ravel(), kinds):
        for i, (name, inv) in enumerate(doc["invariance"].items()):
            x = [r["strength"] for r in inv[kind]]
            colour = colours[i % len(colours)]
            fr = [np.nan if r["firing_rate"] is None else r["firing_rate"] for r in inv[kind]]
            ax.plot(x, fr, "-o", ms=3, color=colour, label=f"{name} firing rate")
            ax.plot(x, [r["cosine_similarity"] for r in inv[kind]], "--", color=colour, label=f"{name} cosine sim.")
        ax.set_title(kind, fontsize=9)
        ax.set_xlabel(doc["settings"]["units"][kind], fontsize=8)
        ax.set_ylim(-0.02, 1.05)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    for ax in axes.ravel()[len(kinds) :]:
        ax.axis("off")
    handles, labels = axes.ravel()[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(4, len(labels)), fontsize=8, frameon=False)
    fig.suptitle(
        f"invariance: mean firing rate (solid) and cosine similarity (dashed), {doc['settings']['images']}", fontsize=9
    )
    fig.tight_layout(rect=(0, 0.07, 1, 0.95))
    return _save(fig, path, dpi=80)


def plot_selectivity(corr_data: dict, results: dict[str, dict[str, Selectivity]], path: Path) -> Path:
    """Rows: organelle images; columns: image, mask, then per encoder the mean response heatmap and its binary."""
    plt = _pyplot()
    names = list(results)
    cols = 2 + 2 * len(names)
    fig, axes = plt.subplots(len(corr_data), cols, figsize=(1.3 * cols, 1.35 * len(corr_data)), squeeze=False)
    for r, (stem, (image, mask)) in enumerate(corr_data.items()):
        panels = [(image, "gray", "image" if r == 0 else None, stem), (mask, "gray", "mask" if r == 0 else None, None)]
        for name in names:
            res = results[name][stem]
            panels.append(
                (res.mean_response, "inferno", f"{name}\nmean top-k" if r == 0 else None, f"r={res.correlation:.2f}")
            )
            panels.append((res.binary, "gray", f"{name}\n>= thr" if r == 0 else None, f"IoU={res.iou:.2f}"))
        for c, (arr, cmap, title, label) in enumerate(panels):
            ax = axes[r, c]
            ax.imshow(arr, cmap=cmap, vmin=0, vmax=1, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if title:
                ax.set_title(title, fontsize=6)
            if label:
                (ax.set_ylabel if c == 0 else ax.set_xlabel)(label, fontsize=6)
    fig.tight_layout(pad=0.3)
    return _save(fig, path, dpi=60)


def plot_occlusion(views: dict, heatmaps: dict[str, dict[str, np.ndarray]], path: Path) -> Path:
    """Rows: occlusion images; columns: the reference view, the occluded view, then per encoder its heatmap overlay."""
    plt = _pyplot()
    names = list(heatmaps)
    cols = 2 + len(names)
    fig, axes = plt.subplots(len(views), cols, figsize=(1.2 * cols, 1.2 * len(views)), squeeze=False)
    for r, (stem, pair) in enumerate(views.items()):
        axes[r, 0].imshow(pair[0], cmap="gray", vmin=0, vmax=1)
        axes[r, 1].imshow(pair[1], cmap="gray", vmin=0, vmax=1)
        axes[r, 0].set_ylabel(stem, fontsize=6)
        for c, name in enumerate(names):
            axes[r, 2 + c].imshow(pair[1], cmap="gray", vmin=0, vmax=1)
            axes[r, 2 + c].imshow(heatmaps[name][stem], cmap="jet", alpha=0.45, vmin=0, vmax=1)
        if r == 0:
            for c, title in enumerate(["reference view", "occluded view", *names]):
                axes[r, c].set_title(title, fontsize=6)
        for ax in axes[r]:
            ax.set_xticks([])
            ax.set_yticks([])
    fig.tight_layout(pad=0.3)
    return _save(fig, path, dpi=56)


__all__ = [
    "DISTORTIONS",
    "AnalyzeSettings",
    "Encoder",
    "FiringRate",
    "Occlusion",
    "Selectivity",
    "WeightsError",
    "analyze",
    "cosine_similarity",
    "distort",
    "firing_rates",
    "firing_thresholds",
    "load_encoder",
    "occlusion_map",
    "parse_encoder_arg",
    "point_biserial",
    "selectivity",
]

"""Performance of `pretrain moco` on the CPU: augmentations, training step overhead, data loader.

1. Augmentation views/s on one core: our numpy/OpenCV pipeline against the CEM500K reference
   recipe written with torchvision PIL transforms, on the same real 224 x 224 EM patches.
2. Training step images/s on one CPU thread: our MoCo module and ``train_step`` against a plain
   single-process MoCo loop written here (same model, batch, queue and inputs). The two are timed
   in alternation, step by step, so load from other processes hits both alike; medians reported.
3. Data loader views/s with 2 worker processes (``ViewPairs`` + ``view_loader``), steady state.

Usage::

    .venv/bin/python benchmarks/bench_pretrain.py [--quick] [--json out.json]

Real data come from ``$CEM_DATA`` or ``../shared/data`` next to the checkout.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import tifffile  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from PIL import Image, ImageFilter  # noqa: E402
from torchvision import transforms as T  # noqa: E402

from cemcurate.store import write_patch_store  # noqa: E402
from pretrain.augment import AugmentParams, two_views  # noqa: E402
from pretrain.data import ViewPairs, view_loader  # noqa: E402
from pretrain.moco import MoCo, create_backbone, projection_head  # noqa: E402
from pretrain.train import train_step  # noqa: E402


def data_root() -> Path:
    root = Path(os.environ.get("CEM_DATA", REPO.parent / "shared" / "data"))
    if not root.is_dir():
        sys.exit(f"real EM data not found at {root}: set CEM_DATA")
    return root


def real_patches(root: Path) -> np.ndarray:
    """64 real 224 x 224 uint8 patches: 48 ssTEM tiles (VNC) and 16 FIB-SEM slices (neuroproof)."""
    vnc = sorted((root / "drosophila_vnc_gerhard" / "stack1" / "raw").glob("*.tif"))[:3]
    tiles = [
        tifffile.imread(f)[y : y + 224, x : x + 224]
        for f in vnc
        for y in range(0, 896, 224)
        for x in range(0, 896, 224)
    ]
    import imageio.v3 as iio

    fib = sorted((root / "neuroproof_flyem" / "training_sample2" / "grayscale_maps").glob("*.png"))[::15][:16]
    tiles += [np.asarray(iio.imread(f))[13:237, 13:237] for f in fib]
    return np.stack(tiles).astype(np.uint8)


# --- 1. augmentations ------------------------------------------------------------------------


class PilGaussianBlur:
    """MoCoV2's blur: a PIL Gaussian filter with a radius (standard deviation) drawn per image."""

    def __init__(self, sigma=(0.1, 2.0)):
        self.sigma = sigma

    def __call__(self, img: Image.Image) -> Image.Image:
        return img.filter(ImageFilter.GaussianBlur(radius=random.uniform(*self.sigma)))


class TensorGaussNoise:
    """CEM500K's noise: variance log-uniform in (1e-5, 1e-4), with probability p, then clipped to [0, 1]."""

    def __init__(self, var=(1e-5, 1e-4), p=0.5):
        self.log_var, self.p = (math.log(var[0]), math.log(var[1])), p

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if random.random() < self.p:
            std = math.exp(random.uniform(*self.log_var)) ** 0.5
            x = (x + torch.randn_like(x) * std).clamp_(0, 1)
        return x


def reference_transform(mean: float, std: float, size: int = 224) -> T.Compose:
    """The CEM500K MoCoV2 recipe with torchvision PIL transforms (colour ops on a 3-channel copy, as released)."""
    return T.Compose(
        [
            T.Grayscale(3),
            T.RandomApply([T.RandomRotation(180)], p=0.5),
            T.RandomResizedCrop(size, scale=(0.2, 1.0)),
            T.RandomApply([T.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
            T.RandomGrayscale(p=0.2),
            T.RandomApply([PilGaussianBlur((0.1, 2.0))], p=0.5),
            T.Grayscale(1),
            T.RandomHorizontalFlip(),
            T.RandomVerticalFlip(),
            T.ToTensor(),
            TensorGaussNoise(),
            T.Normalize([mean], [std]),
        ]
    )


def bench_augment(patches: np.ndarray, views: int) -> dict:
    """Views/s of both pipelines, timed in alternating rounds so background load hits both alike."""
    mean, std = float(patches.mean() / 255), float(patches.std() / 255)
    n = len(patches)
    # Ours, as the data loader calls it: two normalised views per image, seeded per image.
    params = AugmentParams()
    seeds = np.stack([np.zeros(n, np.int64), np.zeros(n, np.int64), np.arange(n)], axis=1)
    reference = reference_transform(mean, std)
    images = [Image.fromarray(p) for p in patches]
    random.seed(0)
    torch.manual_seed(0)
    two_views(patches[:4], seeds[:4], params, mean, std), reference(images[0])  # warm-up
    ours_views = ref_views = 0
    ours_time = ref_time = 0.0
    rounds = 0
    while ours_views < views:
        seeds[:, 1] = rounds  # fresh randomness every round
        t0 = time.perf_counter()
        q, k = two_views(patches, seeds, params, mean, std)
        ours_time += time.perf_counter() - t0
        ours_views += 2 * n
        t0 = time.perf_counter()
        for i in range(n // 4):  # the reference is slower: a quarter as many views per round
            out = reference(images[(rounds * n // 4 + i) % n])
        ref_time += time.perf_counter() - t0
        ref_views += n // 4
        rounds += 1
    assert out.shape == (1, 224, 224) and q.shape[1:] == (1, 224, 224)
    ours, ref = ours_views / ours_time, ref_views / ref_time
    return {
        "ours_views_per_s": ours,
        "reference_views_per_s": ref,
        "speedup": ours / ref,
        "ours_views": ours_views,
        "reference_views": ref_views,
    }


# --- 2. training step ------------------------------------------------------------------------


class PlainMoCo:
    """MoCo written out plainly (single process, no shuffle-BN): the yardstick for our module's overhead."""

    def __init__(self, arch: str, dim: int, queue_size: int, m: float, t: float, lr: float):
        backbone = create_backbone(arch, 1)
        self.encoder_q = torch.nn.Sequential(backbone, projection_head(backbone.num_features, dim))
        self.encoder_k = copy.deepcopy(self.encoder_q)
        for p in self.encoder_k.parameters():
            p.requires_grad = False
        self.queue = F.normalize(torch.randn(dim, queue_size), dim=0)
        self.ptr, self.m, self.t = 0, m, t
        self.opt = torch.optim.SGD(self.encoder_q.parameters(), lr=lr, momentum=0.9, weight_decay=1e-4)

    def step(self, im_q: torch.Tensor, im_k: torch.Tensor) -> float:
        q = F.normalize(self.encoder_q(im_q), dim=1)
        with torch.no_grad():
            for pq, pk in zip(self.encoder_q.parameters(), self.encoder_k.parameters()):
                pk.data = pk.data * self.m + pq.data * (1.0 - self.m)
            k = F.normalize(self.encoder_k(im_k), dim=1)
        logits = torch.cat([torch.einsum("nc,nc->n", q, k)[:, None], q @ self.queue.clone()], dim=1) / self.t
        loss = F.cross_entropy(logits, torch.zeros(len(q), dtype=torch.long))
        self.opt.zero_grad()
        loss.backward()
        self.opt.step()
        with torch.no_grad():
            self.queue[:, self.ptr : self.ptr + len(k)] = k.T
            self.ptr = (self.ptr + len(k)) % self.queue.shape[1]
        return loss.item()


def bench_step(patches: np.ndarray, arch: str, size: int, batch: int, steps: int) -> dict:
    mean, std = float(patches.mean() / 255), float(patches.std() / 255)
    seeds = np.stack([np.zeros(batch, np.int64), np.zeros(batch, np.int64), np.arange(batch)], axis=1)
    q_np, k_np = two_views(patches[:batch], seeds, AugmentParams(image_size=size), mean, std)
    im_q, im_k = torch.from_numpy(q_np), torch.from_numpy(k_np)
    queue_size, lr = 4096, 0.015 * batch / 128

    torch.manual_seed(0)
    ours = MoCo(arch, feature_dim=128, queue_size=queue_size, key_momentum=0.999, temperature=0.2)
    ours.train()
    opt = torch.optim.SGD(ours.query_parameters(), lr=lr, momentum=0.9, weight_decay=1e-4)
    scaler = torch.amp.GradScaler("cuda", enabled=False)
    branch = ours.query_branch()
    torch.manual_seed(0)
    plain = PlainMoCo(arch, 128, queue_size, 0.999, 0.2, lr)
    plain.encoder_q.train()
    plain.encoder_k.train()

    def run_ours(i: int) -> float:
        t0 = time.perf_counter()
        train_step(ours, branch, opt, scaler, im_q, im_k, lr, i, amp=False)
        return time.perf_counter() - t0

    def run_plain(i: int) -> float:
        t0 = time.perf_counter()
        plain.step(im_q, im_k)
        return time.perf_counter() - t0

    for i in range(2):  # warm-up (allocator, oneDNN kernels)
        run_ours(i), run_plain(i)
    t_ours, t_plain = [], []
    for i in range(steps):
        # Alternate the order so neither always runs right after the other.
        if i % 2:
            t_ours.append(run_ours(i)), t_plain.append(run_plain(i))
        else:
            t_plain.append(run_plain(i)), t_ours.append(run_ours(i))
    med_ours, med_plain = statistics.median(t_ours), statistics.median(t_plain)
    return {
        "arch": arch,
        "image_size": size,
        "batch": batch,
        "steps": steps,
        "queue": queue_size,
        "ours_images_per_s": batch / med_ours,
        "plain_images_per_s": batch / med_plain,
        "overhead_percent": 100 * (med_ours / med_plain - 1),
    }


# --- 3. data loader --------------------------------------------------------------------------


def bench_loader(patches: np.ndarray, batch: int, batches: int, workers: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        write_patch_store(Path(tmp) / "store", patches)
        ds = ViewPairs(Path(tmp) / "store", seed=0, global_batch=batch, rank=0, world_size=1, params=AugmentParams())
        per_epoch = ds.steps_per_epoch()
        t_start = time.perf_counter()
        it = iter(view_loader(ds, 0, batches + 1, workers, pin_memory=False))
        next(it)  # workers started and the first batch made
        t_first = time.perf_counter()
        for _ in range(batches):
            q, k = next(it)
        t_end = time.perf_counter()
    views = 2 * batch * batches
    return {
        "workers": workers,
        "batch": batch,
        "batches": batches,
        "steps_per_epoch": per_epoch,
        "startup_s": t_first - t_start,
        "views_per_s": views / (t_end - t_first),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions (a smoke run, noisier numbers)")
    parser.add_argument("--json", type=Path, help="also write the results as JSON here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    patches = real_patches(data_root())
    results = {
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "opencv": cv2.__version__,
            "load_avg_start": os.getloadavg(),
        }
    }
    results["augment"] = bench_augment(patches, views=1024 if args.quick else 6144)
    print(
        f"augment: ours {results['augment']['ours_views_per_s']:.0f} views/s, reference "
        f"{results['augment']['reference_views_per_s']:.0f} views/s, x{results['augment']['speedup']:.2f}",
        flush=True,
    )
    results["step"] = bench_step(patches, "resnet18", 112, 32, steps=4 if args.quick else 12)
    print(
        f"train step: ours {results['step']['ours_images_per_s']:.2f} img/s, plain "
        f"{results['step']['plain_images_per_s']:.2f} img/s, overhead {results['step']['overhead_percent']:+.1f}%",
        flush=True,
    )
    results["loader"] = bench_loader(patches, batch=32, batches=10 if args.quick else 60, workers=2)
    print(
        f"loader: {results['loader']['views_per_s']:.0f} views/s with 2 workers "
        f"(startup {results['loader']['startup_s']:.1f} s)",
        flush=True,
    )
    results["machine"]["load_avg_end"] = os.getloadavg()
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()

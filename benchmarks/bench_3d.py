"""Benchmarks of the inflated 3D U-Net: prediction speed and memory, training speed.

Three parts, each run in its own child process (so peak-memory numbers are its own):

* ``sliding``: sliding-window prediction of a 256^3 volume (NeuroProof ``training_sample2``
  reflected from 250^3 to 256^3; random voxels if the data is absent) from a uint8 memory
  map into a zarr array on disk: voxels/s, peak resident memory of the process and the
  part of it used by prediction.
* ``train``: training iterations/s of the 3D UNet vs the 2D UNet (``finetune``'s
  ``UNet2D``), both resnet18 with the smp decoder widths (256, 128, 64, 32, 16), at
  matched voxels per batch (4 x 32^3 = 8 x 128^2 = 131,072), encoder frozen and trained.
* ``samples``: ms per 32 x 128 x 128 training sample of ``finetune.data3d.SubvolumeSamples``
  without and with elastic deformation, against a reference elastic field made by one
  cubic zoom from the control points to every voxel.
The NeuroProof boundary IoU of 3D inflated-pretrained vs 3D random vs 2D orthoplane is a
``finetune benchmark`` run (``benchmarks/finetune/neuroproof_boundary.yaml --dims 2d 3d``),
whose data ``benchmarks/prepare_neuroproof.py`` writes.

Usage (from the repository root)::

    .venv/bin/python benchmarks/bench_3d.py --out /tmp/bench3d

Results are printed as Markdown and saved as JSON (a few minutes on 2 free CPU cores).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from scipy import ndimage  # noqa: E402

from cemcurate.common.lazy import lazy_import  # noqa: E402
from finetune import augment3d, data3d  # noqa: E402
from finetune.losses import training_loss  # noqa: E402
from finetune.models import build_model  # noqa: E402
from finetune.neuroproof import boundary_map, neuroproof_sample  # noqa: E402
from finetune.predict.sliding import plan_sliding, predict_sliding  # noqa: E402

zarr = lazy_import("zarr")

ARCH = "resnet18"
BENCH_DECODER = (64, 32, 16, 16, 8)  # 3D decoder for prediction speed (CPU budget)
SMP_DECODER = (256, 128, 64, 32, 16)


def default_data_root() -> Path:
    return Path(os.environ.get("CEM_DATA", REPO.parent / "shared" / "data"))


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def current_rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def load_neuroproof(data_root: Path, workdir: Path) -> tuple[np.ndarray, np.ndarray] | None:
    sample = data_root / "neuroproof_flyem" / "training_sample2"
    if not (sample / "groundtruth.h5.gz").is_file():
        return None
    image, bodies = neuroproof_sample(sample, workdir)
    return image, boundary_map(bodies)


# ----------------------------------------------------------------------------- sliding


def part_sliding(args: argparse.Namespace, workdir: Path) -> dict:
    data = load_neuroproof(args.data_root, workdir)
    shape = (256, 256, 256)
    vol = np.lib.format.open_memmap(workdir / "volume.npy", mode="w+", dtype=np.uint8, shape=shape)
    if data is not None:
        pad = [(0, s - n) for s, n in zip(shape, data[0].shape)]
        vol[:] = np.pad(data[0], pad, mode="reflect")
        source = "NeuroProof training_sample2 reflected to 256^3"
    else:
        vol[:] = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
        source = "random uint8 (NeuroProof not found)"
    vol.flush()
    del vol
    volume = np.load(workdir / "volume.npy", mmap_mode="r")
    torch.manual_seed(0)
    model = build_model("unet3d", arch=ARCH, num_classes=2, geometry="isotropic", decoder_channels=BENCH_DECODER).eval()
    window, overlap = tuple(args.window), tuple(args.overlap)
    out = zarr.open_array(
        str(workdir / "probs.zarr"), mode="w", shape=(1,) + shape, chunks=(1, 32, 256, 256), dtype="uint8"
    )
    plan = plan_sliding(shape, window, overlap)
    rss0, peak0 = current_rss_mb(), peak_rss_mb()
    t0 = time.perf_counter()
    predict_sliding(model, volume, window=window, overlap=overlap, batch_size=args.batch_size, out=out)
    seconds = time.perf_counter() - t0
    peak1 = peak_rss_mb()
    written = np.asarray(out[0, ::64, ::64, ::64])
    return {
        "source": source,
        "shape": shape,
        "window": window,
        "overlap": overlap,
        "batch_size": args.batch_size,
        "windows": plan.num_windows,
        "model": f"UNet3D {ARCH} isotropic, decoder {BENCH_DECODER}",
        "seconds": round(seconds, 1),
        "voxels_per_s": round(float(np.prod(shape)) / seconds),
        "rss_before_mb": round(rss0),
        "peak_rss_mb": round(peak1),
        "peak_before_mb": round(peak0),
        "prediction_peak_over_baseline_mb": round(peak1 - rss0),
        "whole_volume_float32_mb": round(float(np.prod(shape)) * 4 / 2**20),
        "output_nonzero": bool(written.any()),
        "threads": torch.get_num_threads(),
    }


# ----------------------------------------------------------------------------- training speed


def _time_steps(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int, warmup: int) -> list[float]:
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3, weight_decay=0.1)
    times = []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        loss = training_loss(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return times


def part_train(args: argparse.Namespace, workdir: Path) -> dict:
    g = torch.Generator().manual_seed(0)
    x3, y3 = torch.rand(4, 1, 32, 32, 32, generator=g), (torch.rand(4, 32, 32, 32, generator=g) > 0.9).long()
    x2, y2 = torch.rand(8, 1, 128, 128, generator=g), (torch.rand(8, 128, 128, generator=g) > 0.9).long()
    rows = []
    for frozen in (True, False):
        torch.manual_seed(0)
        m3 = build_model(
            "unet3d",
            arch=ARCH,
            num_classes=2,
            geometry="isotropic",
            decoder_channels=SMP_DECODER,
            freeze_encoder=frozen,
        )
        s3 = _time_steps(m3, x3, y3, args.train_steps, 2)
        del m3
        torch.manual_seed(0)
        m2 = build_model("unet2d", arch=ARCH, num_classes=2)
        m2.freeze_encoder(frozen)
        s2 = _time_steps(m2, x2, y2, args.train_steps, 2)
        del m2
        # On a shared machine the fastest step is the least disturbed one; the median is
        # what a run of this length would see.
        rows.append(
            {
                "encoder": "frozen" if frozen else "trained",
                "3d_it_per_s": round(1 / min(s3), 3),
                "2d_it_per_s": round(1 / min(s2), 3),
                "3d_median_s_per_it": round(float(np.median(s3)), 2),
                "2d_median_s_per_it": round(float(np.median(s2)), 2),
            }
        )
    return {
        "voxels_per_batch": 131072,
        "3d_batch": "4 x 32^3",
        "2d_batch": "8 x 128^2",
        "models": f"{ARCH}; decoder {SMP_DECODER} in both",
        "steps_timed": args.train_steps,
        "rows": rows,
        "threads": torch.get_num_threads(),
    }


# ----------------------------------------------------------------------------- 3D samples


def _cubic_zoom_field(shape, alpha: float, spacing: int, rng: np.random.Generator) -> np.ndarray:
    """Reference elastic field: one cubic-spline zoom from the control points to every voxel."""
    grid = tuple(max(2, -(-n // spacing) + 1) for n in shape)
    return np.stack(
        [
            ndimage.zoom(rng.normal(0.0, alpha, grid), [n / g for n, g in zip(shape, grid)], order=3, mode="nearest")[
                : shape[0], : shape[1], : shape[2]
            ]
            for _ in range(3)
        ]
    )


def part_samples(args: argparse.Namespace, workdir: Path) -> dict:
    """ms per 32 x 128 x 128 training sample: plain, elastic, elastic with the reference field."""
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (100, 250, 250), dtype=np.uint8)
    labels = (image > 128).astype(np.uint8)
    size, n = (32, 128, 128), args.samples

    def ms_per_sample(alpha: float) -> float:
        augment = augment3d.Augment3D(elastic_alpha=alpha, p_elastic=1.0)
        ds = data3d.SubvolumeSamples([(image, labels)], size, n, 0, augment)
        t0 = time.perf_counter()
        for k in range(n):
            ds[k]
        return round((time.perf_counter() - t0) / n * 1000, 1)

    plain, elastic = ms_per_sample(0.0), ms_per_sample(2.0)
    ours = augment3d.elastic_field
    augment3d.elastic_field = lambda shape, alpha, spacing, rng, along_z=True: _cubic_zoom_field(
        shape, alpha, spacing, rng
    )
    try:
        reference = ms_per_sample(2.0)
    finally:
        augment3d.elastic_field = ours
    return {
        "size": size,
        "samples": n,
        "plain_ms": plain,
        "elastic_ms": elastic,
        "elastic_cubic_zoom_ms": reference,
        "elastic_speedup": round(reference / elastic, 2),
        "threads": torch.get_num_threads(),
    }


# ----------------------------------------------------------------------------- driver

PARTS = {"sliding": part_sliding, "train": part_train, "samples": part_samples}


def to_markdown(results: dict) -> str:
    lines = []
    s = results.get("sliding")
    if s:
        lines += [
            "### Sliding-window prediction (256^3)",
            "",
            f"{s['model']}; window {s['window']}, overlap {s['overlap']}, batch {s['batch_size']}, "
            f"{s['windows']} windows; input {s['source']} (uint8 memmap), output zarr uint8; "
            f"{s['threads']} torch threads.",
            "",
            "| seconds | voxels/s | RSS before (MB) | peak RSS (MB) | prediction peak over baseline (MB) |",
            "|---|---|---|---|---|",
            f"| {s['seconds']} | {s['voxels_per_s']:,} | {s['rss_before_mb']} | {s['peak_rss_mb']} | "
            f"{s['prediction_peak_over_baseline_mb']} |",
            "",
        ]
    t = results.get("train")
    if t:
        lines += [
            "### Training speed, 3D vs 2D at matched voxels per batch",
            "",
            f"{t['models']}; 3D batch {t['3d_batch']}, 2D batch {t['2d_batch']} "
            f"({t['voxels_per_batch']:,} voxels); {t['steps_timed']} timed steps each (AdamW, BCE); it/s from the "
            "fastest step, and the median step time.",
            "",
            "| encoder | 3D it/s | 2D it/s | 3D median s/it | 2D median s/it |",
            "|---|---|---|---|---|",
        ]
        lines += [
            f"| {r['encoder']} | {r['3d_it_per_s']} | {r['2d_it_per_s']} | {r['3d_median_s_per_it']} | "
            f"{r['2d_median_s_per_it']} |"
            for r in t["rows"]
        ]
        lines.append("")
    a = results.get("samples")
    if a:
        lines += [
            "### 3D training samples",
            "",
            f"ms per {' x '.join(map(str, a['size']))} sample (crop, flips, rotation, intensity; "
            f"{a['samples']} samples, {a['threads']} torch threads), elastic alpha 2 voxels, spacing 16:",
            "",
            "| plain | elastic | elastic, one cubic zoom to every voxel (reference) | speed-up |",
            "|---|---|---|---|",
            f"| {a['plain_ms']} | {a['elastic_ms']} | {a['elastic_cubic_zoom_ms']} | {a['elastic_speedup']}x |",
            "",
        ]
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", nargs="+", choices=sorted(PARTS), default=["sliding", "train", "samples"])
    p.add_argument("--samples", type=int, default=30, help="samples timed per row of the samples part")
    p.add_argument("--data-root", type=Path, default=default_data_root())
    p.add_argument("--out", type=Path, default=None, help="folder for results.json / results.md (default: temp)")
    p.add_argument("--window", type=int, nargs=3, default=[64, 256, 256], help="sliding window (z y x)")
    p.add_argument("--overlap", type=int, nargs=3, default=[16, 0, 0], help="sliding overlap (z y x)")
    p.add_argument("--batch-size", type=int, default=1, help="sliding windows per forward pass")
    p.add_argument("--train-steps", type=int, default=6, help="timed steps per training-speed row")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        result = PARTS[args.child](args, args.workdir)
        print("RESULT " + json.dumps(result))
        return 0
    out = args.out or Path(tempfile.mkdtemp(prefix="bench3d-"))
    out.mkdir(parents=True, exist_ok=True)
    results: dict = {"command": " ".join([Path(sys.executable).name, *sys.argv]), "torch": torch.__version__}
    t_all = time.perf_counter()
    for part in args.parts:
        with tempfile.TemporaryDirectory(prefix=f"bench3d-{part}-") as work:
            cmd = [sys.executable, str(Path(__file__).resolve()), "--child", part, "--workdir", work]
            cmd += [a for a in (argv if argv is not None else sys.argv[1:])]
            t0 = time.perf_counter()
            proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
            if proc.returncode != 0:
                raise SystemExit(f"bench_3d: part {part} failed (exit {proc.returncode})")
            line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")][-1]
            results[part] = json.loads(line[len("RESULT ") :])
            results[part]["wall_s"] = round(time.perf_counter() - t0, 1)
            print(f"{part}: {results[part]['wall_s']} s", file=sys.stderr, flush=True)
    results["total_wall_s"] = round(time.perf_counter() - t_all, 1)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    md = to_markdown(results) + f"\nTotal wall time: {results['total_wall_s']} s.\n"
    (out / "results.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())

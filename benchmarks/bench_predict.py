"""Prediction throughput (voxels/s) and peak memory: our pipeline vs a plain loop.

Input: a 512^3 uint8 volume of real FIB-SEM (neuroproof ``training_sample2``, 250^3 at
10 nm, reflected to 512^3), written as a TIFF and read through ``cemcurate.io``.

Each measurement runs in a fresh subprocess, so its peak resident memory (``ru_maxrss``)
is its own; a baseline process that only imports torch and builds the model is reported
too. Two kinds of model:

* ``resnet18`` UNet (random weights: speed and memory do not depend on the values). A
  resnet18 UNet needs seconds per 512 x 512 slice on this CPU, so it runs on a sub-volume:
  ``--stack-slices`` xy slices of the 512^3 volume for stack mode, a ``--ortho-size``^3
  crop for orthoplane mode;
* a one-layer stand-in model (3x3 convolution + sigmoid) on the full 512^3 volume, which
  isolates the cost of the pipeline itself: reading, tiling, blending, the orthoplane
  accumulation and writing.

The plain loop ("naive") loads the whole volume, predicts one un-tiled slice at a time
(padded to a multiple of 32), keeps full-size float32 outputs in memory and writes a uint8
TIFF at the end, which is what a short script would do.

Usage: python benchmarks/bench_predict.py [--size 512] [--stack-slices 16] [--ortho-size 96] [--only standin|unet]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _data_root() -> Path:
    return Path(os.environ.get("CEM_DATA", REPO.parent / "shared" / "data"))


def make_volume(size: int, path: Path) -> Path:
    """``size``^3 uint8 TIFF from the real neuroproof 250^3 volume (reflection beyond its edges)."""
    import imageio.v3 as iio

    from cemcurate.io import write_volume

    if path.is_file():
        return path
    files = sorted((_data_root() / "neuroproof_flyem/training_sample2/grayscale_maps").glob("*.png"))
    if not files:
        raise SystemExit(f"neuroproof data not found under {_data_root()}; set CEM_DATA")
    vol = np.stack([iio.imread(f) for f in files])
    pad = [(0, max(0, size - n)) for n in vol.shape]
    vol = np.pad(vol, pad, mode="symmetric")[:size, :size, :size]
    write_volume(path, np.ascontiguousarray(vol), voxel_size=(10.0, 10.0, 10.0))
    return path


def crop_volume(src: Path, dst: Path, z: int, yx: int) -> Path:
    from cemcurate.io import open_file, write_volume

    if not dst.is_file():
        [vol] = open_file(src)
        write_volume(dst, vol.read_slices(0, z)[:, :yx, :yx], voxel_size=(10.0, 10.0, 10.0))
    return dst


class StandIn:
    """Builder of the one-layer stand-in model (3x3 conv + identity), device-agnostic."""

    @staticmethod
    def build():
        import torch

        torch.manual_seed(0)
        conv = torch.nn.Conv2d(1, 1, 3, padding=1)
        return conv.eval()


def _model(kind: str, arch: str):
    import torch

    from finetune.models import build_model

    if kind == "standin":
        return StandIn.build()
    torch.manual_seed(0)
    return build_model("unet2d", arch=arch).eval()


def worker(args) -> dict:
    """Run one measurement in this process and return its numbers."""
    import torch

    torch.set_num_threads(args.threads)
    from cemcurate.io import open_file, write_volume
    from finetune.predict import PredictionWriter, SlicePredictor, predict_orthoplane, predict_stack
    from finetune.volumes import open_input

    model = _model(args.model, args.arch)
    inp, out = Path(args.input), Path(args.output)
    [vol_meta] = open_file(inp)
    shape = vol_meta.shape
    t0 = time.perf_counter()
    if args.impl == "baseline":
        pass
    elif args.impl == "pipeline":
        source = open_input(str(inp))
        predictor = SlicePredictor(model, "cpu", amp=False, tile=512, overlap=64, batch_size=args.batch_size)
        with PredictionWriter(out, shape, ["background", "foreground"], "probs", "uint8") as writer:
            if args.mode == "stack":
                predict_stack(source, predictor, writer.write, chunk=16)
            else:
                predict_orthoplane(
                    source,
                    predictor,
                    writer.write,
                    1,
                    chunk=16,
                    memory_limit=args.memory_limit_gb * 2**30,
                    workdir=out.parent,
                )
    else:  # naive: whole volume in memory, one un-tiled slice at a time
        vol = vol_meta.read_slices(0, shape[0]).astype(np.float32) / 255.0

        @torch.inference_mode()
        def predict_one(img: np.ndarray) -> np.ndarray:
            h, w = img.shape
            ph, pw = -h % 32, -w % 32
            x = torch.from_numpy(np.pad(img, ((0, ph), (0, pw)), mode="reflect"))[None, None]
            return torch.sigmoid(model(x))[0, 0, :h, :w].numpy()

        acc = np.zeros(shape, np.float32)
        for z in range(shape[0]):
            acc[z] += predict_one(vol[z])
        if args.mode == "orthoplane":
            for y in range(shape[1]):
                acc[:, y, :] += predict_one(vol[:, y, :])
            for x in range(shape[2]):
                acc[:, :, x] += predict_one(vol[:, :, x])
            acc /= 3
        write_volume(out, np.rint(acc * 255).astype(np.uint8))
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {
        "model": args.model,
        "arch": args.arch if args.model == "unet" else "conv3x3",
        "mode": args.mode,
        "impl": args.impl,
        "shape": list(shape),
        "voxels": int(np.prod(shape)),
        "seconds": round(seconds, 2),
        "voxels_per_s": round(float(np.prod(shape)) / seconds) if args.impl != "baseline" and seconds > 0 else None,
        "peak_rss_mb": round(peak / 2**20),
        "threads": args.threads,
        "batch": (
            max(1, min(args.batch_size, 512 * 512 // int(np.prod([-(-n // 32) * 32 for n in shape[1:]]))))
            if args.impl == "pipeline"
            else 1
        ),
    }


def run_case(model: str, mode: str, impl: str, inp: Path, out: Path, args) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--worker",
        "--model",
        model,
        "--mode",
        mode,
        "--impl",
        impl,
        "--input",
        str(inp),
        "--output",
        str(out),
        "--arch",
        args.arch,
        "--threads",
        str(args.threads),
        "--memory-limit-gb",
        str(args.memory_limit_gb),
        "--batch-size",
        str(args.batch_size),
    ]
    res = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    if res.returncode != 0:
        raise SystemExit(f"worker failed: {' '.join(cmd)}\n{res.stderr[-3000:]}")
    row = json.loads(res.stdout.strip().splitlines()[-1])
    print(json.dumps(row), flush=True)
    return row


def table(rows: list[dict]) -> str:
    lines = [
        "| model | mode | implementation | batch | volume (z, y, x) | seconds | voxels/s | peak RSS (MB) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        vps = f"{r['voxels_per_s']:,}" if r["voxels_per_s"] else "-"
        lines.append(
            f"| {r['arch']} | {r['mode']} | {r['impl']} | {r.get('batch', '-')} | {tuple(r['shape'])} | "
            f"{r['seconds']} | {vps} | {r['peak_rss_mb']} |"
        )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=512, help="side of the cubic test volume (default 512)")
    p.add_argument("--stack-slices", type=int, default=16, help="xy slices of the volume for the resnet18 stack runs")
    p.add_argument("--ortho-size", type=int, default=96, help="cube side for the resnet18 orthoplane runs")
    p.add_argument("--arch", default="resnet18", help="UNet encoder (default resnet18: feasible on a CPU)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads per run (default 1)")
    p.add_argument("--memory-limit-gb", type=float, default=4.0, help="orthoplane RAM limit (else memory maps)")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "out" / "predict", help="work/output folder")
    p.add_argument(
        "--batch-size",
        type=int,
        default=8,
        help="most tiles per forward pass in the pipeline runs (capped at 512^2 pixels on the CPU)",
    )
    p.add_argument("--only", choices=("standin", "unet"), help="run only one kind of model")
    # internal: one measurement per subprocess
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--model", default="unet", help=argparse.SUPPRESS)
    p.add_argument("--mode", default="stack", help=argparse.SUPPRESS)
    p.add_argument("--impl", default="pipeline", help=argparse.SUPPRESS)
    p.add_argument("--input", help=argparse.SUPPRESS)
    p.add_argument("--output", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    full = make_volume(args.size, args.out / f"volume{args.size}.tif")
    # Baselines: the process after imports and model construction, before any prediction.
    rows = (
        [run_case("unet", "stack", "baseline", full, args.out / "unused.tif", args)] if args.only != "standin" else []
    )
    if args.only != "unet":
        rows.append(run_case("standin", "stack", "baseline", full, args.out / "unused.tif", args))
        for mode in ("stack", "orthoplane"):
            for impl in ("pipeline", "naive"):
                rows.append(run_case("standin", mode, impl, full, args.out / f"standin_{mode}_{impl}.tif", args))
    if args.only != "standin":
        sub = crop_volume(full, args.out / f"stack{args.stack_slices}.tif", args.stack_slices, args.size)
        cube = crop_volume(full, args.out / f"cube{args.ortho_size}.tif", args.ortho_size, args.ortho_size)
        for impl in ("pipeline", "naive"):
            rows.append(run_case("unet", "stack", impl, sub, args.out / f"unet_stack_{impl}.tif", args))
        for impl in ("pipeline", "naive"):
            rows.append(run_case("unet", "orthoplane", impl, cube, args.out / f"unet_ortho_{impl}.tif", args))
    text = table(rows)
    print(text)
    print(f"total benchmark time {time.perf_counter() - t0:.0f} s")
    tag = f"_{args.only}" if args.only else ""
    (args.out / f"results{tag}.json").write_text(json.dumps(rows, indent=2))
    (args.out / f"results{tag}.md").write_text(text + "\n")


if __name__ == "__main__":
    main()

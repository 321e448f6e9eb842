"""Prediction voxels/s: single process vs ``finetune predict --scheduler local:1`` and ``local:2``.

Input: the real NeuroProof FIB-SEM volume (``training_sample2``, 250^3 uint8 at 10 nm), its
first ``--slices`` slices written as a TIFF (``--slices 250`` is the whole volume). Model: an
untrained resnet18 UNet (stack mode, 250 x 250 slices in one 256 x 256 tile; speed does not
depend on the weights), or with ``--mode sliding`` a small resnet18 3D UNet in ``--window``
windows. Every run writes a uint8 ``.zarr`` (one pyramid level) through
:func:`finetune.predict.command.predict_path`, the CLI's function.

Measured, in this order: the single process with 1 torch thread and with every core (the
default), then Dask ``LocalCluster``\\ s of 1 and 2 single-threaded worker processes. For Dask
the cluster start is timed apart, and each cluster predicts twice: "cold" includes what the
first task of each worker pays (importing torch, loading the model), "warm" is the second
prediction on the same workers (model cached), the steady state of a long run. The outputs are checked equal to the
single-process one. Finally the scheduler's overhead per task: 400 no-op tasks on the
2-worker cluster.

Usage: python benchmarks/bench_predict_dask.py [--slices 64] [--mode stack|sliding] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _data_root() -> Path:
    return Path(os.environ.get("CEM_DATA", REPO.parent / "shared" / "data"))


def make_input(folder: Path, slices: int) -> Path:
    import imageio.v3 as iio

    from cemcurate.io import write_volume

    files = sorted((_data_root() / "neuroproof_flyem/training_sample2/grayscale_maps").glob("*.png"))
    if len(files) < slices:
        raise SystemExit(f"neuroproof data not found under {_data_root()}; set CEM_DATA")
    path = folder / "neuroproof.tif"
    write_volume(path, np.stack([iio.imread(f) for f in files[:slices]]), voxel_size=(10.0, 10.0, 10.0))
    return path


def save_run(folder: Path, mode: str) -> Path:
    import torch

    from finetune.models import build_model
    from finetune.train import MODEL

    torch.manual_seed(0)
    if mode == "stack":
        model = build_model("unet2d", arch="resnet18", num_classes=2)
    else:
        model = build_model(
            "unet3d", arch="resnet18", num_classes=2, geometry="isotropic", decoder_channels=(32, 16, 8, 8, 4)
        )
    folder.mkdir(parents=True, exist_ok=True)
    payload = {"state_dict": model.state_dict(), "model_config": model.config(), "classes": ["bg", "fg"]}
    torch.save({**payload, "config": {}}, folder / MODEL)
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--slices", type=int, default=64, help="slices of the 250 x 250 volume (max 250)")
    parser.add_argument("--mode", choices=("stack", "sliding"), default="stack")
    parser.add_argument("--window", type=int, nargs=3, default=[32, 64, 64], help="sliding mode window z y x")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()

    import torch
    import zarr

    from cemcurate.common.dask_cluster import dask_client
    from finetune.config import PredictConfig
    from finetune.predict.command import predict_path

    work = Path(tempfile.mkdtemp(prefix="bench-predict-dask-"))
    volume = make_input(work, args.slices)
    run = save_run(work / "run", args.mode)
    voxels = args.slices * 250 * 250
    options = dict(mode=args.mode, pyramid_levels=1)
    if args.mode == "sliding":
        options.update(window=args.window, window_overlap=[w // 4 for w in args.window], batch_size=1)
    rows, reference = [], None

    def record(name: str, seconds: float, out: Path, start_s: float | None = None) -> None:
        nonlocal reference
        data = np.asarray(zarr.open_group(str(out), mode="r")["0"])
        if reference is None:
            reference = data
        equal = bool(np.array_equal(data, reference))
        rows.append({"run": name, "seconds": seconds, "voxels_per_s": voxels / seconds, "cluster_start_s": start_s,
                     "equal_to_single_1_thread": equal})  # fmt: skip
        print(f"{name}: {seconds:.1f} s, {voxels / seconds:,.0f} voxels/s, equal {equal}", file=sys.stderr, flush=True)

    cores = torch.get_num_threads()
    for threads in (1, cores):
        torch.set_num_threads(threads)
        out = work / f"single{threads}.zarr"
        t0 = time.perf_counter()
        predict_path(run, str(volume), str(out), PredictConfig(**options), progress=False)
        record(f"single process, {threads} torch thread(s)", time.perf_counter() - t0, out)
    torch.set_num_threads(cores)
    overhead = None
    for workers in (1, 2):
        t0 = time.perf_counter()
        with dask_client(f"local:{workers}", quiet=True) as client:
            started = time.perf_counter() - t0
            cfg = PredictConfig(scheduler=client.scheduler.address, **options)
            for state in ("cold", "warm"):
                out = work / f"dask{workers}{state}.zarr"
                t1 = time.perf_counter()
                predict_path(run, str(volume), str(out), cfg, progress=False)
                record(f"dask local:{workers}, {state}", time.perf_counter() - t1, out, started)
            if workers == 2:
                import distributed

                t2 = time.perf_counter()
                futures = [client.submit(abs, -i, pure=False) for i in range(400)]
                for _ in distributed.as_completed(futures):
                    pass
                overhead = (time.perf_counter() - t2) / 400
    base1, base_all = rows[0]["seconds"], rows[1]["seconds"]
    dask1 = {"cold": rows[2]["seconds"], "warm": rows[3]["seconds"]}
    for row in rows:
        row["speedup_vs_single_1_thread"] = base1 / row["seconds"]
        row["speedup_vs_single_all_threads"] = base_all / row["seconds"]
        state = row["run"].rpartition(" ")[2]
        row["speedup_vs_local1"] = dask1[state] / row["seconds"] if row["run"].startswith("dask") else None
    result = {"mode": args.mode, "shape": [args.slices, 250, 250], "voxels": voxels, "cores": os.cpu_count(),
              "rows": rows, "scheduler_overhead_ms_per_task": overhead * 1e3}  # fmt: skip
    print("| run | seconds | voxels/s | vs single 1 thread | vs single all threads | vs local:1 (same state) | equal |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        vs1 = f"{r['speedup_vs_local1']:.2f}x" if r["speedup_vs_local1"] else "-"
        print(f"| {r['run']} | {r['seconds']:.1f} | {r['voxels_per_s']:,.0f} | {r['speedup_vs_single_1_thread']:.2f}x "
              f"| {r['speedup_vs_single_all_threads']:.2f}x | {vs1} | {r['equal_to_single_1_thread']} |")  # fmt: skip
    print(f"\nscheduler overhead: {overhead * 1e3:.2f} ms per no-op task (400 tasks, 2 workers)")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

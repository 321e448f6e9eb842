"""`cemcurate build --scheduler`: throughput on 1 and 2 Dask workers, per-task overhead, the client's merge.

Run from the repository root:

    .venv/bin/python benchmarks/bench_build_dask.py [--data ../shared/data] [--parts ...] [--merge-rows 10000000]

Prints Markdown tables (``--parts``, default all):
1. ``throughput``: the same RAW (the 20 VNC ssTEM sections of 1024^2, each as 3 separate files, and the
   NeuroProof 250^3 volume cut in 3 planes, split into 2 Mi-voxel chunk tasks on Dask: 24 of them) built
   by the local process pool with 1 and 2 workers and on a LocalCluster of 1 and 2 workers,
   after one warm-up build (the files are then in the page cache: the build is not I/O
   bound); the median of 3 builds each; the cluster's start-up is timed apart. Ratios are against
   the local 1-worker build.
2. ``overhead``: the scheduler's cost per task: 2,000 tasks that do nothing, on 2 workers.
3. ``merge``: what the client does after the workers: :func:`cemcurate.build.merge.merge_parts`
   over synthetic parts totalling ``--merge-rows`` manifest rows (100 parts, cached filter
   scores), then writing ``manifest.parquet``: seconds, peak RSS and bytes per row.
"""

from __future__ import annotations

import argparse
import operator
import os
import resource
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
from distributed import Client, LocalCluster

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from cemcurate.build import BuildConfig, build  # noqa: E402
from cemcurate.build.merge import merge_parts  # noqa: E402
from cemcurate.build.records import PartRecord, SourceRow  # noqa: E402
from cemcurate.build.scoring import _save_scores  # noqa: E402
from cemcurate.filtering.filters import make_filter  # noqa: E402
from cemcurate.layout import BuildLayout  # noqa: E402
from cemcurate.manifest import write_manifest  # noqa: E402


def make_raw(data: Path, raw: Path) -> None:
    raw.mkdir(parents=True)
    for copy in range(3):  # 60 sources: each section three times under other names (dedup is per source)
        for i in range(20):
            os.symlink(data / f"drosophila_vnc_gerhard/stack1/raw/{i:02d}.tif", raw / f"vnc{copy}_{i:02d}.tif")
    (raw / "neuroproof").mkdir()
    for p in sorted((data / "neuroproof_flyem/training_sample2/grayscale_maps").glob("*.png")):
        os.symlink(p, raw / "neuroproof" / p.name)
    (raw / "cemcurate.yaml").write_text("- {path: 'neuroproof/*.png', stack: true, voxel_size: [10, 10, 10]}\n")


def _timed_build(raw: Path, out: Path, cfg: BuildConfig, rounds: int = 3) -> tuple[float, int]:
    """Median wall time of ``rounds`` builds from scratch, and the patches cut."""
    times = []
    for _ in range(rounds):
        shutil.rmtree(out, ignore_errors=True)
        t0 = time.perf_counter()
        summary = build(raw, out, cfg, progress=False)
        times.append(time.perf_counter() - t0)
        assert not summary.failed, summary.failed
    return statistics.median(times), summary.n_raw


def bench_throughput(data: Path, tmp: Path) -> str:
    raw, out = tmp / "raw", tmp / "out"
    make_raw(data, raw)
    chunk = 2 << 20
    _timed_build(raw, out, BuildConfig(workers=2), rounds=1)  # warm-up: page cache, imports
    rows = []
    reference = None
    for label, workers in (("local pool, 1 worker", 1), ("local pool, 2 workers", 2)):
        seconds, n = _timed_build(raw, out, BuildConfig(workers=workers))
        reference = reference or seconds
        rows.append((label, seconds, n, ""))
    for workers in (1, 2):
        t0 = time.perf_counter()
        with LocalCluster(n_workers=workers, threads_per_worker=1, dashboard_address=":0") as cluster:
            start = time.perf_counter() - t0
            cfg = BuildConfig(scheduler=cluster.scheduler_address, dask_chunk_voxels=chunk)
            _timed_build(raw, out, cfg, rounds=1)  # warm-up of the workers' imports
            seconds, n = _timed_build(raw, out, cfg)
        rows.append((f"Dask LocalCluster, {workers} worker{'s' * (workers > 1)}", seconds, n, f"{start:.1f} s"))
    lines = [
        "| Build | Wall s | Patches | Patches/s | vs local 1 worker | Cluster start |",
        "|---|---|---|---|---|---|",
    ]
    for label, seconds, n, start in rows:
        lines.append(f"| {label} | {seconds:.2f} | {n} | {n / seconds:.0f} | {reference / seconds:.2f}x | {start} |")
    one, two = rows[2][1], rows[3][1]
    lines.append(f"\nDask 1 -> 2 workers: {one / two:.2f}x; local pool 1 -> 2 workers: {rows[0][1] / rows[1][1]:.2f}x")
    return "\n".join(lines)


def bench_overhead(n: int = 2000) -> str:
    with LocalCluster(n_workers=2, threads_per_worker=1, dashboard_address=":0") as cluster, Client(cluster) as client:
        client.gather(client.map(operator.add, range(50), range(50)))  # warm-up
        t0 = time.perf_counter()
        futures = client.map(operator.add, range(n), range(n), pure=False)
        client.gather(futures)
        seconds = time.perf_counter() - t0
    return (
        "| Tasks | Workers | Wall s | ms per task |\n|---|---|---|---|\n"
        f"| {n} no-op | 2 | {seconds:.2f} | {1000 * seconds / n:.2f} |"
    )


def bench_merge(tmp: Path, rows: int, parts: int = 100) -> str:
    layout = BuildLayout(tmp / "merge_out")
    layout.parts_dir.mkdir(parents=True)
    cfg = BuildConfig(filter="none")
    name = make_filter("none").name
    layout.filter_cache(name).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    per = rows // parts
    records = []
    for i in range(parts):
        shard = f"src{i:04d}-00000000-0"
        n = per
        group = np.arange(n)
        dup = rng.random(n) < 0.2
        group[dup] = rng.integers(0, n, dup.sum())
        frame = pd.DataFrame(
            {
                "local_id": np.arange(n, dtype=np.int64),
                "source": f"src{i:04d}",
                "file": f"src{i:04d}.tif",
                "plane": "xy",
                "slice": np.arange(n, dtype=np.int64) // 16,
                "y": (np.arange(n) % 4) * 224,
                "x": (np.arange(n) // 4 % 4) * 224,
                "h": 224,
                "w": 224,
                "shard": shard,
                "shard_row": np.where(dup, -1, np.arange(n)),
                "dhash": [f"{v:016x}" for v in rng.integers(0, 2**63, n)],
                "group_local": group,
                "duplicate": dup,
                "pixel_mean": rng.random(n, dtype=np.float32),
                "pixel_std": rng.random(n, dtype=np.float32),
            }
        )
        _save_scores(layout, name, shard, np.ones(n, np.float32), np.ones(n, np.uint8))
        rec = PartRecord(
            key=f"src{i:04d}",
            name=f"src{i:04d}",
            fingerprint="0" * 16,
            settings="",
            files=[],
            status="ok",
            sources=[SourceRow(source=f"src{i:04d}", files=f"src{i:04d}.tif")],
        )
        rec.rows = frame
        records.append(rec)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    manifest, _ = merge_parts(layout, records, cfg, progress=False)
    merge_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    write_manifest(manifest, layout.manifest)
    write_s = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    in_memory = manifest.memory_usage(deep=True).sum()
    on_disk = layout.manifest.stat().st_size
    n = len(manifest)
    return (
        "| Rows | merge_parts s | write manifest s | manifest in RAM | bytes/row RAM | parquet on disk "
        "| bytes/row disk | peak RSS growth |\n|---|---|---|---|---|---|---|---|\n"
        f"| {n:,} | {merge_s:.1f} | {write_s:.1f} | {in_memory / 2**30:.2f} GiB | {in_memory / n:.0f} | "
        f"{on_disk / 2**30:.2f} GiB | {on_disk / n:.0f} | {(peak - rss0) / 2**20:.2f} GiB |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--parts", nargs="+", default=["throughput", "overhead", "merge"])
    parser.add_argument("--merge-rows", type=int, default=10_000_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-dask-") as tmp:
        tmp = Path(tmp)
        if "throughput" in args.parts:
            print("### Build throughput\n\n" + bench_throughput(args.data, tmp / "t") + "\n", flush=True)
        if "overhead" in args.parts:
            print("### Scheduler overhead\n\n" + bench_overhead() + "\n", flush=True)
        if "merge" in args.parts:
            print("### Client-side merge\n\n" + bench_merge(tmp, args.merge_rows) + "\n", flush=True)


if __name__ == "__main__":
    main()

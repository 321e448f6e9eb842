"""`cemcurate build --scheduler`: the same manifest and store bytes on a Dask cluster, also when a worker dies.

Real data: a VNC ssTEM stack (xy only, 50 nm sections), the NeuroProof FIB-SEM volume
(isotropic, so xy, xz and yz planes), and 2D images (an SEM plate with a data bar, a cryo-ET
tomogram's slices). The cluster is a ``LocalCluster`` of 2 worker processes.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import zarr
from distributed import Client, LocalCluster, get_task_stream

from cemcurate.build import BuildConfig, build
from cemcurate.build.chunked import create_scratch, cut_chunk, plan_split, split_chunks
from cemcurate.build.scoring import gpu_workers
from cemcurate.cli import main
from cemcurate.common.dask_cluster import parse_scheduler
from cemcurate.filtering.classifier import create_model, save_classifier
from cemcurate.layout import BuildLayout
from cemcurate.sources import discover_sources


def _raw(root: Path, data_root: Path) -> Path:
    raw = root / "raw"
    (raw / "vnc").mkdir(parents=True)
    for i in range(4):
        os.symlink(data_root / f"drosophila_vnc_gerhard/stack1/raw/{i:02d}.tif", raw / "vnc" / f"{i:02d}.tif")
    (raw / "neuroproof").mkdir()
    for p in sorted((data_root / "neuroproof_flyem/training_sample2/grayscale_maps").glob("*.png"))[:120]:
        os.symlink(p, raw / "neuroproof" / p.name)
    os.symlink(data_root / "sem_plate_databar/plateImage2D.tif", raw / "plate.tif")
    os.symlink(data_root / "cryoet_tomo_napari_bio/tomo.tif", raw / "tomo.tif")
    (raw / "cemcurate.yaml").write_text(
        "sources:\n"
        "  - {path: 'vnc/*.tif', stack: true, voxel_size: [50, 4.6, 4.6]}\n"
        "  - {path: 'neuroproof/*.png', stack: true, voxel_size: [10, 10, 10]}\n"
    )
    return raw


@pytest.fixture(scope="module")
def local_build(tmp_path_factory, data_root):
    root = tmp_path_factory.mktemp("dask_build")
    raw = _raw(root, data_root)
    summary = build(raw, root / "local", BuildConfig(workers=1), progress=False)
    assert not summary.failed and summary.n_raw > 100
    return raw, root / "local"


@pytest.fixture(scope="module")
def cluster():
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster:
        yield cluster


def _store_bytes(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((out / "store").iterdir())}


def _assert_same_build(a: Path, b: Path) -> None:
    pd.testing.assert_frame_equal(pd.read_parquet(a / "manifest.parquet"), pd.read_parquet(b / "manifest.parquet"))
    sa, sb = pd.read_parquet(a / "sources.parquet"), pd.read_parquet(b / "sources.parquet")
    pd.testing.assert_frame_equal(sa, sb)
    assert _store_bytes(a) == _store_bytes(b)  # same shard names, same bytes, nothing left over


def test_a_dask_build_equals_the_local_build(local_build, cluster, tmp_path, capsys):
    raw, local = local_build
    out = tmp_path / "dask"
    assert main(["build", str(raw), str(out), "--scheduler", cluster.scheduler_address]) == 0
    err = capsys.readouterr().err
    assert "dashboard http" in err  # the address a person opens to watch the run
    _assert_same_build(local, out)
    planes = set(pd.read_parquet(out / "manifest.parquet")["plane"])
    assert planes == {"xy", "xz", "yz"}  # the isotropic volume was cut in three planes


def test_a_large_volume_is_cut_by_many_tasks_with_the_same_result(local_build, cluster, tmp_path):
    raw, local = local_build
    client = Client(cluster)
    with get_task_stream(client) as stream:
        cfg = BuildConfig(scheduler=cluster.scheduler_address, dask_chunk_voxels=1 << 20)
        summary = build(raw, tmp_path / "dask", cfg, progress=False)
    client.close()
    assert not summary.failed
    keys = {task["key"] for task in stream.data}
    chunks = sorted(k for k in keys if k.startswith("cemcurate-chunk-"))
    # NeuroProof (120 x 250 x 250, 3 planes) in 1 Mi-voxel chunks: 8 xy slabs of 16 sections,
    # then 8 blocks of 34 rows in each of xz and yz; the smaller sources stay one task each.
    names = [k.rpartition("-")[2] for k in chunks if "neuroproof" in k]
    assert sorted(names) == sorted(
        [f"xy{i}" for i in range(0, 120, 16)] + [f"{p}{i}" for p in ("xz", "yz") for i in range(0, 250, 34)]
    )
    assert all("neuroproof" in k for k in chunks)
    _assert_same_build(local, tmp_path / "dask")
    assert not (tmp_path / "dask" / "parts" / "work").exists()


def test_a_plan_task_run_again_leaves_the_chunks_scratch_alone(local_build, tmp_path):
    """Dask re-runs a task whose result was lost with its worker while a client still wants it; a
    plan re-run while the xz / yz chunks read the xy slabs' scratch must not empty it (it did:
    the plan created the scratch, and a worker kill once changed the hashes of 75 NeuroProof
    patches). The client creates the scratch once; the plan task only reads."""
    raw, _ = local_build
    cfg = BuildConfig(dask_chunk_voxels=1 << 20)
    spec = next(s for s in discover_sources(raw).specs if s.name == "neuroproof")
    out = tmp_path / "out"
    plan = plan_split(spec, cfg, out)
    assert plan is not None and plan.planes == ("xy", "xz", "yz")
    create_scratch(plan, out)
    for plane, start, stop in plan.chunks:
        if plane == "xy":
            cut_chunk(plan, plane, start, stop, cfg, out)
    scratch = plan.scratch(BuildLayout(out))
    filled = zarr.open_array(str(scratch), mode="r")[:]
    assert filled.std() > 10  # the standardised volume, not the zero fill
    again = plan_split(spec, cfg, out)  # what a re-run does ...
    assert (again.chunks, again.window, again.shard) == (plan.chunks, plan.window, plan.shard)
    np.testing.assert_array_equal(zarr.open_array(str(scratch), mode="r")[:], filled)


def test_chunks_follow_the_local_cutting_order():
    assert split_chunks((10, 100, 50), ("xy",), 10000) == [("xy", z, z + 2) for z in range(0, 10, 2)]
    assert split_chunks((3, 100, 50), ("xy",), 10) == [("xy", z, z + 1) for z in range(3)]  # at least a section
    assert split_chunks((4, 6, 5), ("xy", "xz", "yz"), 60) == [
        ("xy", 0, 2),
        ("xy", 2, 4),
        ("xz", 0, 3),
        ("xz", 3, 6),
        ("yz", 0, 2),
        ("yz", 2, 4),
        ("yz", 4, 5),
    ]


def test_a_worker_killed_mid_build_loses_and_duplicates_nothing(local_build, cluster, tmp_path):
    raw, local = local_build
    client = Client(cluster)
    killed = []

    def kill_a_busy_worker() -> None:
        # Kill -9 the worker process cutting a chunk of the large volume (its tasks go to the other
        # worker or to the worker's restart).
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not killed:
            busy = {w: keys for w, keys in client.processing().items() if any("cemcurate-chunk" in k for k in keys)}
            if busy:
                address = next(iter(busy))
                pid = client.run(os.getpid, workers=[address])[address]
                os.kill(pid, signal.SIGKILL)
                killed.append((address, busy[address]))
            time.sleep(0.05)

    thread = threading.Thread(target=kill_a_busy_worker, daemon=True)
    thread.start()
    cfg = BuildConfig(scheduler=cluster.scheduler_address, dask_chunk_voxels=1 << 20)
    summary = build(raw, tmp_path / "dask", cfg, progress=False)
    thread.join()
    client.close()
    assert killed, "no worker was seen cutting a chunk"
    assert not summary.failed
    _assert_same_build(local, tmp_path / "dask")


def test_scheduler_values_are_checked(tmp_path, local_build, capsys):
    assert parse_scheduler("local:3").workers == 3
    assert parse_scheduler("tcp://10.0.0.1:8786").address == "tcp://10.0.0.1:8786"
    slurm = tmp_path / "slurm.yaml"
    slurm.write_text("jobqueue: slurm\njobs: 4\ncores: 8\nmemory: 32GB\nwalltime: '04:00:00'\n")
    spec = parse_scheduler(str(slurm))
    assert (spec.kind, spec.jobqueue, spec.jobs) == ("jobqueue", "slurm", 4)
    assert dict(spec.options) == {"cores": 8, "memory": "32GB", "walltime": "04:00:00"}
    for bad, message in [
        ("local:0", "local:N with N >= 1"),
        ("sched.example.org", "not an address"),
        (str(tmp_path / "none.yaml"), "file not found"),
    ]:
        with pytest.raises(ValueError, match=message):
            parse_scheduler(bad)
    (tmp_path / "pbs.yaml").write_text("jobqueue: torque\n")
    with pytest.raises(ValueError, match="'jobqueue' must be one of slurm"):
        parse_scheduler(str(tmp_path / "pbs.yaml"))
    raw, _ = local_build
    assert main(["build", str(raw), str(tmp_path / "o"), "--scheduler", "local:2", "--workers", "2"]) == 2
    assert "size the cluster instead" in capsys.readouterr().err
    assert not (tmp_path / "o" / "manifest.parquet").exists()


def test_a_chunk_that_cannot_be_read_fails_its_source_alone(data_root, cluster, tmp_path):
    raw = tmp_path / "raw"
    (raw / "np").mkdir(parents=True)
    for p in sorted((data_root / "neuroproof_flyem/training_sample2/grayscale_maps").glob("*.png"))[:80]:
        (raw / "np" / p.name).write_bytes(p.read_bytes())
    broken = sorted((raw / "np").iterdir())[60]
    broken.write_bytes(broken.read_bytes()[:300])  # cut short: only its chunk reads it
    os.symlink(data_root / "sem_plate_databar/plateImage2D.tif", raw / "plate.tif")
    (raw / "cemcurate.yaml").write_text("sources:\n  - {path: 'np/*.png', stack: true, voxel_size: [10, 10, 10]}\n")
    local = build(raw, tmp_path / "local", BuildConfig(workers=1), progress=False)
    cfg = BuildConfig(scheduler=cluster.scheduler_address, dask_chunk_voxels=1 << 20)
    dask = build(raw, tmp_path / "dask", cfg, progress=False)
    assert list(dask.failed) == ["np"] and broken.name in dask.failed["np"]
    assert dask.failed == local.failed  # the same one-line error as the local build
    assert dask.n_kept == local.n_kept > 0  # the plate still made it
    assert not (tmp_path / "dask" / "parts" / "work").exists()


def test_a_classifier_filter_scores_on_the_cluster_as_it_does_here(data_root, tmp_path):
    """The ResNet filter's ranges run as tasks on the workers that declare a GPU (here a LocalCluster
    whose workers say GPU=1; on this CPU machine they compute on the CPU): the same scores."""
    raw = tmp_path / "raw"
    raw.mkdir()
    os.symlink(data_root / "drosophila_vnc_gerhard/stack1/raw/00.tif", raw / "vnc00.tif")
    os.symlink(data_root / "sem_plate_databar/plateImage2D.tif", raw / "plate.tif")
    torch.manual_seed(0)
    classifier = tmp_path / "classifier.pth"
    save_classifier(classifier, create_model("resnet18"), "resnet18", 64, 0.5, 0.2)
    local = build(raw, tmp_path / "local", BuildConfig(workers=1, filter=str(classifier)), progress=False)
    with LocalCluster(n_workers=2, threads_per_worker=1, resources={"GPU": 1}, dashboard_address=":0") as gpus:
        client = Client(gpus)
        assert len(gpu_workers(client)) == 2
        with get_task_stream(client) as stream:
            dask = build(raw, tmp_path / "dask", BuildConfig(scheduler=gpus.scheduler_address, filter=str(classifier)))
        client.close()
    assert not local.failed and not dask.failed
    filter_tasks = [t for t in stream.data if str(t["key"]).startswith("cemcurate-filter-")]
    assert filter_tasks  # the ResNet ran on the cluster, not in this process
    a, b = (pd.read_parquet(tmp_path / o / "manifest.parquet") for o in ("local", "dask"))
    stored = a["shard_row"] >= 0
    assert a.loc[stored, "decided_by"].eq("classifier").all() and stored.sum() > 20
    np.testing.assert_allclose(a["informative_prob"], b["informative_prob"], rtol=0, atol=1e-6)
    pd.testing.assert_frame_equal(a.drop(columns="informative_prob"), b.drop(columns="informative_prob"))


def test_an_interrupted_dask_build_resumes_from_the_parts_it_finished(local_build, cluster, tmp_path):
    """A build stopped part-way leaves finished parts (their JSON last) and no manifest; the next
    build on the cluster redoes only the others and ends with the local build's result."""
    raw, local = local_build
    out = tmp_path / "dask"
    cfg = BuildConfig(scheduler=cluster.scheduler_address, dask_chunk_voxels=1 << 20)
    build(raw, out, cfg, progress=False)
    parts = sorted((out / "parts").glob("*.json"))
    lost = [p for p in parts if p.stem.startswith(("neuroproof", "tomo"))]
    for path in lost:  # as if the build had stopped before these sources finished
        path.unlink()
    for name in ("manifest.parquet", "sources.parquet", "report.html"):
        (out / name).unlink()
    summary = build(raw, out, cfg, progress=False)
    assert summary.reused == len(parts) - len(lost) - 1 and len(lost) == 2  # patch_ids.json is no source
    _assert_same_build(local, out)

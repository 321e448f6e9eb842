"""`pretrain` command line: help text and clear errors for bad input, all before any training starts."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from test_pretrain_data import real_patches

import pretrain.cli as pretrain_cli
from cemcurate.manifest import read_manifest, write_manifest
from cemcurate.store import write_patch_store
from pretrain import distributed
from pretrain.cli import main
from pretrain.config import MocoConfig

SMALL = [
    "--gpus",
    "0",
    "--arch",
    "resnet18",
    "--image-size",
    "64",
    "--batch-size",
    "8",
    "--queue-size",
    "256",
    "--max-steps",
    "1",
    "--workers",
    "0",
]


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory, data_root) -> Path:
    """A small store of real VNC patches (16)."""
    patches = real_patches(data_root, vnc_slices=1, neuroproof_slices=1)["drosophila_vnc_gerhard"]
    out = tmp_path_factory.mktemp("store")
    write_patch_store(out, patches, source="drosophila_vnc_gerhard")
    return out


def _moco(store: Path, run: Path, *extra: str) -> list[str]:
    return ["moco", "--data", str(store), "--out", str(run), *SMALL, *extra]


def test_help_explains_every_option(capsys):
    with pytest.raises(SystemExit) as done:
        main(["moco", "--help"])
    assert done.value.code == 0
    text = capsys.readouterr().out
    for f in dataclasses.fields(MocoConfig):
        assert f"--{f.name.replace('_', '-')}" in text, f.name
        assert f.metadata["help"].split()[0] in text, f.name
    for flag in ("--data", "--out", "--config", "--gpus", "--nproc", "resumes"):
        assert flag in text
    with pytest.raises(SystemExit):
        main(["export", "--help"])
    text = capsys.readouterr().out
    assert "--from-cem500k" in text and "strict=True" in text


def test_missing_and_empty_stores(tmp_path, store_dir, capsys):
    assert main(_moco(tmp_path / "nowhere", tmp_path / "run")) == 2
    err = capsys.readouterr().err
    assert "nowhere: no such folder" in err and "cemcurate build" in err

    empty = tmp_path / "empty"
    write_patch_store(empty, np.zeros((2, 224, 224), np.uint8) + 100)
    manifest = read_manifest(empty / "manifest.parquet")
    manifest["kept"] = False
    write_manifest(manifest, empty / "manifest.parquet")
    assert main(_moco(empty, tmp_path / "run")) == 2
    assert "no kept patches" in capsys.readouterr().err

    assert main(_moco(store_dir, tmp_path / "run", "--batch-size", "32", "--queue-size", "64")) == 2
    assert "16 patches cannot fill one batch of 32" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()  # nothing started


def test_more_gpus_than_the_machine_has(tmp_path, store_dir, capsys, monkeypatch):
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    assert main(["moco", "--data", str(store_dir), "--out", str(tmp_path / "run"), "--gpus", "4"]) == 2
    err = capsys.readouterr().err
    assert "--gpus 4: this machine offers 0 CUDA device(s)" in err and "--gpus 0" in err


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--queue-size", "100"], "queue_size 100 is not divisible by the global batch_size 8"),
        (["--arch", "resnet5O"], "unknown encoder arch 'resnet5O'"),
        (["--key-bn", "sync"], "--key-bn sync needs CUDA"),
        (["--nproc", "3"], "--batch-size 8 does not split evenly over 3 processes"),
        (["--nproc", "0"], "--nproc must be at least 1"),
        (["--crop-scale", "0.2", "1.5"], "at most 1"),
    ],
)
def test_bad_settings_are_named(tmp_path, store_dir, capsys, extra, message):
    assert main(_moco(store_dir, tmp_path / "run", *extra)) == 2
    assert message in capsys.readouterr().err


def test_bad_config_files(tmp_path, store_dir, capsys):
    typo = tmp_path / "typo.yaml"
    typo.write_text("arch: resnet18\nqueue_sise: 256\n")
    assert main(_moco(store_dir, tmp_path / "run", "--config", str(typo))) == 2
    err = capsys.readouterr().err
    assert "typo.yaml" in err and "queue_sise" in err
    assert main(_moco(store_dir, tmp_path / "run", "--config", str(tmp_path / "absent.yaml"))) == 2
    assert "absent.yaml: config file not found" in capsys.readouterr().err


def test_corrupt_checkpoint_in_the_run_folder(tmp_path, store_dir, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "checkpoint.pth").write_bytes(b"PK\x03\x04 this is not a whole zip archive")
    assert main(_moco(store_dir, run)) == 2
    err = capsys.readouterr().err
    assert f"{run / 'checkpoint.pth'}: cannot read checkpoint" in err and "delete it to start the run over" in err


@pytest.mark.parametrize(
    "device, gpus, nproc, cuda, mps, expected",
    [
        ("auto", None, None, 4, True, (4, "cuda")),  # GPUs first
        ("auto", 2, None, 4, True, (2, "cuda")),
        ("auto", None, None, 0, True, (1, "mps")),  # then Apple silicon
        ("auto", 0, None, 0, True, (1, "cpu")),  # --gpus 0 and --nproc are CPU settings
        ("auto", None, 2, 0, True, (2, "cpu")),
        ("auto", None, None, 0, False, (1, "cpu")),
        ("cpu", None, 2, 4, True, (2, "cpu")),
        ("cuda", None, None, 2, False, (2, "cuda")),
        ("mps", None, None, 4, True, (1, "mps")),
        ("mps", None, None, 0, False, (1, "cpu")),  # no MPS: the CPU (the command warns)
    ],
)
def test_device_plans(device, gpus, nproc, cuda, mps, expected):
    plan = distributed.plan_processes(device, gpus, nproc, cuda, mps)
    assert (plan.nprocs, plan.kind) == expected


@pytest.mark.parametrize(
    "device, gpus, nproc, message",
    [
        ("mps", None, 2, "--device mps runs one process"),
        ("mps", 1, None, "--device mps runs one process"),
        ("cpu", 2, None, "--device cpu contradicts --gpus 2"),
        ("cuda", None, None, "--device cuda: torch sees no CUDA GPU"),
        ("cuda", 0, None, "--device cuda contradicts --gpus 0"),
        ("auto", 2, 2, "--nproc is for CPU runs"),
        ("tpu", None, None, "--device must be one of"),
    ],
)
def test_contradicting_device_settings_are_refused(device, gpus, nproc, message):
    with pytest.raises(ValueError, match=message):
        distributed.plan_processes(device, gpus, nproc, 0, False)


def test_mps_without_mps_trains_on_the_cpu_and_says_so(tmp_path, store_dir, capsys, monkeypatch):
    monkeypatch.setattr(pretrain_cli, "mps_available", lambda: False)
    small = SMALL[2:]  # without --gpus 0
    args = ["moco", "--data", str(store_dir), "--out", str(tmp_path / "run"), *small, "--device", "mps"]
    assert main(args) == 0
    captured = capsys.readouterr()
    assert "--device mps but torch has no usable Apple MPS backend" in captured.err
    assert "training on the CPU" in captured.err and "(step 1" in captured.out
    # With MPS present the run goes to one process on it: the launch is asked for the mps device.
    seen = {}
    monkeypatch.setattr(pretrain_cli, "mps_available", lambda: True)
    monkeypatch.setattr(
        distributed,
        "launch",
        lambda fn, n, args, use_cuda, device: (
            seen.update(n=n, device=device) or [{"checkpoint": "ck", "step": 1, "last_loss": None}]
        ),
    )
    main(["moco", "--data", str(store_dir), "--out", str(tmp_path / "run2"), *small, "--device", "mps"])
    assert seen == {"n": 1, "device": torch.device("mps")}

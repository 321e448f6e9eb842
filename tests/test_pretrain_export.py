"""`pretrain moco` end to end on one CPU process, then `pretrain export` into timm and smp.

Also imports a checkpoint this test builds in the released CEM500K MoCoV2 layout.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import segmentation_models_pytorch as smp
import timm
import torch
import yaml
from safetensors.torch import load_file
from test_pretrain_data import build_real_store

from cemcurate.common.weights import CEM500K_MEAN, CEM500K_STD
from pretrain.checkpoint import load_checkpoint
from pretrain.cli import main
from pretrain.config import MocoConfig
from pretrain.moco import MoCo
from pretrain.train import plan_run

pytestmark = [
    pytest.mark.slow,
    pytest.mark.usefixtures("one_torch_thread"),
]  # trains small models (still part of the default suite)

# The short CPU run of the issue, without data-loading worker processes.
SMOKE = [
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
    "5",
    "--workers",
    "0",
]


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory, data_root) -> Path:
    return build_real_store(tmp_path_factory.mktemp("store"), data_root)


@pytest.fixture(scope="module")
def run_dir(store_dir, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("runs") / "smoke"
    assert main(["moco", "--data", str(store_dir), "--out", str(run), *SMOKE]) == 0
    return run


@pytest.fixture(scope="module")
def real_batch(store_dir) -> torch.Tensor:
    """4 real patches, 64 x 64 centre crops normalised with the store statistics: (4, 1, 64, 64)."""
    from cemcurate.store import open_patches

    store = open_patches(store_dir)
    x = torch.from_numpy(store[[0, 10, 33, 47]][:, None, 80:144, 80:144].astype(np.float32) / 255)
    return (x - store.mean) / store.std


def test_smoke_run_writes_checkpoint_logs_and_config(run_dir, store_dir, capsys):
    ckpt = load_checkpoint(run_dir / "checkpoint.pth")
    assert ckpt["step"] == 5 and ckpt["arch"] == "resnet18" and ckpt["world_size"] == 1
    assert ckpt["config"]["queue_size"] == 256 and ckpt["config"]["image_size"] == 64
    assert ckpt["model"]["queue"].shape == (256, 128) and int(ckpt["model"]["queue_ptr"]) == 40
    assert ckpt["data"]["n_patches"] == 48 and ckpt["data"]["sources"]["neuroproof_flyem"] == 16
    assert {"python", "numpy", "torch"} <= ckpt["rng"][0].keys()
    assert ckpt["data_order"]["epoch"] == 0 and ckpt["data_order"]["step_in_epoch"] == 5
    with open(run_dir / "log.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == [5]  # log_every 10: the last step is always logged
    assert float(rows[0]["loss"]) > 0 and float(rows[0]["images_per_s"]) > 0
    assert any((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    assert "queue_size: 256" in (run_dir / "config.yaml").read_text()

    # Re-running the same command finds the run complete and leaves it alone.
    before = (run_dir / "checkpoint.pth").stat().st_mtime_ns
    assert main(["moco", "--data", str(store_dir), "--out", str(run_dir), *SMOKE]) == 0
    assert (run_dir / "checkpoint.pth").stat().st_mtime_ns == before
    assert "nothing to do" in capsys.readouterr().err

    # Resuming on another number of processes is allowed, with a note that it is not bit-exact.
    cfg = MocoConfig(**{**load_checkpoint(run_dir / "checkpoint.pth")["config"], "max_steps": 6})
    plan = plan_run(cfg, store_dir, run_dir, world_size=2, use_cuda=False)
    assert plan.start_step == 5 and plan.total_steps == 6
    assert any("written by 1 process(es), this run has 2" in note for note in plan.notes)

    # Resuming with settings that change the computation is refused, naming them.
    assert main(["moco", "--data", str(store_dir), "--out", str(run_dir), *SMOKE, "--lr", "0.1"]) == 2
    err = capsys.readouterr().err
    assert "cannot resume" in err and "lr: checkpoint 0.015, now 0.1" in err and str(run_dir) in err


def test_export_round_trip_into_timm_and_smp(run_dir, real_batch, tmp_path, capsys, monkeypatch):
    out = tmp_path / "published"
    assert main(["export", str(run_dir / "checkpoint.pth"), str(out)]) == 0
    assert "exported resnet18" in capsys.readouterr().out
    from_safetensors, from_pth = load_file(str(out / "encoder.safetensors")), torch.load(out / "encoder.pth")
    assert from_safetensors.keys() == from_pth.keys()
    assert all(torch.equal(from_safetensors[k], from_pth[k]) for k in from_pth)
    assert not any(k.startswith(("fc.", "head", "encoder_")) for k in from_pth)

    net = timm.create_model("resnet18", in_chans=1, num_classes=0)
    net.load_state_dict(from_safetensors, strict=True)
    unet = smp.Unet("resnet18", in_channels=1, encoder_weights=None, classes=1)
    unet.encoder.load_state_dict(from_pth, strict=True)

    # Same features as the checkpoint's query encoder.
    moco = MoCo("resnet18", feature_dim=128, queue_size=256)
    moco.load_state_dict(load_checkpoint(run_dir / "checkpoint.pth")["model"])
    net.eval(), unet.eval(), moco.eval()
    with torch.no_grad():
        expected = moco.encoder_q(real_batch)
        assert torch.allclose(net(real_batch), expected, atol=1e-5)
        deepest = unet.encoder(real_batch)[-1]
        assert torch.allclose(deepest.mean(dim=(2, 3)), expected, atol=1e-5)
        # ... and not the features of an untrained network.
        assert not torch.allclose(
            timm.create_model("resnet18", in_chans=1, num_classes=0).eval()(real_batch), expected, atol=1e-3
        )

    config = json.loads((out / "config.json").read_text())
    # timm reads the folder itself, offline, through the timm-format pretrained_cfg it carries.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    overlay = dict(file=str(out / "encoder.safetensors"), **config["pretrained_cfg"])
    loaded = timm.create_model("resnet18", pretrained=True, in_chans=1, num_classes=0, pretrained_cfg_overlay=overlay)
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in from_safetensors.items())
    assert config["architecture"] == "resnet18" and tuple(loaded.pretrained_cfg["mean"]) == (config["mean"],)
    ckpt = load_checkpoint(run_dir / "checkpoint.pth")
    assert config["pretrained_cfg"]["input_size"] == [1] + [ckpt["data"]["patch_size"]] * 2
    assert config["arch"] == "resnet18" and config["in_chans"] == 1 and config["smp_encoder"] == "resnet18"
    assert config["mean"] == pytest.approx(ckpt["data"]["mean"]) and config["std"] == pytest.approx(ckpt["data"]["std"])
    card = (out / "model_card.md").read_text()
    _, front, _ = card.split("---\n", 2)  # Hugging Face model-card front matter
    front = yaml.safe_load(front)
    assert front["library_name"] == "timm" and "electron-microscopy" in front["tags"] and front["license"]
    for text in (
        "resnet18",
        "| drosophila_vnc_gerhard | 32 |",
        "| neuroproof_flyem | 16 |",
        "queue_size: 256",
        f"{ckpt['data']['mean']:.6g}",
        "5 optimizer steps",
        ckpt["git_commit"],
    ):
        assert text in card, text


def _cem500k_layout(tmp_path: Path, wrapped: bool, norms: bool) -> tuple[Path, dict[str, torch.Tensor]]:
    """A checkpoint laid out like the released CEM500K MoCoV2 weights (random values)."""
    torch.manual_seed(3)
    encoder = timm.create_model("resnet50", in_chans=1, num_classes=0).state_dict()
    head = {
        "fc.0.weight": torch.randn(2048, 2048) * 0.01,
        "fc.0.bias": torch.zeros(2048),
        "fc.2.weight": torch.randn(128, 2048) * 0.01,
        "fc.2.bias": torch.zeros(128),
    }
    state = {}
    for branch in ("encoder_q", "encoder_k"):
        state.update({f"module.{branch}.{k}": v.clone() for k, v in {**encoder, **head}.items()})
    state["module.queue"] = torch.randn(128, 1024)
    state["module.queue_ptr"] = torch.zeros(1, dtype=torch.long)
    ckpt: dict = {"epoch": 200, "arch": "resnet50", "state_dict": state} if wrapped else state
    if norms:
        ckpt["norms"] = [0.6, 0.12]
    path = tmp_path / ("cem500k_mocov2_resnet50_200ep.pth.tar" if wrapped else "bare.pth")
    torch.save(ckpt, path)
    return path, encoder


def test_cem500k_checkpoint_imports_into_timm_and_smp(tmp_path, capsys):
    path, encoder = _cem500k_layout(tmp_path, wrapped=True, norms=True)
    out = tmp_path / "cem500k"
    assert main(["export", str(path), str(out)]) == 0  # layout detected
    weights = load_file(str(out / "encoder.safetensors"))
    assert weights.keys() == encoder.keys() and all(torch.equal(weights[k], encoder[k]) for k in encoder)
    timm.create_model("resnet50", in_chans=1, num_classes=0).load_state_dict(weights, strict=True)
    smp.Unet("resnet50", in_channels=1, encoder_weights=None).encoder.load_state_dict(weights, strict=True)
    config = json.loads((out / "config.json").read_text())
    assert (config["arch"], config["mean"], config["std"], config["source"]) == ("resnet50", 0.6, 0.12, "cem500k")
    assert "CEM500K" in (out / "model_card.md").read_text()

    # No wrapper, no norms, flag given: CEM500K's published statistics are used.
    bare, _ = _cem500k_layout(tmp_path, wrapped=False, norms=False)
    assert main(["export", "--from-cem500k", str(bare), str(tmp_path / "bare")]) == 0
    config = json.loads((tmp_path / "bare" / "config.json").read_text())
    assert (config["mean"], config["std"]) == (CEM500K_MEAN, CEM500K_STD)

    # A wrong architecture is refused before anything is written.
    capsys.readouterr()
    assert main(["export", str(path), str(tmp_path / "wrong"), "--arch", "resnet18"]) == 2
    assert "does not load into timm 'resnet18'" in capsys.readouterr().err
    assert not (tmp_path / "wrong").exists()


def test_export_rejects_bad_checkpoints(run_dir, tmp_path, capsys):
    good = (run_dir / "checkpoint.pth").read_bytes()
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(good[: len(good) // 3])
    assert main(["export", str(truncated), str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err
    assert str(truncated) in err and "cannot read checkpoint" in err

    foreign = tmp_path / "foreign.pth"
    torch.save({"weights": {"w": torch.zeros(2)}}, foreign)
    assert main(["export", str(foreign), str(tmp_path / "b")]) == 2
    assert "neither a `pretrain moco` checkpoint nor a CEM500K" in capsys.readouterr().err

    assert main(["export", "--from-cem500k", str(run_dir / "checkpoint.pth"), str(tmp_path / "c")]) == 2
    assert "drop the flag" in capsys.readouterr().err
    assert main(["export", str(tmp_path / "missing.pth"), str(tmp_path / "d")]) == 2
    assert "checkpoint not found" in capsys.readouterr().err

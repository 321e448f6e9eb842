"""Device selection: auto prefers CUDA, then Apple MPS, then the CPU; mps without MPS falls back, warned."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

import cemcurate.common.device as device_module
from cemcurate.build import BuildConfig, build
from cemcurate.common.device import select_device
from cemcurate.filtering.classifier import create_model, save_classifier
from finetune.config import PredictConfig, RuntimeConfig


def test_auto_cuda_mps_and_the_fallback(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(device_module, "mps_available", lambda: False)
    assert select_device("auto") == torch.device("cpu")
    with pytest.warns(UserWarning, match="no usable Apple MPS backend.*running on the CPU"):
        assert select_device("mps") == torch.device("cpu")
    with pytest.raises(ValueError, match="no CUDA GPU"):
        select_device("cuda")
    with pytest.raises(ValueError, match="is not a device"):
        select_device("tpu7")
    monkeypatch.setattr(device_module, "mps_available", lambda: True)
    assert select_device("auto") == torch.device("mps") and select_device("mps") == torch.device("mps")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert select_device(None) == torch.device("cuda")


def test_finetune_configs_accept_mps():
    assert PredictConfig(device="mps").device == "mps" and RuntimeConfig(device="mps").device == "mps"
    with pytest.raises(ValueError, match="device must be one of"):
        RuntimeConfig(device="tpu")


def test_the_build_runs_a_classifier_filter_on_the_device_asked_for(tmp_path, data_root, monkeypatch):
    monkeypatch.setattr(device_module, "mps_available", lambda: False)
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "plate.tif").symlink_to(data_root / "sem_plate_databar/plateImage2D.tif")
    torch.manual_seed(0)
    classifier = tmp_path / "classifier.pth"
    save_classifier(classifier, create_model("resnet18"), "resnet18", 64, 0.5, 0.2)
    with pytest.warns(UserWarning, match="device mps requested but torch has no usable Apple MPS"):
        summary = build(raw, tmp_path / "out", BuildConfig(filter=str(classifier), filter_device="mps"), progress=False)
    assert summary.n_raw > 0 and not summary.failed
    assert (pd.read_parquet(tmp_path / "out" / "manifest.parquet")["decided_by"] == "classifier").all()

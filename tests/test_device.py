"""Device selection: auto prefers CUDA, then Apple MPS, then the CPU; mps without MPS falls back, warned."""

from __future__ import annotations

import pytest
import torch

import cemcurate.common.device as device_module
from cemcurate.common.device import select_device
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

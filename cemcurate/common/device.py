"""The torch device of a command: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``."""

from __future__ import annotations

import torch

DEVICE_HELP = "auto (CUDA when available, else the CPU), cpu, cuda or cuda:N"


def select_device(name: str | torch.device | None = "auto") -> torch.device:
    """``auto`` (or None): CUDA when available, else the CPU; otherwise ``torch.device(name)``.

    Raises:
        ValueError: CUDA was asked for but torch sees no CUDA GPU, or the name is not a device.
    """
    if name is None or str(name) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise ValueError(f"device {str(name)!r} is not a device; use {DEVICE_HELP}") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {str(name)} requested but torch sees no CUDA GPU; use --device cpu or auto")
    return device

"""The torch device of a command: ``auto``, ``cpu``, ``cuda``, ``cuda:N`` or ``mps`` (Apple silicon)."""

from __future__ import annotations

import warnings

import torch

DEVICE_HELP = "auto (CUDA when available, else Apple MPS, else the CPU), cpu, cuda, cuda:N or mps"


def mps_available() -> bool:
    """Whether torch can run on Apple's Metal (MPS) backend here."""
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def select_device(name: str | torch.device | None = "auto") -> torch.device:
    """``auto`` (or None): CUDA when available, else MPS when available, else the CPU;
    otherwise ``torch.device(name)``. ``mps`` where torch has no MPS backend falls back to the
    CPU with a warning saying so (a laptop without it still runs, slower).

    Raises:
        ValueError: CUDA was asked for but torch sees no CUDA GPU, or the name is not a device.
    """
    if name is None or str(name) == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps" if mps_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise ValueError(f"device {str(name)!r} is not a device; use {DEVICE_HELP}") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {str(name)} requested but torch sees no CUDA GPU; use --device cpu or auto")
    if device.type == "mps" and not mps_available():
        warnings.warn(
            "device mps requested but torch has no usable Apple MPS backend here (it needs Apple silicon, "
            "macOS 12.3+ and a torch build with MPS): running on the CPU",
            stacklevel=2,
        )
        return torch.device("cpu")
    return device

"""Whole-volume prediction: 2D stack (xy slices) or orthoplane (xy, xz, yz averaged).

Both take a slice predictor ``predict(float32[N, a, b] in [0, 1]) -> float32[N, C, a, b]``
and a source with ``shape`` ``(z, y, x)`` and ``read_unit(z0, z1)``, and hand
``float32[C, n, y, x]`` probability slabs to ``write(z0, probs)``.

Stack mode streams: only ``chunk`` slices are in memory at a time. Orthoplane mode needs
every voxel along three axes, so it keeps a uint8 copy of the input and a float32 sum of
probabilities; both live in RAM when they fit under ``memory_limit`` bytes, otherwise in
memory-mapped files in ``workdir`` (removed afterwards), so volumes larger than memory
work at disk speed.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Callable, Protocol

import numpy as np
from tqdm import tqdm

from finetune.predict.windows import decode_uint8, encode_probs

SlicePredict = Callable[[np.ndarray], np.ndarray]
Write = Callable[[int, np.ndarray], None]


class Source(Protocol):
    shape: tuple[int, int, int]

    def read_unit(self, z0: int, z1: int) -> np.ndarray: ...


def _chunks(n: int, size: int):
    for a in range(0, n, size):
        yield a, min(n, a + size)


def predict_stack(source: Source, predict: SlicePredict, write: Write, chunk: int = 16, progress: bool = False) -> None:
    """Predict every xy slice, ``chunk`` slices at a time, and write them in order."""
    z = source.shape[0]
    for z0, z1 in tqdm(list(_chunks(z, chunk)), desc="predict xy", unit="chunk", disable=not progress):
        probs = predict(source.read_unit(z0, z1))  # (n, C, y, x)
        write(z0, np.ascontiguousarray(probs.transpose(1, 0, 2, 3)))


def _array(shape: tuple[int, ...], dtype, in_memory: bool, workdir: Path | None, name: str) -> np.ndarray:
    if in_memory:
        return np.zeros(shape, dtype)
    assert workdir is not None
    return np.lib.format.open_memmap(workdir / f"{name}.npy", mode="w+", dtype=dtype, shape=shape)


def predict_orthoplane(
    source: Source,
    predict: SlicePredict,
    write: Write,
    channels: int,
    chunk: int = 16,
    memory_limit: float = 4 * 2**30,
    workdir: str | Path | None = None,
    progress: bool = False,
) -> None:
    """Average the probabilities of xy, xz and yz slice predictions for every voxel.

    Args:
        source: the volume (see the module docstring).
        predict: the slice predictor.
        write: receives ``(z0, float32[C, n, y, x])`` slabs of averaged probabilities.
        channels: C, the predictor's output channels.
        chunk: slices predicted together.
        memory_limit: bytes of input copy + probability sums allowed in RAM.
        workdir: folder for the memory maps when over the limit (default: system temp).
    """
    z, y, x = source.shape
    needed = z * y * x * (1 + 4 * channels)
    in_memory = needed <= memory_limit
    tmp = None if in_memory else Path(tempfile.mkdtemp(prefix=".orthoplane-", dir=workdir))
    try:
        volume = _array((z, y, x), np.uint8, in_memory, tmp, "input")
        for z0, z1 in _chunks(z, chunk):
            volume[z0:z1] = encode_probs(source.read_unit(z0, z1), np.uint8)
        acc = _array((channels, z, y, x), np.float32, in_memory, tmp, "sum")
        steps = (
            [("xy", a, b) for a, b in _chunks(z, chunk)]
            + [("xz", a, b) for a, b in _chunks(y, chunk)]
            + [("yz", a, b) for a, b in _chunks(x, chunk)]
        )
        for plane, a, b in tqdm(steps, desc="predict orthoplane", unit="chunk", disable=not progress):
            if plane == "xy":
                acc[:, a:b] += predict(decode_uint8(volume[a:b])).transpose(1, 0, 2, 3)
            elif plane == "xz":
                slices = decode_uint8(volume[:, a:b, :].transpose(1, 0, 2))  # (n, z, x)
                acc[:, :, a:b, :] += predict(slices).transpose(1, 2, 0, 3)  # (C, z, n, x)
            else:
                slices = decode_uint8(volume[:, :, a:b].transpose(2, 0, 1))  # (n, z, y)
                acc[:, :, :, a:b] += predict(slices).transpose(1, 2, 3, 0)  # (C, z, y, n)
        for z0, z1 in _chunks(z, chunk):
            write(z0, np.asarray(acc[:, z0:z1]) / np.float32(3.0))
        del volume, acc
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)

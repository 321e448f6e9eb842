"""Blockwise prediction on a Dask cluster: chunk-aligned blocks of a zarr output, each computed
by a worker exactly as the single-process prediction computes it.

The client opens the input (shape, voxel size, intensity window), creates the output store
(the same :class:`~finetune.predict.output.PredictionWriter` layout as a single-process run:
probabilities, labels, the input beside the prediction) in its temporary directory, and
submits one task per block; workers open the input by its path and the output's level-0
zarr arrays inside that temporary directory by their paths (a shared file system), write
their blocks, and the client publishes the store (pyramids, metadata, atomic rename) once
every block is done. Blocks never share a zarr chunk, and a block's bytes depend on nothing
but the block, so a retried task (a lost worker) rewrites the same bytes.

Blocks and halos, by mode; each reproduces the single-process arithmetic, so the results are
equal (bit for bit on the same device and thread count; within float tolerance otherwise):

* ``stack``: z-slabs of whole xy slices (slice predictions do not depend on z, so there is
  no halo). Slab starts are multiples of both the output chunk depth and ``chunk``, and a
  slab is predicted ``chunk`` slices at a time from its start, so every forward pass holds
  the same slices as in :func:`~finetune.predict.orthoplane.predict_stack`.
* ``sliding``: boxes of about two windows per side (:func:`plan_blocks`). The halo is every window
  of the *global* :func:`~finetune.predict.sliding.plan_sliding` plan that touches the block
  (so up to one window beyond it on each side), blended with the same weights, summed in
  the same window order and divided by the same global weight sums; windows go through the
  model in the same batches as in :func:`~finetune.predict.predictor.predict_windows` (a
  batch with any touching window is computed whole).
* ``orthoplane``: three phases separated by barriers: the input as the model sees it
  (``uint8``) is copied into a scratch zarr array beside the output; xy, xz and yz slabs
  (each a multiple of ``chunk`` slices from 0, as single-process) predict their slices into
  three float32 zarr arrays, one per plane; output z-slabs add them in the single-process
  order ``(xy + xz) + yz`` and divide by 3. The scratch folder is removed at the end.

The model is loaded once per worker process: :func:`cached_model` keeps it in a module-level
cache keyed by the model file (and its modification time) and the device; :func:`model_loads`
tells how often each file was loaded in this process (``client.run(model_loads)``).

Dask's nannies start workers with ``MALLOC_TRIM_THRESHOLD_=65536``, which also freezes glibc's
mmap threshold at 128 KiB, so every large numpy/torch temporary is mapped and unmapped again:
2.7x the page faults and ~40% slower predictions here. A task raises the mmap threshold of its
worker process once (:func:`tune_malloc`).
"""

from __future__ import annotations

import ctypes
import dataclasses
import itertools
import math
import os
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from cemcurate.common.atomic import remove_path
from cemcurate.common.device import select_device
from cemcurate.common.lazy import lazy_import
from cemcurate.io import ZARR_SUFFIXES, suffix_of
from cemcurate.io.ngff import array_path
from cemcurate.standardize import IntensityWindow
from finetune.metrics import probs_to_classes
from finetune.models import SegmentationModel, build_model
from finetune.models.transfer import model_file, read_saved_model
from finetune.predict.output import PredictionWriter
from finetune.predict.predictor import ModelWindows, _take, batch_for
from finetune.predict.slices import SlicePredictor
from finetune.predict.sliding import DEFAULT_WINDOW, plan_sliding
from finetune.predict.windows import WindowPlan, decode_uint8, encode_probs, outer, reflect_indices
from finetune.volumes import InputVolume, open_input

distributed = lazy_import("distributed")
zarr = lazy_import("zarr")

BLOCK_MODES = ("stack", "sliding", "orthoplane")
PLANES = ("xy", "xz", "yz")  # orthoplane passes; the slab axis of plane i is axis i of (z, y, x)
SCRATCH_CHUNK = 64  # orthoplane scratch arrays: chunk side across the slab axis
M_MMAP_THRESHOLD = -3  # glibc mallopt parameter
MMAP_THRESHOLD = 32 * 2**20  # glibc's largest allowed value on 64-bit

Box = tuple[tuple[int, int], tuple[int, int], tuple[int, int]]


@dataclass(frozen=True)
class PredictSettings:
    """What a worker needs to predict (plain values: sent to every task).

    ``model_path`` and ``input_spec`` must be readable by the workers (absolute paths on a
    shared file system); ``mode`` is resolved (``stack``, ``sliding`` or ``orthoplane``); the
    other fields are those of :class:`finetune.config.PredictConfig`, but ``block_windows``:
    sliding mode's block side in windows per axis (see :func:`plan_blocks`).
    """

    model_path: str
    input_spec: str
    mode: str
    output_type: str = "probs"
    prob_dtype: str = "uint8"
    threshold: float = 0.5
    tile: int = 512
    overlap: int = 64
    window: tuple[int, int, int] = DEFAULT_WINDOW
    window_overlap: tuple[int, int, int] = (16, 32, 32)
    batch_size: int = 8
    batch_pixels: int = 0
    chunk: int = 16
    device: str = "auto"
    amp: bool = True
    block_windows: int = 2


@dataclass(frozen=True)
class BlockJob:
    """One prediction's shared task argument: settings, the client's intensity window and where to write.

    ``targets``: level-0 array folders of the prediction volumes (one per output volume, as
    :class:`PredictionWriter` lays them out); ``input_target``: the input image's (``--with-input``),
    or ``""``; ``scratch``: orthoplane's scratch folder, or ``""``.
    """

    settings: PredictSettings
    window: IntensityWindow
    shape: tuple[int, int, int]
    channels: int
    targets: tuple[str, ...]
    input_target: str = ""
    scratch: str = ""


# ---------------------------------------------------------------- per-worker caches

_MODELS: dict[tuple[str, int, str], SegmentationModel] = {}
_LOADS: dict[str, int] = {}
_SOURCES: dict[tuple[str, IntensityWindow], InputVolume] = {}
_PREDICTORS: dict[tuple, SlicePredictor] = {}
_MALLOC: list[bool] = []  # [True] once tune_malloc ran in this process


def tune_malloc() -> None:
    """Under ``MALLOC_TRIM_THRESHOLD_`` (set by Dask's nannies) raise glibc's mmap threshold to 32 MiB,
    once per process, so large temporaries are reused from the heap (a no-op elsewhere)."""
    if _MALLOC:
        return
    _MALLOC.append(True)
    if "MALLOC_TRIM_THRESHOLD_" not in os.environ or not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)
    except (OSError, AttributeError):  # not glibc
        pass


def load_model(path: str | Path, device: str | torch.device = "cpu") -> tuple[SegmentationModel, dict]:
    """Rebuild a trained model from ``RUN`` or ``RUN/model.pth``.

    Returns:
        ``(model in eval mode on device, saved payload without the weights)``; the
        payload holds ``model_config``, ``classes`` and the training ``config``.
    """
    saved = read_saved_model(path)
    cfg = dict(saved.model_config)
    model = build_model(cfg.pop("model"), **cfg)
    model.load_state_dict(saved.state, strict=True)
    model.to(device).eval()
    return model, saved.info


def cached_model(path: str | Path, device: torch.device) -> SegmentationModel:
    """The model in ``path`` on ``device``, loaded once per process (reloaded if the file changes)."""
    file = str(Path(model_file(path)).resolve())
    key = (file, os.stat(file).st_mtime_ns, str(device))
    if key not in _MODELS:
        _MODELS[key] = load_model(file, device)[0]
        _LOADS[file] = _LOADS.get(file, 0) + 1
    return _MODELS[key]


def model_loads() -> dict[str, int]:
    """How many times this process loaded each model file (run on every worker with ``client.run``)."""
    return dict(_LOADS)


def _source(job: BlockJob) -> InputVolume:
    """The input, opened once per process, with the client's intensity window (so all workers agree)."""
    key = (job.settings.input_spec, job.window)
    if key not in _SOURCES:
        source = open_input(job.settings.input_spec)
        if tuple(source.shape) != tuple(job.shape):
            raise ValueError(f"{job.settings.input_spec}: a worker reads shape {source.shape}, the client {job.shape}")
        _SOURCES[key] = dataclasses.replace(source, window=job.window)
    return _SOURCES[key]


def _device(job: BlockJob) -> torch.device:
    return select_device(job.settings.device)


def _slice_predictor(job: BlockJob) -> SlicePredictor:
    s, device = job.settings, _device(job)
    model = cached_model(s.model_path, device)
    key = (id(model), s.amp, s.tile, s.overlap, s.batch_size, s.batch_pixels)
    if key not in _PREDICTORS:
        _PREDICTORS[key] = SlicePredictor(model, device, s.amp, s.tile, s.overlap, s.batch_size, s.batch_pixels)
    return _PREDICTORS[key]


def _open(path: str):
    return zarr.open_array(path, mode="r+")


def _write(job: BlockJob, box: Box, probs: np.ndarray) -> None:
    """Encode ``float32[C, *box]`` probabilities like :meth:`PredictionWriter.write` into the targets."""
    region = tuple(slice(a, b) for a, b in box)
    s = job.settings
    if s.output_type == "labels":
        _open(job.targets[0])[region] = probs_to_classes(probs, s.threshold)
    else:
        for c, target in enumerate(job.targets):
            _open(target)[region] = encode_probs(probs[c], s.prob_dtype)
    if job.input_target:
        (z0, z1), ys, xs = box
        _open(job.input_target)[region] = _source(job).read_uint8(z0, z1)[:, slice(*ys), slice(*xs)]


# ---------------------------------------------------------------- pure plans


def _lcm(a: int, b: int) -> int:
    return a * b // math.gcd(a, b)


def _spans(n: int, step: int) -> list[tuple[int, int]]:
    return [(a, min(n, a + step)) for a in range(0, n, step)]


def plan_blocks(
    shape: tuple[int, int, int],
    chunks: tuple[int, int, int],
    mode: str,
    chunk: int,
    window: tuple[int, int, int] = (1, 1, 1),
    block_windows: int = 2,
) -> list[Box]:
    """The output blocks of a prediction (pure), in z, y, x order; their sides are multiples of
    the output ``chunks`` (or reach the volume's end), so no two blocks share a chunk.

    ``stack``: z-slabs of whole slices, ``lcm(chunks[0], chunk)`` deep (``chunk``-slice batches
    line up with the single-process ones); ``orthoplane`` (its last phase): z-slabs of
    ``chunks[0]``; ``sliding``: boxes whose side on each axis is the smallest multiple of the
    chunk that holds ``block_windows`` windows (a bigger block recomputes fewer halo windows,
    a smaller one makes more tasks).
    """
    if mode not in BLOCK_MODES:
        raise ValueError(f"blockwise prediction supports modes {', '.join(BLOCK_MODES)}, got {mode!r}")
    z, y, x = (int(s) for s in shape)
    if mode != "sliding":
        depth = _lcm(int(chunks[0]), chunk) if mode == "stack" else int(chunks[0])
        return [((a, b), (0, y), (0, x)) for a, b in _spans(z, depth)]
    sides = [c * max(1, -(-block_windows * w // c)) for c, w in zip(chunks, window)]
    return list(itertools.product(*(_spans(n, side) for n, side in zip(shape, sides))))


def touching_starts(starts: tuple[int, ...], window: int, pad: int, lo: int, hi: int) -> list[int]:
    """Window starts (padded coordinates) whose window overlaps positions ``[lo, hi)`` (unpadded)."""
    return [s for s in starts if s < hi + pad and s + window > lo + pad]


def _orthoplane_depth(chunk: int) -> int:
    """Slab depth of the orthoplane passes: a multiple of ``chunk`` (batches as single-process), >= 16."""
    return chunk * max(1, -(-16 // chunk))


# ---------------------------------------------------------------- worker tasks


def predict_block(job: BlockJob, box: Box) -> dict:
    """Predict and write one output block (a task; see the module docstring for each mode)."""
    tune_malloc()
    start = time.perf_counter()
    mode = job.settings.mode
    if mode == "stack":
        probs = _stack_block(job, box)
    elif mode == "sliding":
        probs = _sliding_block(job, box)
    elif mode == "orthoplane":
        probs = _orthoplane_sum(job, box)
    else:
        raise ValueError(f"unknown blockwise mode {mode!r}")
    _write(job, box, probs)
    voxels = int(np.prod([b - a for a, b in box]))
    return {"box": box, "voxels": voxels, "seconds": time.perf_counter() - start, "pid": os.getpid()}


def _stack_block(job: BlockJob, box: Box) -> np.ndarray:
    (z0, z1), (y0, y1), (x0, x1) = box
    source, predictor = _source(job), _slice_predictor(job)
    parts = []
    for a in range(z0, z1, job.settings.chunk):
        probs = predictor(source.read_unit(a, min(z1, a + job.settings.chunk)))  # (n, C, y, x)
        parts.append(np.ascontiguousarray(probs.transpose(1, 0, 2, 3)))
    return np.concatenate(parts, axis=1)[:, :, y0:y1, x0:x1]


def _sliding_plan(job: BlockJob) -> WindowPlan:
    return plan_sliding(job.shape, job.settings.window, job.settings.window_overlap)


def _sliding_block(job: BlockJob, box: Box) -> np.ndarray:
    """Every window of the global plan touching ``box``, blended as :func:`predict_windows` does."""
    s, device = job.settings, _device(job)
    plan = _sliding_plan(job)
    model_fn = ModelWindows(cached_model(s.model_path, device), device, s.amp, "probs")
    batch_size = batch_for(int(np.prod(s.window)), s.batch_size, s.batch_pixels, device)
    source = _source(job)
    pads = [p for p, _ in plan.pad]
    lows = [a + p for (a, _), p in zip(box, pads)]  # the block in padded coordinates
    touch = [touching_starts(plan.starts[i], plan.window[i], pads[i], *box[i]) for i in range(3)]
    blend = plan.num_windows > 1
    weight = plan.window_weight()
    w0, n0 = plan.window[0], plan.shape[0]
    boxes = list(itertools.product(*plan.starts[1:]))  # predict_windows' job order (one input)
    batches = [boxes[b : b + batch_size] for b in range(0, len(boxes), batch_size)]
    work = []  # (batch, indices of its windows touching the block): batches computed whole
    for batch in batches:
        wanted = [k for k, (sy, sx) in enumerate(batch) if sy in touch[1] and sx in touch[2]]
        if wanted:
            work.append((batch, wanted))
    used = [sorted({b[k - 1] for batch, _ in work for b in batch}) for k in (1, 2)]
    # The y/x range of every computed window, reflected at the volume's edges like np.pad
    lo_y, lo_x = used[0][0], used[1][0]
    take_y = reflect_indices(lo_y - pads[1], used[0][-1] + plan.window[1] - pads[1], plan.shape[1])
    take_x = reflect_indices(lo_x - pads[2], used[1][-1] + plan.window[2] - pads[2], plan.shape[2])
    acc: np.ndarray | None = None
    for s0 in touch[0]:
        rows = reflect_indices(s0 - pads[0], s0 - pads[0] + w0, n0)
        first = int(rows.min())
        slab = _take(np.asarray(source.read_unit(first, int(rows.max()) + 1), np.float32), 0, rows - first)
        slab = _take(_take(slab, 1, take_y), 2, take_x)  # (w0, y range, x range)
        for batch, wanted in work:
            windows = np.stack([slab[:, sy - lo_y : sy - lo_y + plan.window[1], sx - lo_x : sx - lo_x + plan.window[2]]
                                for sy, sx in batch])  # fmt: skip
            pred = np.asarray(model_fn(windows), dtype=np.float32)
            if acc is None:
                acc = np.zeros((pred.shape[1],) + tuple(b - a for a, b in box), np.float32)
            if blend:
                pred = pred * weight
            for k in wanted:
                starts = (s0,) + batch[k]
                into, part = [slice(None)], [slice(None)]
                for axis, (st, lo) in enumerate(zip(starts, lows)):
                    hi = lo + box[axis][1] - box[axis][0]
                    a, b = max(st, lo), min(st + plan.window[axis], hi)
                    into.append(slice(a - lo, b - lo))
                    part.append(slice(a - st, b - st))
                if blend:
                    acc[tuple(into)] += pred[k][tuple(part)]
                else:
                    acc[tuple(into)] = pred[k][tuple(part)]
    assert acc is not None  # every block is touched by a window
    if not blend:
        return acc
    norms = [plan.norm[i][lows[i] : lows[i] + box[i][1] - box[i][0]] for i in range(3)]
    return acc / outer([norms[0], outer(norms[1:])])


def _scratch(job: BlockJob, name: str) -> str:
    return str(Path(job.scratch) / name)


def copy_input_block(job: BlockJob, z0: int, z1: int) -> dict:
    """Orthoplane phase 1 (a task): the input as the model sees it, uint8, into the scratch copy."""
    tune_malloc()
    start = time.perf_counter()
    _open(_scratch(job, "input"))[z0:z1] = encode_probs(_source(job).read_unit(z0, z1), np.uint8)
    return {"voxels": (z1 - z0) * job.shape[1] * job.shape[2], "seconds": time.perf_counter() - start}


def predict_plane_block(job: BlockJob, plane: str, a0: int, a1: int) -> dict:
    """Orthoplane phase 2 (a task): slices ``a0..a1`` of ``plane`` predicted into that plane's sums,
    ``chunk`` slices at a time from ``a0`` (``a0`` a multiple of ``chunk``, as single-process)."""
    tune_malloc()
    start = time.perf_counter()
    volume, out = zarr.open_array(_scratch(job, "input"), mode="r"), _open(_scratch(job, plane))
    predict = _slice_predictor(job)
    for a in range(a0, a1, job.settings.chunk):
        b = min(a1, a + job.settings.chunk)
        if plane == "xy":
            out[:, a:b] = predict(decode_uint8(volume[a:b])).transpose(1, 0, 2, 3)
        elif plane == "xz":
            slices = decode_uint8(np.asarray(volume[:, a:b, :]).transpose(1, 0, 2))  # (n, z, x)
            out[:, :, a:b, :] = predict(slices).transpose(1, 2, 0, 3)  # (C, z, n, x)
        else:
            slices = decode_uint8(np.asarray(volume[:, :, a:b]).transpose(2, 0, 1))  # (n, z, y)
            out[:, :, :, a:b] = predict(slices).transpose(1, 2, 3, 0)  # (C, z, y, n)
    voxels = (a1 - a0) * int(np.prod(job.shape)) // job.shape[PLANES.index(plane)]
    return {"voxels": voxels, "seconds": time.perf_counter() - start}


def _orthoplane_sum(job: BlockJob, box: Box) -> np.ndarray:
    """The three planes' probabilities of a z-slab, added and averaged in the single-process order."""
    (z0, z1), (y0, y1), (x0, x1) = box
    total = None
    for plane in PLANES:
        part = np.asarray(zarr.open_array(_scratch(job, plane), mode="r")[:, z0:z1, y0:y1, x0:x1])
        total = part if total is None else total + part
    return total / np.float32(3.0)


# ---------------------------------------------------------------- client


def check_output(output: str | os.PathLike) -> Path:
    """The output path of a blockwise prediction: a ``.zarr`` / ``.ome.zarr`` store, else an error naming it."""
    path = Path(output)
    if suffix_of(path) not in ZARR_SUFFIXES:
        raise ValueError(
            f"{output}: prediction on a Dask cluster (--scheduler) writes a .zarr or .ome.zarr output "
            f"(chunks written in parallel), not '{suffix_of(path) or path.name}'"
        )
    return path


def absolute_spec(spec: str) -> str:
    """An input spec with its path made absolute (workers may run elsewhere; ``::KEY`` and URLs kept)."""
    path, sep, key = str(spec).partition("::")
    if "://" in path:
        return str(spec)
    return os.path.abspath(path) + sep + key


def _run_phase(client, submits: list[tuple], retries: int, bar, name: str) -> list[dict]:
    """Submit ``(function, *args)`` tasks, wait for all (updating ``bar``), cancel the rest on a failure."""
    token = uuid.uuid4().hex[:8]
    futures = [
        client.submit(fn, *args, key=f"predict-{name}-{i}-{token}", retries=retries, pure=False)
        for i, (fn, *args) in enumerate(submits)
    ]
    results = []
    try:
        for future in distributed.as_completed(futures):
            results.append(future.result())
            bar.update(1)
    except BaseException:
        client.cancel(futures)
        raise
    return results


def predict_blockwise(
    client,
    settings: PredictSettings,
    output: str | os.PathLike,
    classes: list[str],
    pyramid_levels: int | None = 1,
    with_input: bool = False,
    retries: int = 2,
    progress: bool = True,
) -> list[Path]:
    """Predict ``settings.input_spec`` into the zarr ``output`` block by block on ``client``'s workers.

    Args:
        client: a ``distributed.Client`` (see :func:`cemcurate.common.dask_cluster.dask_client`);
            its workers must read ``settings.model_path``, the input and ``output``'s folder.
        settings: what to predict and how (``mode`` resolved).
        output: a ``.zarr`` / ``.ome.zarr`` path (multi-class probabilities: one store per class,
            as single-process).
        classes: the model's class names.
        pyramid_levels: OME-Zarr levels (``None``: automatic).
        with_input: write the input as the store's root image (workers write its blocks).
        retries: times a task is re-run after its worker died or it failed.
        progress: a tqdm bar over tasks on the client.

    Returns:
        The stores written (published atomically once every block is done).
    """
    out_path = check_output(output)
    if settings.mode not in BLOCK_MODES:
        raise ValueError(f"blockwise prediction supports modes {', '.join(BLOCK_MODES)}, got {settings.mode!r}")
    settings = dataclasses.replace(
        settings,
        model_path=os.path.abspath(settings.model_path),
        input_spec=absolute_spec(settings.input_spec),
        window=tuple(int(w) for w in settings.window),
        window_overlap=tuple(int(w) for w in settings.window_overlap),
    )
    source = open_input(settings.input_spec)
    shape = tuple(int(s) for s in source.shape)
    if settings.mode == "orthoplane" and min(shape) < 2:
        raise ValueError(
            f"{settings.input_spec}: orthoplane prediction needs a 3D volume, got shape {shape}; use --mode stack"
        )
    channels = 1 if len(classes) == 2 else len(classes)
    writer = PredictionWriter(
        out_path,
        shape,
        classes,
        settings.output_type,
        settings.prob_dtype,
        settings.threshold,
        source.voxel_size,
        pyramid_levels=pyramid_levels,
        input_image=source.read_uint8 if with_input else None,
    )
    scratch = None
    try:
        job = BlockJob(
            settings,
            source.window,
            shape,
            channels,
            tuple(str(array_path(out.array)) for out in writer.outputs),
            str(array_path(writer.input_array)) if writer.input_array is not None else "",
        )
        chunks = tuple(writer.outputs[0].array.chunks)
        window = _sliding_plan(job).window if settings.mode == "sliding" else (1, 1, 1)
        blocks = plan_blocks(shape, chunks, settings.mode, settings.chunk, window, settings.block_windows)
        phases: list[tuple[str, list[tuple]]] = []
        if settings.mode == "orthoplane":
            scratch = out_path.with_name(f".{out_path.name}.{uuid.uuid4().hex[:8]}.orthoplane")
            job = dataclasses.replace(job, scratch=str(scratch))
            phases += _orthoplane_phases(job)
        phases.append((settings.mode, [(predict_block, job, box) for box in blocks]))
        total = sum(len(tasks) for _, tasks in phases)
        with tqdm(total=total, desc=f"predict {settings.mode} on dask", unit="task", disable=not progress) as bar:
            for name, tasks in phases:
                _run_phase(client, tasks, retries, bar, name)
        if writer.store is not None:  # the workers wrote the input image too: publish without rewriting it
            paths = [writer.store.finalize()]
        else:
            paths = writer.finalize()
    except BaseException:
        writer.discard()
        raise
    finally:
        if scratch is not None:
            remove_path(scratch)
    if progress:
        print(f"predicted {len(blocks)} blocks of {shape} on dask", file=sys.stderr)
    return paths


def _orthoplane_phases(job: BlockJob) -> list[tuple[str, list[tuple]]]:
    """Create orthoplane's scratch arrays (input copy, one float32 sum per plane) and plan its first phases."""
    z, y, x = job.shape
    root = zarr.open_group(job.scratch, mode="w", zarr_format=2)
    copy_depth = 16
    side = [min(n, SCRATCH_CHUNK) for n in job.shape]
    root.create_array("input", shape=job.shape, chunks=(min(z, copy_depth), side[1], side[2]), dtype=np.uint8)
    depth = _orthoplane_depth(job.settings.chunk)
    passes = []
    for axis, plane in enumerate(PLANES):
        chunks = list(side)
        chunks[axis] = min(job.shape[axis], depth)
        root.create_array(
            plane, shape=(job.channels,) + job.shape, chunks=(job.channels, *chunks), dtype=np.float32, fill_value=0
        )
        passes += [(predict_plane_block, job, plane, a, b) for a, b in _spans(job.shape[axis], depth)]
    return [("copy", [(copy_input_block, job, a, b) for a, b in _spans(z, copy_depth)]), ("planes", passes)]

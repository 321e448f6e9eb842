"""Every collective and every process-launch detail of pre-training lives here.

The functions work on the default process group when one is initialised and degrade to the
single-process identity otherwise, so the model code calls them unconditionally and never
touches ``torch.distributed`` (or a device) itself.

Three ways to run:

* one process (``--gpus 0`` or ``--gpus 1``): :func:`launch` calls the function directly;
* ``--gpus N`` / ``--nproc N``: :func:`launch` starts N processes with ``torch.multiprocessing``
  (NCCL on GPUs, gloo on the CPU) on a free local port;
* ``torchrun``: :func:`torchrun_context` joins the group torchrun describes in the environment
  (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``).
"""

from __future__ import annotations

import os
import pickle
import socket
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


@dataclass(frozen=True)
class DistContext:
    """Where this process sits: its rank among ``world_size`` processes and its device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        """True on the process that writes checkpoints and logs (rank 0)."""
        return self.rank == 0


class GpuRequestError(ValueError):
    """More GPUs were requested than this machine offers."""


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


# --- collectives ---------------------------------------------------------------------------


@torch.no_grad()
def all_gather_cat(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` (``(n, ...)``, same shape on every rank) from all ranks in rank order.

    Returns ``(world_size * n, ...)``; no gradient flows through it.
    """
    if not is_distributed():
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


def permutation(n: int, seed: int, device: torch.device) -> torch.Tensor:
    """A permutation of ``range(n)`` (int64 on ``device``) that depends only on ``seed``."""
    # Every rank derives the same permutation from the same seed, so nothing is broadcast.
    generator = torch.Generator().manual_seed(int(seed))
    return torch.randperm(n, generator=generator).to(device)


@torch.no_grad()
def shuffle_batch(x: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Shuffle a batch across ranks (MoCo's shuffle-BN).

    Args:
        x: this rank's ``(n, ...)`` batch; ``n`` equal on all ranks.
        seed: the same integer on every rank (e.g. derived from the step).

    Returns:
        ``(mine, perm)``: this rank's ``n`` samples of the globally shuffled batch, and the
        permutation of the ``world_size * n`` samples, for :func:`unshuffle_batch`.
    """
    gathered = all_gather_cat(x)
    perm = permutation(len(gathered), seed, x.device)
    r, n = rank(), len(x)
    return gathered[perm[r * n : (r + 1) * n]], perm


@torch.no_grad()
def unshuffle_batch(y: torch.Tensor, perm: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Undo :func:`shuffle_batch` on outputs ``y`` (``(n, ...)`` per rank).

    Returns ``(mine, everything)``: the outputs of this rank's original samples, in their
    original order, and the outputs of all ranks' samples in rank order (``(world * n, ...)``),
    which MoCo enqueues without a second gather.
    """
    gathered = all_gather_cat(y)
    restored = torch.empty_like(gathered)
    restored[perm] = gathered
    r, n = rank(), len(y)
    return restored[r * n : (r + 1) * n], restored


@torch.no_grad()
def all_reduce_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean of ``x`` over ranks (a new tensor; ``x`` is left alone)."""
    if not is_distributed():
        return x.clone()
    out = x.clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out / dist.get_world_size()


def all_gather_object(obj: Any) -> list[Any]:
    """Picklable ``obj`` from every rank, as a list indexed by rank."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """``obj`` as held by rank ``src``, on every rank."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def shutdown() -> None:
    """Leave the process group (if any), e.g. at the end of a torchrun process."""
    if is_distributed():
        dist.destroy_process_group()


# --- launching -----------------------------------------------------------------------------


def available_gpus() -> int:
    """Number of CUDA devices this process can use (0 without CUDA)."""
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def check_gpus(requested: int) -> None:
    """Raise :class:`GpuRequestError` naming what is visible if ``requested`` GPUs are not."""
    have = available_gpus()
    if requested > have:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        detail = f"CUDA_VISIBLE_DEVICES={visible!r}" if visible is not None else "CUDA_VISIBLE_DEVICES is not set"
        raise GpuRequestError(
            f"--gpus {requested}: this machine offers {have} CUDA device(s) "
            f"(torch.cuda.is_available() = {torch.cuda.is_available()}, {detail}); "
            f"use --gpus {have} or fewer, or --gpus 0 to train on the CPU"
        )


def under_torchrun() -> bool:
    """True when torchrun (or another launcher using its variables) started this process."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def torchrun_context(use_cuda: bool) -> DistContext:
    """Join the process group described by torchrun's environment (NCCL if ``use_cuda``, else gloo)."""
    world, rnk = int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"])
    local = int(os.environ.get("LOCAL_RANK", rnk))
    if use_cuda:
        check_gpus(local + 1)
    device = _device(use_cuda, local)
    if world > 1 and not is_distributed():
        dist.init_process_group(
            "nccl" if use_cuda else "gloo",
            init_method="env://",
            rank=rnk,
            world_size=world,
            device_id=device if use_cuda else None,
        )
    return DistContext(rank=rnk, world_size=world, local_rank=local, device=device)


def _device(use_cuda: bool, local_rank: int) -> torch.device:
    if use_cuda:
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def free_port() -> int:
    """A TCP port on localhost that was free a moment ago (for the rendezvous)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(
    local_rank: int, world: int, port: int, use_cuda: bool, fn: Callable[..., Any], args: Sequence[Any], result_dir: str
) -> None:
    """Body of one spawned process: join the group, run ``fn``, hand its result back via a file."""
    out = Path(result_dir) / f"rank{local_rank}.pkl"
    try:
        device = _device(use_cuda, local_rank)
        if not use_cuda:
            # Processes share the cores; more threads than cores per process only thrash.
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
        # device_id binds NCCL's communicator to this process's GPU up front (no guessing later).
        dist.init_process_group(
            "nccl" if use_cuda else "gloo",
            init_method=f"tcp://127.0.0.1:{port}",
            rank=local_rank,
            world_size=world,
            device_id=device if use_cuda else None,
        )
        ctx = DistContext(rank=local_rank, world_size=world, local_rank=local_rank, device=device)
        result = fn(ctx, *args)
        out.write_bytes(pickle.dumps(("ok", result)))
    except BaseException as exc:
        # Hand the exception itself to the parent so it can re-raise the original error type
        # (e.g. a clean CheckpointError) instead of a wall of child tracebacks.
        try:
            out.write_bytes(pickle.dumps(("error", exc)))
        except Exception:
            pass
        raise
    finally:
        if is_distributed():
            dist.destroy_process_group()


@dataclass(frozen=True)
class ProcessPlan:
    """How ``pretrain moco`` runs outside torchrun: ``nprocs`` processes on ``kind`` (cpu, cuda, mps)."""

    nprocs: int
    kind: str


DEVICE_CHOICES = ("auto", "cpu", "cuda", "mps")


def plan_processes(device: str, gpus: int | None, nproc: int | None, cuda_devices: int, mps: bool) -> ProcessPlan:
    """Resolve ``--device``, ``--gpus`` and ``--nproc`` into processes and a device kind.

    ``auto``: every visible GPU (or ``gpus`` of them), else Apple MPS (one process) when
    ``mps`` and no CPU setting was given, else ``nproc`` CPU processes. ``cpu`` is ``--gpus 0``;
    ``cuda`` needs a GPU; ``mps`` runs one process (DDP has no MPS backend) and, where MPS is
    missing, the CPU (the caller warns).

    Raises:
        ValueError: settings that contradict each other, or ``cuda`` without a GPU.
    """
    if device not in DEVICE_CHOICES:
        raise ValueError(f"--device must be one of {', '.join(DEVICE_CHOICES)}, got {device!r}")
    if device == "mps":
        if gpus or (nproc or 1) > 1:
            raise ValueError("--device mps runs one process (DDP has no MPS backend); drop --gpus/--nproc")
        return ProcessPlan(1, "mps" if mps else "cpu")
    if device == "cpu":
        if gpus:
            raise ValueError(f"--device cpu contradicts --gpus {gpus}")
        gpus = 0
    wanted = cuda_devices if gpus is None else gpus
    if device == "cuda" and wanted == 0:
        raise ValueError("--device cuda contradicts --gpus 0" if gpus == 0 else "--device cuda: torch sees no CUDA GPU")
    if wanted > 0:
        if nproc is not None:
            raise ValueError("--nproc is for CPU runs (--gpus 0); with GPUs, one process runs per GPU")
        return ProcessPlan(wanted, "cuda")
    if device == "auto" and gpus is None and nproc is None and mps:
        return ProcessPlan(1, "mps")
    return ProcessPlan(nproc or 1, "cpu")


def launch(
    fn: Callable[..., Any],
    nprocs: int,
    args: Sequence[Any] = (),
    use_cuda: bool = False,
    device: torch.device | None = None,
) -> list[Any]:
    """Run ``fn(ctx, *args)`` on ``nprocs`` processes and return each rank's result.

    ``nprocs == 1`` runs in this process (on ``device`` if given, else ``cuda:0`` if
    ``use_cuda``, else the CPU). Otherwise the processes are spawned and joined; if one fails,
    the others are stopped and the first failing rank's exception is re-raised here.
    """
    if nprocs < 1:
        raise ValueError(f"need at least one process, got {nprocs}")
    if device is not None and nprocs != 1:
        raise ValueError(f"a device ({device}) is given for one process, not {nprocs}")
    if use_cuda:
        check_gpus(nprocs)
    if nprocs == 1:
        return [fn(DistContext(device=device if device is not None else _device(use_cuda, 0)), *args)]
    with tempfile.TemporaryDirectory(prefix="pretrain-launch-") as result_dir:
        try:
            mp.spawn(
                _entry, args=(nprocs, free_port(), use_cuda, fn, tuple(args), result_dir), nprocs=nprocs, join=True
            )
        except mp.ProcessRaisedException as spawn_error:
            for r in range(nprocs):
                path = Path(result_dir) / f"rank{r}.pkl"
                if path.exists():
                    status, payload = pickle.loads(path.read_bytes())
                    if status == "error" and isinstance(payload, Exception):
                        raise payload from spawn_error
            raise
        results = []
        for r in range(nprocs):
            status, payload = pickle.loads((Path(result_dir) / f"rank{r}.pkl").read_bytes())
            results.append(payload)
        return results

"""Batches of augmented view pairs from a curated patch store, split across processes.

The data order is a pure function of ``(seed, epoch)``: each epoch is one permutation of the
store, cut into global batches of ``batch_size`` (the remainder is dropped, as in MoCo); rank
``r`` of ``W`` takes the ``r``-th ``batch_size / W`` slice of every global batch, so over an
epoch the ranks see disjoint shares of the store (what ``DistributedSampler`` does). The views
of the image at position ``i`` of epoch ``e`` depend only on ``(seed, e, i)``. Hence a run can
resume at any step without saving sampler state, and the images of a global step are the same
whatever the number of processes or data-loading workers.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.context
from pathlib import Path

import cv2
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from cemcurate.store import PatchStore, StoreError, open_patches
from pretrain.augment import AugmentParams, two_views


def open_store(data_dir: str | Path, global_batch: int) -> PatchStore:
    """Open the curated patches in ``data_dir`` and check they fill at least one global batch.

    Raises :class:`cemcurate.store.StoreError` naming the folder and the fix.
    """
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise StoreError(f"{data_dir}: no such folder; pass the output folder of `cemcurate build` as --data")
    store = open_patches(data_dir)
    if len(store) == 0:
        raise StoreError(
            f"{data_dir}: the store holds no kept patches; check the curation report "
            "(every patch was dropped as a duplicate or uninformative)"
        )
    if len(store) < global_batch:
        raise StoreError(
            f"{data_dir}: {len(store)} patches cannot fill one batch of {global_batch}; "
            "lower --batch-size (and --queue-size to a multiple of it) or curate more data"
        )
    if not 0.0 < store.std:
        raise StoreError(f"{data_dir}/store.json: intensity std is {store.std}; cannot normalise")
    return store


def data_summary(store: PatchStore, data_dir: str | Path) -> dict:
    """What the model was trained on, for checkpoints and the model card (plain, picklable types)."""
    sources = store.manifest["source"].value_counts().sort_index()
    return {
        "path": str(Path(data_dir).resolve()),
        "n_patches": len(store),
        "patch_size": store.patch_size,
        "mean": store.mean,
        "std": store.std,
        "sources": {str(k): int(v) for k, v in sources.items()},
    }


def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    """The order in which epoch ``epoch`` visits ``n`` patches: int64 ``(n,)`` permutation."""
    return np.random.default_rng([seed, epoch, 0x5EED]).permutation(n)


def steps_per_epoch(n: int, global_batch: int) -> int:
    """Full global batches per epoch (the remainder of ``n`` is skipped, as MoCo's drop_last)."""
    return n // global_batch


class ViewPairs(Dataset):
    """Item ``(epoch, step)`` = this rank's share of global batch ``step`` of ``epoch``, as two views.

    Returns ``(query, key)``, each float32 ``(batch_size / world_size, 1, S, S)``, normalised
    with the store's mean and std. The store is opened lazily in whichever process reads it, so
    the dataset pickles cheaply to data-loading workers.
    """

    def __init__(
        self, data_dir: str | Path, seed: int, global_batch: int, rank: int, world_size: int, params: AugmentParams
    ):
        if global_batch % world_size:
            raise ValueError(f"global batch {global_batch} is not divisible by {world_size} processes")
        self.data_dir, self.seed = Path(data_dir), seed
        self.global_batch, self.rank, self.local_batch = global_batch, rank, global_batch // world_size
        self.params = params
        self._store: PatchStore | None = None
        self._order: tuple[int, np.ndarray] | None = None  # (epoch, its order), the last one used

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_store"] = state["_order"] = None  # memory maps would be copied into the pickle
        return state

    @property
    def store(self) -> PatchStore:
        if self._store is None:
            self._store = open_patches(self.data_dir)
        return self._store

    def steps_per_epoch(self) -> int:
        return steps_per_epoch(len(self.store), self.global_batch)

    def order(self, epoch: int) -> np.ndarray:
        if self._order is None or self._order[0] != epoch:
            self._order = (epoch, epoch_order(len(self.store), self.seed, epoch))
        return self._order[1]

    def positions(self, step: int) -> np.ndarray:
        """Positions in the epoch order of this rank's samples at ``step`` (int64 ``(local_batch,)``)."""
        start = step * self.global_batch + self.rank * self.local_batch
        return np.arange(start, start + self.local_batch, dtype=np.int64)

    def __getitem__(self, item: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        epoch, step = item
        if not 0 <= step < self.steps_per_epoch():
            raise IndexError(f"step {step} is outside the {self.steps_per_epoch()} steps of an epoch")
        positions = self.positions(step)
        images = self.store[self.order(epoch)[positions]]
        seeds = np.stack([np.full_like(positions, self.seed), np.full_like(positions, epoch), positions], axis=1)
        query, key = two_views(images, seeds, self.params, self.store.mean, self.store.std)
        return torch.from_numpy(query), torch.from_numpy(key)


class StepSampler:
    """Yields ``(epoch, step_in_epoch)`` for global steps ``start .. stop-1``."""

    def __init__(self, start: int, stop: int, steps_in_epoch: int):
        self.start, self.stop, self.steps_in_epoch = start, stop, steps_in_epoch

    def __len__(self) -> int:
        return max(0, self.stop - self.start)

    def __iter__(self):
        return (divmod(s, self.steps_in_epoch) for s in range(self.start, self.stop))


def view_loader(dataset: ViewPairs, start: int, stop: int, workers: int, pin_memory: bool) -> DataLoader:
    """Batches for global steps ``start .. stop-1`` (across epochs), prepared by ``workers`` processes.

    One loader serves the whole run, so workers start once. They are not forked from this
    process: a fork inherits OpenCV's thread pool without its threads, and the first parallel
    OpenCV call in the child then waits forever (seen when the parent had augmented images
    itself). They fork from a fresh fork server instead, which has imported this module (and
    torch) once, so starting workers stays cheap.
    """
    # A private generator seeds the workers, so creating the loader (on resume) does not draw
    # from the global torch RNG and shift its stream (augmentations never use worker seeds).
    generator = torch.Generator().manual_seed(dataset.seed)
    return DataLoader(
        dataset,
        batch_size=None,
        sampler=StepSampler(start, stop, dataset.steps_per_epoch()),
        num_workers=workers,
        pin_memory=pin_memory,
        generator=generator,
        worker_init_fn=_single_threaded_worker,
        multiprocessing_context=_worker_context() if workers else None,
        prefetch_factor=2 if workers else None,
        persistent_workers=False,
    )


def _worker_context() -> multiprocessing.context.BaseContext:
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload([__name__])
    return ctx


def _single_threaded_worker(worker_id: int) -> None:
    # Parallelism comes from the workers themselves; OpenCV's own thread pool in each of them
    # would only oversubscribe the cores.
    cv2.setNumThreads(1)

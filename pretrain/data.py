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

from pathlib import Path

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
        raise StoreError(f"{data_dir}: the store holds no kept patches; check the curation report "
                         "(every patch was dropped as a duplicate or uninformative)")
    if len(store) < global_batch:
        raise StoreError(f"{data_dir}: {len(store)} patches cannot fill one batch of {global_batch}; "
                         "lower --batch-size (and --queue-size to a multiple of it) or curate more data")
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
    """Item ``step`` = this rank's share of global batch ``step`` of one epoch, as two views.

    Returns ``(query, key)``, each float32 ``(batch_size / world_size, 1, S, S)``, normalised
    with the store's mean and std. The store is opened lazily in whichever process reads it, so
    the dataset pickles cheaply to data-loading workers.
    """

    def __init__(self, data_dir: str | Path, epoch: int, seed: int, global_batch: int, rank: int, world_size: int,
                 params: AugmentParams):
        if global_batch % world_size:
            raise ValueError(f"global batch {global_batch} is not divisible by {world_size} processes")
        self.data_dir, self.epoch, self.seed = Path(data_dir), epoch, seed
        self.global_batch, self.rank, self.local_batch = global_batch, rank, global_batch // world_size
        self.params = params
        self._store: PatchStore | None = None
        self._order: np.ndarray | None = None

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_store"] = state["_order"] = None  # memory maps would be copied into the pickle
        return state

    def _ensure_open(self) -> tuple[PatchStore, np.ndarray]:
        if self._store is None or self._order is None:
            self._store = open_patches(self.data_dir)
            self._order = epoch_order(len(self._store), self.seed, self.epoch)
        return self._store, self._order

    def __len__(self) -> int:
        store, _ = self._ensure_open()
        return steps_per_epoch(len(store), self.global_batch)

    def positions(self, step: int) -> np.ndarray:
        """Positions in the epoch order of this rank's samples at ``step`` (int64 ``(local_batch,)``)."""
        start = step * self.global_batch + self.rank * self.local_batch
        return np.arange(start, start + self.local_batch, dtype=np.int64)

    def __getitem__(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        store, order = self._ensure_open()
        positions = self.positions(step)
        images = store[order[positions]]
        seeds = np.stack([np.full_like(positions, self.seed), np.full_like(positions, self.epoch), positions], axis=1)
        query, key = two_views(images, seeds, self.params, store.mean, store.std)
        return torch.from_numpy(query), torch.from_numpy(key)


def view_loader(dataset: ViewPairs, start: int, stop: int, workers: int, pin_memory: bool) -> DataLoader:
    """Iterate ``dataset`` items ``start .. stop-1`` in order, prepared by ``workers`` processes."""
    # A private generator seeds the workers, so creating a loader mid-epoch (on resume) does not
    # draw from the global torch RNG and shift its stream (augmentations never use worker seeds).
    generator = torch.Generator().manual_seed(dataset.seed + dataset.epoch)
    return DataLoader(dataset, batch_size=None, sampler=range(start, stop), num_workers=workers,
                      pin_memory=pin_memory, generator=generator,
                      prefetch_factor=2 if workers else None, persistent_workers=False)

"""The filter stage: informative probability of every stored patch, cached per shard.

Scores, and what decided each (the manifest's ``decided_by``), are cached per shard and
filter identity (``PatchFilter.name``) under ``OUT/parts/filter/``, so a re-run scores only
new shards, and changing ``--filter`` rescores without re-reading any source.

A built-in filter (``stats``, ``none``: plain numpy/Pillow code) scores each shard in the
worker that has just written it (:func:`score_new_shard`), while its patches are in the page
cache and beside the other sources' work, so the filter stage only has to read the scores
back. What is left (shards of an earlier run under another filter) is scored here: a
fork-safe filter in ranges of patches on a pool of forked processes, one per worker the
build may use; a classifier in the calling process (with its own threads, or on the GPU).
"""

from __future__ import annotations

import concurrent.futures as cf
import multiprocessing
import os
import signal
import uuid
from functools import lru_cache
from pathlib import Path
from typing import Iterator

import numpy as np
import pandas as pd
from tqdm import tqdm

from cemcurate.build.config import BuildConfig
from cemcurate.build.timing import timed
from cemcurate.common.atomic import atomic_path
from cemcurate.common.lazy import lazy_import
from cemcurate.filtering.filters import BUILTIN_FILTERS, DECIDED_BY, PatchFilter, make_filter
from cemcurate.layout import BuildLayout
from cemcurate.store import open_shard

distributed = lazy_import("distributed")

# Patches per task of the pool (25 MB of 224-px patches read from the page cache).
RANGE_PATCHES = 512
# Fewer patches than this are scored in the calling process: starting the pool costs more.
MIN_PARALLEL_PATCHES = 1024


def _score_range(patch_filter: PatchFilter, path: Path, patch_size: int, start: int, stop: int, batch: int):
    """Scores (float32 ``(stop - start,)``) and deciders (uint8, :meth:`PatchFilter.decide`) of
    patches ``start:stop`` of the shard at ``path``, ``batch`` at a time (which also bounds the
    filters' per-batch float temporaries)."""
    patches = open_shard(path, patch_size)
    scores = np.empty(stop - start, np.float32)
    deciders = np.empty(stop - start, np.uint8)
    for first in range(start, stop, batch):
        last = min(first + batch, stop)
        scores[first - start : last - start], deciders[first - start : last - start] = patch_filter.decide(
            np.asarray(patches[first:last])
        )
    return scores, deciders


@lru_cache(maxsize=4)
def _child_filter(spec: str, batch_size: int, device: str = "auto") -> PatchFilter:
    return make_filter(spec, batch_size=batch_size, device=device)


def _save_scores(layout: BuildLayout, filter_name: str, shard: str, scores: np.ndarray, deciders: np.ndarray) -> None:
    # Each file is written atomically; a shard counts as scored only when both exist (:func:`_scored`).
    scores_path, deciders_path = layout.filter_scores(filter_name, shard), layout.filter_deciders(filter_name, shard)
    for path, values in ((deciders_path, deciders), (scores_path, scores)):
        with timed("write"), atomic_path(path) as tmp:
            with open(tmp, "wb") as f:
                np.save(f, values)


def _scored(layout: BuildLayout, filter_name: str, shard: str) -> bool:
    """Whether the shard's scores and deciders are cached (caches of older builds hold no deciders)."""
    return layout.filter_scores(filter_name, shard).is_file() and layout.filter_deciders(filter_name, shard).is_file()


def score_new_shard(layout: BuildLayout, cfg: BuildConfig, shard: str) -> None:
    """Score the shard a source worker has just written and cache the scores, when the
    build's filter is a built-in one; a classifier file waits for the filter stage (it would
    load its weights in every worker)."""
    if str(cfg.filter).strip() not in BUILTIN_FILTERS:
        return
    patch_filter = _child_filter(cfg.filter, cfg.filter_batch_size, cfg.filter_device)
    path = layout.shard(shard)
    with timed("filter"):
        scores, deciders = _score_range(
            patch_filter, path, cfg.patch_size, 0, path.stat().st_size // cfg.patch_size**2, cfg.filter_batch_size
        )
    layout.filter_cache(patch_filter.name).mkdir(parents=True, exist_ok=True)
    _save_scores(layout, patch_filter.name, shard, scores, deciders)


def _score_range_in_child(
    spec: str, batch_size: int, path: Path, patch_size: int, start: int, stop: int, device: str = "auto"
):
    return _score_range(_child_filter(spec, batch_size, device), path, patch_size, start, stop, batch_size)


def _leave_interrupt_to_parent() -> None:
    # Ctrl-C is the build's to handle. A child writes nothing into OUT (the parent saves the
    # scores) and exits when the parent's end of the pool's pipe closes.
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _ranges(sizes: dict[str, int]) -> list[tuple[str, int, int]]:
    """``(shard, start, stop)`` ranges of at most :data:`RANGE_PATCHES` patches of every shard (name -> count)."""
    return [(s, a, min(a + RANGE_PATCHES, n)) for s, n in sizes.items() for a in range(0, n, RANGE_PATCHES)]


class _ShardScores:
    """Scores of shards arriving a range at a time, in any order; :meth:`add` returns
    ``(shard, scores, deciders)`` once a shard's last range is in."""

    def __init__(self, sizes: dict[str, int], bar: tqdm):
        self.scores = {shard: np.empty(n, np.float32) for shard, n in sizes.items()}
        self.deciders = {shard: np.empty(n, np.uint8) for shard, n in sizes.items()}
        self.left = {shard: len(range(0, n, RANGE_PATCHES)) for shard, n in sizes.items()}
        self.bar = bar

    def add(self, shard: str, start: int, stop: int, result: tuple[np.ndarray, np.ndarray]):
        self.scores[shard][start:stop], self.deciders[shard][start:stop] = result
        self.bar.update(stop - start)
        self.left[shard] -= 1
        return (shard, self.scores.pop(shard), self.deciders.pop(shard)) if not self.left[shard] else None


def _score_shards(
    layout: BuildLayout, cfg: BuildConfig, patch_filter: PatchFilter, sizes: dict[str, int], bar: tqdm
) -> Iterator[tuple[str, np.ndarray, np.ndarray]]:
    """``(shard, scores, deciders)`` of all the patches of each shard in ``sizes`` (name ->
    patch count), as soon as it is scored (so an interrupted run keeps the shards it finished)."""
    tasks = _ranges(sizes)
    finished = _ShardScores(sizes, bar).add
    workers = min(cfg.workers or os.cpu_count() or 1, len(tasks))
    parallel = (
        patch_filter.fork_safe
        and workers > 1
        and sum(sizes.values()) >= MIN_PARALLEL_PATCHES
        and "fork" in multiprocessing.get_all_start_methods()
    )

    if not parallel:
        for shard, start, stop in tasks:
            with timed("filter"):
                result = _score_range(
                    patch_filter, layout.shard(shard), cfg.patch_size, start, stop, cfg.filter_batch_size
                )
            done = finished(shard, start, stop, result)
            if done:
                yield done
        return
    context = multiprocessing.get_context("fork")
    with cf.ProcessPoolExecutor(workers, context, _leave_interrupt_to_parent) as pool:
        futures = {
            pool.submit(
                _score_range_in_child,
                cfg.filter,
                cfg.filter_batch_size,
                layout.shard(s),
                cfg.patch_size,
                a,
                b,
                cfg.filter_device,
            ): (s, a, b)
            for s, a, b in tasks
        }
        pending = cf.as_completed(futures)
        while True:
            with timed("filter"):  # waiting for the pool; not around the yield
                future = next(pending, None)
            if future is None:
                break
            done = finished(*futures[future], future.result())
            if done:
                yield done


def gpu_workers(client) -> list[str]:
    """Addresses of the workers that declare a ``GPU`` resource (``dask worker --resources GPU=1``)."""
    return [a for a, w in client.scheduler_info()["workers"].items() if w.get("resources", {}).get("GPU", 0) > 0]


def _score_on_dask(
    client, layout: BuildLayout, cfg: BuildConfig, patch_filter: PatchFilter, sizes: dict[str, int], bar: tqdm
) -> Iterator[tuple[str, np.ndarray, np.ndarray]]:
    """As :func:`_score_shards`, with every range of patches a task on the cluster: a classifier
    runs on the workers that declare a ``GPU`` resource when there are any (one range per GPU at
    a time), and loads its weights once per worker process (:func:`_child_filter`)."""
    finished = _ShardScores(sizes, bar).add
    resources = {"GPU": 1} if not patch_filter.fork_safe and gpu_workers(client) else None
    token = uuid.uuid4().hex[:8]
    futures = {
        client.submit(
            _score_range_in_child,
            cfg.filter,
            cfg.filter_batch_size,
            layout.shard(s).resolve(),
            cfg.patch_size,
            a,
            b,
            cfg.filter_device,
            key=f"cemcurate-filter-{token}-{s}-{a}",
            resources=resources,
            retries=2,
        ): (s, a, b)
        for s, a, b in _ranges(sizes)
    }
    try:
        for future in distributed.as_completed(futures):
            done = finished(*futures[future], future.result())
            if done:
                yield done
    except BaseException:
        client.cancel(list(futures))
        raise


def score_patches(
    layout: BuildLayout, manifest: pd.DataFrame, cfg: BuildConfig, progress: bool = True, client: object = None
) -> tuple[np.ndarray, np.ndarray]:
    """Every manifest row's informative probability (float32 ``(n,)`` in [0, 1]; NaN for patches
    not stored) and what decided it (object ``(n,)`` of :data:`DECIDED_BY` names; '' when not
    stored). With a Dask ``client`` what is left is scored on its workers (:func:`_score_on_dask`)."""
    patch_filter = make_filter(cfg.filter, batch_size=cfg.filter_batch_size, device=cfg.filter_device)
    layout.filter_cache(patch_filter.name).mkdir(parents=True, exist_ok=True)
    probs = np.full(len(manifest), np.nan, np.float32)
    codes = np.zeros(len(manifest), np.uint8)  # DECIDED_BY[0] == ''
    if not len(manifest):
        return probs, np.asarray(DECIDED_BY, object)[codes]
    stored = manifest["shard_row"].to_numpy() >= 0
    shards = manifest.loc[stored, "shard"].unique()
    todo = [s for s in shards if not _scored(layout, patch_filter.name, s)]
    sizes = {s: layout.shard(s).stat().st_size // (cfg.patch_size**2) for s in todo}
    bar = tqdm(total=sum(sizes.values()), desc=f"filter ({cfg.filter})", unit="patch", disable=not progress or not todo)
    scored = (
        _score_on_dask(client, layout, cfg, patch_filter, sizes, bar)
        if client is not None and sizes
        else _score_shards(layout, cfg, patch_filter, sizes, bar)
    )
    for shard, scores, deciders in scored:
        _save_scores(layout, patch_filter.name, shard, scores, deciders)
    bar.close()
    shard_col, row_col = manifest["shard"].to_numpy(), manifest["shard_row"].to_numpy()
    for shard in shards:
        sel = np.flatnonzero(stored & (shard_col == shard))
        probs[sel] = np.load(layout.filter_scores(patch_filter.name, shard))[row_col[sel]]
        codes[sel] = np.load(layout.filter_deciders(patch_filter.name, shard))[row_col[sel]]
    return probs, np.asarray(DECIDED_BY, object)[codes]

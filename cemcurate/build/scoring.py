"""The filter stage: informative probability of every stored patch, cached per shard.

Scores are cached per shard and filter identity (``PatchFilter.name``) under
``OUT/parts/filter/``, so a re-run scores only new shards, and changing ``--filter``
rescores without re-reading any source.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from tqdm import tqdm

from cemcurate.build.config import BuildConfig
from cemcurate.build.timing import timed
from cemcurate.common.atomic import atomic_path
from cemcurate.filtering.filters import make_filter
from cemcurate.layout import BuildLayout
from cemcurate.store import open_shard


def score_patches(layout: BuildLayout, manifest: pd.DataFrame, cfg: BuildConfig, progress: bool = True) -> np.ndarray:
    """Informative probability (float32 (n,), in [0, 1]) of every manifest row; NaN for patches not stored."""
    patch_filter = make_filter(cfg.filter, batch_size=cfg.filter_batch_size)
    layout.filter_cache(patch_filter.name).mkdir(parents=True, exist_ok=True)
    probs = np.full(len(manifest), np.nan, np.float32)
    if not len(manifest):
        return probs
    stored = manifest["shard_row"].to_numpy() >= 0
    shards = manifest.loc[stored, "shard"].unique()
    todo = [s for s in shards if not layout.filter_scores(patch_filter.name, s).is_file()]
    sizes = {s: layout.shard(s).stat().st_size // (cfg.patch_size**2) for s in todo}
    bar = tqdm(total=sum(sizes.values()), desc=f"filter ({cfg.filter})", unit="patch", disable=not progress or not todo)
    for shard in todo:
        patches = open_shard(layout.shard(shard), cfg.patch_size)
        scores = np.empty(len(patches), np.float32)
        step = cfg.filter_batch_size  # also bounds the filters' per-batch float temporaries
        for start in range(0, len(patches), step):
            with timed("filter"):
                scores[start : start + step] = patch_filter(np.asarray(patches[start : start + step]))
            bar.update(min(step, len(patches) - start))
        with timed("write"), atomic_path(layout.filter_scores(patch_filter.name, shard)) as tmp:
            with open(tmp, "wb") as f:
                np.save(f, scores)
    bar.close()
    shard_col, row_col = manifest["shard"].to_numpy(), manifest["shard_row"].to_numpy()
    for shard in shards:
        sel = np.flatnonzero(stored & (shard_col == shard))
        probs[sel] = np.load(layout.filter_scores(patch_filter.name, shard))[row_col[sel]]
    return probs

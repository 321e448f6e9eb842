"""The filter stage (cemcurate.build.scoring): the pool of forked processes scores what one process does."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import tifffile
from conftest import require
from test_filter_rules_reference import enlarged_plate_crops

import cemcurate.build.scoring as scoring
from cemcurate.build import BuildConfig
from cemcurate.filtering.filters import make_filter
from cemcurate.layout import BuildLayout
from cemcurate.store import ShardWriter


@pytest.fixture
def out_with_shards(tmp_path, data_root):
    """An OUT with two shards of real 224-px tiles (SEM plate: data bar and empty background
    included; VNC ssTEM) and a manifest whose rows point into them, one row not stored."""
    plate = tifffile.imread(require(data_root / "sem_plate_databar/plateImage2D.tif"))
    vnc = tifffile.imread(require(data_root / "drosophila_vnc_gerhard/stack1/raw/00.tif"))
    layout = BuildLayout(tmp_path / "out")
    layout.store_dir.mkdir(parents=True)
    rows = []
    for name, image in (("plate", plate), ("vnc", vnc)):
        tiles = [image[y : y + 224, x : x + 224] for y in range(0, 720, 56) for x in range(0, 800, 56)]
        if name == "plate":
            tiles += enlarged_plate_crops(plate)
        with ShardWriter(layout.shard(name), 224) as writer:
            writer.append(np.stack(tiles))
        rows += [{"shard": name, "shard_row": i} for i in range(len(tiles))]
    rows.append({"shard": "vnc", "shard_row": -1})  # a duplicate: not stored, no score
    return layout, pd.DataFrame(rows)


def test_the_pool_scores_as_one_process_does(out_with_shards, monkeypatch):
    layout, manifest = out_with_shards
    serial = scoring.score_patches(layout, manifest, BuildConfig(workers=1), progress=False)
    cache = layout.filter_cache(make_filter("stats").name)
    for path in cache.iterdir():
        path.unlink()
    monkeypatch.setattr(scoring, "RANGE_PATCHES", 50)  # several ranges per shard, in any order
    monkeypatch.setattr(scoring, "MIN_PARALLEL_PATCHES", 1)
    pooled = scoring.score_patches(layout, manifest, BuildConfig(workers=2), progress=False)
    assert np.array_equal(serial, pooled, equal_nan=True)
    assert np.isnan(pooled[-1]) and set(np.unique(pooled[:-1])) == {0.0, 1.0}  # both outcomes occur
    assert sorted(p.name for p in cache.iterdir()) == ["plate.npy", "vnc.npy"]


def test_a_classifier_is_never_forked():
    assert make_filter("stats").fork_safe and make_filter("none").fork_safe
    # Files (classifier, forest) keep the default: scored in the calling process.
    assert not scoring.PatchFilter("x", lambda p: np.ones(len(p), np.float32)).fork_safe

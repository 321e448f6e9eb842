"""The filter stage (cemcurate.build.scoring): the pool of forked processes scores what one
process does, and a build's source workers score the shards they write."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import tifffile
from conftest import require
from test_filter_rules_reference import enlarged_plate_crops

import cemcurate.build.scoring as scoring
from cemcurate.build import BuildConfig, build
from cemcurate.filtering.filters import make_filter
from cemcurate.layout import BuildLayout
from cemcurate.store import ShardWriter, open_shard


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
    serial, serial_deciders = scoring.score_patches(layout, manifest, BuildConfig(workers=1), progress=False)
    cache = layout.filter_cache(make_filter("stats").name)
    for path in cache.iterdir():
        path.unlink()
    monkeypatch.setattr(scoring, "RANGE_PATCHES", 50)  # several ranges per shard, in any order
    monkeypatch.setattr(scoring, "MIN_PARALLEL_PATCHES", 1)
    pooled, deciders = scoring.score_patches(layout, manifest, BuildConfig(workers=2), progress=False)
    assert np.array_equal(serial, pooled, equal_nan=True) and (serial_deciders == deciders).all()
    assert np.isnan(pooled[-1]) and (pooled[:-1] < 0.5).any() and (pooled[:-1] >= 0.5).any()  # both outcomes
    # The rule that fired, for every dropped patch; 'rules' for the kept; '' for the one not stored.
    assert deciders[-1] == "" and set(deciders[:-1][pooled[:-1] >= 0.5]) == {"rules"}
    assert set(deciders[:-1][pooled[:-1] < 0.5]) <= {"uniform", "overlay", "low-contrast"}
    assert {"uniform", "overlay"} <= set(deciders)
    names = ["plate.decided.npy", "plate.npy", "vnc.decided.npy", "vnc.npy"]
    assert sorted(p.name for p in cache.iterdir()) == names


def test_a_cache_without_deciders_is_scored_again(out_with_shards):
    """Score caches of builds before ``decided_by`` hold only the scores: those shards are redone."""
    layout, manifest = out_with_shards
    cfg = BuildConfig(workers=1)
    probs, deciders = scoring.score_patches(layout, manifest, cfg, progress=False)
    name = make_filter("stats").name
    layout.filter_deciders(name, "vnc").unlink()
    again, deciders_again = scoring.score_patches(layout, manifest, cfg, progress=False)
    assert layout.filter_deciders(name, "vnc").is_file()
    assert np.array_equal(probs, again, equal_nan=True) and (deciders == deciders_again).all()


def test_a_classifier_is_never_forked():
    assert make_filter("stats").fork_safe and make_filter("none").fork_safe
    # Files (classifier, forest) keep the default: scored in the calling process.
    assert not scoring.PatchFilter("x", lambda p: np.ones(len(p), np.float32)).fork_safe
    assert make_filter("none").decider == "none"


def test_a_build_scores_its_shards_where_they_are_written(tmp_path, data_root, monkeypatch):
    """The built-in filter's scores are cached by the source workers (two forked processes
    here), so the filter stage has nothing left to score; a re-run under another filter
    reuses the parts and scores their shards in the stage."""
    raw = tmp_path / "raw"
    raw.mkdir()
    for i in (0, 1):
        src = require(data_root / f"drosophila_vnc_gerhard/stack1/raw/{i:02d}.tif")
        (raw / src.name).symlink_to(src)
    (raw / "plate.tif").symlink_to(require(data_root / "sem_plate_databar/plateImage2D.tif"))
    staged = []
    real_score_shards = scoring._score_shards

    def recording(layout, cfg, patch_filter, sizes, bar):
        staged.append((patch_filter.name, dict(sizes)))
        return real_score_shards(layout, cfg, patch_filter, sizes, bar)

    monkeypatch.setattr(scoring, "_score_shards", recording)
    out = tmp_path / "out"
    build(raw, out, BuildConfig(workers=2), progress=False)
    stats = make_filter("stats")
    layout = BuildLayout(out)
    shards = sorted(p.stem for p in layout.shards())
    assert len(shards) == 3 and staged == [(stats.name, {})]
    manifest = pd.read_parquet(layout.manifest)
    for shard in shards:
        cached = np.load(layout.filter_scores(stats.name, shard))
        assert np.array_equal(cached, stats(np.asarray(open_shard(layout.shard(shard), 224))))
        rows = manifest[(manifest["shard"] == shard) & (manifest["shard_row"] >= 0)]
        assert np.array_equal(manifest.loc[rows.index, "informative_prob"], cached[rows["shard_row"]])

    staged.clear()
    build(raw, out, BuildConfig(workers=2, filter="none"), progress=False)
    name, sizes = staged[0]
    assert name == "none" and sorted(sizes) == shards
    assert pd.read_parquet(layout.manifest)["informative_prob"].dropna().eq(1.0).all()

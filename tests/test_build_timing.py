"""The build's time split (cemcurate.build.timing) and the per-patch statistics of the cut."""

from __future__ import annotations

import os
import time

import numpy as np
from conftest import require

from cemcurate.build import BuildConfig, build, timing
from cemcurate.build.cut import patch_statistics


def test_nested_stages_count_each_second_once():
    timing.reset()
    with timing.timed("outer"):
        time.sleep(0.02)
        with timing.timed("inner"):
            time.sleep(0.03)
    seconds = timing.stage_seconds()
    assert 0.02 <= seconds["outer"] < 0.03 + 0.02 and seconds["inner"] >= 0.03
    timing.reset()
    assert timing.stage_seconds() == {}


def test_patch_statistics_are_the_plain_float32_mean_and_std():
    rng = np.random.default_rng(0)
    for n, p in ((1, 224), (17, 224), (40, 100)):
        patches = rng.integers(0, 256, (n, p, p), dtype=np.uint8)
        flat = patches.reshape(n, -1).astype(np.float32) / 255.0
        plain = np.stack([flat.mean(1), flat.std(1)], 1)
        assert patch_statistics(patches).dtype == np.float32
        assert np.array_equal(patch_statistics(patches).view(np.uint32), plain.view(np.uint32))  # bit for bit


def test_a_one_worker_build_records_its_stages(tmp_path, data_root):
    raw = tmp_path / "raw"
    raw.mkdir()
    os.symlink(require(data_root / "sem_plate_databar/plateImage2D.tif"), raw / "plate.tif")
    timing.reset()
    build(raw, tmp_path / "out", BuildConfig(workers=1), progress=False)
    seconds = timing.stage_seconds()
    assert {"discover", "decode", "cut", "hash", "group", "write", "merge", "filter", "report"} <= set(seconds)
    assert all(v >= 0 for v in seconds.values())

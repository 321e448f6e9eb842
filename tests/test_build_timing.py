"""The build's time split: cemcurate.build.timing."""

from __future__ import annotations

import os
import time

from conftest import require

from cemcurate.build import BuildConfig, build, timing


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


def test_a_one_worker_build_records_its_stages(tmp_path, data_root):
    raw = tmp_path / "raw"
    raw.mkdir()
    os.symlink(require(data_root / "sem_plate_databar/plateImage2D.tif"), raw / "plate.tif")
    timing.reset()
    build(raw, tmp_path / "out", BuildConfig(workers=1), progress=False)
    seconds = timing.stage_seconds()
    assert {"discover", "decode", "cut", "hash", "group", "write", "merge", "filter", "report"} <= set(seconds)
    assert all(v >= 0 for v in seconds.values())

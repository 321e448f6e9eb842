"""``cemcurate check OUT [--repair]``: is an output folder whole, and if not, make it so.

:func:`check_build` verifies what every later stage relies on: the manifest, source table
and ``store.json`` exist and the manifest has its schema; every stored row's shard exists,
is a whole number of patches and holds the row; every kept row is stored; and the pixels
of a random sample of stored patches still give the dHash the manifest recorded.
:func:`repair_build` drops the parts whose shards are missing or damaged and runs the
build again on the RAW folder OUT's marker records, which redoes just those sources and
rewrites the outputs.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from cemcurate.build.config import BuildConfig
from cemcurate.build.lock import BuildLock
from cemcurate.build.orchestrate import BuildSummary, build
from cemcurate.build.records import PartRecord
from cemcurate.commit import finish_interrupted_commit
from cemcurate.common.config import load_config
from cemcurate.dhash import dhash64, hex_to_dhash
from cemcurate.layout import BuildLayout
from cemcurate.manifest import check_manifest
from cemcurate.store import StoreError, open_shard, read_store_info


@dataclass
class CheckResult:
    """What :func:`check_build` found: ``problems`` (empty when OUT is whole), what it looked at."""

    out_dir: Path
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    bad_shards: set[str] = field(default_factory=set)
    rows: int = 0
    shards: int = 0
    hashed: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems


def check_build(out_dir: str | Path, sample: int = 256, seed: int = 0) -> CheckResult:
    """Check build folder ``out_dir`` (see the module docstring).

    The only change it may make is the one every reader makes: finishing the publication of
    outputs that a build killed after its point of no return left half renamed
    (:func:`cemcurate.commit.finish_interrupted_commit`), which is noted.

    Args:
        sample: stored patches whose dHash is recomputed from their pixels.
        seed: seed of that random sample.
    """
    layout = BuildLayout(out_dir)
    result = CheckResult(layout.root)
    problems = result.problems
    if finish_interrupted_commit(layout):
        result.notes.append("finished publishing the outputs of an interrupted build")
    for required in (layout.manifest, layout.sources, layout.store_info):
        if not required.is_file():
            problems.append(f"{required}: missing")
    if problems:
        return result
    try:
        patch_size = read_store_info(layout.root).patch_size
        manifest = pd.read_parquet(layout.manifest)
        check_manifest(manifest, layout.manifest)
    except (StoreError, ValueError, OSError) as exc:
        problems.append(str(exc))
        return result
    result.rows = len(manifest)
    stored = manifest[manifest["shard_row"] >= 0]
    unstored_kept = int((manifest["kept"] & (manifest["shard_row"] < 0)).sum())
    if unstored_kept:
        problems.append(f"{layout.manifest}: {unstored_kept} kept row(s) have no stored pixels (shard_row -1)")
    shards = {}
    for name, rows in stored.groupby("shard")["shard_row"]:
        try:
            shards[name] = open_shard(layout.shard(name), patch_size)
        except StoreError as exc:
            problems.append(str(exc))
            result.bad_shards.add(name)
            continue
        if int(rows.max()) >= len(shards[name]):
            problems.append(
                f"{layout.shard(name)}: holds {len(shards[name])} patches but the manifest points at row {rows.max()}"
            )
            result.bad_shards.add(name)
    result.shards = len(shards)
    good = stored[~stored["shard"].isin(result.bad_shards)]
    picks = good.sample(min(sample, len(good)), random_state=seed) if len(good) else good
    for name, rows in picks.groupby("shard"):
        pixels = np.asarray(shards[name][rows["shard_row"].to_numpy()])
        mismatched = int((dhash64(pixels) != hex_to_dhash(rows["dhash"].tolist())).sum())
        if mismatched:
            problems.append(
                f"{layout.shard(name)}: {mismatched} of {len(rows)} sampled patches do not match their dHash"
            )
            result.bad_shards.add(name)
    result.hashed = len(picks)
    return result


def repair_build(out_dir: str | Path, raw: str | Path | None = None, progress: bool = True) -> BuildSummary:
    """Make ``out_dir`` whole again: forget the parts whose shards are missing or damaged, then
    build again with the folder's recorded settings (``build_config.yaml``) on its RAW folder
    (recorded in its marker, or ``raw``).

    Raises:
        ValueError: the RAW folder is not known (pass ``raw``) or not found.
    """
    layout = BuildLayout(out_dir)
    marker = json.loads(layout.marker.read_text()) if layout.marker.is_file() else {}
    raw = Path(raw) if raw is not None else (Path(marker["raw"]) if marker.get("raw") else None)
    if raw is None:
        raise ValueError(f"{layout.root}: the RAW folder of this build is not recorded; pass --raw RAW")
    cfg = load_config(BuildConfig, layout.build_config) if layout.build_config.is_file() else BuildConfig()
    with BuildLock(layout):
        bad = check_build(layout.root).bad_shards
        for path in layout.parts_dir.glob("*.json"):
            record = PartRecord.from_json(path.read_text()) if path != layout.patch_ids else None
            if record is not None and any(_shard_of_part(layout, record.key, shard) for shard in bad):
                path.unlink()
    return build(raw, layout.root, cfg, progress=progress)


def _shard_of_part(layout: BuildLayout, key: str, shard: str) -> bool:
    """Whether shard ``shard`` belongs to the part stored under ``key`` (its names start with the key)."""
    return shard.startswith(f"{key}-") and layout.part_parquet(key).is_file()

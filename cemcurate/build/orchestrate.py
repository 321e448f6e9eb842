"""``build()``: find the sources, process the unfinished ones in parallel, merge, write the outputs."""

from __future__ import annotations

import concurrent.futures as cf
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from cemcurate.build.config import BuildConfig
from cemcurate.build.merge import merge_parts
from cemcurate.build.records import PartRecord, SourceRow
from cemcurate.build.resume import finished_part
from cemcurate.build.source import process_source
from cemcurate.common.atomic import atomic_path
from cemcurate.common.config import save_config
from cemcurate.layout import BuildLayout
from cemcurate.manifest import write_manifest
from cemcurate.report import write_report
from cemcurate.sources import SourceSpec, discover_sources
from cemcurate.store import write_store_info


@dataclass
class BuildSummary:
    """What a build did: counts and the sources that failed (name -> error)."""

    out_dir: Path
    n_sources: int
    n_raw: int
    n_kept: int
    failed: dict[str, str]
    skipped: int
    reused: int


def _crashed(spec: SourceSpec, exc: BaseException) -> PartRecord:
    """The record of a source whose worker process died (nothing of it was written)."""
    return PartRecord(
        key=spec.key,
        name=spec.name,
        fingerprint="",
        settings="",
        files=[],
        status="failed",
        sources=[SourceRow.failed(spec, f"{spec.name}: worker crashed: {exc}")],
    )


def _process_all(
    todo: list[SourceSpec], cfg: BuildConfig, layout: BuildLayout, raw: Path, progress: bool
) -> dict[str, PartRecord]:
    """Run :func:`process_source` for every spec of ``todo``, in ``cfg.workers`` processes."""
    records: dict[str, PartRecord] = {}
    workers = cfg.workers or os.cpu_count() or 1
    bar = tqdm(total=len(todo), desc="sources", unit="src", disable=not progress or not todo)
    if workers == 1 or len(todo) <= 1:
        for spec in todo:
            records[spec.key] = process_source(spec, cfg, layout.root, raw)
            bar.update()
    else:
        with cf.ProcessPoolExecutor(max_workers=min(workers, len(todo))) as pool:
            futures = {pool.submit(process_source, spec, cfg, layout.root, raw): spec for spec in todo}
            for future in cf.as_completed(futures):
                spec = futures[future]
                try:
                    records[spec.key] = future.result()
                except Exception as exc:  # a crashed worker process
                    records[spec.key] = _crashed(spec, exc)
                bar.update()
    bar.close()
    return records


def _store_statistics(manifest: pd.DataFrame) -> tuple[float, float]:
    """Mean and std of the kept patches' pixels, in [0, 1]."""
    kept = manifest[manifest["kept"]]
    if not len(kept):
        return 0.0, 0.0
    mean = float(kept["pixel_mean"].mean())
    # Pooled std of equal-sized patches: E[x^2] - E[x]^2 with E[x^2] = std^2 + mean^2 per patch.
    sq = float((kept["pixel_std"].astype(np.float64) ** 2 + kept["pixel_mean"].astype(np.float64) ** 2).mean())
    return mean, float(np.sqrt(max(sq - mean * mean, 0.0)))


def _remove_stale_shards(layout: BuildLayout, manifest: pd.DataFrame) -> None:
    """Delete shards no manifest row points to (sources removed from RAW or redone)."""
    live = set(manifest["shard"].unique()) if len(manifest) else set()
    for path in layout.shards():
        if path.stem not in live:
            path.unlink()


def build(raw: str | Path, out_dir: str | Path, cfg: BuildConfig | None = None, progress: bool = True) -> BuildSummary:
    """Run ``cemcurate build RAW OUT``; see :mod:`cemcurate.build`. Returns a summary."""
    cfg = cfg or BuildConfig()
    raw, layout = Path(raw), BuildLayout(out_dir)
    specs, skipped = discover_sources(raw, cfg.sources)
    if len(set(s.key for s in specs)) != len(specs):
        raise ValueError(f"{raw}: two sources map to the same id; rename one of them")
    for folder in (layout.parts_dir, layout.store_dir):
        folder.mkdir(parents=True, exist_ok=True)
    records: dict[str, PartRecord] = {}
    todo = []
    for spec in specs:
        record = finished_part(layout, spec, cfg)
        if record is None:
            todo.append(spec)
        else:
            records[spec.key] = record
    reused = len(records)
    records.update(_process_all(todo, cfg, layout, raw, progress))
    shutil.rmtree(layout.work_dir, ignore_errors=True)
    ordered = [records[s.key] for s in specs]
    manifest, sources = merge_parts(layout, ordered, cfg, progress)
    skipped_rows = pd.DataFrame(
        [{"source": s.name, "files": s.name, "status": "skipped", "error": s.reason} for s in skipped]
    )
    sources = pd.concat([sources, skipped_rows], ignore_index=True)
    write_manifest(manifest, layout.manifest)
    _remove_stale_shards(layout, manifest)
    with atomic_path(layout.sources) as tmp:
        sources.astype({"voxel_size": str, "shape": str}).to_parquet(tmp, index=False)
    write_store_info(layout.root, cfg.patch_size, *_store_statistics(manifest))
    save_config(cfg, layout.build_config)
    write_report(layout.root, manifest, sources, cfg)
    failed = {r.name: r.sources[0].error for r in ordered if not r.ok}
    return BuildSummary(
        layout.root, len(specs), len(manifest), int(manifest["kept"].sum()), failed, len(skipped), reused
    )

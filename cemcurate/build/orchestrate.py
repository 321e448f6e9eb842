"""``build()``: find the sources, process the unfinished ones in parallel, merge, publish the outputs.

A build holds OUT's lock (:mod:`cemcurate.build.lock`) from start to end, finishes or
discards whatever an interrupted build left (:mod:`cemcurate.commit`), reuses only parts
whose shards the store still holds whole (:func:`cemcurate.build.resume.finished_part`), and
publishes the manifest, source table, ``store.json``, config and report together. Worker
processes ignore Ctrl-C (the parent stops them) and exit when the parent dies.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import dataclasses
import json
import multiprocessing
import os
import shutil
import signal
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from cemcurate.build.chunked import SplitPlan, create_scratch, cut_chunk, finish_split, may_split, plan_split
from cemcurate.build.config import BuildConfig
from cemcurate.build.lock import BuildLock
from cemcurate.build.merge import merge_parts
from cemcurate.build.records import PartRecord, SourceRow
from cemcurate.build.resume import finished_part
from cemcurate.build.source import process_source
from cemcurate.build.timing import timed
from cemcurate.commit import commit, discard_unfinished_stage, finish_interrupted_commit, stage
from cemcurate.common.atomic import atomic_path
from cemcurate.common.config import save_config
from cemcurate.common.dask_cluster import dask_client
from cemcurate.common.lazy import lazy_import
from cemcurate.layout import BuildLayout
from cemcurate.manifest import write_manifest
from cemcurate.report import write_report
from cemcurate.sources import SourceSpec, discover_sources
from cemcurate.store import write_store_info

distributed = lazy_import("distributed")


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
    notes: list[str] = field(default_factory=list)  # for the person running it (waits, redone parts)


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


def _exit_with_parent(parent: int) -> None:
    """Worker start-up: leave Ctrl-C to the parent, and exit as soon as the parent is gone (a
    killed build must not leave workers writing into OUT)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, daemon=True, name="exit-with-parent").start()


def _largest_first(specs: list[SourceSpec]) -> list[SourceSpec]:
    """``specs`` by the bytes of their files, largest first: the pool then ends with small
    sources on every worker instead of one large source running alone (results do not depend
    on the order)."""

    def size(spec: SourceSpec) -> int:
        try:
            return sum(f.stat().st_size for f in spec.files)
        except OSError:  # a file that went away fails in its worker, with its own message
            return 0

    return sorted(specs, key=size, reverse=True)


def _process_all(
    todo: list[SourceSpec],
    cfg: BuildConfig,
    layout: BuildLayout,
    raw: Path,
    progress: bool,
    debug: bool,
    client: object = None,
) -> dict[str, PartRecord]:
    """Run :func:`process_source` for every spec of ``todo``, in ``cfg.workers`` processes (or on
    the Dask cluster ``cfg.scheduler``)."""
    if client is not None:
        return _process_on_dask(todo, cfg, layout, raw, progress, debug, client)
    records: dict[str, PartRecord] = {}
    workers = cfg.workers or os.cpu_count() or 1
    bar = tqdm(total=len(todo), desc="sources", unit="src", disable=not progress or not todo)
    if workers == 1 or len(todo) <= 1:
        for spec in todo:
            records[spec.key] = process_source(spec, cfg, layout.root, raw, debug)
            bar.update()
        bar.close()
        return records
    pool = cf.ProcessPoolExecutor(
        max_workers=min(workers, len(todo)), initializer=_exit_with_parent, initargs=(os.getpid(),)
    )
    try:
        futures = {
            pool.submit(process_source, spec, cfg, layout.root, raw, debug): spec for spec in _largest_first(todo)
        }
        for future in cf.as_completed(futures):
            spec = futures[future]
            try:
                records[spec.key] = future.result()
            except Exception as exc:  # a crashed worker process
                records[spec.key] = _crashed(spec, exc)
            bar.update()
    except BaseException:  # Ctrl-C or an error here: stop the workers at once, not after their sources
        pool.shutdown(wait=False, cancel_futures=True)
        for child in multiprocessing.active_children():
            child.terminate()
        raise
    finally:
        bar.close()
    pool.shutdown()
    return records


def _process_on_dask(
    todo: list[SourceSpec], cfg: BuildConfig, layout: BuildLayout, raw: Path, progress: bool, debug: bool, client
) -> dict[str, PartRecord]:
    """Every spec of ``todo`` on the Dask cluster of ``client``: a source is one task
    (:func:`process_source`), or, when its volume is large, a plan, a task per chunk and a reduce
    (:mod:`cemcurate.build.chunked`).

    Workers write shards and parts straight into OUT, each atomically and under names fixed by
    the source, so a task re-run after its worker died rewrites the same bytes; the records
    are put in RAW's order afterwards, so the result does not depend on which task ends first.
    A future is dropped as soon as its result is read: Dask re-runs a lost result only while a
    client holds its future, and a finished task re-run behind the build's back could still be
    writing into OUT while the client merges and publishes.
    """
    records: dict[str, PartRecord] = {}
    if not todo:
        return records
    root, raw = layout.root.resolve(), raw.resolve()
    # Keys name the build too: two builds on one long-running scheduler must not share results.
    token = uuid.uuid4().hex[:8]
    submit = dict(retries=2, pure=False)
    plans, final = {}, {}
    for spec in _largest_first(todo):
        if may_split(spec, cfg):
            plans[client.submit(plan_split, spec, cfg, root, key=f"cemcurate-plan-{token}-{spec.key}", **submit)] = spec
        else:  # too small to split: one task, without a planning round trip
            key = f"cemcurate-source-{token}-{spec.key}"
            final[client.submit(process_source, spec, cfg, root, raw, debug, key=key, **submit)] = (spec, None)
    running = distributed.as_completed(list(plans) + list(final))
    bar = tqdm(total=len(plans) + len(final), desc="tasks (dask)", unit="task", disable=not progress)
    try:
        for future in running:
            bar.update()
            if future in plans:
                spec = plans.pop(future)
                plan = _result(future)
                if isinstance(plan, SplitPlan):
                    create_scratch(plan, root)
                    tasks = _submit_split(client, spec, plan, cfg, root, raw, debug, submit, token)
                else:  # small, several volumes, a grown stack, or unreadable: one task
                    key = f"cemcurate-source-{token}-{spec.key}"
                    tasks = [client.submit(process_source, spec, cfg, root, raw, debug, key=key, **submit)]
                final[tasks[-1]] = (spec, plan if isinstance(plan, SplitPlan) else None)
                running.update(tasks)
                bar.total += len(tasks)
                bar.refresh()
                del tasks
            elif future in final:
                spec, plan = final.pop(future)
                record = _result(future)
                if isinstance(record, BaseException):  # a chunk failed, or the task's workers kept dying
                    record = finish_split(spec, plan, cfg, root, raw, record, debug) if plan else _crashed(spec, record)
                records[spec.key] = record
            del future  # not held while waiting for the next one (see the docstring)
    except BaseException:
        client.cancel(list(plans) + list(final))
        raise
    finally:
        bar.close()
    return records


def _result(future) -> object:
    """A future's result, or the exception it raised (KilledWorker after repeated worker deaths)."""
    try:
        return future.result()
    except Exception as exc:
        return exc


def _submit_split(
    client, spec: SourceSpec, plan: SplitPlan, cfg: BuildConfig, root: Path, raw: Path, debug, submit, token: str
):
    """The chunk tasks of a split volume (xz / yz after every xy slab) and its reduce, last."""
    xy, sections = [], []
    for plane, start, stop in plan.chunks:
        key = f"cemcurate-chunk-{token}-{spec.key}-{plane}{start}"
        after = xy if plane != "xy" else None
        task = client.submit(cut_chunk, plan, plane, start, stop, cfg, root, after, key=key, **submit)
        (xy if plane == "xy" else sections).append(task)
    chunks = xy + sections
    reduce = client.submit(
        finish_split, spec, plan, cfg, root, raw, chunks, debug, key=f"cemcurate-source-{token}-{spec.key}", **submit
    )
    return chunks + [reduce]


def _store_statistics(manifest: pd.DataFrame) -> tuple[float, float]:
    """Mean and std of the kept patches' pixels, in [0, 1]."""
    kept = manifest[manifest["kept"]]
    if not len(kept):
        return 0.0, 0.0
    mean = float(kept["pixel_mean"].mean())
    # Pooled std of equal-sized patches: E[x^2] - E[x]^2 with E[x^2] = std^2 + mean^2 per patch.
    sq = float((kept["pixel_std"].astype(np.float64) ** 2 + kept["pixel_mean"].astype(np.float64) ** 2).mean())
    return mean, float(np.sqrt(max(sq - mean * mean, 0.0)))


def _remove_stale(layout: BuildLayout, manifest: pd.DataFrame, specs: list[SourceSpec]) -> None:
    """Delete shards no manifest row points to (sources removed from RAW or redone), and the
    parts of sources no longer in RAW (their shards are gone with them)."""
    live = set(manifest["shard"].unique()) if len(manifest) else set()
    for path in layout.shards():
        if path.stem not in live:
            path.unlink()
    keys = {spec.key for spec in specs}
    for path in layout.parts_dir.glob("*.json"):
        if path != layout.patch_ids and path.stem not in keys:
            path.unlink()
            layout.part_parquet(path.stem).unlink(missing_ok=True)


def _sidecar_cell(spec: SourceSpec, sidecar: str | None) -> str:
    """The ``sidecar`` column of a source: which entries of which file set its options (JSON)."""
    if not sidecar or not spec.entries:
        return ""
    options = {k: v for k, v in dataclasses.asdict(spec.options).items() if v not in (None, False)}
    return json.dumps({"sidecar": sidecar, "entries": list(spec.entries), "options": options})


def _source_table(
    sources: pd.DataFrame, specs: list[SourceSpec], ordered: list[PartRecord], sidecar: str, skipped: list
) -> pd.DataFrame:
    """The source table: a row per volume, with the sidecar entries that set its options, then
    a row per skipped file; it has every column even when RAW gave nothing."""
    sources = sources.reindex(columns=[f.name for f in dataclasses.fields(SourceRow)])
    sources["sidecar"] = [_sidecar_cell(spec, sidecar) for spec, rec in zip(specs, ordered) for _ in rec.sources]
    skipped_rows = pd.DataFrame(
        [{"source": s.name, "files": s.name, "status": "skipped", "error": s.reason, "sidecar": ""} for s in skipped],
        columns=sources.columns,
    )
    table = pd.concat([sources, skipped_rows], ignore_index=True) if len(skipped_rows) else sources
    return table.astype({"voxel_size": str, "shape": str})


def _publish(layout: BuildLayout, cfg: BuildConfig, manifest: pd.DataFrame, sources: pd.DataFrame) -> None:
    """Write the manifest, source table, store.json, config and report, then commit them together."""
    stage(layout)
    write_manifest(manifest, layout.staged(layout.manifest))
    with atomic_path(layout.staged(layout.sources)) as tmp:
        sources.to_parquet(tmp, index=False)
    write_store_info(layout.staged(layout.store_info), cfg.patch_size, *_store_statistics(manifest))
    save_config(cfg, layout.staged(layout.build_config))
    with timed("report"):
        write_report(layout.root, manifest, sources, cfg, layout.staged(layout.report))
    names = [p.name for p in (layout.manifest, layout.sources, layout.store_info, layout.build_config, layout.report)]
    commit(layout, names)


def build(
    raw: str | Path,
    out_dir: str | Path,
    cfg: BuildConfig | None = None,
    progress: bool = True,
    wait: bool = False,
    debug: bool = False,
) -> BuildSummary:
    """Run ``cemcurate build RAW OUT``; see the module docstring. Returns a summary.

    Args:
        wait: when another build holds OUT, wait for it instead of failing.
        debug: failed sources also print their full traceback (the source table keeps one line).

    Raises:
        BuildLockedError: another build holds OUT (and ``wait`` is False).
        ValueError: RAW missing or the same folder as OUT, or a bad sidecar (each message names
            the problem).
    """
    cfg = cfg or BuildConfig()
    raw, layout = Path(raw), BuildLayout(out_dir)
    if raw.resolve() == layout.root.resolve():
        raise ValueError(f"{raw}: RAW and OUT are the same folder; write the outputs somewhere else")
    with timed("discover"):
        found = discover_sources(raw, cfg.sources, cfg.allow_unmatched, layout.root)
    specs, skipped = found.specs, found.skipped
    if len(set(s.key for s in specs)) != len(specs):
        raise ValueError(f"{raw}: two sources map to the same id; rename one of them")
    notes = list(found.warnings)
    with BuildLock(layout, wait, on_wait=lambda holder: notes.append(f"waited for {holder}")):
        if finish_interrupted_commit(layout):
            notes.append("finished publishing the outputs of an interrupted build")
        discard_unfinished_stage(layout)
        for folder in (layout.parts_dir, layout.store_dir):
            folder.mkdir(parents=True, exist_ok=True)
        layout.marker.write_text(json.dumps({"raw": str(raw.resolve()), "sources": cfg.sources}) + "\n")
        records: dict[str, PartRecord] = {}
        todo, redone = [], {}
        for spec in specs:
            with timed("discover"):
                record, problem = finished_part(layout, spec, cfg)
            if record is not None:
                records[spec.key] = record
            else:
                todo.append(spec)
                if problem:
                    redone[spec.key] = f"redone: the part of an earlier build could not be reused ({problem})"
        reused = len(records)
        # One cluster for the sources and the filter stage (a batch system starts it once), and
        # none when every source is reused (the filter stage then scores what is left here).
        cluster = dask_client(cfg.scheduler, quiet=not progress) if cfg.scheduler and todo else None
        with cluster or contextlib.nullcontext() as client:
            records.update(_process_all(todo, cfg, layout, raw, progress, debug, client))
            shutil.rmtree(layout.work_dir, ignore_errors=True)
            for key, note in redone.items():
                for row in records[key].sources:
                    row.notes = "; ".join(filter(None, [row.notes, note]))
            ordered = [records[s.key] for s in specs]
            with timed("merge"):
                manifest, sources = merge_parts(layout, ordered, cfg, progress, client)
                sources = _source_table(sources, specs, ordered, str(found.sidecar or ""), skipped)
        with timed("write"):
            _publish(layout, cfg, manifest, sources)
            _remove_stale(layout, manifest, specs)
    failed = {r.name: r.sources[0].error for r in ordered if not r.ok}
    return BuildSummary(
        layout.root,
        len(specs),
        len(manifest),
        int(manifest["kept"].sum()),
        failed,
        len(skipped),
        reused,
        notes + list(redone.values()),
    )

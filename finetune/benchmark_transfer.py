"""Label-scarcity curves and transfer matrices (Xie et al. 2025, Fig. 2 and Table 2).

Both run on the benchmark definitions of :mod:`finetune.benchmark` (``benchmarks/finetune/*.yaml``)
and reuse its :func:`~finetune.benchmark.run_task` (train, predict the test set, score it):

* :func:`run_fraction_curve` trains every (task, initialisation) pair on nested random
  subsets of the task's training files (``fractions``, e.g. 1 0.5 0.25 0.1), once per seed,
  and writes the mean foreground IoU against the fraction (mean and spread over seeds) as
  ``fraction_curve.png`` plus a table;
* :func:`run_transfer_matrix` trains one segmentation model per source task on all of its
  training data, then fine-tunes every target task (on ``fraction`` of its training files)
  from each source model (``init_model``: encoder and decoder; the output head is
  re-initialised where the classes differ) and from scratch, and writes Xie Table 2's form:
  rows the pretraining task, columns the target task, the best per column in bold.

A task is ``DEFINITION.yaml`` (its first task) or ``DEFINITION.yaml:TASK``. Subsets are
nested: for seed ``s`` the training files are permuted once by ``default_rng(s)`` and a
fraction ``f`` takes the first ``ceil(f * n)`` (at least one), so a smaller fraction's files
are always part of a larger one's. The seed also seeds training (``optim.seed``).
"""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import numpy as np

from cemcurate.common.atomic import atomic_path
from cemcurate.common.lazy import lazy_import
from finetune.benchmark import (
    Init,
    _slug,
    _train_config,
    load_definition,
    parse_init,
    resolve_data_root,
    run_task,
    write_results,
)
from finetune.data import pair_files
from finetune.volumes import expand_patterns

matplotlib = lazy_import("matplotlib")
pyplot = lazy_import("matplotlib.pyplot")

SCRATCH = "none (from scratch)"


def subset_indices(n: int, fraction: float, seed: int) -> list[int]:
    """Indices of the nested subset of ``n`` training files for ``fraction`` and ``seed`` (sorted)."""
    if not 0 < fraction <= 1:
        raise ValueError(f"fractions must be in (0, 1], got {fraction}")
    order = np.random.default_rng(seed).permutation(n)
    return sorted(int(i) for i in order[: max(1, math.ceil(fraction * n - 1e-9))])


def parse_task(text: str) -> tuple[str, dict, dict]:
    """``DEF.yaml[:TASK]`` -> ``(label, task, definition)``; the label is ``benchmark`` or ``benchmark/task``."""
    path, _, name = text.partition(":") if not Path(text).is_file() else (text, "", "")
    d = load_definition(path)
    tasks = d["tasks"]
    if name:
        found = [t for t in tasks if t.get("name") == name]
        if not found:
            raise ValueError(f"{path}: no task {name!r}; tasks: {[t.get('name') for t in tasks]}")
        task = found[0]
    else:
        task = tasks[0]
    label = d["name"] if len(tasks) == 1 else f"{d['name']}/{task.get('name', '')}"
    return label, task, d


def subset_overrides(
    task: dict, data_root: Path, fraction: float, seed: int, overrides: dict, dim: str | None
) -> tuple[dict, int, int]:
    """Overrides that train ``task`` on its nested ``fraction`` subset with ``seed``.

    Returns ``(overrides, files used, files available)``.
    """
    cfg = _train_config(task, dim, {**overrides, "data_dir": str(data_root)})
    pairs = pair_files(cfg.data.images, cfg.data.masks, str(data_root))
    keep = subset_indices(len(pairs), fraction, seed)
    if fraction < 1 and len(pairs) < 2:
        raise ValueError(
            f"task {task.get('name', '')!r} has a single training file: fractions subset training files, "
            "so it needs several"
        )
    out = {
        **overrides,
        "images": [str(pairs[i][0]) for i in keep],
        "masks": [str(pairs[i][1]) for i in keep],
        "seed": seed,
    }
    if cfg.data.mask_volume:
        regions = expand_patterns(cfg.data.mask_volume, str(data_root), what="mask volumes")
        out["mask_volume"] = [str(regions[i]) for i in keep]
    return out, len(keep), len(pairs)


def _row(task_label: str, init: Init, fraction: float, seed: int, used: int, total: int, scored: dict) -> dict:
    extra = {"fraction": fraction, "seed": seed, "train_files": used, "train_files_available": total}
    return {**scored, "task": task_label, "init": init.name, **extra}


def _stats(values: list[float]) -> str:
    if not values:
        return "-"
    arr = np.asarray(values, np.float64)
    return f"{arr.mean():.3f}" if arr.size == 1 else f"{arr.mean():.3f} ± {arr.std(ddof=1):.3f}"


def _scores(rows: list[dict]) -> list[float]:
    return [r["mean_foreground_iou"] for r in rows if r["mean_foreground_iou"] is not None]


def fraction_table(rows: list[dict]) -> str:
    """Markdown: one row per task and initialisation, one column per fraction (mean ± sd over seeds)."""
    fractions = sorted({r["fraction"] for r in rows}, reverse=True)
    head = ["Task", "Init"] + [f"{f:g} ({_files(rows, f)})" for f in fractions]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for task in dict.fromkeys(r["task"] for r in rows):
        for init in dict.fromkeys(r["init"] for r in rows if r["task"] == task):
            cells = [
                _stats(_scores([r for r in rows if (r["task"], r["init"], r["fraction"]) == (task, init, f)]))
                for f in fractions
            ]
            lines.append("| " + " | ".join([task, init] + cells) + " |")
    seeds = sorted({r["seed"] for r in rows})
    lines.append("")
    lines.append(
        f"Mean foreground IoU on the test set; ± is the standard deviation over seeds {seeds}; "
        "columns: fraction of the training files (files used)."
    )
    return "\n".join(lines) + "\n"


def _files(rows: list[dict], fraction: float) -> str:
    used = sorted({r["train_files"] for r in rows if r["fraction"] == fraction})
    return "/".join(str(u) for u in used) + " files"


def write_fraction_png(path: Path, rows: list[dict]) -> None:
    """IoU against the training fraction, one line per (task, init): the mean over seeds with
    every seed's score as a dot (Xie et al. Fig. 2's form), atomically."""
    matplotlib.use("Agg", force=False)
    fig, ax = pyplot.subplots(figsize=(5.2, 4.0), dpi=120)
    for task in dict.fromkeys(r["task"] for r in rows):
        for init in dict.fromkeys(r["init"] for r in rows if r["task"] == task):
            sub = [r for r in rows if (r["task"], r["init"]) == (task, init) and r["mean_foreground_iou"] is not None]
            fractions = sorted({r["fraction"] for r in sub})
            means = [np.mean([r["mean_foreground_iou"] for r in sub if r["fraction"] == f]) for f in fractions]
            (line,) = ax.plot(fractions, means, marker="o", label=f"{task}: {init}")
            ax.scatter(
                [r["fraction"] for r in sub], [r["mean_foreground_iou"] for r in sub], s=10, color=line.get_color()
            )
    ax.set_xscale("log")
    ticks = sorted({r["fraction"] for r in rows})
    ax.set_xticks(ticks, [f"{f:g}" for f in ticks])
    ax.minorticks_off()
    ax.set_xlabel("fraction of training files")
    ax.set_ylabel("test IoU (foreground)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    pyplot.close(fig)


def run_fraction_curve(
    task_texts: list[str],
    init_texts: list[str],
    fractions: list[float],
    seeds: list[int],
    out: str | Path,
    data_root: str | Path | None = None,
    freeze: str = "paper",
    overrides: dict | None = None,
    progress: bool = True,
    dim: str | None = None,
) -> tuple[list[dict], str]:
    """Train every task x init x fraction x seed; write ``results.json``, ``results.md`` and
    ``fraction_curve.png`` in ``out``. Runs go to ``out/<task>/<init>/f<fraction>_s<seed>``."""
    out, root = Path(out), resolve_data_root(data_root)
    for f in fractions:
        subset_indices(1, f, 0)  # validates every fraction before anything trains
    inits = [parse_init(t, freeze) for t in init_texts]
    rows = []
    for text in task_texts:
        label, task, _ = parse_task(text)
        for init in inits:
            for seed in seeds:
                for fraction in sorted(fractions, reverse=True):
                    sub, used, total = subset_overrides(task, root, fraction, seed, overrides or {}, dim)
                    folder = out / _slug(label) / _slug(init.name) / f"f{fraction:g}_s{seed}"
                    scored = run_task(task, init, root, folder, sub, progress, dim)
                    rows.append(_row(label, init, fraction, seed, used, total, scored))
                    _report(rows[-1])
    table = fraction_table(rows)
    write_results(out, rows, table)
    write_fraction_png(out / "fraction_curve.png", rows)
    return rows, table


def matrix_table(rows: list[dict], sources: list[str], targets: list[str]) -> str:
    """Xie Table 2's form: rows the pretraining task (first: from scratch), columns the target
    task, mean foreground IoU (± sd over seeds), the best of each column in bold."""
    head = ["Pretraining task \\ target"] + targets
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    means: dict[tuple[str, str], float] = {}
    for source in [SCRATCH] + sources:
        for target in targets:
            values = _scores([r for r in rows if (r["init"], r["task"]) == (source, target)])
            if values:
                means[source, target] = float(np.mean(values))
    best = {t: max((v for (s, tt), v in means.items() if tt == t), default=None) for t in targets}
    for source in [SCRATCH] + sources:
        cells = []
        for target in targets:
            text = _stats(_scores([r for r in rows if (r["init"], r["task"]) == (source, target)]))
            bold = (source, target) in means and means[source, target] == best[target]
            cells.append(f"**{text}**" if bold else text)
        lines.append("| " + " | ".join([source] + cells) + " |")
    return "\n".join(lines) + "\n"


def run_transfer_matrix(
    source_texts: list[str],
    target_texts: list[str],
    out: str | Path,
    fraction: float = 1.0,
    seeds: list[int] | None = None,
    data_root: str | Path | None = None,
    overrides: dict | None = None,
    source_overrides: dict | None = None,
    progress: bool = True,
    dim: str | None = None,
) -> tuple[list[dict], str]:
    """Train each source task on all its training data (random init, trained end to end), then
    fine-tune each target on ``fraction`` of its training files from each source model and from
    scratch, once per seed; write ``results.json`` (targets and sources, each with its test
    scores) and ``results.md`` (the matrix, then the sources' own scores) in ``out``.

    ``source_overrides`` (e.g. more iterations) apply to the source runs on top of ``overrides``.
    """
    out, root = Path(out), resolve_data_root(data_root)
    seeds = seeds or [42]
    subset_indices(1, fraction, 0)
    scratch = parse_init("random")
    sources, source_rows = [], []
    for text in source_texts:
        label, task, _ = parse_task(text)
        run = out / "sources" / _slug(label)
        scored = run_task(task, scratch, root, run, {**(overrides or {}), **(source_overrides or {})}, progress, dim)
        source_rows.append({**scored, "task": label, "role": "source"})
        _report(source_rows[-1])
        sources.append((label, run))
    rows = []
    targets = []
    for text in target_texts:
        label, task, _ = parse_task(text)
        targets.append(label)
        inits = [replace(scratch, name=SCRATCH)] + [Init(name, "random", False, str(run)) for name, run in sources]
        for init in inits:
            for seed in seeds:
                sub, used, total = subset_overrides(task, root, fraction, seed, overrides or {}, dim)
                folder = out / "targets" / _slug(label) / _slug(init.name) / f"f{fraction:g}_s{seed}"
                scored = run_task(task, init, root, folder, sub, progress, dim)
                rows.append(_row(label, init, fraction, seed, used, total, scored))
                _report(rows[-1])
    table = matrix_table(rows, [name for name, _ in sources], targets)
    own = ["", "Sources on their own test sets (all training data): "]
    own += [f"- {r['task']}: IoU {r['mean_foreground_iou']:.3f} ({r['iters']} iterations)" for r in source_rows]
    write_results(out, source_rows + rows, table + "\n".join(own) + "\n")
    return source_rows + rows, table + "\n".join(own) + "\n"


def _report(row: dict) -> None:
    extra = f" fraction {row['fraction']:g} seed {row['seed']}" if "fraction" in row else ""
    score, seconds = row["mean_foreground_iou"], row["train_seconds"]
    print(f"{row['task']} {row.get('init', '')}{extra}: IoU {score} (train {seconds} s)", flush=True)

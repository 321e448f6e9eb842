"""Benchmarks: train, predict and score several encoder initialisations, in 2D and 3D; Table 2 form.

A benchmark definition (``benchmarks/finetune/*.yaml``) is a YAML mapping::

    name: Lucchi++
    source: where to get the data (citation, URL)
    layout: the folder layout the globs below expect
    split: which images train and which test
    paper: {iters: 10000, random: 0.894, imagenet: 0.865, cem500k: 0.895, reported: 0.888}
    tasks:                               # one or more (Perez has four organelles)
      - name: mito
        config: configs/finetune/lucchi_pp.yaml    # TrainConfig; relative to the repository
        overrides: {lr: 0.001}                     # optional TrainConfig overrides
        dim_overrides:                             # optional, per dim (after overrides)
          3d: {crop: 32, crop_depth: 32, batch_size: 4}
        test:
          images: lucchi_pp/test/images/*.tif      # glob relative to the data root
          masks: lucchi_pp/test/masks/*.tif
          mode: stack                              # 2D models: stack or orthoplane
          window: [64, 128, 128]                   # 3D models: sliding window z y x (optional)
          window_overlap: [16, 32, 32]             # and its overlap (optional)
          instances_only: false                    # Perez-style scoring
          per_image: true                          # 2D test set: one prediction per image
          tile: 512                                # prediction tile side (optional)

Data globs (in the config and the test spec) are relative to ``--data-root``. An
initialisation is ``random``, ``imagenet``, ``cem500k:PATH`` or a weights ``PATH``,
optionally named ``NAME=SPEC``. As in the paper's Table 2, a randomly initialised encoder
is trained with the decoder and a pre-trained encoder is frozen (``--freeze`` changes it).

``--dims 2d 3d`` runs every task once per dim (``TrainConfig.dim``) and initialisation;
without it each task's config decides. Training overrides apply in this order: the
config file, the task's ``overrides``, its ``dim_overrides`` for the run's dim (e.g. 2D
crops of 8 x 128^2 vs 3D crops of 4 x 32^3, the same voxels per batch), then the
command-line ones (``--iters``, ``--set`` ...). 2D models predict the test set in the test
spec's ``mode``; 3D models by sliding windows (``window``, ``window_overlap``). Runs go to
``OUT/<benchmark>/<task>/<init>`` (``OUT/<benchmark>/<task>/<dim>/<init>`` with ``--dims``);
``results.md`` has one row per benchmark, task and dim, one column per initialisation.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

from cemcurate.common.atomic import atomic_path
from cemcurate.common.config import leaf_paths, load_config
from finetune.config import DIMS, EvaluateConfig, PredictConfig, TrainConfig
from finetune.evaluate import evaluate_paths, write_json
from finetune.labels import LabelSpec, to_class_map
from finetune.losses import IGNORE_INDEX
from finetune.predict.command import predict_path
from finetune.report import benchmark_html, central_crop, overlay, save_rgb, write_html
from finetune.train import train
from finetune.volumes import input_files, open_input, open_volume

REPO = Path(__file__).resolve().parents[1]
_TASK_KEYS = {"name", "config", "test", "overrides", "dim_overrides"}
_TEST_KEYS = {
    "images",
    "masks",
    "mode",
    "instances_only",
    "per_image",
    "ignore_mask",
    "tile",
    "window",
    "window_overlap",
}
_DEF_KEYS = {"name", "source", "layout", "split", "paper", "tasks", "notes", "licence", "data"}
# Column names of the paper's Table 2 for the standard initialisations.
_INIT_NAMES = {"random": "Random Init.", "imagenet": "IN-super"}


@dataclass
class Init:
    """One initialisation column: display name, encoder spec, freeze the encoder?, and a whole
    model to start from (``init_model``; empty: start from the encoder spec)."""

    name: str
    spec: str
    frozen: bool
    model: str = ""


def default_data_root() -> Path:
    """``$CEM_DATA`` if set, else ``<repo>/../shared/data`` (the project's real-data folder)."""
    return Path(os.environ.get("CEM_DATA", REPO.parent / "shared" / "data"))


def parse_init(text: str, freeze: str = "paper") -> Init:
    """``[NAME=]SPEC[+frozen|+trainable]`` -> :class:`Init`.

    ``freeze`` is the default policy: ``paper`` (random trains, pre-trained is frozen, as in
    Table 2), ``all`` or ``none``; a ``+frozen``/``+trainable`` suffix overrides it for one
    initialisation (e.g. ``"Random frozen=random+frozen"``, the paper's Figure 2c baseline).
    ``model:RUN`` starts the whole network from a trained model (``init_model``), which
    trains end to end unless ``+frozen`` freezes its encoder.
    """
    forced = None
    for suffix, value in (("+frozen", True), ("+trainable", False)):
        if text.endswith(suffix):
            text, forced = text[: -len(suffix)], value
    name, sep, spec = text.partition("=")
    if not sep or name.startswith(("cem500k:", "model:", "/", ".")):
        name, spec = "", text
    if spec.startswith("model:"):
        model = spec[len("model:") :]
        if not model:
            raise ValueError("initialisation 'model:' needs a run folder or model file, e.g. model:runs/source")
        return Init(name or f"from {Path(model).name}", "random", bool(forced), model)
    kind = spec.split(":", 1)[0] if spec.startswith("cem500k:") else spec
    if not name:
        name = _INIT_NAMES.get(kind) or ("CEM500K-moco" if kind == "cem500k" else Path(spec).stem)
    frozen = {"paper": spec != "random", "all": True, "none": False}[freeze] if forced is None else forced
    return Init(name, spec, frozen)


def load_definition(path: str | Path) -> dict:
    """Read and check a benchmark definition; errors name the file and the key."""
    path = Path(path)
    try:
        d = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ValueError(f"{path}: cannot read benchmark definition ({exc})") from exc
    if not isinstance(d, dict) or not isinstance(d.get("tasks"), list) or not d["tasks"]:
        raise ValueError(f"{path}: a benchmark definition needs a non-empty 'tasks' list")
    unknown = set(d) - _DEF_KEYS
    if unknown:
        raise ValueError(f"{path}: unknown key(s) {sorted(unknown)}; valid: {sorted(_DEF_KEYS)}")
    for i, task in enumerate(d["tasks"]):
        where = f"{path}: tasks[{i}]"
        if not isinstance(task, dict) or "config" not in task or "test" not in task:
            raise ValueError(f"{where} needs 'config' and 'test'")
        if set(task) - _TASK_KEYS:
            raise ValueError(f"{where}: unknown key(s) {sorted(set(task) - _TASK_KEYS)}; valid: {sorted(_TASK_KEYS)}")
        test = task["test"]
        if not isinstance(test, dict) or not {"images", "masks"} <= set(test) or set(test) - _TEST_KEYS:
            raise ValueError(f"{where}.test needs images and masks; valid keys: {sorted(_TEST_KEYS)}")
        config = REPO / task["config"]  # an absolute path stays absolute
        if not config.is_file():
            raise ValueError(f"{where}: config {task['config']} not found (relative paths start at {REPO})")
        per_dim = task.get("dim_overrides") or {}
        if not isinstance(per_dim, dict) or set(per_dim) - set(DIMS):
            raise ValueError(f"{where}.dim_overrides: expected a mapping with keys among {list(DIMS)}, got {per_dim!r}")
        for dim in per_dim:
            try:
                _train_config(task, dim, {})
            except (ValueError, TypeError) as exc:
                raise ValueError(f"{where}.dim_overrides.{dim}: {exc}") from exc
    d.setdefault("name", path.stem)
    return d


def _train_config(task: dict, dim: str | None, train_overrides: dict) -> TrainConfig:
    """The task's TrainConfig for ``dim`` (None: the config's own): file < overrides < dim_overrides <
    ``train_overrides`` (command line, ``None`` values ignored); with ``dim`` given it is forced."""
    path = REPO / task["config"]
    task_overrides = task.get("overrides") or {}
    given = {k: v for k, v in train_overrides.items() if v is not None}
    if dim is None:
        dim = load_config(TrainConfig, path, overrides={**task_overrides, **given}).model.dim
    per_dim = (task.get("dim_overrides") or {}).get(dim) or {}
    unknown = set(per_dim) - set(leaf_paths(TrainConfig))
    if unknown:
        raise ValueError(f"unknown TrainConfig key(s) {sorted(unknown)}")
    return load_config(TrainConfig, path, overrides={**task_overrides, **per_dim, **given, "dim": dim})


def run_task(
    task: dict,
    init: Init,
    data_root: Path,
    out: Path,
    train_overrides: dict,
    progress: bool = True,
    dim: str | None = None,
) -> dict:
    """Train one initialisation on one task in ``dim`` (None: as configured), predict its test set, score it."""
    start = {"encoder": init.spec, "freeze_encoder": init.frozen, "init_model": init.model}
    cfg = _train_config(task, dim, {**train_overrides, "data_dir": str(data_root), **start})
    result = train(cfg, out, progress=progress)
    data, model, optim = cfg.data, cfg.model, cfg.optim
    test = task["test"]
    t0 = time.perf_counter()
    per_image = bool(test.get("per_image", False))
    pred_out = str(out / "test_pred") + "/" if per_image else str(out / "test_pred.tif")
    if model.dim == "3d":
        how = {"mode": "sliding", **{k: list(test[k]) for k in ("window", "window_overlap") if k in test}}
    else:
        how = {"mode": test.get("mode", "stack")}
    pcfg = PredictConfig(**how, output_type="labels", device=cfg.runtime.device, tile=int(test.get("tile", 512)))
    predict_path(out, str(data_root / test["images"]), pred_out, pcfg, progress=progress)
    predict_seconds = time.perf_counter() - t0
    ecfg = EvaluateConfig(
        classes=data.classes,
        label_threshold=data.mask_threshold,
        label_map=data.label_map,
        unmapped=data.unmapped,
        ignore_label=data.ignore_label,
        ignore_mask=str(data_root / test["ignore_mask"]) if test.get("ignore_mask") else "",
        instances_only=bool(test.get("instances_only", False)),
        pred_kind="labels",
        json=str(out / "test_scores.json"),
    )
    scores = evaluate_paths(pred_out, str(data_root / test["masks"]), ecfg)
    write_json(scores, ecfg.json)
    overlay = save_rgb(
        out / "test_overlay.png",
        task_overlay(str(data_root / test["images"]), str(data_root / test["masks"]), pred_out, data.label_spec()),
    )
    return {
        "overlay": str(overlay),
        "task": task.get("name", ""),
        "dim": model.dim,
        "init": init.name,
        "encoder": init.spec,
        "init_model": init.model,
        "frozen": init.frozen,
        "iters": optim.iters,
        "arch": model.arch,
        "batch_size": optim.batch_size,
        "crop": cfg.augment.crop,
        "crop_depth": cfg.dim3d.crop_depth if model.dim == "3d" else None,
        "train_seconds": round(result.seconds, 1),
        "predict_seconds": round(predict_seconds, 1),
        "iou": scores["iou"],
        "mean_foreground_iou": scores["mean_foreground_iou"],
    }


def results_table(rows: list[dict], definitions: dict[str, dict], inits: list[str], show_dim: bool = False) -> str:
    """Markdown table in the form of the paper's Table 2 (mean foreground IoU per init).

    One row per benchmark, task and dim; the label names the task when a benchmark has
    several, and the dim (``"NeuroProof boundaries (3D)"``) when ``show_dim``. A timing table
    with one row per run follows.
    """
    head = ["Benchmark", "Training Iterations"] + inits + ["Paper CEM500K-moco"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    keys = []
    for r in rows:
        key = (r["benchmark"], r["task"], r["dim"])
        if key not in keys:
            keys.append(key)
    for bench, task, dim in keys:
        sub = [r for r in rows if (r["benchmark"], r["task"], r["dim"]) == (bench, task, dim)]
        multi_task = len({k[1] for k in keys if k[0] == bench}) > 1
        parts = ([task] if task and multi_task else []) + ([dim.upper()] if show_dim else [])
        label = bench + (f" ({', '.join(parts)})" if parts else "")
        by_init = {r["init"]: r for r in sub}
        cells = [
            f"{by_init[i]['mean_foreground_iou']:.3f}"
            if i in by_init and by_init[i]["mean_foreground_iou"] is not None
            else "-"
            for i in inits
        ]
        paper_cfg = definitions[bench].get("paper") or {}
        paper = (paper_cfg.get("cem500k_per_task") or {}).get(task, paper_cfg.get("cem500k"))
        lines.append(
            "| "
            + " | ".join(
                [label, str(sub[0]["iters"])] + cells + [f"{paper:.3f}" if isinstance(paper, (int, float)) else "-"]
            )
            + " |"
        )
    timing = [
        "",
        "| Benchmark | Dim | Init | Iterations | Arch | Crop | Batch | Train s | Predict s | IoU per class |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ious = ", ".join(f"{c} {v:.3f}" if v is not None else f"{c} -" for c, v in r["iou"].items())
        crop = f"{r['crop_depth']}x{r['crop']}x{r['crop']}" if r.get("crop_depth") else str(r["crop"])
        timing.append(
            f"| {r['benchmark']}{' (' + r['task'] + ')' if r['task'] else ''} | {r['dim']} | {r['init']} | "
            f"{r['iters']} | {r['arch']} | {crop} | {r['batch_size']} | {r['train_seconds']} | "
            f"{r['predict_seconds']} | {ious} |"
        )
    return "\n".join(lines + timing) + "\n"


def run_benchmarks(
    definitions: list[str | Path],
    init_texts: list[str],
    out: str | Path,
    data_root: str | Path | None = None,
    freeze: str = "paper",
    train_overrides: dict | None = None,
    progress: bool = True,
    dims: list[str] | None = None,
) -> tuple[list[dict], str]:
    """Run every definition x task x dim x initialisation; write ``results.json`` and ``results.md`` in ``out``.

    ``dims``: e.g. ``["2d", "3d"]``; None runs each task in its config's dim.
    """
    out, root = Path(out), resolve_data_root(data_root)
    if dims is not None and (not dims or set(dims) - set(DIMS) or len(set(dims)) != len(dims)):
        raise ValueError(f"dims must be distinct values among {list(DIMS)}, got {dims}")
    inits = [parse_init(t, freeze) for t in init_texts]
    if len({i.name for i in inits}) != len(inits):
        raise ValueError(f"initialisation names must be unique, got {[i.name for i in inits]}; use NAME=SPEC")
    defs = {}
    for path in definitions:
        d = load_definition(path)
        defs[d["name"]] = d
    rows = []
    for bench, d in defs.items():
        for task in d["tasks"]:
            task_dir = out / _slug(bench) / _slug(task.get("name", ""))
            for dim in dims or [None]:
                for init in inits:
                    folder = (task_dir / dim if dim else task_dir) / _slug(init.name)
                    row = run_task(task, init, root, folder, train_overrides or {}, progress, dim)
                    row["benchmark"] = bench
                    rows.append(row)
                    print(
                        f"{bench} {task.get('name', '')} {row['dim']} {init.name}: IoU {row['mean_foreground_iou']} "
                        f"(train {row['train_seconds']} s)",
                        flush=True,
                    )
    table = results_table(rows, defs, [i.name for i in inits], show_dim=dims is not None)
    write_results(out, rows, table)
    return rows, table


def resolve_data_root(data_root: str | Path | None) -> Path:
    """``data_root``, else :func:`default_data_root`; an error naming it when it is not a folder."""
    root = Path(data_root) if data_root else default_data_root()
    if not root.is_dir():
        raise ValueError(f"data root {root} not found: pass --data-root or set CEM_DATA")
    return root


def write_results(out: Path, rows: list[dict], table: str) -> None:
    """``out/results.json`` (the rows), ``out/results.md`` (the table) and ``out/results.html`` (the
    table and every run's test overlay), each written atomically."""
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / "results.json") as tmp:
        tmp.write_text(json.dumps(rows, indent=2))
    with atomic_path(out / "results.md") as tmp:
        tmp.write_text(table)
    page = benchmark_html(f"finetune benchmark {out.name}", table, rows, _overlay_caption)
    write_html(out / "results.html", page)


def _overlay_caption(row: dict) -> str:
    names = [str(row[k]) for k in ("benchmark", "task", "dim", "init") if row.get(k)]
    names += [f"{k} {row[k]:g}" if k == "fraction" else f"{k} {row[k]}" for k in ("fraction", "seed") if k in row]
    iou = row.get("mean_foreground_iou")
    return " / ".join(names) + f": test IoU {'-' if iou is None else f'{iou:.3f}'}"


def task_overlay(images: str, masks: str, preds: str, spec: LabelSpec) -> np.ndarray:
    """One picture of a task's test predictions (:func:`finetune.report.overlay`, central crop).

    The slice shown is the one with the most labelled foreground among up to 8 evenly spaced
    slices of the test volume (a set of separate 2D images: among up to 8 of its files).
    """
    image_files, mask_files, pred_files = input_files(images), input_files(masks), input_files(preds)
    if len(pred_files) > 1:  # one prediction per test image
        picks = np.unique(np.linspace(0, len(pred_files) - 1, num=min(8, len(pred_files))).astype(int))
        candidates = [
            (open_input([image_files[i]]), open_input([mask_files[i]]).volume, open_volume(pred_files[i]), 0)
            for i in picks
        ]
    else:
        image, mask, pred = open_input(images), open_input(masks).volume, open_volume(pred_files[0])
        zs = np.unique(np.linspace(0, image.shape[0] - 1, num=min(8, image.shape[0])).astype(int))
        candidates = [(image, mask, pred, int(z)) for z in zs]
    best, best_fg = None, -1
    for image, mask, pred, z in candidates:
        truth = to_class_map(mask.read_slices(z, z + 1)[0], spec, str(masks))
        fg = int(((truth > 0) & (truth != IGNORE_INDEX)).sum())
        if fg > best_fg:
            best, best_fg = (image, truth, pred, z), fg
    image, truth, pred, z = best
    ys, xs = central_crop(truth.shape)
    return overlay(image.read_uint8(z, z + 1)[0][ys, xs], pred.read_slices(z, z + 1)[0][ys, xs], truth[ys, xs])


def _slug(text: str) -> str:
    keep = "".join(c if c.isalnum() or c in "-_." else "_" for c in text.strip())
    return keep or "default"

"""Benchmarks: train, predict and score several encoder initialisations; Table 2 form.

A benchmark definition (``benchmarks/finetune/*.yaml``) is a YAML mapping::

    name: Lucchi++
    source: where to get the data (citation, URL)
    layout: the folder layout the globs below expect
    split: which images train and which test
    paper: {iters: 10000, random: 0.894, imagenet: 0.865, cem500k: 0.895, reported: 0.888}
    tasks:                               # one or more (Perez has four organelles)
      - name: mito
        config: configs/finetune/lucchi_pp.yaml    # TrainConfig; relative to the repository
        test:
          images: lucchi_pp/test/images/*.tif      # glob relative to the data root
          masks: lucchi_pp/test/masks/*.tif
          mode: stack                              # or orthoplane
          instances_only: false                    # Perez-style scoring
          per_image: true                          # 2D test set: one prediction per image
          tile: 512                                # prediction tile side (optional)

Data globs (in the config and the test spec) are relative to ``--data-root``. An
initialisation is ``random``, ``imagenet``, ``cem500k:PATH`` or a weights ``PATH``,
optionally named ``NAME=SPEC``. As in the paper's Table 2, a randomly initialised encoder
is trained with the decoder and a pre-trained encoder is frozen (``--freeze`` changes it).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from cemcurate.atomic import atomic_path
from cemcurate.config import load_config
from finetune.config import EvaluateConfig, PredictConfig, TrainConfig

REPO = Path(__file__).resolve().parents[1]
_TASK_KEYS = {"name", "config", "test", "overrides"}
_TEST_KEYS = {"images", "masks", "mode", "instances_only", "per_image", "ignore_mask", "tile"}
_DEF_KEYS = {"name", "source", "layout", "split", "paper", "tasks", "notes", "licence", "data"}
# Column names of the paper's Table 2 for the standard initialisations.
_INIT_NAMES = {"random": "Random Init.", "imagenet": "IN-super"}


@dataclass
class Init:
    """One initialisation column: display name, encoder spec, freeze the encoder?"""

    name: str
    spec: str
    frozen: bool


def default_data_root() -> Path:
    """``$CEM_DATA`` if set, else ``<repo>/../shared/data`` (the project's real-data folder)."""
    return Path(os.environ.get("CEM_DATA", REPO.parent / "shared" / "data"))


def parse_init(text: str, freeze: str = "paper") -> Init:
    """``[NAME=]SPEC[+frozen|+trainable]`` -> :class:`Init`.

    ``freeze`` is the default policy: ``paper`` (random trains, pre-trained is frozen, as in
    Table 2), ``all`` or ``none``; a ``+frozen``/``+trainable`` suffix overrides it for one
    initialisation (e.g. ``"Random frozen=random+frozen"``, the paper's Figure 2c baseline).
    """
    forced = None
    for suffix, value in (("+frozen", True), ("+trainable", False)):
        if text.endswith(suffix):
            text, forced = text[: -len(suffix)], value
    name, sep, spec = text.partition("=")
    if not sep or name.startswith(("cem500k:", "/", ".")):
        name, spec = "", text
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
        config = REPO / task["config"]          # an absolute path stays absolute
        if not config.is_file():
            raise ValueError(f"{where}: config {task['config']} not found (relative paths start at {REPO})")
    d.setdefault("name", path.stem)
    return d


def run_task(task: dict, init: Init, data_root: Path, out: Path, train_overrides: dict,
             progress: bool = True) -> dict:
    """Train one initialisation on one task, predict its test set and score it."""
    from finetune.evaluate import evaluate_paths
    from finetune.predict import predict_path
    from finetune.train import train

    overrides = dict(task.get("overrides") or {})
    overrides.update({k: v for k, v in train_overrides.items() if v is not None})
    overrides.update({"data_dir": str(data_root), "encoder": init.spec, "freeze_encoder": init.frozen})
    cfg = load_config(TrainConfig, REPO / task["config"], overrides=overrides)
    result = train(cfg, out, progress=progress)
    test = task["test"]
    t0 = time.perf_counter()
    per_image = bool(test.get("per_image", False))
    pred_out = str(out / "test_pred") + "/" if per_image else str(out / "test_pred.tif")
    pcfg = PredictConfig(mode=test.get("mode", "stack"), output_type="labels", device=cfg.device,
                         tile=int(test.get("tile", 512)))
    predict_path(out, str(data_root / test["images"]), pred_out, pcfg, progress=progress)
    predict_seconds = time.perf_counter() - t0
    ecfg = EvaluateConfig(classes=cfg.classes, label_threshold=cfg.mask_threshold, label_map=cfg.label_map,
                          unmapped=cfg.unmapped, ignore_label=cfg.ignore_label,
                          ignore_mask=str(data_root / test["ignore_mask"]) if test.get("ignore_mask") else "",
                          instances_only=bool(test.get("instances_only", False)), pred_kind="labels",
                          json=str(out / "test_scores.json"))
    scores = evaluate_paths(pred_out, str(data_root / test["masks"]), ecfg)
    from finetune.evaluate import write_json

    write_json(scores, ecfg.json)
    return {"task": task.get("name", ""), "init": init.name, "encoder": init.spec, "frozen": init.frozen,
            "iters": cfg.iters, "arch": cfg.arch, "crop": cfg.crop, "batch_size": cfg.batch_size,
            "train_seconds": round(result.seconds, 1), "predict_seconds": round(predict_seconds, 1),
            "iou": scores["iou"], "mean_foreground_iou": scores["mean_foreground_iou"]}


def results_table(rows: list[dict], definitions: dict[str, dict], inits: list[str]) -> str:
    """Markdown table in the form of the paper's Table 2 (mean foreground IoU per init)."""
    head = ["Benchmark", "Training Iterations"] + inits + ["Paper CEM500K-moco"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    keys = []
    for r in rows:
        key = (r["benchmark"], r["task"])
        if key not in keys:
            keys.append(key)
    for bench, task in keys:
        sub = [r for r in rows if (r["benchmark"], r["task"]) == (bench, task)]
        label = bench + (f" ({task})" if task and sum(1 for k in keys if k[0] == bench) > 1 else "")
        by_init = {r["init"]: r for r in sub}
        cells = [f"{by_init[i]['mean_foreground_iou']:.3f}" if i in by_init and by_init[i]["mean_foreground_iou"]
                 is not None else "-" for i in inits]
        paper_cfg = definitions[bench].get("paper") or {}
        paper = (paper_cfg.get("cem500k_per_task") or {}).get(task, paper_cfg.get("cem500k"))
        lines.append("| " + " | ".join([label, str(sub[0]["iters"])] + cells +
                                      [f"{paper:.3f}" if isinstance(paper, (int, float)) else "-"]) + " |")
    timing = ["", "| Benchmark | Init | Iterations | Arch | Crop | Batch | Train s | Predict s | IoU per class |",
              "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ious = ", ".join(f"{c} {v:.3f}" if v is not None else f"{c} -" for c, v in r["iou"].items())
        timing.append(f"| {r['benchmark']}{' (' + r['task'] + ')' if r['task'] else ''} | {r['init']} | {r['iters']} | "
                      f"{r['arch']} | {r['crop']} | {r['batch_size']} | {r['train_seconds']} | {r['predict_seconds']} | {ious} |")
    return "\n".join(lines + timing) + "\n"


def run_benchmarks(definitions: list[str | Path], init_texts: list[str], out: str | Path,
                   data_root: str | Path | None = None, freeze: str = "paper", train_overrides: dict | None = None,
                   progress: bool = True) -> tuple[list[dict], str]:
    """Run every definition x initialisation; write ``results.json`` and ``results.md`` in ``out``."""
    out = Path(out)
    root = Path(data_root) if data_root else default_data_root()
    if not root.is_dir():
        raise ValueError(f"data root {root} not found: pass --data-root or set CEM_DATA")
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
            for init in inits:
                folder = out / _slug(bench) / _slug(task.get("name", "")) / _slug(init.name)
                row = run_task(task, init, root, folder, train_overrides or {}, progress)
                row["benchmark"] = bench
                rows.append(row)
                print(f"{bench} {task.get('name', '')} {init.name}: IoU {row['mean_foreground_iou']} "
                      f"(train {row['train_seconds']} s)", flush=True)
    table = results_table(rows, defs, [i.name for i in inits])
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / "results.json") as tmp:
        tmp.write_text(json.dumps(rows, indent=2))
    with atomic_path(out / "results.md") as tmp:
        tmp.write_text(table)
    return rows, table


def _slug(text: str) -> str:
    keep = "".join(c if c.isalnum() or c in "-_." else "_" for c in text.strip())
    return keep or "default"


def add_benchmark_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("definitions", nargs="+", metavar="DEFINITION",
                   help="benchmark definition YAML files (benchmarks/finetune/*.yaml)")
    p.add_argument("--inits", nargs="+", default=["random"], metavar="[NAME=]SPEC[+frozen|+trainable]",
                   help="initialisations: random, imagenet, cem500k:PATH or a weights PATH, optionally named and "
                        "with the freeze policy overridden (default: random)")
    p.add_argument("--out", required=True, type=Path, help="output folder (one run per benchmark/task/init)")
    p.add_argument("--data-root", type=Path, help="folder the data globs are relative to "
                                                  "(default: $CEM_DATA or ../shared/data)")
    p.add_argument("--freeze", choices=("paper", "all", "none"), default="paper",
                   help="paper: random encoders train, pre-trained ones are frozen (Table 2); all; none")
    p.add_argument("--iters", type=int, help="override the training iterations of every task")
    p.add_argument("--arch", help="override the encoder architecture")
    p.add_argument("--crop", type=int, help="override the crop size")
    p.add_argument("--batch-size", type=int, help="override the batch size")
    p.add_argument("--workers", type=int, help="override data-loading workers")
    p.add_argument("--device", help="override the device (auto, cpu, cuda)")
    p.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE",
                   help="override any TrainConfig key for every task, e.g. class_weighting=prevalence lr=0.001 "
                        "(VALUE is read as YAML)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def parse_sets(items: list[str]) -> dict:
    """``["key=value", ...]`` -> ``{key: yaml value}``, keys checked against :class:`TrainConfig`."""
    import dataclasses

    valid = {f.name for f in dataclasses.fields(TrainConfig)}
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or key not in valid:
            raise ValueError(f"--set {item!r}: expected KEY=VALUE with KEY one of {sorted(valid)}")
        out[key] = yaml.safe_load(value)
    return out


def run_from_args(args: argparse.Namespace) -> None:
    overrides = parse_sets(args.set)
    overrides.update({k: getattr(args, k) for k in ("iters", "arch", "crop", "batch_size", "workers", "device")
                      if getattr(args, k) is not None})
    _, table = run_benchmarks(args.definitions, args.inits, args.out, args.data_root, args.freeze, overrides,
                              progress=not args.quiet)
    print(table)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="run_finetune", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_benchmark_arguments(parser)
    try:
        run_from_args(parser.parse_args(argv))
    except ValueError as exc:
        print(f"run_finetune: error: {exc}", file=sys.stderr)
        return 2
    return 0

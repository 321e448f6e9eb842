"""Argparse builders for ``cemcurate label`` and ``cemcurate filter train|evaluate``.

``cemcurate/cli.py`` calls :func:`add_label_command` and :func:`add_filter_command` with its
sub-parsers; each sets ``func`` to a handler that takes the parsed namespace and returns an
exit code.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from cemcurate.common.atomic import atomic_path
from cemcurate.common.config import add_config_arguments, load_config
from cemcurate.common.lazy import lazy_import
from cemcurate.filtering.config import FilterTrainConfig
from cemcurate.layout import BuildLayout

# The handlers' modules load pandas, Flask or torch: bound lazily, so that building the
# parser (``cemcurate --help``) imports none of them.
evaluation = lazy_import("cemcurate.filtering.evaluation")
np = lazy_import("numpy")
filters = lazy_import("cemcurate.filtering.filters")
label_server = lazy_import("cemcurate.filtering.label_server")
labels = lazy_import("cemcurate.filtering.labels")
train = lazy_import("cemcurate.filtering.train")


def _cmd_label(args: argparse.Namespace) -> int:
    if args.export_sheet is not None:
        sheets, csv_path = labels.export_sheets(
            args.out,
            args.export_sheet,
            count=args.sheet_patches,
            per_sheet=args.sheet_size,
            columns=args.sheet_columns,
            seed=args.seed,
            order=args.order,
        )
        n = sum(1 for _ in open(csv_path)) - 1
        print(f"wrote {len(sheets)} contact sheet(s) with {n} unlabelled patches to {args.export_sheet}")
        print(
            f"fill the 'label' column of {csv_path} (1 = informative, 0 = uninformative, blank = skip), "
            f"then run: cemcurate label {args.out} --import-sheet {csv_path}"
        )
        return 0
    if args.import_sheet is not None:
        added = labels.import_sheet(args.out, args.import_sheet)
        print(f"added {added} label(s) from {args.import_sheet} to {labels.labels_path(args.out)}")
        return 0
    return label_server.serve(
        args.out,
        port=args.port,
        open_browser=not args.no_browser,
        seed=args.seed,
        page_size=args.page_size,
        order=args.order,
    )


def add_label_command(subparsers) -> argparse.ArgumentParser:
    """Add ``label OUT [--port P] [--no-browser] [--export-sheet DIR | --import-sheet CSV]``."""
    p = subparsers.add_parser(
        "label",
        help="label patches informative / uninformative (local web page, or contact sheets)",
        description="Show deduplicated patches of a build (random, or the most uncertain first once a classifier has "
        "scored it) in a local web page (http://127.0.0.1 only) and "
        "record each click as a label in OUT/labels.csv (patch_id, label: 1 informative / 0 uninformative, "
        "time), saved at once. A patch is uninformative when 80% or more of it is uniform (nucleus or "
        "cytoplasm interior, resin, padding), when it is low-contrast, or when it shows reconstruction "
        "artefacts or non-cellular objects (scale bars, text). Without a browser, export numbered contact "
        "sheets and a CSV to fill in, then import it.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("out", type=Path, help="a `cemcurate build` output folder")
    p.add_argument(
        "--port", type=int, default=0, help="TCP port on 127.0.0.1 for the page (0 = any free port; the URL is printed)"
    )
    p.add_argument("--no-browser", action="store_true", help="do not open a web browser, only print the URL")
    p.add_argument("--page-size", type=int, default=24, help="patches per page of the grid")
    p.add_argument(
        "--seed", type=int, default=None, help="seed of the random patch order; None = a new order every time"
    )
    p.add_argument(
        "--order",
        choices=("auto", "uncertain", "random"),
        default="auto",
        help="which unlabelled patches come first (page and sheets): 'uncertain' = informative_prob nearest the "
        "build's threshold (active learning: train a classifier, rebuild with --filter "
        "OUT/filter/classifier.pth, label again); 'random'; 'auto' = uncertain when the build's scores rank "
        "patches (a classifier's), random when they only keep or drop (the rules)",
    )
    mode = p.add_mutually_exclusive_group()
    mode.add_argument(
        "--export-sheet",
        type=Path,
        default=None,
        metavar="DIR",
        help="instead of serving the page, write numbered contact sheets (PNG) of unlabelled patches and "
        "DIR/sheet_labels.csv (patch_id, sheet, position, label) to fill in",
    )
    mode.add_argument(
        "--import-sheet",
        type=Path,
        default=None,
        metavar="CSV",
        help="merge a filled-in sheet CSV into OUT/labels.csv (labels 1/0, i/u or informative/uninformative; "
        "blank rows are skipped)",
    )
    p.add_argument("--sheet-patches", type=int, default=240, help="number of patches to export with --export-sheet")
    p.add_argument("--sheet-size", type=int, default=48, help="patches per contact sheet")
    p.add_argument("--sheet-columns", type=int, default=8, help="columns of each contact sheet")
    p.set_defaults(func=_cmd_label)
    return p


def _cmd_filter_train(args: argparse.Namespace) -> int:
    cfg = load_config(FilterTrainConfig, args.config, vars(args))
    metrics = train.train_filter(args.out, cfg, progress=not args.quiet)
    dest = Path(cfg.output) if cfg.output else BuildLayout(args.out).filter_dir
    auroc = metrics["auroc"]
    if metrics["bootstrap"]:
        b = metrics["bootstrap"]
        print(
            f"bootstrap: {b['uninformative']} uninformative and {b['informative']} informative patches labelled by the "
            f"label-free rules, {b['hand_labels']} hand labels; the held-out AUROC below measures agreement with "
            f"the rules - judge the classifier with `cemcurate filter evaluate` on a hand-labelled set"
        )
    print(
        f"trained on {metrics['n_train']} labelled patches, tested on {metrics['n_test']} held out: "
        f"AUROC ResNet {auroc['resnet']:.3f}, Random Forest {auroc['forest']:.3f}, label-free rules "
        f"{auroc['rules']:.3f}"
    )
    print(f"classifier: {dest / 'classifier.pth'}  (use: cemcurate build ... --filter {dest / 'classifier.pth'})")
    print(f"forest: {dest / 'stats_forest.pkl'}; ROC curves: {dest / 'roc.png'}; metrics: {dest / 'metrics.json'}")
    return 0


def _percent(value: float) -> str:
    return "-" if value != value else f"{100 * value:.1f}%"  # NaN: a class with no patches


def _cmd_filter_evaluate(args: argparse.Namespace) -> int:
    crops = evaluation.read_evaluation_set(args.labels)
    if args.min_edge is not None:
        small = [c for c in crops if min(c.h, c.w) < args.min_edge]
        crops = [c for c in crops if min(c.h, c.w) >= args.min_edge]
        print(f"--min-edge {args.min_edge}: left out {len(small)} crop(s) with a side below {args.min_edge} px")
        if not crops:
            raise ValueError(f"{args.labels}: no crop has both sides of at least --min-edge {args.min_edge} px")
    data_root = args.data if args.data is not None else args.labels.parent
    patches = evaluation.evaluation_patches(crops, data_root, source=args.labels)
    labels = np.array([c.label for c in crops])
    groups = np.array([c.group for c in crops])
    counts = f"{int(labels.sum())} informative, {int((labels == 0).sum())} uninformative"
    print(f"{args.labels}: {len(crops)} patches from {len(set(groups))} source folder(s), {counts}")
    report, curves = {}, {}
    for spec in args.filters or ["stats"]:
        patch_filter = filters.make_filter(spec)
        scores = patch_filter(patches)
        threshold = patch_filter.threshold if args.threshold is None else args.threshold
        overall = evaluation.filter_metrics(labels, scores, threshold)
        per_group = {
            g: evaluation.filter_metrics(labels[groups == g], scores[groups == g], threshold)
            for g in sorted(set(groups))
        }
        report[spec] = {"filter": patch_filter.name, **overall, "by_source_folder": per_group}
        if overall["informative"] and overall["uninformative"]:
            curves[spec] = {**evaluation.roc_points(labels, scores), "label": spec}
        print(
            f"\n--filter {spec} (keeps score >= {threshold:g}): AUROC {overall['auroc']:.3f}, precision "
            f"{overall['precision']:.3f}, recall {overall['recall']:.3f}; dropped: "
            f"{_percent(overall['informative_dropped'])} of the informative, "
            f"{_percent(overall['uninformative_dropped'])} of the uninformative"
        )
        print("| source folder | informative | uninformative | informative dropped | uninformative dropped |")
        print("|---|---|---|---|---|")
        for g, m in per_group.items():
            print(
                f"| {g} | {m['informative']} | {m['uninformative']} | {_percent(m['informative_dropped'])} | "
                f"{_percent(m['uninformative_dropped'])} |"
            )
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        with atomic_path(args.out / "metrics.json") as tmp:
            tmp.write_text(json.dumps(report, indent=2) + "\n")
        written = [args.out / "metrics.json"]
        if curves:
            evaluation.write_roc_png(
                args.out / "roc.png", curves, f"{args.labels.name}: {len(crops)} patches, {counts}"
            )
            written.append(args.out / "roc.png")
        print("\nwrote " + ", ".join(str(p) for p in written))
    return 0


def add_filter_command(subparsers) -> argparse.ArgumentParser:
    """Add ``filter train OUT [--labels CSV] [--config YAML] [flags]``."""
    f = subparsers.add_parser(
        "filter", help="train the uninformative-patch filter on labels", description="Uninformative-patch filter tools."
    )
    sub = f.add_subparsers(dest="filter_command", required=True, metavar="{train,evaluate}")
    t = sub.add_parser(
        "train",
        help="fine-tune a ResNet filter (and the statistics baseline) on OUT/labels.csv",
        description="Fine-tune a timm ResNet (layer4 + head by default, Adam lr 0.001, 30 epochs: the CEM500K recipe) "
        "to tell informative from uninformative patches, fit the Random Forest on four image statistics as "
        "a baseline, report both AUROCs on a held-out stratified split and write OUT/filter/classifier.pth, "
        "stats_forest.pkl, metrics.json, roc.png and filter_train.yaml. Uses CUDA (with AMP) when available.",
    )
    t.add_argument("out", type=Path, help="a `cemcurate build` output folder holding labels.csv")
    t.add_argument(
        "--config",
        type=Path,
        default=None,
        help=(
            "YAML with the settings below (keys with underscores, e.g. configs/curate/filter_train.yaml); flags "
            "override it (default: none, built-in defaults)"
        ),
    )
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    add_config_arguments(t, FilterTrainConfig)
    t.set_defaults(func=_cmd_filter_train)
    e = sub.add_parser(
        "evaluate",
        help="score filters on a labelled evaluation set: AUROC, precision/recall, ROC",
        description="Cut the patches an evaluation set names out of the raw files (with a default build's "
        "reader, intensity window and patch size), score them with each --filter and print the AUROC, the "
        "precision and recall of the informative class at the filter's threshold, and the share of each "
        "class dropped, overall and per source folder. The set is a CSV with the columns file, plane, "
        "slice, y, x, h, w, label (1 informative, 0 uninformative) and optionally dataset; "
        "benchmarks/filter_labels.csv is ours, on ../shared/data.",
    )
    e.add_argument("labels", type=Path, help="the evaluation set CSV")
    e.add_argument(
        "--data",
        type=Path,
        default=None,
        help="folder the CSV's file paths are relative to (default: the CSV's own folder)",
    )
    e.add_argument(
        "--filter",
        action="append",
        dest="filters",
        metavar="SPEC",
        help="a filter to evaluate, as `cemcurate build --filter` takes it (stats, none, a classifier .pth or a "
        "stats_forest.pkl); repeat to compare several (default: stats)",
    )
    e.add_argument(
        "--threshold",
        type=float,
        default=None,
        help="keep a patch when its score is at least this (default: each filter's own, 0.5 for stats)",
    )
    e.add_argument(
        "--min-edge",
        type=int,
        default=None,
        help="score only the crops whose sides are both at least this many pixels (112: the crops a default "
        "build cuts; smaller crops are enlarged to the patch size, which a default build never does); "
        "default: every crop",
    )
    e.add_argument(
        "--out", type=Path, default=None, help="folder to write metrics.json and roc.png into (default: print only)"
    )
    e.set_defaults(func=_cmd_filter_evaluate)
    return f

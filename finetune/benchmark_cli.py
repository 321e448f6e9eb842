"""``finetune benchmark`` on the command line: its options and the dispatch to a Table 2 run
(:func:`finetune.benchmark.run_benchmarks`), a label-fraction curve or a transfer matrix
(:mod:`finetune.benchmark_transfer`)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

from cemcurate.common.config import leaf_paths
from finetune.benchmark import __doc__ as BENCHMARK_DOC
from finetune.benchmark import run_benchmarks
from finetune.benchmark_transfer import run_fraction_curve, run_transfer_matrix
from finetune.config import DIMS, TrainConfig


def add_benchmark_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "definitions",
        nargs="*",
        metavar="DEFINITION",
        help="benchmark definition YAML files (benchmarks/finetune/*.yaml); with --fractions, DEF.yaml[:TASK] "
        "(default task: the first)",
    )
    p.add_argument(
        "--inits",
        nargs="+",
        metavar="[NAME=]SPEC[+frozen|+trainable]",
        help="initialisations: random, imagenet, cem500k:PATH, a weights PATH or model:RUN (a whole trained "
        "model, --init-model), optionally named and with the freeze policy overridden (default: random)",
    )
    p.add_argument(
        "--fractions",
        nargs="+",
        type=float,
        metavar="F",
        help="label-scarcity curve: train on nested random subsets of each task's training files, e.g. "
        "1 0.5 0.25 0.1 (writes fraction_curve.png); with --targets: one fraction, the targets' share",
    )
    p.add_argument(
        "--seeds",
        nargs="+",
        type=int,
        metavar="SEED",
        help="with --fractions or a transfer matrix: repeat every run with these seeds (subset and training; "
        "default: 42)",
    )
    p.add_argument(
        "--pretrain-tasks",
        nargs="+",
        metavar="DEF.yaml[:TASK]",
        help="transfer matrix: source tasks, each trained once on all its training data (needs --targets)",
    )
    p.add_argument(
        "--targets",
        nargs="+",
        metavar="DEF.yaml[:TASK]",
        help="transfer matrix: target tasks, fine-tuned from every source model (--init-model) and from scratch",
    )
    p.add_argument(
        "--source-iters", type=int, help="transfer matrix: training iterations of the source runs (default: --iters)"
    )
    p.add_argument("--out", required=True, type=Path, help="output folder (one run per benchmark/task/[dim/]init)")
    p.add_argument(
        "--dims",
        nargs="+",
        choices=DIMS,
        metavar="DIM",
        help="run every task as a 2D and/or 3D model (2d 3d), side by side in the table "
        "(default: each task's config decides)",
    )
    p.add_argument(
        "--data-root", type=Path, help="folder the data globs are relative to (default: $CEM_DATA or ../shared/data)"
    )
    p.add_argument(
        "--freeze",
        choices=("paper", "all", "none"),
        default="paper",
        help="paper: random encoders train, pre-trained ones are frozen (Table 2); all; none",
    )
    p.add_argument("--iters", type=int, help="override the training iterations of every task")
    p.add_argument("--arch", help="override the encoder architecture")
    p.add_argument("--crop", type=int, help="override the crop size")
    p.add_argument("--batch-size", type=int, help="override the batch size")
    p.add_argument("--workers", type=int, help="override data-loading workers")
    p.add_argument("--device", help="override the device (auto, cpu, cuda)")
    p.add_argument(
        "--set",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="override any TrainConfig key for every task, e.g. class_weighting=prevalence lr=0.001 "
        "(VALUE is read as YAML)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def parse_sets(items: list[str]) -> dict:
    """``["key=value", ...]`` -> ``{key: yaml value}``, keys checked against :class:`TrainConfig`."""
    valid = set(leaf_paths(TrainConfig))
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or key not in valid:
            raise ValueError(f"--set {item!r}: expected KEY=VALUE with KEY one of {sorted(valid)}")
        out[key] = yaml.safe_load(value)
    return out


def run_from_args(args: argparse.Namespace) -> None:
    """Dispatch ``finetune benchmark``: a Table 2 run, a label-fraction curve or a transfer matrix."""
    overrides = parse_sets(args.set)
    overrides.update(
        {
            k: getattr(args, k)
            for k in ("iters", "arch", "crop", "batch_size", "workers", "device")
            if getattr(args, k) is not None
        }
    )
    matrix = bool(args.pretrain_tasks or args.targets)
    dims = args.dims or []
    if (matrix or args.fractions) and len(dims) > 1:
        raise ValueError("--fractions and transfer matrices run one dim: pass at most one --dims value")
    if args.seeds and not (matrix or args.fractions):
        raise ValueError("--seeds applies to --fractions and transfer matrices (--pretrain-tasks/--targets)")
    if args.source_iters is not None and not matrix:
        raise ValueError("--source-iters applies to transfer matrices (--pretrain-tasks/--targets)")
    if matrix:
        if not (args.pretrain_tasks and args.targets):
            raise ValueError("a transfer matrix needs both --pretrain-tasks and --targets")
        if args.definitions or args.inits:
            raise ValueError(
                "a transfer matrix takes its tasks from --pretrain-tasks and --targets: drop the positional "
                "definitions and --inits (targets start from scratch and from every source model)"
            )
        if args.fractions and len(args.fractions) != 1:
            raise ValueError("a transfer matrix trains its targets on one --fractions value, e.g. 0.1")
        _, table = run_transfer_matrix(
            args.pretrain_tasks,
            args.targets,
            args.out,
            args.fractions[0] if args.fractions else 1.0,
            args.seeds,
            args.data_root,
            overrides,
            {"iters": args.source_iters} if args.source_iters is not None else {},
            progress=not args.quiet,
            dim=dims[0] if dims else None,
        )
    elif not args.definitions:
        raise ValueError("no benchmark definitions given (benchmarks/finetune/*.yaml)")
    elif args.fractions:
        _, table = run_fraction_curve(
            args.definitions,
            args.inits or ["random"],
            args.fractions,
            args.seeds or [42],
            args.out,
            args.data_root,
            args.freeze,
            overrides,
            progress=not args.quiet,
            dim=dims[0] if dims else None,
        )
    else:
        _, table = run_benchmarks(
            args.definitions,
            args.inits or ["random"],
            args.out,
            args.data_root,
            args.freeze,
            overrides,
            progress=not args.quiet,
            dims=args.dims,
        )
    print(table)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="run_finetune", description=BENCHMARK_DOC, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_benchmark_arguments(parser)
    try:
        run_from_args(parser.parse_args(argv))
    except ValueError as exc:
        print(f"run_finetune: error: {exc}", file=sys.stderr)
        return 2
    return 0

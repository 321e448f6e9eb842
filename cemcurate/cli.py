"""Command line of the curation stage: ``cemcurate build | check | export | dedup-preview | label | filter``.

Errors are one line naming the file (``--debug`` shows the traceback); Ctrl-C stops with
one line and exit code 130; a closed standard output (``| head``) is not an error.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from pathlib import Path

from cemcurate.build.config import BuildConfig
from cemcurate.common.config import add_config_arguments, load_config
from cemcurate.common.lazy import lazy_import
from cemcurate.filtering.cli import add_filter_command, add_label_command
from cemcurate.layout import BuildLayout
from cemcurate.sample import default_input

# The commands' modules load pandas and pyarrow: bound lazily, so that ``cemcurate --help``
# imports neither and each command only what it uses.
orchestrate = lazy_import("cemcurate.build.orchestrate")
checking = lazy_import("cemcurate.build.check")
preview = lazy_import("cemcurate.dedup.preview")
exporting = lazy_import("cemcurate.export_patches")

DEFAULT_OUT = "cemcurate_out"


def _cmd_build(args: argparse.Namespace) -> int:
    cfg = load_config(BuildConfig, args.config, vars(args))
    raw = args.raw
    if raw is None:
        raw, sidecar = default_input()
        if cfg.sources is None and sidecar is not None:
            cfg.sources = str(sidecar)
        print(f"no RAW folder given: using {raw}")
    summary = orchestrate.build(raw, args.out, cfg, progress=not args.quiet, wait=args.wait, debug=args.debug)
    for note in summary.notes:
        print(f"note: {note}", file=sys.stderr)
    if summary.n_sources == 0:
        print(
            f"note: {raw} holds no file cemcurate reads ({summary.skipped} skipped); wrote an empty, valid "
            f"{summary.out_dir}",
            file=sys.stderr,
        )
    print(
        f"{summary.n_sources} source(s) ({summary.reused} reused from an earlier run, {summary.skipped} file(s) "
        f"skipped), {summary.n_raw} raw patches, {summary.n_kept} kept -> {summary.out_dir}"
    )
    print(f"report: {BuildLayout(summary.out_dir).report}")
    if summary.failed:
        print(f"{len(summary.failed)} source(s) failed:", file=sys.stderr)
        for name, error in summary.failed.items():
            print(f"  {name}: {error.splitlines()[0]}", file=sys.stderr)
        return 1
    return 0


def _cmd_check(args: argparse.Namespace) -> int:
    result = checking.check_build(args.out, sample=args.sample)
    if not result.ok and args.repair:
        for problem in result.problems:
            print(f"found: {problem}", file=sys.stderr)
        checking.repair_build(args.out, args.raw, progress=not args.quiet)
        result = checking.check_build(args.out, sample=args.sample)
    for note in result.notes:
        print(f"note: {note}", file=sys.stderr)
    for problem in result.problems:
        print(f"problem: {problem}", file=sys.stderr)
    state = "OK" if result.ok else f"{len(result.problems)} problem(s)"
    print(
        f"{result.out_dir}: {state} ({result.rows} manifest rows, {result.shards} shards, "
        f"{result.hashed} patches re-hashed)"
    )
    return 0 if result.ok else 1


def _cmd_export(args: argparse.Namespace) -> int:
    n = exporting.export_patches(args.out, args.dest, args.format)
    print(f"wrote {n} patches to {args.dest}")
    return 0


def _cmd_dedup_preview(args: argparse.Namespace) -> int:
    page = preview.dedup_preview(args.out, groups=args.groups, max_hamming=args.max_hamming, seed=args.seed)
    print(f"wrote {page}")
    return 0


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cemcurate", description="Curate EM images into a deduplicated, filtered patch dataset (CEM500K-style)."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    b = sub.add_parser(
        "build",
        help="read every EM file in RAW and write curated 224x224 patches to OUT",
        description="Read every EM file in RAW (tif/tiff, png, jpg, bmp, mrc/map/rec/st, nii/nii.gz, h5, zarr, "
        "avi/mp4), convert to uint8, slice volumes, crop patches, remove near-duplicates, drop uninformative patches "
        "and write the patch store, manifest.parquet, sources.parquet and report.html to OUT. Re-running resumes.",
    )
    b.add_argument(
        "raw",
        nargs="?",
        type=Path,
        default=None,
        help=(
            "folder of EM files (or one file); default: $CEM_DATA, ../shared/data, else a small public sample "
            "downloaded once"
        ),
    )
    b.add_argument(
        "out", nargs="?", type=Path, default=Path(DEFAULT_OUT), help=f"output folder (default: {DEFAULT_OUT})"
    )
    b.add_argument(
        "--config",
        type=Path,
        default=None,
        help="YAML file with build settings (keys as the flags below, with underscores); flags override it",
    )
    b.add_argument("--quiet", action="store_true", help="no progress bar")
    b.add_argument(
        "--debug",
        action="store_true",
        help="print the full traceback of an error and of each failed source (the source table "
        "always keeps a one-line message)",
    )
    b.add_argument(
        "--wait",
        action="store_true",
        help="when another build is writing OUT, wait for it to finish instead of stopping",
    )
    add_config_arguments(b, BuildConfig)
    b.set_defaults(func=_cmd_build)

    c = sub.add_parser(
        "check",
        help="verify an output folder (files, schema, shards, dHash of a sample); --repair rebuilds what is missing",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    c.add_argument("out", type=Path, help="a cemcurate build output folder")
    c.add_argument(
        "--repair",
        action="store_true",
        help="redo the sources whose shards are missing or damaged and rewrite the outputs",
    )
    c.add_argument("--raw", type=Path, default=None, help="RAW folder for --repair (default: the one recorded in OUT)")
    c.add_argument("--sample", type=int, default=256, help="stored patches whose dHash is recomputed")
    c.add_argument("--quiet", action="store_true", help="no progress bar while repairing")
    c.add_argument("--debug", action="store_true", help="print the full traceback of an error")
    c.set_defaults(func=_cmd_check)

    e = sub.add_parser(
        "export",
        help="write every kept patch as an image file (CEM500K-style folder)",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    e.add_argument("out", type=Path, help="a cemcurate build output folder")
    e.add_argument("dest", type=Path, help="folder to write the images to")
    e.add_argument("--format", choices=("tiff", "png"), default="tiff", help="image file format")
    e.set_defaults(func=_cmd_export)

    d = sub.add_parser(
        "dedup-preview",
        help="HTML page of near-duplicate groups and pairs near the cutoff, to choose --max-hamming by eye",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    d.add_argument("out", type=Path, help="a cemcurate build output folder")
    d.add_argument("--groups", type=int, default=12, help="number of random near-duplicate groups shown")
    d.add_argument(
        "--max-hamming", type=int, default=None, help="cutoff to illustrate (default: the one the build used)"
    )
    d.add_argument("--seed", type=int, default=0, help="seed of the random choice of groups and pairs")
    d.set_defaults(func=_cmd_dedup_preview)
    add_label_command(sub)
    add_filter_command(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print(
            f"cemcurate {args.command}: interrupted; outputs already written stay valid (re-run to resume)",
            file=sys.stderr,
        )
        return 130
    except BrokenPipeError:
        # The reader of our output went away (e.g. `| head`): not an error. Point stdout at
        # /dev/null so the interpreter's final flush does not complain either.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except (ValueError, OSError) as exc:
        if getattr(args, "debug", False):
            traceback.print_exc()
        print(f"cemcurate {args.command}: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

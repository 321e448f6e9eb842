"""``finetune``: train, predict, evaluate and benchmark UNet-ResNet segmentation models.

Every config key is a flag (``finetune train --help`` lists them); ``--config FILE.yaml``
fills them from a file first (configs/finetune/ holds the paper benchmarks), flags win.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

from cemcurate.common.config import add_config_arguments, load_config
from cemcurate.io import ReadError
from finetune.benchmark_cli import add_benchmark_arguments, run_from_args
from finetune.config import EvaluateConfig, PredictConfig, TrainConfig
from finetune.evaluate import evaluate_paths, format_table, write_json
from finetune.predict.command import predict_path
from finetune.publish.bioimageio import DEFAULT_LICENSE, FORMATS, export_bioimageio
from finetune.train import train

_EPILOG_TRAIN = """examples:
  finetune train --config configs/finetune/lucchi_pp.yaml --data-dir /data/benchmarks \\
      --encoder cem500k:cem500k_mocov2_resnet50_200ep.pth.tar --out runs/lucchi
  finetune train --images 'raw/*.tif' --masks 'mito/*.png' --mask-threshold 127 \\
      --arch resnet18 --iters 500 --crop 256 --out runs/mito
  finetune train --dim 3d --images vol.tif --masks mito.tif --mask-threshold 0 --crop 128 --crop-depth 32 \
      --batch-size 2 --encoder runs/pretrain/export --out runs/mito3d      # inflated 3D U-Net
Re-running the same command after an interruption resumes from RUN/checkpoint.pth.
"""

_EPILOG_PREDICT = """examples:
  finetune predict runs/mito volume.mrc probs.tif
  finetune predict runs/urocell test.nii.gz seg.nii.gz --mode orthoplane --output-type labels
  finetune predict runs/mito 'test/*.png' preds/      # one output per image
  finetune predict runs/mito3d test.tif probs.zarr --window 64 128 128 --window-overlap 16 32 32
"""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="finetune", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "train",
        help="fine-tune a 2D or 3D UNet-ResNet on labelled images or volumes",
        description=TrainConfig.__doc__,
        epilog=_EPILOG_TRAIN,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", type=Path, help="YAML file with TrainConfig keys (flags override it)")
    p.add_argument(
        "--out",
        required=True,
        type=Path,
        metavar="RUN",
        help="run folder: config, checkpoints, logs and the final model.pth",
    )
    p.add_argument(
        "--stop-at",
        type=int,
        metavar="ITER",
        help="stop with a checkpoint after ITER iterations; re-run the command to continue",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_config_arguments(p, TrainConfig)

    p = sub.add_parser(
        "predict",
        help="predict a volume, a stack or a set of 2D images with a trained model",
        description=PredictConfig.__doc__,
        epilog=_EPILOG_PREDICT,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("run", metavar="RUN", help="run folder (or its model.pth)")
    p.add_argument(
        "input",
        metavar="INPUT",
        help="volume file (tif, mrc, nii.gz, h5 (PATH::KEY), zarr, ...), folder or glob of 2D images",
    )
    p.add_argument(
        "output",
        metavar="OUTPUT",
        help="output file, format from its suffix (.tif .zarr .nii.gz .mrc .npy ...), or a folder "
        "(ending in /) for one output per input file",
    )
    p.add_argument("--config", type=Path, help="YAML file with PredictConfig keys")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_config_arguments(p, PredictConfig)

    p = sub.add_parser(
        "evaluate",
        help="per-class IoU, F1 (Dice), precision and recall of a prediction against labels",
        description=EvaluateConfig.__doc__,
    )
    p.add_argument("pred", metavar="PRED", help="prediction: volume file, folder or glob of 2D images")
    p.add_argument("labels", metavar="LABELS", help="labels: volume file, folder or glob (paired with PRED in order)")
    p.add_argument("--config", type=Path, help="YAML file with EvaluateConfig keys")
    add_config_arguments(p, EvaluateConfig)

    p = sub.add_parser(
        "benchmark",
        help="train and score several encoder initialisations (paper Table 2 form)",
        description="Train, predict and evaluate every benchmark definition with every "
        "initialisation and write a Table-2-style results table.",
    )
    add_benchmark_arguments(p)

    p = sub.add_parser(
        "export",
        help="write a trained run as a bioimage.io model package (validated and tested)",
        description="Write RUN as a bioimage.io model package (spec 0.5) in DIR: rdf.yaml, state-dict and\n"
        "torchscript weights, test tensors, cover, documentation. The package is validated with bioimageio.spec\n"
        "and tested with bioimageio.core (as `bioimageio test DIR/rdf.yaml`) before it is renamed to DIR.\n"
        "Needs the publish extra (pip install -e '.[publish]'); makes no network request.",
        epilog="example:\n  finetune export runs/mito packages/mito --format bioimageio --author 'Ada Lovelace' \\\n"
        "      --repository-url https://github.com/ORG/cem-toolkit",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("run", metavar="RUN", help="run folder (or its model.pth)")
    p.add_argument("out", metavar="DIR", type=Path, help="package folder to write (must be empty or absent)")
    p.add_argument("--format", choices=FORMATS, default="bioimageio", help="package format (default bioimageio)")
    p.add_argument(
        "--author", action="append", required=True, metavar="NAME", help="package author (repeat for several)"
    )
    p.add_argument(
        "--license",
        default=DEFAULT_LICENSE,
        metavar="SPDX",
        help=f"license of the weights and documentation (default {DEFAULT_LICENSE}, the model zoo's recommendation; "
        "check the training data's terms)",
    )
    p.add_argument("--name", default="", help="package name (default from the run: network and classes)")
    p.add_argument("--description", default="", help="one-paragraph description (default from the run)")
    p.add_argument(
        "--repository-url",
        default="",
        metavar="URL",
        help="this repository's URL: cited, named as git_repo and as the pip source of the state-dict weights' "
        "environment (without it only CEM500K is cited)",
    )
    p.add_argument(
        "--voxel-size",
        type=float,
        nargs="+",
        metavar="NM",
        help="voxel size in nm, z y x (2D: y x); default the run's recorded voxel size",
    )
    p.add_argument(
        "--sample",
        metavar="IMAGE",
        help="image or volume the test input is cropped from (default the run's first validation, else "
        "training, image)",
    )
    p.add_argument(
        "--test-shape",
        type=int,
        nargs="+",
        metavar="N",
        help="test crop size, y x (3D: z y x); default 256 256 (3D 32 64 64), rounded to the network's size step",
    )
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty DIR")
    p.add_argument("--no-test", action="store_true", help="skip bioimageio.core's test (the format is still validated)")
    p.add_argument("--quiet", action="store_true", help="print only the result, not bioimageio.core's test summary")
    return parser


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    # One line naming the command, not Python's "file:line: UserWarning:" with a source line.
    print(f"finetune: warning: {message}", file=sys.stderr if file is None else file)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    with warnings.catch_warnings():
        warnings.showwarning = _show_warning
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    try:
        if args.command == "train":
            cfg = load_config(TrainConfig, args.config, overrides=vars(args))
            result = train(cfg, args.out, stop_at=args.stop_at, progress=not args.quiet)
            if result.finished and result.iteration < cfg.optim.iters:
                state = "stopped early (validation stopped improving; model_best.pth holds the best)"
            else:
                state = "finished" if result.finished else "stopped (re-run the same command to continue)"
            print(
                f"{args.out}: {state} at iteration {result.iteration}/{cfg.optim.iters} "
                f"after {result.seconds:.0f} s of training"
            )
            if result.val:
                print(f"validation mean foreground IoU: {result.val['mean_foreground_iou']:.4f}")
        elif args.command == "predict":
            cfg = load_config(PredictConfig, args.config, overrides=vars(args))
            for path in predict_path(args.run, args.input, args.output, cfg, progress=not args.quiet):
                print(path)
        elif args.command == "evaluate":
            cfg = load_config(EvaluateConfig, args.config, overrides=vars(args))
            result = evaluate_paths(args.pred, args.labels, cfg)
            print(format_table(result))
            if cfg.json:
                write_json(result, cfg.json)
        elif args.command == "export":
            result = export_bioimageio(
                args.run,
                args.out,
                authors=args.author,
                license=args.license,
                name=args.name,
                description=args.description,
                repository_url=args.repository_url,
                voxel_size=args.voxel_size,
                sample=args.sample,
                test_shape=args.test_shape,
                overwrite=args.overwrite,
                run_test=not args.no_test,
                log=(lambda text: None) if args.quiet else print,
            )
            print(f"{result.rdf}: " + ("format valid (not tested)" if args.no_test else "bioimageio.core test passed"))
        else:
            run_from_args(args)
    except KeyboardInterrupt:
        print("finetune: interrupted", file=sys.stderr)
        return 130
    except (ValueError, OSError, ReadError) as exc:  # WeightsError and CheckpointError are ValueErrors
        print(f"finetune {args.command}: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

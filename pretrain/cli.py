"""``pretrain``: MoCoV2 pre-training on curated EM patches and encoder export.

Subcommands::

    pretrain moco --data OUT --out RUN [--config YAML] [--gpus N | --gpus 0 --nproc N] [--<setting> VALUE ...]
    pretrain export CKPT DIR [--from-cem500k] [--arch ARCH] [--mean M --std S]
    pretrain analyze NAME=SPEC [NAME=SPEC ...] --out DIR [--images OUT|DIR|GLOB] [--noise-images N] ...
    pretrain probe NAME=SPEC [NAME=SPEC ...] --train-images G --train-masks G --test-images G --test-masks G --out DIR
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Sequence

import torch

from cemcurate.common.config import add_config_arguments, load_config
from cemcurate.common.device import DEVICE_HELP, mps_available
from cemcurate.common.runstate import CheckpointError
from cemcurate.common.weights import SPEC_HELP
from cemcurate.io import ReadError
from cemcurate.store import StoreError
from pretrain import analyze as analysis
from pretrain import distributed
from pretrain import probe as probing
from pretrain.config import MocoConfig
from pretrain.export_encoder import export_encoder
from pretrain.train import plan_run, train

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "pretrain" / "mocov2_cem500k.yaml"
# The CEM500K example patches of the project's real-data folder ($CEM_DATA or ../shared/data).
EXAMPLES = (
    Path(os.environ.get("CEM_DATA", Path(__file__).resolve().parents[2] / "shared" / "data")) / "cem500k_examples"
)

MOCO_EPILOG = """\
examples:
  # the CEM500K recipe on every visible GPU (ResNet50, batch 128, 200 epochs)
  pretrain moco --data cemcurate_out --out runs/cem500k
  # a short CPU smoke run
  pretrain moco --data cemcurate_out --out runs/smoke --gpus 0 --arch resnet18 --image-size 64 \\
      --batch-size 8 --queue-size 256 --max-steps 5
  # two CPU processes with gloo, or any torchrun launch
  pretrain moco --data cemcurate_out --out runs/ddp --gpus 0 --nproc 2 ...
  torchrun --nproc-per-node 4 -m pretrain.cli moco --data cemcurate_out --out runs/cem500k

Re-running the same command resumes from RUN/checkpoint.pth and continues exactly where it
stopped (only --epochs, --max-steps, --workers and the logging/checkpoint intervals may change).
RUN receives checkpoint.pth, config.yaml, log.csv and tensorboard/.
"""

ANALYZE_EPILOG = """\
examples:
  # our export against a random encoder of the same arch, test images from a build
  pretrain analyze random=random moco=runs/export --arch resnet18 --images cemcurate_out --out analysis
  # the released CEM500K weights
  pretrain analyze cem500k=cem500k:weights/cem500k_mocov2_resnet50_200ep.pth.tar --out analysis --device cuda
  # fewer distortions, quicker thresholds
  pretrain analyze moco=runs/export --distortions rotation=0,45,90 blur=1,2,4 --noise-images 200 --out analysis

strengths: rotation in degrees; hflip/vflip 1 = flipped; brightness: shift of intensities in [0, 1];
contrast: factor about the image mean; blur: Gaussian sigma (px); noise: Gaussian sigma in [0, 1] units;
scale f: centre crop of side 224/f resized back to 224. A firing rate of 1 means every neuron that fired
on an image (near its maximum) still fires on the distorted image.
"""


PROBE_EPILOG = """\
examples:
  # does our encoder separate tiles with mitochondria better than a random one? (VNC, sections 0-15 / 16-19)
  D=../shared/data/drosophila_vnc_gerhard/stack1
  pretrain probe moco=runs/export random=random --arch resnet18 --mask-threshold 127 \\
      --train-images "$D/raw/0?.tif" "$D/raw/1[0-5].tif" \\
      --train-masks "$D/mitochondria/0?.png" "$D/mitochondria/1[0-5].png" \\
      --test-images "$D/raw/1[6-9].tif" --test-masks "$D/mitochondria/1[6-9].png" --out probe_mito

A tile is positive when at least --positive-fraction of its pixels are foreground (mask > --mask-threshold),
negative below --negative-fraction, and left out in between. probe.json holds every score; a table is printed.
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pretrain",
        description="MoCoV2 pre-training on curated EM patches "
        "(`pretrain moco`) and publishable encoder weights (`pretrain export`).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="{moco,export,analyze,probe}")

    moco = sub.add_parser(
        "moco",
        help="MoCoV2 pre-training on a curated patch store (resumable, multi-GPU)",
        description="Train a ResNet encoder with MoCoV2 on the patches of a `cemcurate build` "
        "output folder. Every setting below overrides the --config file.",
        epilog=MOCO_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    moco.add_argument(
        "--data",
        required=True,
        type=Path,
        metavar="OUT",
        help="output folder of `cemcurate build` (store/, store.json, manifest.parquet)",
    )
    moco.add_argument(
        "--out",
        required=True,
        type=Path,
        metavar="RUN",
        help="run folder for checkpoints and logs; an existing checkpoint there is resumed",
    )
    moco.add_argument(
        "--config",
        type=Path,
        default=None,
        metavar="YAML",
        help=f"settings file whose keys are the options below (default: the CEM500K recipe, "
        f"{DEFAULT_CONFIG.relative_to(DEFAULT_CONFIG.parents[2])})",
    )
    moco.add_argument(
        "--gpus",
        type=int,
        default=None,
        metavar="N",
        help="train on N GPUs, one process each, with DDP over NCCL; 0 trains on the CPU "
        "(default: every visible GPU, or the CPU if there is none). Ignored under torchrun, "
        "except that --gpus 0 keeps torchrun processes on the CPU",
    )
    moco.add_argument(
        "--device",
        choices=distributed.DEVICE_CHOICES,
        default="auto",
        help="auto: every visible CUDA GPU (or --gpus N), else Apple MPS (one process), else the CPU "
        "(--nproc processes); cpu: as --gpus 0; cuda: fail without a GPU; mps: one process on Apple "
        "silicon (DDP has no MPS backend), the CPU with a warning where MPS is missing. Under torchrun "
        "only cpu (as --gpus 0) applies",
    )
    moco.add_argument(
        "--nproc",
        type=int,
        default=None,
        metavar="N",
        help="with --gpus 0: number of CPU processes (DDP over gloo; default 1)",
    )
    add_config_arguments(moco, MocoConfig)

    export = sub.add_parser(
        "export",
        help="publish the query encoder of a checkpoint (ours or CEM500K's)",
        description="Write encoder.safetensors, encoder.pth, config.json and model_card.md "
        "for the query encoder of CKPT. The weights load with strict=True into "
        "timm.create_model(arch, in_chans=1, num_classes=0) and into the encoder "
        "of smp.Unet(arch, in_channels=1).",
    )
    export.add_argument(
        "checkpoint",
        type=Path,
        metavar="CKPT",
        help="RUN/checkpoint.pth of `pretrain moco`, or a released CEM500K MoCoV2 checkpoint",
    )
    export.add_argument("out_dir", type=Path, metavar="DIR", help="folder to write the encoder files into")
    export.add_argument(
        "--from-cem500k",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="CKPT is in the released CEM500K layout (module.encoder_q.* keys, fc MLP head); "
        "default: detected from the keys",
    )
    export.add_argument(
        "--arch", default=None, help="backbone name if the checkpoint does not record it (CEM500K default: resnet50)"
    )
    export.add_argument(
        "--mean",
        type=float,
        default=None,
        help="normalisation mean of intensities in [0, 1] (default: from the checkpoint, "
        "or CEM500K's for an imported checkpoint without 'norms')",
    )
    export.add_argument("--std", type=float, default=None, help="normalisation std, as --mean")

    an = sub.add_parser(
        "analyze",
        help="what encoders learned (paper Fig. 3): invariance, selectivity, occlusion",
        description="For one or more encoders side by side write analyze.json, invariance.png, "
        "selectivity.png and occlusion.png into --out: (a) invariance: per distortion and strength the "
        "mean firing rate of the pooled features (Goodfellow et al. 2009, thresholds from noise images) "
        "and the cosine similarity of an image's and its distorted view's features; (b) selectivity: "
        "point-biserial correlation of each feature-map channel (output stride 8, 16 for nuclei) with "
        "the organelle masks of the correlation examples, the top-32 mean response and its IoU at 0.3; "
        "(c) occlusion: how much zeroing each 61x61 square (every 30 px) of one view lowers the dot "
        "product with another view's features, on the occlusion examples.",
        epilog=ANALYZE_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    an.add_argument(
        "encoders",
        nargs="+",
        metavar="NAME=SPEC",
        help=f"an encoder to analyse, named NAME in the outputs; SPEC: {SPEC_HELP}. The arch comes from "
        "the file (config.json or the state dict), else --arch; normalisation from the weights, else CEM500K's",
    )
    an.add_argument("--out", required=True, type=Path, metavar="DIR", help="folder for analyze.json and the PNGs")
    an.add_argument(
        "--images",
        default=None,
        metavar="OUT|DIR|GLOB",
        help="test images of the invariance analysis: a `cemcurate build` output folder (--n-images random "
        "kept patches) or a folder or glob of image files (centre 224 crops); default: the correlation "
        "and occlusion example images (--correlation, --occlusion)",
    )
    an.add_argument("--n-images", type=int, default=100, help="number of test images to sample (default: 100)")
    an.add_argument(
        "--noise-images",
        type=int,
        default=1000,
        help="uniform-noise images whose 99th-percentile responses are the neurons' firing thresholds "
        "(default: 1000, as the paper)",
    )
    an.add_argument(
        "--distortions",
        nargs="+",
        default=None,
        metavar="KIND[=S1,S2,...]",
        help=f"distortions and strengths to test (default: all of {', '.join(analysis.DISTORTIONS)} at "
        "built-in strengths; a bare KIND uses those)",
    )
    an.add_argument(
        "--correlation",
        type=Path,
        default=EXAMPLES / "correlation",
        metavar="DIR",
        help="selectivity examples: DIR/images/*.png with DIR/masks/*.png (0/255), named after the organelle "
        "(default: $CEM_DATA or ../shared/data, cem500k_examples/correlation)",
    )
    an.add_argument(
        "--occlusion",
        type=Path,
        default=EXAMPLES / "occlusion",
        metavar="DIR",
        help="occlusion examples: DIR/*.tif[f] (default: cem500k_examples/occlusion of the data folder)",
    )
    an.add_argument(
        "--max-occlusion-images", type=int, default=None, help="analyse only the first N occlusion examples"
    )
    an.add_argument("--arch", default="resnet50", help="arch of encoders whose files do not say (default: resnet50)")
    an.add_argument("--device", default="auto", help=DEVICE_HELP)
    an.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed of the image sample, noise, views and random weights (encoder i: seed+i)",
    )
    an.add_argument("--batch-size", type=int, default=32, help="images per forward pass (default: 32)")
    an.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="show a progress bar")

    pr = sub.add_parser(
        "probe",
        help="linear probe and kNN on frozen features: how well encoders separate tiles with an organelle",
        description="Cut the labelled images into non-overlapping --crop tiles, label each tile from its mask, "
        "embed the tiles with every encoder (global-average-pooled last stage, frozen) and score a "
        "class-balanced logistic regression (test AUROC, balanced accuracy at 0.5) and a k-nearest-neighbour "
        "vote by cosine similarity (balanced accuracy) trained on the training files and tested on the test files.",
        epilog=PROBE_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    pr.add_argument("encoders", nargs="+", metavar="NAME=SPEC", help=f"an encoder to probe; SPEC: {SPEC_HELP}")
    for split in ("train", "test"):
        for what in ("images", "masks"):
            pr.add_argument(
                f"--{split}-{what}",
                nargs="+",
                required=True,
                metavar="GLOB",
                help=f"{split}ing {what}: globs, folders or files, paired with the {split} "
                f"{'masks' if what == 'images' else 'images'} in sorted order",
            )
    pr.add_argument("--out", required=True, type=Path, metavar="DIR", help="folder for probe.json")
    pr.add_argument(
        "--crop", type=int, default=112, help="tile side in pixels, at the images' resolution (default: 112)"
    )
    pr.add_argument(
        "--positive-fraction",
        type=float,
        default=0.05,
        help="foreground share that makes a tile positive (default: 0.05)",
    )
    pr.add_argument(
        "--negative-fraction",
        type=float,
        default=0.005,
        help="foreground share below which a tile is negative (default: 0.005)",
    )
    pr.add_argument(
        "--mask-threshold",
        type=float,
        default=0.0,
        help="foreground = mask value above this (default: 0; 127 for anti-aliased masks)",
    )
    pr.add_argument("--k", type=int, default=5, help="neighbours of the kNN vote (default: 5)")
    pr.add_argument("--c", type=float, default=1.0, help="inverse L2 strength of the logistic regression (default: 1)")
    pr.add_argument("--arch", default="resnet50", help="arch of encoders whose files do not say (default: resnet50)")
    pr.add_argument("--device", default="auto", help=DEVICE_HELP)
    pr.add_argument("--seed", type=int, default=0, help="seed of random weights (encoder i: seed+i)")
    pr.add_argument("--batch-size", type=int, default=64, help="tiles per forward pass (default: 64)")
    return parser


def _fail(command: str, message: str) -> int:
    print(f"pretrain {command}: error: {message}", file=sys.stderr)
    return 2


def _train_worker(ctx: distributed.DistContext, cfg: MocoConfig, data: Path, out: Path, plan) -> dict:
    result = train(cfg, data, out, ctx, plan)
    return {"step": result.step, "checkpoint": str(result.checkpoint), "last_loss": result.last_loss}


def run_moco(args: argparse.Namespace) -> int:
    try:
        cfg = load_config(MocoConfig, args.config if args.config is not None else DEFAULT_CONFIG, overrides=vars(args))
        if args.nproc is not None and args.nproc < 1:
            raise ValueError(f"--nproc must be at least 1, got {args.nproc}")
        if args.gpus is not None and args.gpus < 0:
            raise ValueError(f"--gpus must be >= 0, got {args.gpus}")
        if distributed.under_torchrun():
            if args.device == "mps":
                raise ValueError("--device mps runs one process and torchrun starts several; run without torchrun")
            use_cuda = args.gpus != 0 and args.device != "cpu" and distributed.available_gpus() > 0
            ctx = distributed.torchrun_context(use_cuda)
            try:
                plan = plan_run(cfg, args.data, args.out, ctx.world_size, use_cuda)
                result = train(cfg, args.data, args.out, ctx, plan)
            finally:
                distributed.shutdown()
            if ctx.is_main:
                print(f"checkpoint: {result.checkpoint} (step {result.step})")
            return 0
        processes = distributed.plan_processes(
            args.device, args.gpus, args.nproc, distributed.available_gpus(), mps_available()
        )
        if args.device == "mps" and processes.kind == "cpu":
            print(
                "pretrain moco: warning: --device mps but torch has no usable Apple MPS backend here "
                "(it needs Apple silicon, macOS 12.3+ and a torch build with MPS): training on the CPU",
                file=sys.stderr,
            )
        use_cuda = processes.kind == "cuda"
        if use_cuda:
            distributed.check_gpus(processes.nprocs)
        plan = plan_run(cfg, args.data, args.out, processes.nprocs, use_cuda)
    except ValueError as exc:  # config, store, checkpoint and GPU checks all raise ValueError subclasses
        return _fail("moco", str(exc))

    try:
        results = distributed.launch(
            _train_worker,
            processes.nprocs,
            args=(cfg, args.data, args.out, plan),
            use_cuda=use_cuda,
            device=torch.device("mps") if processes.kind == "mps" else None,
        )
    except (StoreError, CheckpointError, distributed.GpuRequestError) as exc:
        return _fail("moco", str(exc))
    main_result = results[0]
    loss = main_result["last_loss"]
    print(
        f"checkpoint: {main_result['checkpoint']} (step {main_result['step']}"
        + (f", loss {loss:.4f})" if loss is not None else ")")
    )
    print(f"publish the encoder with: pretrain export {main_result['checkpoint']} DIR")
    return 0


def run_export(args: argparse.Namespace) -> int:
    try:
        result = export_encoder(
            args.checkpoint, args.out_dir, from_cem500k=args.from_cem500k, arch=args.arch, mean=args.mean, std=args.std
        )
    except ValueError as exc:  # ExportError, CheckpointError, WeightsError
        return _fail("export", str(exc))
    print(
        f"exported {result.arch} encoder ({result.source}; mean {result.mean:.4f}, std {result.std:.4f}) to "
        f"{result.out_dir}: " + ", ".join(p.name for p in result.files)
    )
    return 0


def run_analyze(args: argparse.Namespace) -> int:
    try:
        settings = analysis.AnalyzeSettings(
            images=args.images,
            n_images=args.n_images,
            noise_images=args.noise_images,
            correlation_dir=args.correlation,
            occlusion_dir=args.occlusion,
            arch=args.arch,
            device=args.device,
            seed=args.seed,
            batch_size=args.batch_size,
            distortions=analysis.parse_distortions(args.distortions)
            if args.distortions
            else dict(analysis.DISTORTIONS),
            max_occlusion_images=args.max_occlusion_images,
            progress=args.progress,
        )
        encoders = [analysis.parse_encoder_arg(text) for text in args.encoders]
        doc = analysis.analyze(encoders, args.out, settings)
    except (ValueError, OSError, ReadError) as exc:  # WeightsError, StoreError, unreadable images
        return _fail("analyze", str(exc))
    print(f"wrote {', '.join(doc['files'])} to {args.out}")
    return 0


def run_probe(args: argparse.Namespace) -> int:
    try:
        settings = probing.ProbeSettings(
            crop=args.crop,
            positive_fraction=args.positive_fraction,
            negative_fraction=args.negative_fraction,
            mask_threshold=args.mask_threshold,
            k=args.k,
            c=args.c,
            arch=args.arch,
            device=args.device,
            seed=args.seed,
            batch_size=args.batch_size,
        )
        encoders = [analysis.parse_encoder_arg(text) for text in args.encoders]
        train_pairs = probing.pair_files(args.train_images, args.train_masks)
        test_pairs = probing.pair_files(args.test_images, args.test_masks)
        doc = probing.probe(encoders, train_pairs, test_pairs, args.out, settings)
    except (ValueError, OSError, ReadError) as exc:
        return _fail("probe", str(exc))
    t, s = doc["train"], doc["test"]
    print(
        f"training: {t['tiles']} tiles ({t['positive']} positive) of {t['files']} files; "
        f"test: {s['tiles']} tiles ({s['positive']} positive) of {s['files']} files"
    )
    print(probing.results_table(doc))
    print(f"wrote {args.out / 'probe.json'}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "moco":
        return run_moco(args)
    if args.command == "analyze":
        return run_analyze(args)
    if args.command == "probe":
        return run_probe(args)
    return run_export(args)


if __name__ == "__main__":
    sys.exit(main())

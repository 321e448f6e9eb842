"""``pretrain``: MoCoV2 pre-training on curated EM patches and encoder export.

Subcommands::

    pretrain moco --data OUT --out RUN [--config YAML] [--gpus N | --gpus 0 --nproc N] [--<setting> VALUE ...]
    pretrain export CKPT DIR [--from-cem500k] [--arch ARCH] [--mean M --std S]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

import torch

from cemcurate.common.config import add_config_arguments, load_config
from cemcurate.common.device import mps_available
from cemcurate.common.runstate import CheckpointError
from cemcurate.store import StoreError
from pretrain import distributed
from pretrain.config import MocoConfig
from pretrain.export_encoder import export_encoder
from pretrain.train import plan_run, train

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "pretrain" / "mocov2_cem500k.yaml"

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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pretrain",
        description="MoCoV2 pre-training on curated EM patches "
        "(`pretrain moco`) and publishable encoder weights (`pretrain export`).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="{moco,export}")

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


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "moco":
        return run_moco(args)
    return run_export(args)


if __name__ == "__main__":
    sys.exit(main())

"""One run of every GPU path the CPU machine cannot execute: MoCo with AMP and channels-last, the data
loader against the GPU, fine-tuning steps, whole-volume prediction and the filter's ResNet34.

Run by ``benchmarks/gpu_check.sh`` on a machine with an NVIDIA GPU (everything in one call,
well under 10 minutes on one H200); ``--smoke`` runs the same code at toy sizes on the CPU (what
the test suite does, so the script cannot rot unseen). Prints Markdown tables and writes
``--json`` (default ``$OUT/gpu_check.json`` or ``gpu_check.json``):

1. MoCoV2 resnet50 at 224 px, batch 128 and 256, AMP + channels-last: images/s (query + key
   views per step count as one image) and peak GPU memory;
2. fp32 vs AMP from the same start over 20 steps on the same batches: the two loss curves and
   their largest difference;
3. the data loader (real augmentations on a synthetic store of 224-px patches) with 16
   workers: views/s, against the GPU's images/s from 1;
4. ``finetune`` training steps/s: 2D UNet-ResNet50 (batch 16, 224 px) and inflated 3D U-Net
   (batch 2, 64 x 128 x 128), AMP;
5. ``finetune predict`` voxels/s on a 512^3 volume: 2D stack mode (resnet50) and 3D sliding
   windows (the inflated U-Net);
6. the filter's ResNet34 (224 px, float16 autocast): patches/s.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from cemcurate.filtering.classifier import Classifier, create_model, predict_informative  # noqa: E402
from cemcurate.store import write_patch_store  # noqa: E402
from finetune.models import build_model  # noqa: E402
from finetune.predict.orthoplane import predict_stack  # noqa: E402
from finetune.predict.slices import SlicePredictor  # noqa: E402
from finetune.predict.sliding import predict_sliding  # noqa: E402
from pretrain.augment import AugmentParams  # noqa: E402
from pretrain.data import ViewPairs, view_loader  # noqa: E402
from pretrain.moco import MoCo  # noqa: E402
from pretrain.train import train_step  # noqa: E402

FULL = dict(
    arch="resnet50",
    size=224,
    batches=(128, 256),
    queue=65536,
    moco_steps=30,
    agree_steps=20,
    agree_batch=64,
    loader_workers=16,
    loader_steps=60,
    seg_arch="resnet50",
    seg_batch=16,
    seg3d_batch=2,
    seg3d_crop=(64, 128, 128),
    seg_steps=30,
    volume=512,
    window=(64, 128, 128),
    filter_patches=8192,
)
SMOKE = dict(
    arch="resnet18",
    size=64,
    batches=(8,),
    queue=64,
    moco_steps=2,
    agree_steps=3,
    agree_batch=8,
    loader_workers=2,
    loader_steps=3,
    seg_arch="resnet18",
    seg_batch=2,
    seg3d_batch=2,
    seg3d_crop=(32, 64, 64),
    seg_steps=2,
    volume=32,
    window=(16, 32, 32),
    filter_patches=32,
)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _moco(arch: str, queue: int, device: torch.device, channels_last: bool) -> MoCo:
    torch.manual_seed(0)
    model = MoCo(arch, queue_size=queue).to(device)
    return model.to(memory_format=torch.channels_last) if channels_last else model


def moco_throughput(p: dict, device: torch.device, amp: bool) -> list[dict]:
    rows = []
    for batch in p["batches"]:
        _reset_peak(device)
        model = _moco(p["arch"], p["queue"], device, channels_last=device.type == "cuda")
        optimizer = torch.optim.SGD(model.query_parameters(), lr=0.03, momentum=0.9, weight_decay=1e-4)
        scaler = torch.amp.GradScaler(device.type, enabled=amp)
        fmt = torch.channels_last if device.type == "cuda" else torch.contiguous_format
        im_q, im_k = (
            torch.randn(batch, 1, p["size"], p["size"], device=device).contiguous(memory_format=fmt) for _ in "qk"
        )
        for step in range(p["moco_steps"] + 3):
            if step == 3:  # warm-up steps (cuDNN autotuning, allocator) are not timed
                _sync(device)
                t0 = time.perf_counter()
            train_step(model, model.query_branch(), optimizer, scaler, im_q, im_k, 0.03, step, amp)
        _sync(device)
        seconds = time.perf_counter() - t0
        rows.append({"batch": batch, "images_per_s": batch * p["moco_steps"] / seconds, "peak_gib": _peak_gib(device)})
        del model, optimizer
    return rows


def fp32_vs_amp(p: dict, device: torch.device) -> dict:
    torch.manual_seed(1)
    batches = torch.randn(p["agree_steps"], 2, p["agree_batch"], 1, p["size"], p["size"])
    curves = {}
    for amp in (False, True):
        model = _moco(p["arch"], p["queue"], device, channels_last=False)
        optimizer = torch.optim.SGD(model.query_parameters(), lr=0.03, momentum=0.9, weight_decay=1e-4)
        scaler = torch.amp.GradScaler(device.type, enabled=amp and device.type == "cuda")
        losses = []
        for step in range(p["agree_steps"]):
            views = batches[step].to(device)
            out = train_step(
                model,
                model.query_branch(),
                optimizer,
                scaler,
                views[0],
                views[1],
                0.03,
                step,
                amp and device.type == "cuda",
            )
            losses.append(float(out.loss.detach()))
        curves["amp" if amp else "fp32"] = losses
        del model, optimizer
    diff = np.abs(np.array(curves["fp32"]) - np.array(curves["amp"]))
    return {**curves, "max_abs_diff": float(diff.max()), "max_rel_diff": float((diff / np.array(curves["fp32"])).max())}


def loader_throughput(p: dict, tmp: Path) -> dict:
    rng = np.random.default_rng(0)
    store = tmp / "store"
    write_patch_store(store, rng.integers(0, 256, size=(2048, 224, 224), dtype=np.uint8), source="synthetic")
    batch = max(p["batches"])
    dataset = ViewPairs(store, 0, batch, 0, 1, AugmentParams(image_size=p["size"]))
    steps = min(p["loader_steps"], dataset.steps_per_epoch() * 4)
    loader = view_loader(dataset, 0, steps, p["loader_workers"], pin_memory=torch.cuda.is_available())
    it = iter(loader)
    next(it)  # workers started
    t0 = time.perf_counter()
    n = 0
    for _ in it:
        n += 1
    seconds = time.perf_counter() - t0
    return {"workers": p["loader_workers"], "views_per_s": 2 * batch * n / seconds, "batch": batch}


def segmentation_steps(p: dict, device: torch.device, amp: bool) -> list[dict]:
    rows = []
    cases = [
        (
            "2D UNet",
            "unet2d",
            (p["seg_batch"], 1, p["size"], p["size"]),
        ),
        (
            "3D U-Net (inflated)",
            "unet3d",
            (p["seg3d_batch"], 1, *p["seg3d_crop"]),
        ),
    ]
    for name, kind, shape in cases:
        _reset_peak(device)
        model = build_model(kind, arch=p["seg_arch"], num_classes=2).to(device).train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        scaler = torch.amp.GradScaler(device.type, enabled=amp)
        x = torch.rand(shape, device=device)
        y = torch.randint(0, 2, (shape[0],) + shape[2:], device=device)
        for step in range(p["seg_steps"] + 2):
            if step == 2:
                _sync(device)
                t0 = time.perf_counter()
            with torch.autocast(device_type=device.type, dtype=torch.float16, enabled=amp):
                logits = model(x)
            # A binary model has one foreground logit; a multi-class one a logit per class.
            loss = (
                torch.nn.functional.binary_cross_entropy_with_logits(logits[:, 0].float(), y.float())
                if logits.shape[1] == 1
                else torch.nn.functional.cross_entropy(logits.float(), y)
            )
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        _sync(device)
        seconds = time.perf_counter() - t0
        rows.append(
            {"model": name, "batch": shape, "steps_per_s": p["seg_steps"] / seconds, "peak_gib": _peak_gib(device)}
        )
        del model, optimizer
    return rows


def prediction(p: dict, device: torch.device, amp: bool) -> list[dict]:
    n = p["volume"]
    volume = np.random.default_rng(0).integers(0, 256, size=(n, n, n), dtype=np.uint8)
    rows = []
    model2d = build_model("unet2d", arch=p["seg_arch"], num_classes=2).to(device).eval()
    predictor = SlicePredictor(model2d, device, amp, 512, 64, 8, 0)
    out = np.zeros((n, n, n), np.uint8)

    class Source:
        shape = volume.shape

        @staticmethod
        def read_unit(z0, z1):
            return volume[z0:z1].astype(np.float32) / np.float32(255.0)

    def write(z0, probs):
        out[z0 : z0 + probs.shape[1]] = np.rint(probs[-1] * 255).astype(np.uint8)

    _sync(device)
    t0 = time.perf_counter()
    predict_stack(Source, predictor, write, 16, False)
    _sync(device)
    rows.append({"mode": "2D stack", "voxels_per_s": volume.size / (time.perf_counter() - t0)})
    model3d = build_model("unet3d", arch=p["seg_arch"], num_classes=2).to(device).eval()
    _sync(device)
    t0 = time.perf_counter()
    predict_sliding(model3d, volume, p["window"], batch_size=4, out=out, device=device, amp=amp)
    _sync(device)
    rows.append({"mode": "3D sliding", "voxels_per_s": volume.size / (time.perf_counter() - t0)})
    return rows


def filter_throughput(p: dict, device: torch.device) -> dict:
    patches = np.random.default_rng(0).integers(0, 256, size=(p["filter_patches"], 224, 224), dtype=np.uint8)
    model = create_model("resnet34")
    classifier = Classifier(model=model, arch="resnet34", input_size=224, mean=0.5, std=0.2, threshold=0.5)
    predict_informative(classifier, patches[:256], batch_size=256, device=device, progress=False)  # warm-up
    _sync(device)
    t0 = time.perf_counter()
    predict_informative(classifier, patches, batch_size=256, device=device, progress=False)
    _sync(device)
    return {"patches_per_s": len(patches) / (time.perf_counter() - t0)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="toy sizes on whatever device there is (CPU tests)")
    parser.add_argument("--json", type=Path, default=Path(os.environ.get("OUT", ".")) / "gpu_check.json")
    args = parser.parse_args()
    p = SMOKE if args.smoke else FULL
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type != "cuda" and not args.smoke:
        sys.exit("gpu_check: no CUDA GPU here; --smoke runs the script at toy sizes on the CPU")
    amp = device.type == "cuda"
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (smoke)"
    torch.backends.cudnn.benchmark = True
    results: dict = {"device": name, "torch": torch.__version__, "smoke": args.smoke}
    print(f"## GPU check on {name} (torch {torch.__version__})\n", flush=True)
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        steps = [
            ("moco", lambda: moco_throughput(p, device, amp)),
            ("agreement", lambda: fp32_vs_amp(p, device)),
            ("loader", lambda: loader_throughput(p, Path(tmp))),
            ("segmentation", lambda: segmentation_steps(p, device, amp)),
            ("prediction", lambda: prediction(p, device, amp)),
            ("filter", lambda: filter_throughput(p, device)),
        ]
        for key, run in steps:
            t0 = time.perf_counter()
            try:
                results[key] = run()
            except Exception as exc:  # one failing part must not cost the others (one GPU session)
                results[key] = {"error": f"{type(exc).__name__}: {exc}"}
            print(f"{key} ({time.perf_counter() - t0:.0f} s): {json.dumps(results[key], default=str)}", flush=True)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2, default=str))
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()

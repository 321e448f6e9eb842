"""Throughput of the uninformative-patch filters on the CPU.

Run from the repository root:

    .venv/bin/python benchmarks/bench_filter.py [--data ../shared/data] [--patches 512]
        [--batch-size 64] [--threads 2] [--arch resnet34]

Patches are real: every 224-px tile of the VNC ssTEM stacks (both stacks, 16 tiles a
slice), repeated if more are asked for. Prints one Markdown table row per filter:

* ``stats`` rules (the label-free ``--filter stats``);
* the four CEM500K image statistics alone and with the Random Forest (``stats_forest.pkl``,
  fitted here on random labels: only its speed is measured);
* the ResNet classifier (random weights; speed does not depend on them) through
  ``make_filter`` on a classifier file, as ``cemcurate build --filter PATH`` calls it.

Every filter is timed on the same patches after one warm-up call, on ``--threads`` threads
(``torch.set_num_threads``; the NumPy parts are single-threaded).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def real_patches(data: Path, n: int) -> np.ndarray:
    """``n`` real 224-px uint8 patches (VNC ssTEM tiles, cycled if needed)."""
    import tifffile

    files = sorted((data / "drosophila_vnc_gerhard").glob("stack*/raw/*.tif"))
    if not files:
        raise SystemExit(f"{data}: no drosophila_vnc_gerhard/stack*/raw/*.tif; pass --data")
    tiles = []
    for f in files:
        image = tifffile.imread(f)
        tiles += [image[y : y + 224, x : x + 224] for y in range(0, 896, 224) for x in range(0, 896, 224)]
        if len(tiles) >= n:
            break
    tiles = np.stack(tiles)
    return tiles[np.arange(n) % len(tiles)]


def timed(fn, patches: np.ndarray, repeats: int = 1) -> float:
    """Patches per second of ``fn(patches)`` (best of ``repeats``), after a warm-up on a small batch."""
    fn(patches[:8])
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn(patches)
        best = min(best, time.perf_counter() - t0)
    return len(patches) / best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--data",
        type=Path,
        default=Path(os.environ.get("CEM_DATA", REPO.parent / "shared" / "data")),
        help="real-data root (default: $CEM_DATA or ../shared/data)",
    )
    parser.add_argument("--patches", type=int, default=512, help="patches per timed run")
    parser.add_argument("--batch-size", type=int, default=64, help="ResNet inference batch size")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--arch", default="resnet34", help="timm ResNet of the classifier")
    parser.add_argument("--repeats", type=int, default=1, help="timed runs per filter (best is reported)")
    args = parser.parse_args()

    import torch

    from cemcurate.filtering.classifier import create_model, save_classifier
    from cemcurate.filtering.features import image_statistics
    from cemcurate.filtering.filters import make_filter
    from cemcurate.filtering.forest import fit_forest, save_forest
    from cemcurate.filtering.rules import RuleSettings, rule_scores

    torch.set_num_threads(args.threads)
    patches = real_patches(args.data, args.patches)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        stats = make_filter("stats")
        rows.append(("`--filter stats` (label-free rules)", "-", timed(stats, patches, args.repeats)))
        # The reference in the same run: the rules as they were before issue 12 (no relative
        # noise floor, no structure rule).
        before = RuleSettings(rel_factor=0, min_structure=0)
        rows.append(
            (
                "the rules before issue 12 (no relative floor, no `unstructured` rule)",
                "-",
                timed(lambda p: rule_scores(p, before), patches, args.repeats),
            )
        )
        rows.append(
            (
                "4 image statistics (`image_statistics`)",
                "-",
                timed(image_statistics, patches[: max(64, args.patches // 4)], args.repeats),
            )
        )
        rng = np.random.default_rng(0)
        forest = fit_forest(rng.normal(size=(200, 4)), rng.integers(0, 2, 200), trees=200)
        save_forest(Path(tmp) / "forest.pkl", forest)
        forest_filter = make_filter(Path(tmp) / "forest.pkl")
        rows.append(
            (
                "Random Forest on the 4 statistics (`stats_forest.pkl`, 200 trees)",
                "-",
                timed(forest_filter, patches[: max(64, args.patches // 4)], args.repeats),
            )
        )
        torch.manual_seed(0)
        save_classifier(Path(tmp) / "clf.pth", create_model(args.arch), args.arch, 224, 0.5, 0.2)
        resnet = make_filter(Path(tmp) / "clf.pth", batch_size=args.batch_size, device="cpu")
        rows.append(
            (
                f"ResNet classifier ({args.arch}, 224 px, float32)",
                str(args.batch_size),
                timed(resnet, patches, args.repeats),
            )
        )

    cpu = platform.processor() or platform.machine()
    print(
        f"CPU: {cpu}, {os.cpu_count()} logical cores; torch {torch.__version__}, {torch.get_num_threads()} thread(s); "
        f"{args.patches} real 224-px VNC patches\n"
    )
    print("| filter | batch | patches/s |")
    print("|---|---|---|")
    for name, batch, rate in rows:
        print(f"| {name} | {batch} | {rate:.1f} |")


if __name__ == "__main__":
    main()

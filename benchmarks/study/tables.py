"""Combine `finetune benchmark --fractions` results of the study into one table and a verdict.

    .venv/bin/python benchmarks/study/tables.py study_runs/transfer/2d/results.json \
        study_runs/transfer/neuroproof/results.json [more results.json ...]

Prints the table of mean ± sd foreground IoU over seeds (one row per task and init, one column
per fraction), then, per task and fraction, the frozen-MoCo mean minus the random-frozen mean
and whether that gap exceeds the seed spread (the larger of the two standard deviations).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from finetune.benchmark_transfer import fraction_table

MOCO, RANDOM_FROZEN = "MoCo frozen", "random frozen"


def _scores(rows: list[dict], task: str, fraction: float, init: str) -> np.ndarray:
    return np.array(
        [
            r["mean_foreground_iou"]
            for r in rows
            if (r["task"], r["fraction"], r["init"]) == (task, fraction, init) and r["mean_foreground_iou"] is not None
        ]
    )


def verdict(rows: list[dict], treated: str = MOCO, baseline: str = RANDOM_FROZEN) -> list[str]:
    """One line per task and fraction: ``treated`` mean minus ``baseline`` mean against the seed spread."""
    lines = []
    keys = dict.fromkeys((r["task"], r["fraction"]) for r in rows)
    for task, fraction in keys:
        a, b = (_scores(rows, task, fraction, init) for init in (treated, baseline))
        if len(a) < 2 or len(b) < 2:
            continue
        gap, spread = a.mean() - b.mean(), max(a.std(ddof=1), b.std(ddof=1))
        word = "beats" if gap > spread else ("loses to" if -gap > spread else "within the spread of")
        lines.append(
            f"- {task}, fraction {fraction:g}: {treated} {word} {baseline} "
            f"({gap:+.3f}; seed spread {spread:.3f}; n = {len(a)}, {len(b)})"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", nargs="+", type=Path, help="results.json files of `finetune benchmark --fractions`")
    args = parser.parse_args()
    rows = [row for path in args.results for row in json.loads(path.read_text())]
    print(fraction_table(rows))
    print("\n".join(verdict(rows)))


if __name__ == "__main__":
    main()

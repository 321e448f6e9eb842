"""Train, predict and score benchmark definitions for several encoder initialisations.

Thin entry point for :func:`finetune.benchmark_cli.main` (same as ``finetune benchmark``):

    python benchmarks/run_finetune.py benchmarks/finetune/vnc_mito.yaml benchmarks/finetune/isbi2012.yaml \
        --inits random ours=runs/pretrain/export --out benchmarks/out/finetune

writes one run per benchmark/task/initialisation under ``--out`` and a results table in
the form of the paper's Table 2 (``results.md``, ``results.json``). See
``python benchmarks/run_finetune.py --help`` for the overrides (iterations, arch, crop,
batch size) used to fit CPU budgets.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from finetune.benchmark_cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())

"""Which training crops to keep: ASEM's block rejection (pure functions).

ASEM (Gallusser et al. 2023, Methods "Training: Sampling") trains on sparse, imbalanced
annotations and keeps a randomly placed block only if

1. at most 25% of its voxels are outside the labelled sample, and
2. at least 5% of its voxels are foreground, or else with probability 0.1 (a block with less
   foreground is rejected with probability 0.9),

so batches hold about the global foreground ratio without discarding the background-only
regions entirely. Here "outside the labelled sample" is every voxel labelled
:data:`~finetune.losses.IGNORE_INDEX` (``--ignore-label`` values and voxels outside
``--mask-volume``), and foreground is every class other than background (class 0).

A crop sampler draws candidates from its per-sample generator until one is accepted (at
most :data:`MAX_DRAWS`, then it keeps the last), so the sample stays a pure function of
``(seed, sample index)`` and resumed runs see the same data.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from finetune.losses import IGNORE_INDEX

MAX_DRAWS = 50


@dataclass(frozen=True)
class SamplingRule:
    """Acceptance rule for a training crop.

    Attributes:
        max_unlabelled: reject crops with a larger fraction of unlabelled voxels.
        min_foreground: crops with a smaller foreground fraction are rejected with
            probability ``reject_probability``.
        reject_probability: see ``min_foreground``.
    """

    max_unlabelled: float
    min_foreground: float
    reject_probability: float

    def accepts(self, labels: np.ndarray, rng: np.random.Generator) -> bool:
        """Whether to keep a crop with class map ``labels`` (uint8, any shape); draws from ``rng``
        only for a crop short of foreground."""
        n = labels.size
        unlabelled = np.count_nonzero(labels == IGNORE_INDEX)
        if unlabelled > self.max_unlabelled * n:
            return False
        foreground = n - unlabelled - np.count_nonzero(labels == 0)
        if foreground < self.min_foreground * n:
            return bool(rng.random() >= self.reject_probability)
        return True


# ``sampling`` settings: ``uniform`` keeps every crop; ``asem`` is the paper's rule.
SAMPLING_RULES: dict[str, SamplingRule | None] = {
    "uniform": None,
    "asem": SamplingRule(max_unlabelled=0.25, min_foreground=0.05, reject_probability=0.9),
}

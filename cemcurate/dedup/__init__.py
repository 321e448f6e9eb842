"""Deduplication of patches by their 64-bit difference hashes.

* :mod:`cemcurate.dedup.hamming` - Hamming distances and the exact range index;
* :mod:`cemcurate.dedup.grouping` - greedy near-duplicate grouping, also incremental;
* :mod:`cemcurate.dedup.inequality` - Lorenz curve and Gini coefficient of patches per source;
* :mod:`cemcurate.dedup.preview` - the ``cemcurate dedup-preview`` page (import it from there:
  it reads build folders, so it is not loaded with the compute modules above).

Importing this package loads numpy only.
"""

from cemcurate.dedup.grouping import (
    DEFAULT_MAX_HAMMING,
    IncrementalGrouping,
    assign_to_exemplars,
    group_incremental,
    group_near_duplicates,
)
from cemcurate.dedup.hamming import HammingRangeIndex, hamming_distance
from cemcurate.dedup.inequality import gini, lorenz_curve

__all__ = [
    "DEFAULT_MAX_HAMMING",
    "HammingRangeIndex",
    "IncrementalGrouping",
    "assign_to_exemplars",
    "gini",
    "group_incremental",
    "group_near_duplicates",
    "hamming_distance",
    "lorenz_curve",
]

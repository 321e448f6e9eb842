"""Where a build's time goes: wall seconds per stage, summed within one process.

The build's modules wrap each stage in ``with timed("decode"):``. Stages may nest; each
second is counted once, for the innermost stage running (a stage's own time excludes the
stages inside it), so the totals add up to the time covered. Totals are per process: a
build with one worker runs every source in the calling process, so there
:func:`stage_seconds` after ``build()`` is the build's whole split (``benchmarks/bench_build.py``
prints it); with a process pool each worker keeps its own. Meant for the one thread that runs
the build in each process.

Stages: ``discover`` (finding sources, checking finished parts), ``decode`` (file headers
and pixels), ``standardise`` (the uint8 window; the whole standardised volume of a 3-plane
source), ``slice`` (its xz/yz sections), ``cut`` (tiling, edge resizes, per-patch
statistics), ``hash`` (dHash), ``group`` (near-duplicate grouping), ``write`` (shards,
parts, the manifest and tables), ``merge`` (parts to the manifest), ``filter`` (the
uninformative-patch filter), ``report`` (``report.html``).
"""

from __future__ import annotations

import contextlib
import time
from collections import defaultdict
from typing import Iterator

_TOTALS: defaultdict[str, float] = defaultdict(float)
_INNER: list[float] = []  # per running stage: seconds spent in the stages nested inside it


@contextlib.contextmanager
def timed(stage: str) -> Iterator[None]:
    """Add the wall time of the block, less that of the stages nested in it, to ``stage``."""
    start = time.perf_counter()
    _INNER.append(0.0)
    try:
        yield
    finally:
        elapsed = time.perf_counter() - start
        inner = _INNER.pop()
        _TOTALS[stage] += elapsed - inner
        if _INNER:
            _INNER[-1] += elapsed


def stage_seconds() -> dict[str, float]:
    """Seconds per stage run in this process since the last :func:`reset`."""
    return dict(_TOTALS)


def reset() -> None:
    """Forget the totals (a new measurement)."""
    _TOTALS.clear()

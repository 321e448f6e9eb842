"""Exact search among 64-bit difference hashes: Hamming distances and a range index.

:class:`HammingRangeIndex` finds every base hash within ``max_hamming`` bits of each query
with multi-index hashing, which returns exactly the pairs within the threshold, never an
approximation. Shared by the greedy grouping (:mod:`cemcurate.dedup.grouping`) and the
dedup preview.
"""

from __future__ import annotations

import itertools
import math
from functools import lru_cache

import numpy as np

HASH_BITS = 64


# --------------------------------------------------------------------------- validation


def as_hashes(values, name: str) -> np.ndarray:
    """Validate a 1-D uint64 hash array (a numpy scalar or 0-d array counts as one hash)."""
    if not isinstance(values, (np.ndarray, np.generic)):
        raise ValueError(
            f"{name} must be a numpy uint64 array, got {type(values).__name__};"
            " build it with np.asarray(..., dtype=np.uint64)"
        )
    array = np.asarray(values)
    if array.dtype != np.uint64:
        hint = " (reinterpret signed storage with .view(np.uint64))" if array.dtype == np.int64 else ""
        raise ValueError(f"{name} must have dtype uint64, got {array.dtype}{hint}")
    if array.ndim > 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {array.shape}")
    return array.reshape(-1)


def check_max_hamming(max_hamming) -> int:
    """``max_hamming`` as an int, after checking it is an integer number of bits in 0..64."""
    if isinstance(max_hamming, bool) or not isinstance(max_hamming, (int, np.integer)):
        raise ValueError(f"max_hamming must be an integer, got {max_hamming!r}")
    if not 0 <= max_hamming <= HASH_BITS:
        raise ValueError(f"max_hamming must be between 0 and {HASH_BITS}, got {max_hamming}")
    return int(max_hamming)


# --------------------------------------------------------------------------- distances


def hamming_distance(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Number of differing bits between 64-bit hashes, with numpy broadcasting.

    ``a`` and ``b`` are uint64 arrays (or numpy uint64 scalars) of broadcastable shapes.
    Returns a uint8 array (values 0..64) of the broadcast shape; cast it before subtracting.
    """
    for name, value in (("a", a), ("b", b)):
        if not isinstance(value, (np.ndarray, np.generic)) or np.asarray(value).dtype != np.uint64:
            got = getattr(value, "dtype", type(value).__name__)
            raise ValueError(f"{name} must be a numpy uint64 array, got {got}")
    return np.bitwise_count(np.bitwise_xor(a, b))


class HammingRangeIndex:
    """Exact range search (all base hashes within ``max_hamming`` of each query).

    Multi-index hashing: the 64 bits are cut into ``m`` disjoint blocks with radii ``r_i``
    such that ``sum(r_i + 1) > max_hamming``. If two hashes were within ``max_hamming`` but
    differed in more than ``r_i`` bits of every block, they would differ in at least
    ``sum(r_i + 1) > max_hamming`` bits in total -- a contradiction (pigeonhole). So every
    true neighbour shares some block with the query up to ``r_i`` flipped bits, and looking
    up all keys within ``r_i`` of the query's block key in that block's table finds it. Each
    candidate is then checked with the full 64-bit popcount, so nothing false is returned.

    The number of blocks is chosen by a cost model (table lookups versus candidates to
    verify, from timings on this kind of CPU); when the base is small a plain vectorised
    popcount against all base hashes is cheaper and is used instead. Both are exact.
    """

    # Approximate costs in nanoseconds, measured with numpy 2 on one core (the choice only
    # affects speed, never results).
    _BRUTE_NS_PER_PAIR = 0.8
    _CANDIDATE_NS = 12.0
    _SEARCHSORTED_NS = 200.0
    _MAX_TABLE_BITS = 22
    _MAX_BLOCKS = 8
    # Queries x flips (or x base hashes) handled per vectorised step, to bound memory.
    _STEP_ELEMENTS = 1 << 22

    def __init__(self, base_hashes: np.ndarray, max_hamming: int, strategy: str = "auto"):
        """``strategy``: "auto" (cost model), "blocks" (multi-index) or "brute"; all exact."""
        if strategy not in ("auto", "blocks", "brute"):
            raise ValueError(f"strategy must be 'auto', 'blocks' or 'brute', got {strategy!r}")
        self.base = base_hashes
        self.max_hamming = max_hamming
        self.blocks = (
            None if strategy == "brute" else self._choose_blocks(len(base_hashes), max_hamming, strategy == "blocks")
        )
        self.tables = [self._build_table(*block[:2]) for block in self.blocks] if self.blocks else []

    # -- planning

    @staticmethod
    def _lookup_ns(width: int) -> float:
        if width <= 16:
            return 1.5  # count table fits in L2
        if width <= 20:
            return 7.0
        if width <= HammingRangeIndex._MAX_TABLE_BITS:
            return 12.0
        return HammingRangeIndex._SEARCHSORTED_NS

    @classmethod
    def _choose_blocks(cls, n_base: int, max_hamming: int, blocks_only: bool = False):
        """Return [(shift, width, radius, flips)] of the cheapest plan, or None for brute force."""
        best_cost = math.inf if blocks_only else n_base * cls._BRUTE_NS_PER_PAIR
        best_plan = None
        for n_blocks in range(1, min(max_hamming + 1, cls._MAX_BLOCKS) + 1):
            widths = [HASH_BITS // n_blocks + (1 if i < HASH_BITS % n_blocks else 0) for i in range(n_blocks)]
            # Smallest radii with sum(r_i + 1) > max_hamming, spread evenly, wider blocks first.
            radius_total = max_hamming + 1 - n_blocks
            radii = [radius_total // n_blocks + (1 if i < radius_total % n_blocks else 0) for i in range(n_blocks)]
            flip_counts = [sum(math.comb(w, k) for k in range(r + 1)) for w, r in zip(widths, radii)]
            if max(flip_counts) > 50_000:
                continue  # the flip table alone would be large; more blocks will be cheaper
            cost = sum(
                n_flips * (cls._lookup_ns(width) + n_base / 2.0**width * cls._CANDIDATE_NS)
                for width, n_flips in zip(widths, flip_counts)
            )
            if cost < best_cost:
                best_cost, best_plan = cost, (widths, radii)
        if best_plan is None:
            return None
        blocks, shift = [], 0
        for width, radius in zip(*best_plan):
            blocks.append((shift, width, radius, cls._flip_masks(width, radius)))
            shift += width
        return blocks

    @staticmethod
    @lru_cache(maxsize=32)
    def _flip_masks(width: int, radius: int) -> np.ndarray:
        masks = [0]
        for k in range(1, radius + 1):
            masks.extend(sum(1 << bit for bit in bits) for bits in itertools.combinations(range(width), k))
        masks = np.array(masks, dtype=np.uint64)
        masks.setflags(write=False)
        return masks

    def _build_table(self, shift: int, width: int):
        keys = (self.base >> np.uint64(shift)) & np.uint64((1 << width) - 1)
        if width <= self._MAX_TABLE_BITS:
            keys = keys.astype(np.int32)
            order = np.argsort(keys)  # members of a bucket may come in any order
            counts = np.bincount(keys, minlength=1 << width)
            index_dtype = np.int32 if len(self.base) < 2**31 else np.int64
            starts = np.zeros(len(counts), dtype=index_dtype)
            np.cumsum(counts[:-1], out=starts[1:])
            # A saturated uint8 copy of the counts is 4x smaller than the exact counts and
            # stays in cache; most lookups only need to learn that a bucket is empty.
            occupied = np.minimum(counts, 255).astype(np.uint8)
            table = (occupied, counts.astype(index_dtype), starts)
        else:
            order = np.argsort(keys)
            table = keys[order]
        return order, self.base[order], table

    # -- querying

    def query(self, queries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """All (query index, base index) pairs within max_hamming; int64 arrays, any order.

        Each pair appears at least once; with multi-index hashing a pair close in several
        blocks may appear more than once.
        """
        if len(queries) == 0 or len(self.base) == 0:
            empty = np.zeros(0, dtype=np.int64)
            return empty, empty
        if self.blocks is None:
            return self._query_brute(queries)
        # Real hashes are not uniform: partly flat patches share all-zero rows, so a block
        # key can hold a large share of the base. A query whose buckets hold more candidates
        # than a plain scan would touch is cheaper to scan, so it is moved to the brute path.
        candidate_limit = max(1024, int(len(self.base) * self._BRUTE_NS_PER_PAIR / self._CANDIDATE_NS))
        scanned = np.zeros(len(queries), dtype=bool)
        found_query, found_base = [], []
        for (shift, width, _, flips), (order, sorted_hashes, table) in zip(self.blocks, self.tables):
            query_keys = (queries >> np.uint64(shift)) & np.uint64((1 << width) - 1)
            step = max(1, self._STEP_ELEMENTS // len(flips))
            for start in range(0, len(queries), step):
                chunk_ids = np.arange(start, min(start + step, len(queries)))
                chunk_ids = chunk_ids[~scanned[chunk_ids]]
                if len(chunk_ids) == 0:
                    continue
                targets = (query_keys[chunk_ids, None] ^ flips[None, :]).ravel()  # (q * n_flips,)
                if isinstance(table, tuple):
                    occupied_table, counts_table, starts_table = table
                    targets = targets.view(np.int64)  # keys < 2**22, so the view is exact
                    hit = np.flatnonzero(occupied_table.take(targets))
                    hit_keys = targets[hit]
                    counts = counts_table.take(hit_keys).astype(np.int64)
                    first = starts_table.take(hit_keys).astype(np.int64)
                else:
                    first = np.searchsorted(table, targets, side="left")
                    counts = np.searchsorted(table, targets, side="right") - first
                    hit = np.flatnonzero(counts)
                    counts, first = counts[hit], first[hit]
                if len(hit) == 0:
                    continue
                query_of_hit = chunk_ids[hit // len(flips)]
                per_query = np.bincount(query_of_hit - start, weights=counts, minlength=len(chunk_ids) + 1)
                heavy = per_query > candidate_limit
                if heavy.any():
                    scanned[np.flatnonzero(heavy) + start] = True
                    light = ~scanned[query_of_hit]
                    query_of_hit, counts, first = query_of_hit[light], counts[light], first[light]
                for part in self._bounded_parts(counts):
                    query_index, base_index = self._verify(
                        queries, query_of_hit[part], first[part], counts[part], sorted_hashes, order
                    )
                    found_query.append(query_index)
                    found_base.append(base_index)
        if scanned.any():
            heavy_ids = np.flatnonzero(scanned)
            heavy_query, heavy_base = self._query_brute(queries[heavy_ids])
            found_query.append(heavy_ids[heavy_query])
            found_base.append(heavy_base)
        if not found_query:
            empty = np.zeros(0, dtype=np.int64)
            return empty, empty
        return np.concatenate(found_query).astype(np.int64), np.concatenate(found_base).astype(np.int64)

    def _bounded_parts(self, counts: np.ndarray) -> list[slice]:
        """Split hits into runs of at most about _STEP_ELEMENTS candidates, to bound memory."""
        total = int(counts.sum())
        if total <= self._STEP_ELEMENTS:
            return [slice(None)]
        ends = np.cumsum(counts)
        cuts = np.searchsorted(ends, np.arange(self._STEP_ELEMENTS, total, self._STEP_ELEMENTS), side="right")
        bounds = [0, *np.unique(cuts).tolist(), len(counts)]
        return [slice(a, b) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]

    def _verify(self, queries, query_of_hit, first, counts, sorted_hashes, order):
        """Check every member of every hit bucket; return (query index, base index) of the close.

        Bucket ``h`` holds sorted positions ``first[h] .. first[h] + counts[h] - 1``. Only the
        query hash is repeated per candidate; which query a close candidate came from is
        recovered afterwards from the running totals, as close candidates are few.
        """
        ends = np.cumsum(counts)
        total = int(ends[-1])
        positions = np.repeat(first - (ends - counts), counts) + np.arange(total, dtype=np.int64)
        query_hashes = np.repeat(queries.take(query_of_hit), counts)
        close = np.flatnonzero(np.bitwise_count(sorted_hashes.take(positions) ^ query_hashes) <= self.max_hamming)
        hit_of_close = np.searchsorted(ends, close, side="right")
        return query_of_hit.take(hit_of_close), order.take(positions.take(close))

    def _query_brute(self, queries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        found_query, found_base = [], []
        step = max(1, self._STEP_ELEMENTS // max(len(self.base), 1))
        for start in range(0, len(queries), step):
            block = queries[start : start + step, None] ^ self.base[None, :]
            rows, cols = np.nonzero(np.bitwise_count(block) <= self.max_hamming)
            found_query.append(rows + start)
            found_base.append(cols)
        return np.concatenate(found_query).astype(np.int64), np.concatenate(found_base).astype(np.int64)

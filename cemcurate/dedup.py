"""Near-duplicate grouping of 64-bit difference hashes, and inequality of patches per source.

Paper (Conrad & Narayan 2021, "Deduplication"): within one source dataset, patches whose
dHashes differ by a Hamming distance below 12 form a group of near-duplicates, and all but
one randomly chosen patch of each group are dropped. "Group" is made precise here as greedy
leader clustering, the semantics of the reference implementation: visit patches in a random
order; the first patch not yet assigned becomes an exemplar and takes every unassigned patch
within ``max_hamming`` of it as its duplicates. Exemplars are therefore pairwise more than
``max_hamming`` apart, every duplicate is within ``max_hamming`` of its exemplar, and a slow
drift through a series (slice k close to k+1 close to k+2 ...) does not merge the whole
series into one group, as connected components would.

Everything here is exact: neighbours are found with multi-index hashing (see
:class:`_HammingRangeIndex`), which returns exactly the pairs within the threshold, never an
approximation.
"""

from __future__ import annotations

import itertools
import math
from functools import lru_cache
from typing import NamedTuple

import numpy as np

__all__ = [
    "DEFAULT_MAX_HAMMING",
    "hamming_distance",
    "group_near_duplicates",
    "assign_to_exemplars",
    "group_incremental",
    "IncrementalGrouping",
    "lorenz_curve",
    "gini",
]

# Paper: "a distance <12"; the released CEM500K code compared with <= 12 (i.e. < 13).
DEFAULT_MAX_HAMMING = 11

_HASH_BITS = 64


# --------------------------------------------------------------------------- validation


def _as_hashes(values, name: str) -> np.ndarray:
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


def _check_max_hamming(max_hamming) -> int:
    if isinstance(max_hamming, bool) or not isinstance(max_hamming, (int, np.integer)):
        raise ValueError(f"max_hamming must be an integer, got {max_hamming!r}")
    if not 0 <= max_hamming <= _HASH_BITS:
        raise ValueError(f"max_hamming must be between 0 and {_HASH_BITS}, got {max_hamming}")
    return int(max_hamming)


# --------------------------------------------------------------------------- distances


def hamming_distance(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Number of differing bits between 64-bit hashes, with numpy broadcasting.

    ``a`` and ``b`` are uint64 arrays (or numpy uint64 scalars) of broadcastable shapes.
    Returns a uint8 array (values 0..64) of the broadcast shape; cast it before subtracting.
    """
    for name, value in (("a", a), ("b", b)):
        if not isinstance(value, (np.ndarray, np.generic)) or np.asarray(value).dtype != np.uint64:
            raise ValueError(f"{name} must be a numpy uint64 array, got {getattr(value, 'dtype', type(value).__name__)}")
    return np.bitwise_count(np.bitwise_xor(a, b))


class _HammingRangeIndex:
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
        self.blocks = None if strategy == "brute" else self._choose_blocks(len(base_hashes), max_hamming, strategy == "blocks")
        self.tables = [self._build_table(*block[:2]) for block in self.blocks] if self.blocks else []

    # -- planning

    @staticmethod
    def _lookup_ns(width: int) -> float:
        if width <= 16:
            return 1.5  # count table fits in L2
        if width <= 20:
            return 7.0
        if width <= _HammingRangeIndex._MAX_TABLE_BITS:
            return 12.0
        return _HammingRangeIndex._SEARCHSORTED_NS

    @classmethod
    def _choose_blocks(cls, n_base: int, max_hamming: int, blocks_only: bool = False):
        """Return [(shift, width, radius, flips)] of the cheapest plan, or None for brute force."""
        best_cost = math.inf if blocks_only else n_base * cls._BRUTE_NS_PER_PAIR
        best_plan = None
        for n_blocks in range(1, min(max_hamming + 1, cls._MAX_BLOCKS) + 1):
            widths = [_HASH_BITS // n_blocks + (1 if i < _HASH_BITS % n_blocks else 0) for i in range(n_blocks)]
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


# --------------------------------------------------------------------------- grouping


def _visit_order(n: int, order, seed) -> np.ndarray:
    if order is None:
        return np.random.default_rng(seed).permutation(n)
    order_array = np.asarray(order)
    if order_array.shape != (n,) or not np.issubdtype(order_array.dtype, np.integer):
        raise ValueError(f"order must be an integer array of shape ({n},), got {order_array.dtype} {order_array.shape}")
    if n and (order_array.min() < 0 or order_array.max() >= n or np.bincount(order_array, minlength=n).max() != 1):
        raise ValueError("order must be a permutation of range(len(hashes)): every index exactly once")
    return order_array.astype(np.int64)


# Below this many indexed hashes a rebuild costs more than the smaller index saves.
_MIN_REBUILD_SIZE = 1 << 15
# Up to this many distinct hashes, one all-pairs popcount matrix beats building an index.
_SINGLE_BATCH_SIZE = 2048


def _resolve_in_order(hashes: np.ndarray, max_hamming: int) -> np.ndarray:
    """Sequential greedy rule among a few hashes, all undecided, visited in index order.

    Returns int64 (k,): local index of each hash's exemplar. Uses the full (k, k) distance
    matrix, so keep k in the low thousands.
    """
    close = np.bitwise_count(hashes[:, None] ^ hashes[None, :]) <= max_hamming
    leader = np.arange(len(hashes))
    # A hash with no neighbour here is its own exemplar and claims nobody, so the loop only
    # walks the others.
    has_neighbour = close.sum(axis=1) > 1
    alive = has_neighbour.copy()
    for i in np.flatnonzero(has_neighbour).tolist():
        if alive[i]:
            members = np.flatnonzero(alive & close[i])
            leader[members] = i
            alive[members] = False
    return leader


def _greedy_leaders(unique_hashes: np.ndarray, max_hamming: int, batch_size: int = 512) -> np.ndarray:
    """Greedy leader clustering of distinct hashes visited in index order.

    Returns int64 ``leader`` of shape (M,): the index of each hash's exemplar (itself for
    exemplars). The rule "visit in order; an unassigned hash becomes an exemplar and takes
    all unassigned hashes within max_hamming" is equivalent to: a hash is an exemplar iff no
    earlier exemplar is within max_hamming, and a duplicate belongs to the earliest exemplar
    within max_hamming. We exploit that by working in batches along the order: the
    undecided hashes of a batch are resolved among themselves with the sequential rule (all
    earlier exemplars have already claimed their neighbours), then the batch's new
    exemplars claim their still-undecided neighbours through the range index. Only
    exemplars are ever queried, so many duplicates make it faster, not slower. The index
    only has to hold undecided hashes, so it is rebuilt whenever their number has halved:
    a smaller index means fewer candidates and may allow a cheaper block plan.
    """
    n = len(unique_hashes)
    if n <= _SINGLE_BATCH_SIZE:
        return _resolve_in_order(unique_hashes, max_hamming).astype(np.int64)
    leader = np.full(n, -1, dtype=np.int64)
    indexed_ids = np.arange(n)
    index = _HammingRangeIndex(unique_hashes, max_hamming)
    n_undecided = n
    position = 0
    window = batch_size
    while position < n:
        window_ids = np.arange(position, min(position + window, n))
        undecided = window_ids[leader[window_ids] < 0]
        if len(undecided) > batch_size:
            undecided = undecided[:batch_size]
            position = int(undecided[-1]) + 1
            window = max(batch_size, window // 2)
        else:
            position = int(window_ids[-1]) + 1
            if len(undecided) < batch_size // 2:
                window *= 2  # mostly claimed already: look further ahead per step
        if len(undecided) == 0:
            continue
        local_leader = _resolve_in_order(unique_hashes[undecided], max_hamming)
        leader[undecided] = undecided[local_leader]
        exemplar_ids = undecided[local_leader == np.arange(len(undecided))]  # ascending = visit order
        n_undecided -= len(undecided)
        if position >= n:
            break  # nobody left to claim
        query_index, neighbour = index.query(unique_hashes[exemplar_ids])
        neighbour = indexed_ids[neighbour]
        unclaimed = leader[neighbour] < 0
        query_index, neighbour = query_index[unclaimed], neighbour[unclaimed]
        if len(neighbour):
            # earliest exemplar wins: sort by (neighbour, exemplar position), keep first
            by_neighbour = np.lexsort((query_index, neighbour))
            neighbour, query_index = neighbour[by_neighbour], query_index[by_neighbour]
            first = np.ones(len(neighbour), dtype=bool)
            first[1:] = neighbour[1:] != neighbour[:-1]
            leader[neighbour[first]] = exemplar_ids[query_index[first]]
            n_undecided -= int(first.sum())
        if len(indexed_ids) >= _MIN_REBUILD_SIZE and n_undecided <= len(indexed_ids) // 2:
            indexed_ids = np.flatnonzero(leader < 0)
            index = _HammingRangeIndex(unique_hashes[indexed_ids], max_hamming)
    return leader


def group_near_duplicates(
    hashes: np.ndarray,
    max_hamming: int = DEFAULT_MAX_HAMMING,
    order: np.ndarray | None = None,
    seed: int = 0,
) -> np.ndarray:
    """Group near-duplicate patches of one source by greedy leader clustering.

    Parameters
    ----------
    hashes : np.ndarray
        uint64 array of shape (N,): 64-bit dHashes (:func:`cemcurate.dhash.dhash64`) of the
        patches of one source dataset.
    max_hamming : int
        Largest Hamming distance (in bits, 0..64) at which two patches count as
        near-duplicates; inclusive. The default 11 is the paper's "distance < 12"; the
        released CEM500K code used ``<= 12``, i.e. ``max_hamming=12``.
    order : np.ndarray, optional
        Permutation of ``range(N)`` (int, shape (N,)) giving the visiting order. Default: a
        random permutation from ``np.random.default_rng(seed)``, which makes the kept
        patch of each group a random one, as in the paper.
    seed : int
        Seed for the default order; ignored when ``order`` is given.

    Returns
    -------
    np.ndarray
        int64 array ``exemplar`` of shape (N,): index of each patch's exemplar; exemplars
        point to themselves, so the kept patches are ``np.flatnonzero(exemplar == arange(N))``.
        Patches are visited in ``order``; the first one not yet assigned becomes an exemplar
        and every unassigned patch within ``max_hamming`` of it becomes its duplicate. Hence
        exemplars are pairwise farther apart than ``max_hamming`` and each duplicate lies
        within ``max_hamming`` of its exemplar (the earliest-visited such exemplar).
    """
    hashes = _as_hashes(hashes, "hashes")
    max_hamming = _check_max_hamming(max_hamming)
    n = len(hashes)
    visit = _visit_order(n, order, seed)
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    # Identical hashes are at distance 0 and share all neighbours, so the first visited of
    # each identical set decides for all of them: group the distinct values, visited in the
    # order of their first occurrence, then map back.
    visited_hashes = hashes[visit]
    distinct, first_visit, inverse = np.unique(visited_hashes, return_index=True, return_inverse=True)
    by_first_visit = np.argsort(first_visit)
    distinct_rank = np.empty(len(distinct), dtype=np.int64)
    distinct_rank[by_first_visit] = np.arange(len(distinct))
    leader_rank = _greedy_leaders(distinct[by_first_visit], max_hamming)
    exemplar_patch_of_rank = visit[first_visit[by_first_visit]][leader_rank]
    exemplar = np.empty(n, dtype=np.int64)
    exemplar[visit] = exemplar_patch_of_rank[distinct_rank[inverse.reshape(-1)]]
    return exemplar


def assign_to_exemplars(
    new_hashes: np.ndarray, exemplar_hashes: np.ndarray, max_hamming: int = DEFAULT_MAX_HAMMING
) -> np.ndarray:
    """Match hashes to the closest of a set of exemplars, if within the threshold.

    ``new_hashes``: uint64 (N,); ``exemplar_hashes``: uint64 (E,); ``max_hamming``: inclusive
    threshold in bits. Returns int64 (N,): index into ``exemplar_hashes`` of the exemplar at
    the smallest Hamming distance (ties: the lowest index) if that distance is
    <= ``max_hamming``, else -1.
    """
    new_hashes = _as_hashes(new_hashes, "new_hashes")
    exemplar_hashes = _as_hashes(exemplar_hashes, "exemplar_hashes")
    max_hamming = _check_max_hamming(max_hamming)
    assigned = np.full(len(new_hashes), -1, dtype=np.int64)
    if len(new_hashes) == 0 or len(exemplar_hashes) == 0:
        return assigned
    query_index, exemplar_index = _HammingRangeIndex(exemplar_hashes, max_hamming).query(new_hashes)
    if len(query_index):
        distance = np.bitwise_count(new_hashes[query_index] ^ exemplar_hashes[exemplar_index])
        best_first = np.lexsort((exemplar_index, distance, query_index))
        query_index, exemplar_index = query_index[best_first], exemplar_index[best_first]
        first = np.ones(len(query_index), dtype=bool)
        first[1:] = query_index[1:] != query_index[:-1]
        assigned[query_index[first]] = exemplar_index[first]
    return assigned


class IncrementalGrouping(NamedTuple):
    """Result of :func:`group_incremental` for N new patches; both fields int64 of shape (N,).

    For each new patch exactly one field is >= 0:

    * ``existing_exemplar[i] = k >= 0``: the patch duplicates ``exemplar_hashes[k]`` (the
      closest kept exemplar within the threshold) and is dropped;
    * ``new_exemplar[i] = j >= 0``: the patch matched no kept exemplar and was grouped among
      the new patches; ``j`` indexes the new patches and ``j == i`` means it is itself a new
      exemplar to keep.
    """

    existing_exemplar: np.ndarray
    new_exemplar: np.ndarray

    @property
    def is_new_exemplar(self) -> np.ndarray:
        """bool (N,): the new patches to keep."""
        return self.new_exemplar == np.arange(len(self.new_exemplar))


def group_incremental(
    new_hashes: np.ndarray,
    exemplar_hashes: np.ndarray,
    max_hamming: int = DEFAULT_MAX_HAMMING,
    seed: int = 0,
) -> IncrementalGrouping:
    """Group new patches of a source against the exemplars already kept for it.

    New patches within ``max_hamming`` of a kept exemplar are assigned to the closest one
    (:func:`assign_to_exemplars`); the rest are grouped among themselves with
    :func:`group_near_duplicates` (default random order from ``seed``). A new exemplar is
    therefore farther than ``max_hamming`` from every kept exemplar and from every other new
    exemplar. Shapes: ``new_hashes`` uint64 (N,), ``exemplar_hashes`` uint64 (E,). See
    :class:`IncrementalGrouping` for the result.
    """
    new_hashes = _as_hashes(new_hashes, "new_hashes")
    exemplar_hashes = _as_hashes(exemplar_hashes, "exemplar_hashes")
    max_hamming = _check_max_hamming(max_hamming)
    existing = assign_to_exemplars(new_hashes, exemplar_hashes, max_hamming)
    unmatched = np.flatnonzero(existing < 0)
    new_exemplar = np.full(len(new_hashes), -1, dtype=np.int64)
    if len(unmatched):
        local = group_near_duplicates(new_hashes[unmatched], max_hamming, seed=seed)
        new_exemplar[unmatched] = unmatched[local]
    return IncrementalGrouping(existing, new_exemplar)


# --------------------------------------------------------------------------- inequality


def _as_counts(counts) -> np.ndarray:
    values = np.asarray(counts)
    if values.ndim != 1 or values.size == 0:
        raise ValueError(f"counts must be a non-empty 1-D array of patches per source, got shape {values.shape}")
    if not (np.issubdtype(values.dtype, np.integer) or np.issubdtype(values.dtype, np.floating)):
        raise ValueError(f"counts must be numeric, got dtype {values.dtype}")
    values = values.astype(np.float64)
    if not np.all(np.isfinite(values)) or values.min() < 0:
        raise ValueError("counts must be finite and non-negative")
    if values.sum() == 0:
        raise ValueError("counts sum to zero: the Lorenz curve and Gini coefficient are undefined")
    return values


def lorenz_curve(counts) -> tuple[np.ndarray, np.ndarray]:
    """Lorenz curve of patches per source (paper, Appendix 1 figure 6).

    ``counts``: non-negative numbers of shape (S,), one per source, not all zero. Returns
    float64 arrays ``x, y`` of shape (S + 1,): after sorting sources by ascending count,
    ``x[i] = i / S`` is the fraction of sources and ``y[i]`` the fraction of all patches they
    hold; both run from 0 to 1, and ``y == x`` is perfect equality.
    """
    values = np.sort(_as_counts(counts))
    x = np.arange(len(values) + 1, dtype=np.float64) / len(values)
    y = np.concatenate([[0.0], np.cumsum(values) / values.sum()])
    return x, y


def gini(counts) -> float:
    """Gini coefficient of patches per source: twice the area between the diagonal and the
    Lorenz curve (trapezoids between its points). 0 is perfect equality; all patches in one of S
    sources gives 1 - 1/S.
    """
    x, y = lorenz_curve(counts)
    area_under_curve = float(np.sum((y[1:] + y[:-1]) * np.diff(x)) / 2.0)
    return 1.0 - 2.0 * area_under_curve

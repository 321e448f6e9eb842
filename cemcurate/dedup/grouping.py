"""Near-duplicate grouping of 64-bit difference hashes: greedy leader clustering.

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
:class:`cemcurate.dedup.hamming.HammingRangeIndex`), which returns exactly the pairs within
the threshold, never an approximation.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from cemcurate.dedup.hamming import HammingRangeIndex, as_hashes, check_max_hamming

# Paper: "a distance <12"; the released CEM500K code compared with <= 12 (i.e. < 13).
DEFAULT_MAX_HAMMING = 11


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
    index = HammingRangeIndex(unique_hashes, max_hamming)
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
            index = HammingRangeIndex(unique_hashes[indexed_ids], max_hamming)
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
    hashes = as_hashes(hashes, "hashes")
    max_hamming = check_max_hamming(max_hamming)
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
    new_hashes = as_hashes(new_hashes, "new_hashes")
    exemplar_hashes = as_hashes(exemplar_hashes, "exemplar_hashes")
    max_hamming = check_max_hamming(max_hamming)
    assigned = np.full(len(new_hashes), -1, dtype=np.int64)
    if len(new_hashes) == 0 or len(exemplar_hashes) == 0:
        return assigned
    query_index, exemplar_index = HammingRangeIndex(exemplar_hashes, max_hamming).query(new_hashes)
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
    new_hashes = as_hashes(new_hashes, "new_hashes")
    exemplar_hashes = as_hashes(exemplar_hashes, "exemplar_hashes")
    max_hamming = check_max_hamming(max_hamming)
    existing = assign_to_exemplars(new_hashes, exemplar_hashes, max_hamming)
    unmatched = np.flatnonzero(existing < 0)
    new_exemplar = np.full(len(new_hashes), -1, dtype=np.int64)
    if len(unmatched):
        local = group_near_duplicates(new_hashes[unmatched], max_hamming, seed=seed)
        new_exemplar[unmatched] = unmatched[local]
    return IncrementalGrouping(existing, new_exemplar)

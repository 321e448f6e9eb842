"""Near-duplicate grouping: equal to the plain greedy loop, exact at the threshold, and sensible
on real EM (adjacent 10 nm slices are duplicates, unrelated sources are not)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile
from conftest import require

from cemcurate.dedup import (
    DEFAULT_MAX_HAMMING,
    HammingRangeIndex,
    assign_to_exemplars,
    gini,
    group_incremental,
    group_near_duplicates,
    grouping,
    hamming_distance,
    lorenz_curve,
)
from cemcurate.dhash import dhash64

PATCH = 224


# ----------------------------------------------------------------------------- references


def reference_greedy(hashes: np.ndarray, max_hamming: int, order: np.ndarray) -> np.ndarray:
    """The reference semantics, as plainly as possible: one exemplar at a time."""
    exemplar = np.full(len(hashes), -1, dtype=np.int64)
    for i in order:
        if exemplar[i] < 0:
            distance = np.array([bin(int(h) ^ int(hashes[i])).count("1") for h in hashes])
            exemplar[(exemplar < 0) & (distance <= max_hamming)] = i
    return exemplar


def reference_greedy_vectorised(hashes: np.ndarray, max_hamming: int, order: np.ndarray) -> np.ndarray:
    """Same loop with a numpy popcount, for sizes where the pure-Python distance is too slow."""
    exemplar = np.full(len(hashes), -1, dtype=np.int64)
    for i in order:
        if exemplar[i] < 0:
            close = np.bitwise_count(hashes ^ hashes[i]) <= max_hamming
            exemplar[(exemplar < 0) & close] = i
    return exemplar


def popcount(x: int) -> int:
    return bin(x).count("1")


def flip_bits(value: int, bits) -> int:
    for bit in bits:
        value ^= 1 << int(bit)
    return value


def clustered_hashes(n: int, rng: np.random.Generator, mean_cluster: int = 8, max_flips: int = 8) -> np.ndarray:
    """Random centres plus copies with 0..max_flips random bit flips (like slices of a volume)."""
    centres = rng.integers(0, 2**64, max(1, n // mean_cluster), dtype=np.uint64, endpoint=False)
    hashes = centres[rng.integers(0, len(centres), n)]
    n_flips = rng.integers(0, max_flips + 1, n)
    for k in range(max_flips):
        chosen = n_flips > k
        hashes[chosen] ^= np.uint64(1) << rng.integers(0, 64, chosen.sum()).astype(np.uint64)
    return hashes


def drifting_hashes(n: int, rng: np.random.Generator, max_flips: int = 4) -> np.ndarray:
    """A slow drift: each hash is the previous one with 0..max_flips random bits flipped (like
    adjacent planes of a volume, which differ by a few bits), so neighbours in the series are
    near-duplicates and distant ones are not."""
    hashes = np.empty(n, dtype=np.uint64)
    hashes[0] = rng.integers(0, 2**64, dtype=np.uint64, endpoint=False)
    for i in range(1, n):
        flips = rng.choice(64, rng.integers(0, max_flips + 1), replace=False)
        hashes[i] = flip_bits(int(hashes[i - 1]), flips)
    return hashes


def assert_greedy_properties(hashes: np.ndarray, exemplar: np.ndarray, max_hamming: int) -> None:
    n = len(hashes)
    assert exemplar.dtype == np.int64 and exemplar.shape == (n,)
    kept = np.flatnonzero(exemplar == np.arange(n))
    assert np.array_equal(exemplar[exemplar], exemplar), "every exemplar must point to itself"
    between = hamming_distance(hashes[kept][:, None], hashes[kept][None, :]).astype(int)
    np.fill_diagonal(between, 99)
    assert between.min() > max_hamming, "two exemplars are within max_hamming"
    assert hamming_distance(hashes, hashes[exemplar]).max() <= max_hamming, "a duplicate is too far from its exemplar"


# ----------------------------------------------------------------------------- real data


@pytest.fixture(scope="module")
def vnc_tile_hashes(data_root: Path) -> np.ndarray:
    """dHashes of the 320 full 224 x 224 tiles of VNC stack1 (ssTEM, 45-50 nm sections)."""
    files = sorted(require(data_root / "drosophila_vnc_gerhard" / "stack1" / "raw").glob("*.tif"))
    stack = np.stack([tifffile.imread(f)[:896, :896] for f in files])
    tiles = stack.reshape(len(files), 4, PATCH, 4, PATCH).transpose(0, 1, 3, 2, 4).reshape(-1, PATCH, PATCH)
    return dhash64(np.ascontiguousarray(tiles))


@pytest.fixture(scope="module")
def neuroproof_hashes(neuroproof_volume) -> dict[str, np.ndarray]:
    """dHashes of 224 x 224 crops of every xy, xz and yz plane, at two corners: (250,) each."""
    vol = neuroproof_volume
    planes = {
        "xy": vol,
        "xz": vol.transpose(1, 0, 2),
        "yz": vol.transpose(2, 0, 1),
    }
    hashes = {}
    for name, stack in planes.items():
        hashes[f"{name}_top_left"] = dhash64(np.ascontiguousarray(stack[:, :PATCH, :PATCH]))
        hashes[f"{name}_bottom_right"] = dhash64(np.ascontiguousarray(stack[:, -PATCH:, -PATCH:]))
    return hashes


def test_adjacent_neuroproof_slices_are_duplicates(neuroproof_hashes):
    # Measured on this volume: adjacent 10 nm planes differ by 0..8 bits (xy top-left:
    # 14, 42, 54, 49, 33, 31, 14, 9, 3 pairs at 0..8), five planes apart by 3..24 bits,
    # and more than 30 planes apart never by less than 18.
    for name, hashes in neuroproof_hashes.items():
        adjacent = hamming_distance(hashes[1:], hashes[:-1])
        assert adjacent.max() <= DEFAULT_MAX_HAMMING, f"{name}: adjacent planes {adjacent.max()} bits apart"
        pair = group_near_duplicates(hashes[100:102])
        assert pair[0] == pair[1], f"{name}: planes 100 and 101 not grouped"
        far = hamming_distance(hashes[:100], hashes[150:])
        assert far.min() > DEFAULT_MAX_HAMMING, f"{name}: planes >= 50 apart should not be duplicates"
        exemplar = group_near_duplicates(hashes, seed=1)
        n_kept = int(np.sum(exemplar == np.arange(len(hashes))))
        assert n_kept < len(hashes) / 3, f"{name}: kept {n_kept} of 250 planes"
        assert_greedy_properties(hashes, exemplar, DEFAULT_MAX_HAMMING)


def test_unrelated_sources_are_not_duplicates(neuroproof_hashes, vnc_tile_hashes):
    # FIB-SEM medulla versus ssTEM VNC: measured minimum 15 bits over all 320 x 250 pairs
    neuroproof = neuroproof_hashes["xy_top_left"]
    cross = hamming_distance(vnc_tile_hashes[:, None], neuroproof[None, :])
    assert cross.min() > DEFAULT_MAX_HAMMING
    both = np.concatenate([vnc_tile_hashes, neuroproof])
    exemplar = group_near_duplicates(both, seed=3)
    n_vnc = len(vnc_tile_hashes)
    assert np.all(exemplar[:n_vnc] < n_vnc) and np.all(exemplar[n_vnc:] >= n_vnc), "a group spans both sources"


@pytest.mark.parametrize("single_batch_size", [2048, 0])
def test_real_hashes_match_reference_loop(neuroproof_hashes, vnc_tile_hashes, monkeypatch, single_batch_size):
    # 0: force the batched path with the range index even for these 1820 hashes
    monkeypatch.setattr(grouping, "_SINGLE_BATCH_SIZE", single_batch_size)
    hashes = np.concatenate([*neuroproof_hashes.values(), vnc_tile_hashes])  # 1820 real hashes
    rng = np.random.default_rng(7)
    for max_hamming in (6, 11, 12):
        order = rng.permutation(len(hashes))
        expected = reference_greedy_vectorised(hashes, max_hamming, order)
        exemplar = group_near_duplicates(hashes, max_hamming, order=order)
        assert np.array_equal(exemplar, expected)
        assert_greedy_properties(hashes, exemplar, max_hamming)
    # a visit order along the slices (long chains of close neighbours) must also match
    sequential = np.arange(len(hashes))
    assert np.array_equal(group_near_duplicates(hashes, order=sequential), reference_greedy(hashes, 11, sequential))


def test_default_order_is_seeded_permutation():
    hashes = drifting_hashes(250, np.random.default_rng(7))
    order = np.random.default_rng(5).permutation(len(hashes))
    assert np.array_equal(group_near_duplicates(hashes, seed=5), group_near_duplicates(hashes, order=order))
    assert not np.array_equal(group_near_duplicates(hashes, seed=5), group_near_duplicates(hashes, seed=6))


# ----------------------------------------------------------------------------- threshold boundary


@pytest.fixture(scope="module")
def boundary_hashes() -> np.ndarray:
    """Three centres with 12 neighbours each at exactly 10, 11, 12 and 13 bits, neighbours of
    those at 1 to 3 bits, and exact repeats: many decisions sit right at the threshold."""
    rng = np.random.default_rng(11)
    values = []
    for centre in rng.integers(0, 2**64, 3, dtype=np.uint64, endpoint=False).tolist():
        values.append(centre)
        for distance in (10, 11, 12, 13):
            for _ in range(12):
                neighbour = flip_bits(centre, rng.choice(64, distance, replace=False))
                values.append(neighbour)
                values.append(flip_bits(neighbour, rng.choice(64, rng.integers(1, 4), replace=False)))
        values.extend([centre, values[-1]])
    return np.array(values, dtype=np.uint64)


def test_threshold_is_inclusive(boundary_hashes):
    centre = boundary_hashes[:1]
    first_ring = boundary_hashes[1:97:2]  # 12 each at 10, 11, 12, 13 bits
    distance = hamming_distance(first_ring, centre[0]).astype(int)
    assert np.array_equal(np.bincount(distance)[10:], [12, 12, 12, 12])
    for max_hamming in (10, 11, 12):
        hashes = np.concatenate([centre, first_ring])
        order = np.arange(len(hashes))  # centre first: it is the exemplar
        exemplar = group_near_duplicates(hashes, max_hamming, order=order)
        claimed = exemplar[1:] == 0
        assert np.array_equal(claimed, distance <= max_hamming)


@pytest.mark.parametrize("max_hamming", [0, 1, 3, 10, 11, 12, 13, 20])
def test_boundary_hashes_match_reference_loop(boundary_hashes, max_hamming):
    rng = np.random.default_rng(max_hamming)
    for _ in range(3):
        order = rng.permutation(len(boundary_hashes))
        expected = reference_greedy(boundary_hashes, max_hamming, order)
        exemplar = group_near_duplicates(boundary_hashes, max_hamming, order=order)
        assert np.array_equal(exemplar, expected)
        assert_greedy_properties(boundary_hashes, exemplar, max_hamming)


def test_chain_does_not_merge():
    # 0 -> 6 -> 12 -> 18 bits from the first hash, each step 6 bits: connected components
    # would merge all four; greedy leaders visited in chain order keep the first and third.
    steps = [range(0, 6), range(6, 12), range(12, 18)]
    chain = [0]
    for bits in steps:
        chain.append(flip_bits(chain[-1], bits))
    hashes = np.array(chain, dtype=np.uint64)
    exemplar = group_near_duplicates(hashes, 11, order=np.arange(4))
    assert exemplar.tolist() == [0, 0, 2, 2]


# ----------------------------------------------------------------------------- exact index at scale


@pytest.mark.parametrize("max_hamming", [0, 1, 2, 5, 11, 12, 16])
def test_range_index_returns_exactly_the_close_pairs(max_hamming):
    rng = np.random.default_rng(100 + max_hamming)
    base = np.unique(clustered_hashes(6000, rng))
    queries = np.concatenate([base[rng.integers(0, len(base), 300)], clustered_hashes(300, rng)])
    indexes = [HammingRangeIndex(base, max_hamming, strategy) for strategy in ("auto", "blocks", "brute")]
    assert indexes[1].blocks is not None and indexes[2].blocks is None
    expected_rows, expected_cols = np.nonzero(hamming_distance(queries[:, None], base[None, :]) <= max_hamming)
    expected = set(zip(expected_rows.tolist(), expected_cols.tolist()))
    for index in indexes:
        found_rows, found_cols = index.query(queries)
        assert set(zip(found_rows.tolist(), found_cols.tolist())) == expected


def test_range_index_with_skewed_blocks(monkeypatch):
    # Like partly flat patches: most hashes have all-zero rows, so two 16-bit blocks each
    # hold one giant bucket; those queries must fall back to a scan and stay exact.
    scanned = []
    plain_scan = HammingRangeIndex._query_brute
    monkeypatch.setattr(
        HammingRangeIndex, "_query_brute", lambda self, q: scanned.append(len(q)) or plain_scan(self, q)
    )
    rng = np.random.default_rng(9)
    base = np.unique(clustered_hashes(8000, rng))
    base[: len(base) * 9 // 10] &= np.uint64(0xFFFFFFFF00000000)
    base = np.unique(base)
    queries = np.concatenate([base[rng.integers(0, len(base), 400)], clustered_hashes(100, rng)])
    index = HammingRangeIndex(base, 11, "blocks")
    rows, cols = index.query(queries)
    assert 0 < scanned[0] < len(queries)  # both the multi-index and the scan answered some
    expected_rows, expected_cols = np.nonzero(hamming_distance(queries[:, None], base[None, :]) <= 11)
    assert set(zip(rows.tolist(), cols.tolist())) == set(zip(expected_rows.tolist(), expected_cols.tolist()))
    order = rng.permutation(len(base))
    assert np.array_equal(group_near_duplicates(base, 11, order=order), reference_greedy_vectorised(base, 11, order))


def test_large_clustered_set_matches_reference_loop():
    rng = np.random.default_rng(21)
    hashes = clustered_hashes(30000, rng)  # big enough for the multi-index path and rebuilds
    assert HammingRangeIndex(np.unique(hashes), 11).blocks is not None
    order = rng.permutation(len(hashes))
    exemplar = group_near_duplicates(hashes, 11, order=order)
    assert np.array_equal(exemplar, reference_greedy_vectorised(hashes, 11, order))
    kept = np.flatnonzero(exemplar == np.arange(len(hashes)))
    assert 0.1 < len(kept) / len(hashes) < 0.5
    assert hamming_distance(hashes, hashes[exemplar]).max() <= 11


def test_exact_repeats_follow_first_visit():
    hashes = np.array([5, 5, 5, 2**40, 5], dtype=np.uint64)
    exemplar = group_near_duplicates(hashes, 0, order=np.array([2, 0, 4, 3, 1]))
    assert exemplar.tolist() == [2, 2, 2, 3, 2]


# ----------------------------------------------------------------------------- incremental


def test_assign_to_exemplars_picks_closest_then_lowest_index():
    base = 0
    exemplars = np.array(
        [flip_bits(base, range(0, 5)), flip_bits(base, range(10, 13)), flip_bits(base, range(20, 23)), 2**64 - 1],
        dtype=np.uint64,
    )
    new = np.array([base, flip_bits(base, [10]), flip_bits(base, range(40, 52)), 2**64 - 1], dtype=np.uint64)
    # distances to exemplars: new[0]: 5, 3, 3, 64 -> tie 1 vs 2 -> 1; new[1]: 6, 2, 4 -> 1;
    # new[2]: 17, 15, 15 -> none within 11; new[3]: itself at 0 -> 3
    assert assign_to_exemplars(new, exemplars, 11).tolist() == [1, 1, -1, 3]
    assert assign_to_exemplars(new, exemplars, 2).tolist() == [-1, 1, -1, 3]
    assert assign_to_exemplars(new, exemplars[:0], 11).tolist() == [-1, -1, -1, -1]


def test_assign_to_exemplars_matches_brute_force():
    rng = np.random.default_rng(2)
    exemplars = np.unique(clustered_hashes(5000, rng))
    # A drift that starts at an exemplar: close to it at first, then farther than the threshold.
    drift = drifting_hashes(250, rng)
    drift ^= drift[0] ^ exemplars[17]
    # Exemplars with 0..14 bits flipped: on both sides of the threshold, with ties between exemplars.
    near = np.array(
        [
            flip_bits(int(h), rng.choice(64, rng.integers(0, 15), replace=False))
            for h in exemplars[rng.integers(0, len(exemplars), 500)]
        ],
        dtype=np.uint64,
    )
    new = np.concatenate([drift, near, clustered_hashes(2000, rng)])
    distance = hamming_distance(new[:, None], exemplars[None, :]).astype(int)
    expected = np.where(distance.min(axis=1) <= 11, distance.argmin(axis=1), -1)  # argmin: lowest index on ties
    assert np.array_equal(assign_to_exemplars(new, exemplars, 11), expected)


def test_group_incremental():
    hashes = drifting_hashes(250, np.random.default_rng(4))
    first_run = group_near_duplicates(hashes[:125], seed=0)
    kept = hashes[:125][first_run == np.arange(125)]
    new = hashes[125:]
    result = group_incremental(new, kept, seed=4)
    # expected, step by step with the plain references
    distance = hamming_distance(new[:, None], kept[None, :]).astype(int)
    expected_existing = np.where(distance.min(axis=1) <= 11, distance.argmin(axis=1), -1)
    assert np.array_equal(result.existing_exemplar, expected_existing)
    unmatched = np.flatnonzero(expected_existing < 0)
    local_order = np.random.default_rng(4).permutation(len(unmatched))
    expected_new = np.full(len(new), -1)
    expected_new[unmatched] = unmatched[reference_greedy(new[unmatched], 11, local_order)]
    assert np.array_equal(result.new_exemplar, expected_new)
    assert np.all((result.existing_exemplar >= 0) != (result.new_exemplar >= 0))
    assert 0 < len(unmatched) < len(new)  # hash 125 drifted a few bits from 124, so some match
    # kept set after the increment: nothing within 11 bits of anything else
    all_kept = np.concatenate([kept, new[result.is_new_exemplar]])
    between = hamming_distance(all_kept[:, None], all_kept[None, :]).astype(int)
    np.fill_diagonal(between, 99)
    assert between.min() > 11


# ----------------------------------------------------------------------------- distances, inequality


def test_hamming_distance_matches_python_popcount():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 2**64, (5, 1), dtype=np.uint64, endpoint=False)
    b = rng.integers(0, 2**64, (1, 7), dtype=np.uint64, endpoint=False)
    distance = hamming_distance(a, b)
    assert distance.shape == (5, 7)
    expected = [[popcount(int(x) ^ int(y)) for y in b[0]] for x in a[:, 0]]
    assert distance.tolist() == expected
    assert int(hamming_distance(np.uint64(0), np.uint64(2**64 - 1))) == 64


def test_lorenz_and_gini_by_hand():
    x, y = lorenz_curve([3, 1, 4, 2])
    # sorted 1, 2, 3, 4 of 10 patches: cumulative 0, .1, .3, .6, 1
    assert np.allclose(x, [0, 0.25, 0.5, 0.75, 1])
    assert np.allclose(y, [0, 0.1, 0.3, 0.6, 1])
    # area under the curve by trapezoids: (0+.1 + .1+.3 + .3+.6 + .6+1) / 2 / 4 = 0.375
    assert gini([3, 1, 4, 2]) == pytest.approx(1 - 2 * 0.375)
    # the same from the mean absolute difference: sum |xi - xj| / (2 n^2 mean) = 20 / 80
    assert gini([3, 1, 4, 2]) == pytest.approx(20 / 80)
    assert gini([5, 5, 5]) == pytest.approx(0.0)
    assert gini([0, 0, 0, 9]) == pytest.approx(0.75)  # one source of four holds everything
    counts = np.random.default_rng(1).integers(0, 1000, 50)
    mean_abs = np.abs(counts[:, None] - counts[None, :]).sum() / (2 * len(counts) ** 2 * counts.mean())
    assert gini(counts) == pytest.approx(mean_abs)


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "call",
    [
        lambda: group_near_duplicates(np.array([1, 2], dtype=np.int64)),
        lambda: group_near_duplicates(np.zeros((2, 2), dtype=np.uint64)),
        lambda: group_near_duplicates([1, 2]),
        lambda: group_near_duplicates(np.zeros(3, dtype=np.uint64), max_hamming=-1),
        lambda: group_near_duplicates(np.zeros(3, dtype=np.uint64), max_hamming=65),
        lambda: group_near_duplicates(np.zeros(3, dtype=np.uint64), max_hamming=11.5),
        lambda: group_near_duplicates(np.zeros(3, dtype=np.uint64), order=np.array([0, 1, 1])),
        lambda: group_near_duplicates(np.zeros(3, dtype=np.uint64), order=np.array([0, 1])),
        lambda: group_near_duplicates(np.zeros(3, dtype=np.uint64), order=np.array([0.0, 1.0, 2.0])),
        lambda: assign_to_exemplars(np.zeros(3, dtype=np.uint64), np.zeros(3, dtype=np.int32), 11),
        lambda: assign_to_exemplars(np.zeros(3, dtype=np.uint64), np.zeros(3, dtype=np.uint64), -2),
        lambda: group_incremental(np.zeros(3, dtype=np.float64), np.zeros(3, dtype=np.uint64)),
        lambda: hamming_distance(np.zeros(3, dtype=np.int64), np.zeros(3, dtype=np.uint64)),
        lambda: lorenz_curve([]),
        lambda: lorenz_curve([1, -1]),
        lambda: gini([0, 0]),
        lambda: gini(np.ones((2, 2))),
    ],
)
def test_bad_input_raises_value_error(call):
    with pytest.raises(ValueError):
        call()


def test_empty_and_single():
    assert group_near_duplicates(np.zeros(0, dtype=np.uint64)).shape == (0,)
    assert group_near_duplicates(np.array([7], dtype=np.uint64)).tolist() == [0]
    result = group_incremental(np.zeros(0, dtype=np.uint64), np.array([1], dtype=np.uint64))
    assert result.existing_exemplar.shape == (0,) and result.new_exemplar.shape == (0,)

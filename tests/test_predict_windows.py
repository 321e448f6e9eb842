"""The N-d window engine (pure logic, synthetic inputs only): plans in 1D, 2D and 3D, blend
weights, weight sums, the uint8 encoding, the streaming predictor, and 2D tile plans.

Each property is checked against a plain reference written here (loops over windows,
numpy's reflection padding) or an exact property (a per-position model must give the same
result however the input is cut into windows).
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from finetune.predict.predictor import predict_windows
from finetune.predict.slices import plan_tiles, predict_tiled
from finetune.predict.windows import (
    MIN_WEIGHT,
    decode_uint8,
    encode_probs,
    linear_weights_1d,
    plan_windows,
    window_starts,
    window_weights,
)

PLANS = [  # shape, window, overlap, blend, fit, multiple
    ((100,), 32, 8, "gaussian", "axis", 1),
    ((7,), 32, 8, "gaussian", "axis", 1),
    ((250, 190), 64, 16, "linear", "all", 32),
    ((300, 60), 128, 32, "linear", "all", 32),
    ((45, 70), 512, 64, "linear", "all", 32),
    ((37, 50, 20), (16, 24, 32), (6, 8, 4), "gaussian", "axis", 1),
    ((25, 60, 61), (12, 32, 48), None, "gaussian", "axis", 1),
]


def _coverage(plan) -> tuple[np.ndarray, np.ndarray]:
    """(windows covering each padded position, summed N-d weights) by looping over every window."""
    count = np.zeros(plan.padded_shape, np.int64)
    wsum = np.zeros(plan.padded_shape, np.float64)
    w = plan.window_weight()
    for corner in itertools.product(*plan.starts):
        box = tuple(slice(c, c + n) for c, n in zip(corner, plan.window))
        count[box] += 1
        wsum[box] += w
    return count, wsum


@pytest.mark.parametrize("shape, window, overlap, blend, fit, multiple", PLANS)
def test_plans_cover_every_position_and_weights_normalise(shape, window, overlap, blend, fit, multiple):
    plan = plan_windows(shape, window, overlap, multiple, blend=blend, fit=fit)
    assert plan.ndim == len(shape) and plan.num_windows == np.prod([len(s) for s in plan.starts])
    for n, (a, b), w, starts, m in zip(
        plan.padded_shape, plan.pad, plan.window, plan.starts, np.broadcast_to(multiple, len(shape))
    ):
        assert w % m == 0 and a >= 0 and b >= 0
        assert starts[0] == 0 and starts[-1] == n - w, "last window flush with the (padded) end"
        assert all(0 < t - s <= w for s, t in zip(starts, starts[1:]))
    count, wsum = _coverage(plan)
    assert count.min() >= 1, "every position covered"
    np.testing.assert_allclose(plan.weight_sum(), wsum, rtol=1e-5)
    assert plan.weight_sum().min() > 0


@pytest.mark.parametrize("shape, window, overlap, blend, fit, multiple", PLANS)
def test_window_weights_are_symmetric_positive_and_peak_at_one(shape, window, overlap, blend, fit, multiple):
    plan = plan_windows(shape, window, overlap, multiple, blend=blend, fit=fit)
    w = plan.window_weight()
    assert w.shape == plan.window and w.dtype == np.float32
    assert w.min() >= MIN_WEIGHT**w.ndim and w.max() == pytest.approx(1.0, abs=1e-3)  # per-axis floor
    for axis in range(w.ndim):
        np.testing.assert_allclose(w, np.flip(w, axis), rtol=1e-6)
    for axis_weight, starts in zip(plan.weights, plan.starts):
        if len(starts) == 1:
            np.testing.assert_array_equal(axis_weight, 1.0)  # nothing to blend along a single-window axis


def test_axes_that_fit_get_one_window_of_their_own_size():
    # fit="axis" (3D windows): each axis on its own; fit="all" (2D tiles): only a whole fit counts.
    plan = plan_windows((10, 100, 7), (16, 32, 32), (4, 8, 8))
    assert plan.window == (10, 32, 7) and plan.pad == ((0, 0), (4, 4), (0, 0))
    tiles = plan_windows((45, 300), 128, 32, 32, blend="linear", fit="all")
    assert tiles.window == (96, 128)  # 45 + 2 * 16 margin, rounded up to 32
    assert tiles.pad[0] == (16, 96 - 45 - 16) and tiles.pad[1] == (16, 16)
    one = plan_windows((45, 70), 512, 64, 32, blend="linear", fit="all")
    assert one.window == (64, 96) and one.pad == ((9, 10), (13, 13)) and one.num_windows == 1


def test_weights_match_their_definitions():
    ramp = linear_weights_1d(64, 16)
    ref = [max(MIN_WEIGHT, min((i + 0.5) / 16, (64 - i - 0.5) / 16, 1.0)) for i in range(64)]
    np.testing.assert_allclose(ramp, ref, rtol=1e-6)
    np.testing.assert_array_equal(linear_weights_1d(10, 0), 1.0)
    g = window_weights((9, 16), "gaussian", sigma_scale=0.125, ndim=2)
    centre = (np.arange(16) - 7.5) / (0.125 * 16)
    ref = np.exp(-0.5 * centre**2)
    np.testing.assert_allclose(g[4], np.maximum(ref / ref.max(), MIN_WEIGHT), rtol=1e-5)
    assert window_weights(5, "linear", overlap=2, ndim=1).shape == (5,)
    with pytest.raises(ValueError, match="blend"):
        window_weights(5, "cosine")


def test_uint8_encoding_round_trip():
    u = np.arange(256, dtype=np.uint8)
    p = decode_uint8(u)
    assert p.dtype == np.float32 and p[0] == 0 and p[-1] == 1
    np.testing.assert_array_equal(encode_probs(p, "uint8"), u)
    q = np.random.default_rng(0).random(10_000).astype(np.float32)
    enc = encode_probs(q, np.uint8)
    assert enc.dtype == np.uint8
    np.testing.assert_allclose(decode_uint8(enc), q, atol=0.5 / 255 + 1e-7)
    np.testing.assert_array_equal(encode_probs(np.array([-0.2, 1.7], np.float32), "uint8"), [0, 255])
    assert encode_probs(q, "float32") is q


def _pointwise(windows: np.ndarray) -> np.ndarray:
    # A "model" whose output at a position depends only on that position: any cut into
    # windows must give exactly the uncut answer, which exposes offset, padding and blend mistakes.
    return np.stack([np.sin(3 * windows) ** 2, windows**2], axis=1).astype(np.float32)


@pytest.mark.parametrize("shape, window, overlap, blend, fit, multiple", PLANS)
def test_streamed_pointwise_model_equals_uncut(shape, window, overlap, blend, fit, multiple):
    rng = np.random.default_rng(1)
    inputs = rng.random((2,) + shape, dtype=np.float32)
    plan = plan_windows(shape, window, overlap, multiple, blend=blend, fit=fit)
    out = np.full((2, 2) + shape, np.nan, np.float32)
    rows = []

    def write(a0, block):
        rows.append((a0, block.shape[2]))
        out[:, :, a0 : a0 + block.shape[2]] = block

    predict_windows(lambda a0, a1: inputs[:, a0:a1], plan, _pointwise, write, count=2, batch_size=3)
    expected = np.stack([_pointwise(x[None])[0] for x in inputs])  # (count, C, *shape), uncut
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)
    assert [a for a, _ in rows] == sorted(a for a, _ in rows) and sum(n for _, n in rows) == shape[0]


def test_streaming_reads_one_window_depth_at_a_time():
    data = np.random.default_rng(2).random((1, 90, 20), dtype=np.float32)
    plan = plan_windows((90, 20), (16, 20), (4, 0))
    reads = []

    def read(a0, a1):
        reads.append((a0, a1))
        return data[:, a0:a1]

    predict_windows(read, plan, lambda w: w[:, None], lambda a0, b: None)
    assert max(a1 - a0 for a0, a1 in reads) <= 16 and len(reads) == len(plan.starts[0])


def test_model_output_of_the_wrong_shape_is_an_error():
    plan = plan_windows((40, 40), 16, 4)
    with pytest.raises(ValueError, match="model returned shape"):
        predict_windows(
            lambda a0, a1: np.zeros((1, a1 - a0, 40), np.float32), plan, lambda w: w[:, None, :-1], lambda a0, b: None
        )
    with pytest.raises(ValueError, match="overlap"):
        plan_windows((40, 40), 16, 16)


# ---------------------------------------------------------------------------- 2D tiles


def test_window_starts_cover_the_range_and_stay_inside():
    for length, tile, stride in [(100, 32, 16), (64, 64, 10), (1000, 512, 448), (33, 32, 1)]:
        starts = window_starts(length, tile, tile - stride)
        covered = np.zeros(length, bool)
        for s in starts:
            assert 0 <= s <= length - tile
            covered[s : s + tile] = True
        assert covered.all()
        assert all(b - a <= stride for a, b in zip(starts, starts[1:]))
    assert window_starts(100, 32, 8) == [0, 24, 48, 68]
    with pytest.raises(ValueError):
        window_starts(10, 32, 8)


def test_plan_pads_to_multiples_of_32():
    plan = plan_tiles((100, 70), tile=512, overlap=64)
    assert plan.window == (128, 96) and plan.num_windows == 1
    assert plan.padded_shape == (128, 96)
    big = plan_tiles((250, 1000), tile=128, overlap=32)
    assert big.window == (128, 128) and all(t % 32 == 0 for t in big.window)
    assert big.num_windows > 1
    w = window_weights((64, 64), "linear", overlap=16, ndim=2)
    assert w.max() == 1.0 and w.min() > 0 and w[0, 0] < w[32, 32]


def test_tiled_pointwise_model_equals_untiled():
    image = np.random.default_rng(3).random((1, 250, 230), dtype=np.float32)
    for tile, overlap in [(64, 16), (96, 0), (128, 40), (512, 64)]:
        plan = plan_tiles(image.shape[1:], tile=tile, overlap=overlap)
        out = predict_tiled(image, _pointwise, plan, batch_size=5)
        np.testing.assert_allclose(out[0], _pointwise(image)[0], rtol=1e-5, atol=1e-6)


def test_single_tile_reflection_padding_matches_manual_padding():
    rng = np.random.default_rng(0)
    slices = rng.random((2, 45, 70), dtype=np.float32)
    seen = []

    def spy(tiles):
        seen.append(tiles.copy())
        return tiles[:, None] * 2

    plan = plan_tiles((45, 70), tile=256, overlap=32)
    out = predict_tiled(slices, spy, plan)
    (top, bottom), (left, right) = plan.pad
    manual = np.pad(slices, ((0, 0), (top, bottom), (left, right)), mode="reflect")
    np.testing.assert_array_equal(seen[0], manual)
    np.testing.assert_allclose(out[:, 0], slices * 2)

"""Sliding-window prediction: window plan, Gaussian blending, reflection, streaming outputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import zarr

from finetune.models import build_model, logits_to_probs
from finetune.predict.sliding import plan_sliding, predict_sliding
from finetune.predict.windows import gaussian_weights_1d, reflect_indices, window_starts, window_weights

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class Identity(torch.nn.Module):
    """Returns its input: blending must give the input back exactly."""

    def forward(self, x):
        return x.clone()


class Constant(torch.nn.Module):
    """Two channels of fixed values whatever the input."""

    def __init__(self, values=(0.37, -2.0)):
        super().__init__()
        self.register_buffer("values", torch.tensor(values))

    def forward(self, x):
        b, _, z, y, x_ = x.shape
        return self.values.view(1, -1, 1, 1, 1).expand(b, -1, z, y, x_).clone()


class CountingReader:
    """A lazy (z, y, x) source that records which slabs are read."""

    def __init__(self, array: np.ndarray):
        self.array = array
        self.shape = array.shape
        self.reads: list[tuple[int, int]] = []

    def read_unit(self, z0: int, z1: int) -> np.ndarray:
        self.reads.append((z0, z1))
        return self.array[z0:z1].astype(np.float32) / 255.0


@pytest.fixture
def volume() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (37, 50, 45)).astype(np.uint8)


def test_gaussian_weights():
    g = gaussian_weights_1d(16)
    assert g.max() == pytest.approx(1.0, abs=1e-3) and g.min() >= 1e-3
    np.testing.assert_allclose(g, g[::-1])
    assert g[8] > g[4] > g[0]
    w = window_weights((4, 8, 6), "gaussian")
    assert w.shape == (4, 8, 6) and w.dtype == np.float32
    np.testing.assert_allclose(
        w, np.einsum("i,j,k->ijk", gaussian_weights_1d(4), gaussian_weights_1d(8), gaussian_weights_1d(6)), rtol=1e-6
    )


def test_window_starts_and_reflection():
    assert window_starts(100, 32, 8) == [0, 24, 48, 68]
    assert window_starts(32, 32, 0) == [0]
    with pytest.raises(ValueError, match="overlap"):
        window_starts(100, 32, 32)
    for n, lo, hi in [(5, -3, 9), (7, -20, 30), (1, -2, 3), (2, -5, 6)]:
        ref = np.pad(np.arange(n), (-lo, hi - n), mode="reflect") if n > 1 else np.zeros(hi - lo, int)
        np.testing.assert_array_equal(reflect_indices(lo, hi, n), ref)


def test_plan_weight_sum_is_the_product_of_axis_sums():
    plan = plan_sliding((37, 50, 20), (16, 24, 32), (6, 8, 4))
    assert plan.window == (16, 24, 20)  # x fits in one window: shrunk, not padded
    assert plan.pad == ((3, 3), (4, 4), (0, 0))
    wsum = np.zeros(plan.padded_shape, np.float64)
    w = plan.window_weight()
    for z in plan.starts[0]:
        for y in plan.starts[1]:
            for x in plan.starts[2]:
                wsum[z : z + 16, y : y + 24, x : x + 20] += w
    np.testing.assert_allclose(wsum, np.einsum("i,j,k->ijk", *plan.norm), rtol=1e-5)
    assert wsum.min() > 0


@pytest.mark.parametrize("batch_size", [1, 3])
def test_identity_and_constant_models_blend_exactly(volume, batch_size):
    # Several windows on every axis, odd sizes, reflection margins: an identity model gives
    # the input back and a constant model its constant, everywhere.
    out = predict_sliding(
        Identity(), volume, window=(16, 24, 20), overlap=(6, 8, 6), batch_size=batch_size, activation="none"
    )
    assert out.shape == (1,) + volume.shape and out.dtype == np.float32
    np.testing.assert_allclose(out[0], volume / 255.0, atol=1e-5)
    out = predict_sliding(
        Constant(), volume, window=(16, 24, 20), overlap=(6, 8, 6), batch_size=batch_size, activation="none"
    )
    np.testing.assert_allclose(out[0], 0.37, atol=1e-5)
    np.testing.assert_allclose(out[1], -2.0, atol=1e-5)
    probs = predict_sliding(Constant(), volume, window=16, overlap=4, batch_size=batch_size)
    np.testing.assert_allclose(
        probs,
        np.broadcast_to(torch.softmax(torch.tensor([0.37, -2.0]), 0).numpy()[:, None, None, None], probs.shape),
        atol=1e-5,
    )


def test_one_window_equals_whole_volume_prediction():
    model = build_model(
        "unet3d", arch="resnet18", num_classes=2, geometry="isotropic", decoder_channels=(32, 16, 8, 8, 4)
    ).eval()
    vol = np.random.default_rng(1).integers(0, 256, (20, 40, 36)).astype(np.uint8)
    with torch.no_grad():
        whole = logits_to_probs(model(torch.from_numpy(vol / np.float32(255.0))[None, None].float()))[0].numpy()
    for window in [(32, 64, 64), (20, 40, 36)]:
        out = predict_sliding(model, vol, window=window, overlap=(4, 8, 8))
        np.testing.assert_allclose(out, whole, atol=1e-6)
    assert not model.training  # the call restored the eval mode it found


def test_streams_into_memmap_zarr_and_callables(volume, tmp_path):
    mm = np.lib.format.open_memmap(tmp_path / "out.npy", mode="w+", dtype=np.uint8, shape=volume.shape)
    assert predict_sliding(Identity(), volume, window=(12, 32, 32), overlap=4, out=mm, activation="none") is mm
    np.testing.assert_array_equal(mm, volume)  # uint8 output stores round(255 * p)

    z = zarr.open_array(
        str(tmp_path / "out.zarr"), mode="w", shape=(2,) + volume.shape, chunks=(1, 8, 32, 32), dtype="float32"
    )
    predict_sliding(Constant(), volume, window=(12, 32, 32), overlap=4, out=z, activation="none")
    np.testing.assert_allclose(z[1], -2.0, atol=1e-5)

    written = []
    predict_sliding(
        Identity(),
        volume,
        window=(12, 32, 32),
        overlap=4,
        activation="none",
        out=lambda z0, probs: written.append((z0, probs.shape[1])),
    )
    # Every slice written exactly once, in increasing z.
    assert [z0 for z0, _ in written] == sorted(z0 for z0, _ in written)
    assert sum(n for _, n in written) == volume.shape[0]
    assert all(b[0] == a[0] + a[1] for a, b in zip(written, written[1:]))


def test_reads_are_bounded_by_the_window_depth(volume):
    # Out-of-memory volumes: the source is read slab by slab, never as a whole.
    reader = CountingReader(volume)
    out = predict_sliding(Identity(), reader, window=(10, 32, 32), overlap=(4, 8, 8), activation="none")
    np.testing.assert_allclose(out[0], volume / 255.0, atol=1e-5)
    assert max(z1 - z0 for z0, z1 in reader.reads) <= 10
    assert len(reader.reads) > 3


def test_errors_name_the_problem(volume):
    with pytest.raises(ValueError, match="dtype int32"):
        predict_sliding(Identity(), volume.astype(np.int32), window=16)
    with pytest.raises(ValueError, match="out has shape"):
        predict_sliding(Identity(), volume, window=16, out=np.zeros((1, 5, 5, 5), np.float32))
    with pytest.raises(ValueError, match="overlap"):
        predict_sliding(Identity(), volume, window=16, overlap=16)
    with pytest.raises(ValueError, match="model gives 2 channels"):
        predict_sliding(Constant(), volume, window=16, out=np.zeros(volume.shape, np.float32))

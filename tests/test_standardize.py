import imageio.v3 as iio
import numpy as np
import pytest

from cemcurate.standardize import IntensityWindow, compute_window, sample_slice_indices


def test_uint8_passes_through_unchanged_and_inverts(data_root):
    image = iio.imread(data_root / "isbi2012_unet/train/image/0.png")
    window = compute_window(image)
    assert window.low is None and np.array_equal(window.apply(image), image)
    inverted = compute_window(image, invert=True).apply(image)
    assert np.array_equal(inverted, 255 - image)


def test_uint16_uses_the_full_range_not_a_misread_bit_depth(data_root):
    # Real 8-bit pixels re-encoded in the low 12 bits of uint16, as many detectors write them.
    image = iio.imread(data_root / "isbi2012_unet/train/image/0.png").astype(np.uint16) * 16
    window = compute_window(image, 0.0, 100.0)
    out = window.apply(image)
    assert out.dtype == np.uint8
    assert out.min() == 0 and out.max() == 255
    # A linear map of a monotone re-encoding keeps the order of pixel values.
    order = np.argsort(image.ravel(), kind="stable")
    assert np.all(np.diff(out.ravel()[order].astype(int)) >= 0)


def test_signed_and_float_with_nan_are_windowed_by_finite_percentiles(data_root):
    image = iio.imread(data_root / "isbi2012_unet/train/image/1.png").astype(np.int16) - 128
    window = compute_window(image)
    expected = np.percentile(image, [0.1, 99.9])
    assert (window.low, window.high) == pytest.approx(tuple(expected))
    floats = image.astype(np.float32)
    floats[:10, :10] = np.nan
    floats[-1, -1] = np.inf
    w = compute_window(floats)
    finite = floats[np.isfinite(floats)]
    assert (w.low, w.high) == pytest.approx(tuple(np.percentile(finite, [0.1, 99.9])))
    out = w.apply(floats)
    assert out[0, 0] == 0 and out[-1, -1] == 255


def test_window_matches_a_plain_formula():
    arr = np.linspace(-5.0, 5.0, 101)
    w = IntensityWindow(-2.0, 2.0)
    expected = np.clip(np.rint((arr + 2.0) / 4.0 * 255), 0, 255).astype(np.uint8)
    assert np.array_equal(w.apply(arr), expected)


def test_constant_and_empty_samples_do_not_divide_by_zero():
    const = np.full((4, 4), 7.5, np.float32)
    assert np.array_equal(compute_window(const).apply(const), np.zeros((4, 4), np.uint8))
    nan = np.full((4, 4), np.nan, np.float32)
    assert compute_window(nan).apply(nan).max() == 0


def test_bad_percentiles_and_dtypes_are_rejected():
    with pytest.raises(ValueError, match="percentiles"):
        compute_window(np.zeros(3, np.float32), 50, 10)
    with pytest.raises(ValueError, match="dtype"):
        compute_window(np.zeros(3, np.complex64))


def test_sample_slice_indices_spread_over_the_volume():
    idx = sample_slice_indices(1000, 32)
    assert len(idx) == 32 and idx[0] == 0 and idx[-1] == 999
    assert np.array_equal(sample_slice_indices(5, 32), np.arange(5))

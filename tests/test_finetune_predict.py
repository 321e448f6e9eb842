"""Whole-volume prediction on the real neuroproof FIB-SEM volume (a crop, for speed).

The crop is deliberately non-cubic (z, y, x all different) so that any axis mix-up in the
orthoplane pass changes the output shape or values.
"""

from __future__ import annotations

import glob

import imageio.v3 as iio
import numpy as np
import pytest
import torch

from cemcurate.io import open_file, write_volume
from finetune.cli import main
from finetune.config import PredictConfig
from finetune.models import build_model
from finetune.predict import SlicePredictor, plan_tiles, predict_orthoplane, predict_stack
from finetune.train import MODEL
from finetune.volumes import open_input

SHAPE = (24, 40, 56)  # z, y, x


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def volume_path(data_root, tmp_path_factory):
    files = sorted(glob.glob(str(data_root / "neuroproof_flyem/training_sample2/grayscale_maps/*.png")))
    if len(files) < SHAPE[0]:
        pytest.skip("neuroproof training_sample2 grayscale maps not found")
    vol = np.stack([iio.imread(f)[100 : 100 + SHAPE[1], 80 : 80 + SHAPE[2]] for f in files[50 : 50 + SHAPE[0]]])
    path = tmp_path_factory.mktemp("neuroproof") / "crop.tif"
    write_volume(path, vol, voxel_size=(10.0, 10.0, 10.0))
    return path


def _save_run(folder, arch="resnet18", classes=("background", "mito"), seed=0):
    torch.manual_seed(seed)
    model = build_model("unet2d", arch=arch, num_classes=len(classes))
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(
        {"state_dict": model.state_dict(), "model_config": model.config(), "classes": list(classes), "config": {}},
        folder / MODEL,
    )
    return model


class _Collect:
    def __init__(self, shape, channels):
        self.out = np.full((channels,) + shape, np.nan, np.float32)

    def __call__(self, z0, probs):
        self.out[:, z0 : z0 + probs.shape[1]] = probs


def test_orthoplane_of_constant_and_pointwise_models(volume_path, tmp_path):
    source = open_input(str(volume_path))
    assert source.shape == SHAPE
    const = _Collect(SHAPE, 2)
    predict_orthoplane(source, lambda s: np.full((s.shape[0], 2) + s.shape[1:], 0.3, np.float32), const, 2, chunk=7)
    np.testing.assert_allclose(const.out, 0.3, rtol=1e-6)
    # A per-voxel model sees the same value in all three planes, so the orthoplane average
    # must equal the model applied to the volume: any transposition mistake breaks this.
    expected = (source.read_unit(0, SHAPE[0]) ** 2)[None]
    for limit in (4 * 2**30, 1):  # in RAM, then memory-mapped files in tmp_path
        got = _Collect(SHAPE, 1)
        predict_orthoplane(source, lambda s: (s**2)[:, None], got, 1, chunk=5, memory_limit=limit, workdir=tmp_path)
        np.testing.assert_allclose(got.out, expected, rtol=1e-5, atol=1e-6)
    assert not list(tmp_path.glob(".orthoplane-*")), "memory-mapped work files must be removed"
    stack = _Collect(SHAPE, 1)
    predict_stack(source, lambda s: (s**2)[:, None], stack, chunk=5)
    np.testing.assert_allclose(stack.out, expected, rtol=1e-6)


def test_tiled_equals_untiled_on_a_slice_that_fits_one_tile(volume_path):
    torch.manual_seed(0)
    model = build_model("unet2d", arch="resnet18").eval()
    source = open_input(str(volume_path))
    slices = source.read_unit(3, 5)[:, 4:36, 8:40]  # 2 x 32 x 32 real slices
    tiled = SlicePredictor(model, "cpu", tile=512, overlap=64, batch_size=1)(slices)
    with torch.inference_mode():
        direct = torch.sigmoid(model(torch.from_numpy(slices)[:, None])).numpy()
    assert tiled.shape == (2, 1, 32, 32)
    np.testing.assert_allclose(tiled, direct, rtol=1e-5, atol=1e-6)


def _reference_blend(slices: np.ndarray, model_fn, tile: int, overlap: int) -> np.ndarray:
    """Plain tiled prediction of (N, H, W) slices larger than the tile on both axes: a reflection
    margin of overlap // 2, tiles every tile - overlap pixels plus one flush with the end, each
    weighted by a linear ramp over overlap pixels to its edges, then divided by the summed weights."""
    m = overlap // 2
    padded = np.pad(slices, ((0, 0), (m, m), (m, m)), mode="reflect")

    def starts(length):
        s = list(range(0, length - tile + 1, tile - overlap))
        return s if s[-1] == length - tile else s + [length - tile]

    ramp = np.array([min((i + 0.5) / overlap, (tile - i - 0.5) / overlap, 1.0) for i in range(tile)])
    weight = np.outer(ramp, ramp)
    num, den = None, np.zeros(padded.shape[1:])
    for y in starts(padded.shape[1]):
        for x in starts(padded.shape[2]):
            probs = model_fn(padded[:, y : y + tile, x : x + tile])
            num = np.zeros((len(slices), probs.shape[1]) + padded.shape[1:]) if num is None else num
            num[:, :, y : y + tile, x : x + tile] += probs * weight
            den[y : y + tile, x : x + tile] += weight
    h, w = slices.shape[1:]
    return (num / den)[:, :, m : m + h, m : m + w]


def test_tiles_of_real_slices_blend_like_a_plain_reference(data_root):
    files = sorted(glob.glob(str(data_root / "neuroproof_flyem/training_sample2/grayscale_maps/*.png")))
    if len(files) < 2:
        pytest.skip("neuroproof training_sample2 grayscale maps not found")
    # Two real slices larger than the tile on both axes, neither side a multiple of 32.
    slices = np.stack([iio.imread(f)[:150, 20:190] for f in files[40:42]]).astype(np.float32) / 255.0
    tile, overlap = 64, 20
    plan = plan_tiles(slices.shape[1:], tile, overlap)
    assert plan.window == (tile, tile) and min(len(s) for s in plan.starts) >= 3
    # (a) a context-free model (1x1 convolution): tiling changes nothing
    torch.manual_seed(0)
    pointwise = torch.nn.Conv2d(1, 1, 1)
    with torch.inference_mode():
        untiled = torch.sigmoid(pointwise(torch.from_numpy(slices)[:, None])).numpy()
    tiled = SlicePredictor(pointwise, "cpu", tile=tile, overlap=overlap, batch_size=3)(slices)
    np.testing.assert_allclose(tiled, untiled, rtol=1e-5, atol=1e-6)
    # (b) a UNet depends on where a pixel sits in its tile: wrong weights or offsets show
    model = build_model("unet2d", arch="resnet18").eval()

    @torch.inference_mode()
    def unet(tiles):
        return torch.sigmoid(model(torch.from_numpy(np.ascontiguousarray(tiles))[:, None])).numpy()

    got = SlicePredictor(model, "cpu", tile=tile, overlap=overlap, batch_size=4)(slices)
    np.testing.assert_allclose(got, _reference_blend(slices, unet, tile, overlap), rtol=1e-5, atol=1e-6)
    assert not np.allclose(
        got, unet(np.pad(slices, ((0, 0), (5, 5), (11, 11)), mode="reflect"))[:, :, 5:-5, 11:-11], atol=1e-3
    ), "tiling must matter for a UNet, or (b) tests nothing"
    # (c) every pixel covered, weights normalise: a constant model gives its constant
    const = SlicePredictor(torch.nn.Conv2d(1, 1, 1).requires_grad_(False), "cpu", tile=tile, overlap=overlap)
    const.model.weight.zero_()
    const.model.bias.fill_(0.4)
    np.testing.assert_allclose(const(slices), 1 / (1 + np.exp(-0.4)), rtol=1e-6)


@pytest.mark.slow
def test_cli_predict_stack_and_orthoplane_outputs(volume_path, tmp_path):
    run = tmp_path / "run"
    _save_run(run)
    out_stack = tmp_path / "stack.tif"
    out_ortho = tmp_path / "ortho.tif"
    assert (
        main(["predict", str(run), str(volume_path), str(out_stack), "--quiet", "--tile", "32", "--overlap", "8"]) == 0
    )
    assert (
        main(
            [
                "predict",
                str(run),
                str(volume_path),
                str(out_ortho),
                "--mode",
                "orthoplane",
                "--quiet",
                "--prob-dtype",
                "float32",
                "--chunk",
                "8",
            ]
        )
        == 0
    )
    [stack] = open_file(out_stack)
    [ortho] = open_file(out_ortho)
    assert stack.shape == ortho.shape == SHAPE
    assert stack.dtype == np.uint8 and ortho.dtype == np.float32
    s = stack.read_slices(0, SHAPE[0])
    o = ortho.read_slices(0, SHAPE[0])
    assert 0 <= o.min() and o.max() <= 1 and s.std() > 0
    assert stack.voxel_size is not None and np.allclose(stack.voxel_size, 10.0)
    # labels into a zarr store (chunked output) equal thresholded float probabilities
    out_zarr = tmp_path / "labels.zarr"
    out_float = tmp_path / "stack_float.npy"
    assert (
        main(
            [
                "predict",
                str(run),
                str(volume_path),
                str(out_zarr),
                "--output-type",
                "labels",
                "--quiet",
                "--tile",
                "32",
                "--overlap",
                "8",
            ]
        )
        == 0
    )
    assert (
        main(
            [
                "predict",
                str(run),
                str(volume_path),
                str(out_float),
                "--prob-dtype",
                "float32",
                "--quiet",
                "--tile",
                "32",
                "--overlap",
                "8",
            ]
        )
        == 0
    )
    [labels] = open_file(out_zarr)
    probs = np.load(out_float)
    np.testing.assert_array_equal(labels.read_slices(0, SHAPE[0]), (probs >= 0.5).astype(np.uint8))
    np.testing.assert_array_equal(s, np.rint(probs * 255).astype(np.uint8))


def test_multiclass_probabilities_one_file_per_class_and_folder_output(volume_path, tmp_path, data_root):
    run = tmp_path / "run3"
    _save_run(run, classes=("background", "mito", "er"))
    out = tmp_path / "p.nii.gz"
    assert main(["predict", str(run), str(volume_path), str(out), "--quiet", "--prob-dtype", "float32"]) == 0
    vols = [open_file(tmp_path / f"p_{c}.nii.gz")[0].read_slices(0, SHAPE[0]) for c in ("background", "mito", "er")]
    np.testing.assert_allclose(sum(vols), 1.0, atol=1e-5)
    # a glob of 2D images into a folder: one output per image, same names
    imgs = sorted(glob.glob(str(data_root / "cem500k_examples/correlation/images/*.png")))[:2]
    if not imgs:
        pytest.skip("cem500k_examples not found")
    folder = tmp_path / "preds"
    assert (
        main(
            [
                "predict",
                str(run),
                str(data_root / "cem500k_examples/correlation/images/*.png"),
                str(folder) + "/",
                "--output-type",
                "labels",
                "--quiet",
                "--suffix",
                ".png",
            ]
        )
        == 0
    )
    written = sorted(p.name for p in folder.iterdir())
    assert len(written) == len(glob.glob(str(data_root / "cem500k_examples/correlation/images/*.png")))
    lab = iio.imread(folder / written[0])
    assert lab.shape == iio.imread(imgs[0]).shape[:2] and lab.max() <= 2


def test_bad_inputs_fail_with_clear_errors(tmp_path, volume_path, capsys):
    assert main(["predict", str(tmp_path / "nope"), str(volume_path), str(tmp_path / "o.tif")]) == 2
    assert "model file not found" in capsys.readouterr().err
    run = tmp_path / "run"
    _save_run(run)
    assert main(["predict", str(run), str(tmp_path / "missing_*.tif"), str(tmp_path / "o.tif"), "--quiet"]) == 2
    assert "matches no file" in capsys.readouterr().err
    with pytest.raises(ValueError, match="mode must be"):
        PredictConfig(mode="sideways")

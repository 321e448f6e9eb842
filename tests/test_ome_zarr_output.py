"""OME-Zarr outputs: resolution pyramids, the input beside the prediction, NGFF labels, read back with ome-zarr.

``ome_zarr`` (ome-zarr-py) is the reference NGFF reader; a store it reads with the right
levels, axes and scales is one napari-ome-zarr and the other NGFF viewers read.
"""

from __future__ import annotations

import glob
import itertools

import imageio.v3 as iio
import numpy as np
import pytest
import torch
from ome_zarr.io import parse_url
from ome_zarr.reader import Label, Multiscales, Reader

from cemcurate.io import open_file, write_volume
from cemcurate.io.ngff import NgffStore, downsample, pyramid_factors
from finetune.cli import main
from finetune.models import build_model
from finetune.train import MODEL
from finetune.volumes import open_input

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SHAPE = (8, 250, 236)  # z, y, x: a NeuroProof crop, not square so that y/x mix-ups show
VOXEL = (10.0, 10.0, 10.0)  # nm; isotropic, so z is halved with y and x


@pytest.fixture(scope="module")
def volume_path(data_root, tmp_path_factory):
    files = sorted(glob.glob(str(data_root / "neuroproof_flyem/training_sample2/grayscale_maps/*.png")))
    vol = np.stack([iio.imread(f)[: SHAPE[1], : SHAPE[2]] for f in files[50 : 50 + SHAPE[0]]])
    path = tmp_path_factory.mktemp("neuroproof") / "crop.tif"
    write_volume(path, vol, voxel_size=VOXEL)
    return path


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A run folder with an untrained resnet18 UNet (3 classes, so labels take values 0-2)."""
    torch.manual_seed(0)
    model = build_model("unet2d", arch="resnet18", num_classes=3)
    folder = tmp_path_factory.mktemp("run")
    classes = ["background", "mito", "membrane"]
    payload = {"state_dict": model.state_dict(), "model_config": model.config(), "classes": classes, "config": {}}
    torch.save(payload, folder / MODEL)
    return folder


def _nodes(path):
    return list(Reader(parse_url(str(path)))())


def _scales(node) -> list[list[float]]:
    return [
        next(t["scale"] for t in level if t["type"] == "scale") for level in node.metadata["coordinateTransformations"]
    ]


def test_pyramid_factors_follow_the_spacing():
    # Isotropic: z halves with y and x. Auto stops at the first level of at most 256 px.
    assert pyramid_factors((64, 1024, 900), (8.0, 8.0, 8.0)) == [(1, 1, 1), (2, 2, 2), (4, 4, 4)]
    # Serial sections (50 nm z, 4 nm xy): z keeps full resolution until the lateral spacing
    # has caught up (4 * 16 = 64 nm > 50 nm).
    factors = pyramid_factors((100, 4096, 4096), (50.0, 4.0, 4.0), levels=6)
    assert [f[0] for f in factors] == [1, 1, 1, 1, 1, 2]
    assert [f[1] for f in factors] == [1, 2, 4, 8, 16, 32]
    # Unknown z spacing (a stack of 2D images): z is never halved.
    assert [f[0] for f in pyramid_factors((40, 600, 600), (float("nan"), 5.0, 5.0), levels=4)] == [1, 1, 1, 1]
    assert pyramid_factors((1, 200, 100), None) == [(1, 1, 1)]
    with pytest.raises(ValueError, match="at most 3 pyramid levels"):
        pyramid_factors((1, 4, 3), None, levels=4)


def test_downsample_averages_partial_boxes_and_subsamples_labels():
    rng = np.random.default_rng(0)
    block = rng.integers(0, 256, size=(5, 7, 6)).astype(np.uint8)
    out = downsample(block, (2, 2, 2), "mean")
    assert out.shape == (3, 4, 3) and out.dtype == np.uint8
    for z, y, x in itertools.product(range(3), range(4), range(3)):
        box = block[2 * z : 2 * z + 2, 2 * y : 2 * y + 2, 2 * x : 2 * x + 2].astype(np.float64)
        assert out[z, y, x] == np.rint(box.mean())  # edge boxes average the voxels they hold
    labels = rng.integers(0, 3, size=(3, 9, 9)).astype(np.uint8)
    np.testing.assert_array_equal(downsample(labels, (1, 2, 2), "nearest"), labels[:, ::2, ::2])
    probs = rng.random((2, 4, 4), dtype=np.float32)
    np.testing.assert_allclose(
        downsample(probs, (1, 2, 2), "mean"), probs.reshape(2, 2, 2, 2, 2).mean(axis=(2, 4)), rtol=1e-6
    )


def test_labels_with_the_input_are_an_ngff_image_with_a_label_image(run, volume_path, tmp_path):
    out = tmp_path / "seg.ome.zarr"
    argv = ["predict", str(run), str(volume_path), str(out), "--output-type", "labels", "--quiet"]
    assert main(argv + ["--with-input", "--pyramid-levels", "3"]) == 0
    plain = tmp_path / "seg.tif"
    assert main(["predict", str(run), str(volume_path), str(plain), "--output-type", "labels", "--quiet"]) == 0

    image, labels_group, label = _nodes(out)
    assert any(isinstance(s, Multiscales) for s in image.specs)
    # A 3-level pyramid: isotropic data, so every axis halves (ceil) from level to level.
    assert [tuple(d.shape) for d in image.data] == [SHAPE, (4, 125, 118), (2, 63, 59)]
    assert [a["name"] for a in image.metadata["axes"]] == ["z", "y", "x"]
    assert {a["unit"] for a in image.metadata["axes"]} == {"nanometer"}
    assert _scales(image) == [[10.0] * 3, [20.0] * 3, [40.0] * 3]
    # The root image is the input as the model saw it.
    source = open_input(str(volume_path))
    np.testing.assert_array_equal(np.asarray(image.data[0]), source.read_uint8(0, SHAPE[0]))

    assert any(isinstance(s, Label) for s in label.specs)
    assert label.metadata["properties"] == {0: {"class": "background"}, 1: {"class": "mito"}, 2: {"class": "membrane"}}
    assert label.metadata["color"][0][3] == 0.0  # background is transparent
    [tif_labels] = open_file(plain)
    level0 = np.asarray(label.data[0])
    np.testing.assert_array_equal(level0, tif_labels.read_slices(0, SHAPE[0]))
    assert len(np.unique(level0)) > 1
    # Label levels subsample (no blending into classes that do not exist), with the image's scales.
    np.testing.assert_array_equal(np.asarray(label.data[1]), level0[::2, ::2, ::2])
    assert _scales(label) == _scales(image)

    # cemcurate reads the store as input: the root image, with its voxel size.
    [volume] = open_file(out)
    assert volume.shape == SHAPE and volume.voxel_size == VOXEL


def test_probabilities_get_an_automatic_pyramid_by_mean(run, volume_path, tmp_path):
    out = tmp_path / "probs.zarr"
    assert main(["predict", str(run), str(volume_path), str(out), "--quiet"]) == 0
    written = sorted(p.name for p in tmp_path.iterdir())
    assert written == ["probs_background.zarr", "probs_membrane.zarr", "probs_mito.zarr"]
    [node] = _nodes(tmp_path / "probs_mito.zarr")
    # Auto: halve until the largest side is at most 256 px; 250 px already is, so one level...
    assert len(node.data) == 1
    # With the input: one store, the input at the root, one probability image per class inside it.
    out = tmp_path / "with_input.zarr"
    assert main(["predict", str(run), str(volume_path), str(out), "--with-input", "--quiet"]) == 0
    names = sorted(v.dataset for v in open_file(out))
    assert names == ["0", "prediction_background/0", "prediction_membrane/0", "prediction_mito/0"]
    mito = open_input(f"{out}::prediction_mito/0").volume
    [separate] = open_file(tmp_path / "probs_mito.zarr")
    np.testing.assert_array_equal(mito.read_slices(0, SHAPE[0]), separate.read_slices(0, SHAPE[0]))
    assert mito.voxel_size == VOXEL
    big = tmp_path / "big.tif"
    [vol] = open_file(volume_path)
    write_volume(big, np.concatenate([vol.read_slices(0, SHAPE[0])] * 2, axis=2), voxel_size=VOXEL)  # 472 px wide
    out = tmp_path / "big.zarr"
    assert main(["predict", str(run), str(big), str(out), "--quiet", "--output-type", "labels"]) == 0
    [node] = _nodes(out)

    # A 472-px-wide volume gets two auto levels: 472 -> 236.
    assert [tuple(d.shape) for d in node.data] == [(8, 250, 472), (4, 125, 236)]
    assert np.asarray(node.data[1]).dtype == np.uint8


def test_mean_levels_are_box_averages_of_level_zero(volume_path, tmp_path):
    [vol] = open_file(volume_path)
    data = vol.read_slices(0, SHAPE[0])
    with NgffStore(tmp_path / "img.zarr") as store:
        store.add_image("", data.shape, data.dtype, chunks=(3, 64, 64), voxel_size=VOXEL, levels=3)[:] = data
    [node] = _nodes(tmp_path / "img.zarr")
    np.testing.assert_array_equal(np.asarray(node.data[1]), downsample(data, (2, 2, 2), "mean"))
    np.testing.assert_array_equal(
        np.asarray(node.data[2]), downsample(downsample(data, (2, 2, 2), "mean"), (2, 2, 2), "mean")
    )
    translations = [
        t for level in node.metadata["coordinateTransformations"] for t in level if t["type"] == "translation"
    ]
    assert [t["translation"] for t in translations] == [[5.0] * 3, [15.0] * 3]  # box centres, in nm


def test_zarr_only_settings_are_refused_elsewhere_and_failures_keep_old_output(run, volume_path, tmp_path, capsys):
    out = tmp_path / "seg.tif"
    out.write_bytes(b"previous result")
    assert main(["predict", str(run), str(volume_path), str(out), "--with-input", "--quiet"]) == 2
    assert "--with-input needs a .zarr" in capsys.readouterr().err
    assert main(["predict", str(run), str(volume_path), str(out), "--pyramid-levels", "3", "--quiet"]) == 2
    assert "--pyramid-levels needs a .zarr" in capsys.readouterr().err
    assert out.read_bytes() == b"previous result"

    store_path = tmp_path / "old.zarr"
    write_volume(store_path, np.ones((2, 8, 8), np.uint8))
    with pytest.raises(RuntimeError, match="boom"):
        with NgffStore(store_path) as store:
            store.add_image("", (2, 8, 8), np.uint8)[:] = 7
            raise RuntimeError("boom")
    [volume] = open_file(store_path)
    np.testing.assert_array_equal(volume.read_slices(0, 2), 1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old.zarr", "seg.tif"]  # no temporary left

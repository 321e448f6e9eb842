"""``finetune export RUN DIR --format bioimageio`` (issue 17): bioimage.io packages from short real-data runs.

A 2D resnet18 UNet trained for a few iterations on VNC mitochondria (Gerhard et al. 2013, 4x
downsampled) and a tiny inflated 3D UNet on a NeuroProof FIB-SEM crop (neuron boundaries) are
exported; bioimageio.core's own test (what ``bioimageio test DIR/rdf.yaml`` runs: the test tensors
reproduced with both weight formats, the parameterised sizes run) passes on both, their outputs
through bioimageio.core's pipeline equal what ``finetune predict`` writes for the test input, and
a corrupted test tensor makes the test fail. Nothing goes to the network.
"""

from __future__ import annotations

import ast
import shutil

import imageio.v3 as iio
import numpy as np
import pytest
import yaml
from bioimageio.core import create_prediction_pipeline, predict
from bioimageio.spec import load_description
from conftest import REPO

import finetune.publish.bioimageio as exporter
from cemcurate.common.atomic import file_sha256
from cemcurate.common.config import build_config
from cemcurate.common.lazy import lazy_import
from cemcurate.io import write_volume
from finetune.cli import main
from finetune.config import TrainConfig
from finetune.publish.bioimageio import CheckResult, check_package, export_bioimageio, validation_context
from finetune.train import train

pytestmark = [pytest.mark.usefixtures("one_torch_thread"), pytest.mark.slow]

AUTHOR = "Test Author"
REPOSITORY = "https://github.com/example-org/cem-toolkit"
NP_TRAIN = (slice(0, 16), slice(0, 64), slice(0, 64))
NP_VAL = (slice(186, 218), slice(0, 96), slice(0, 96))


@pytest.fixture(scope="module")
def run2d(vnc, tmp_path_factory):
    cfg = build_config(
        TrainConfig,
        images=["raw/0[0-3].png"],
        masks=["mito/0[0-3].png"],
        val_images=["raw/16.png"],
        val_masks=["mito/16.png"],
        data_dir=str(vnc),
        mask_threshold=127,
        arch="resnet18",
        freeze_encoder=False,
        iters=4,
        batch_size=2,
        crop=64,
        workers=0,
        device="cpu",
    )
    run = tmp_path_factory.mktemp("bioimageio") / "run2d"
    assert train(cfg, run, progress=False).finished
    return run


@pytest.fixture(scope="module")
def package2d(run2d, tmp_path_factory):
    """Exported through the command line, with the voxel size (the PNGs record none) given as a flag."""
    out = tmp_path_factory.mktemp("pkg") / "mito2d"
    args = ["export", str(run2d), str(out), "--format", "bioimageio", "--author", AUTHOR, "--author", "Second Author"]
    args += ["--repository-url", REPOSITORY, "--voxel-size", "18.4", "18.4", "--quiet"]
    assert main(args) == 0
    return out


@pytest.fixture(scope="module")
def run3d(neuroproof_boundaries, tmp_path_factory):
    image, _, boundaries = neuroproof_boundaries
    d = tmp_path_factory.mktemp("np3d")
    for name, region in (("train", NP_TRAIN), ("val", NP_VAL)):
        write_volume(d / f"{name}_image.tif", image[region], (10.0, 10.0, 10.0))
        write_volume(d / f"{name}_boundary.tif", boundaries[region], (10.0, 10.0, 10.0))
    cfg = build_config(
        TrainConfig,
        dim="3d",
        images=[str(d / "train_image.tif")],
        masks=[str(d / "train_boundary.tif")],
        val_images=[str(d / "val_image.tif")],
        val_masks=[str(d / "val_boundary.tif")],
        mask_threshold=0,
        arch="resnet18",
        freeze_encoder=False,
        decoder_channels=[16, 8, 8, 4, 4],
        geometry="planar",  # in-plane kernels: the parameterised sizes bioimageio.core runs stay cheap
        crop=32,
        crop_depth=8,
        batch_size=2,
        iters=2,
        workers=0,
        device="cpu",
    )
    run = d / "run3d"
    assert train(cfg, run, progress=False).finished
    return run


@pytest.fixture(scope="module")
def package3d(run3d, tmp_path_factory):
    out = tmp_path_factory.mktemp("pkg") / "boundaries3d"
    logged = []
    result = export_bioimageio(run3d, out, authors=[AUTHOR], log=logged.append)
    assert result.rdf == out / "rdf.yaml" and logged == [result.summary]
    return out


def _rdf(package) -> dict:
    return yaml.safe_load((package / "rdf.yaml").read_text())


def _bioimageio_outputs(package) -> dict[str, np.ndarray]:
    """The package's probabilities for its test input through bioimageio.core's pipeline
    (preprocessing, network, postprocessing), per weight format."""
    outputs = {}
    with validation_context(package / "rdf.yaml"):
        descr = load_description(package / "rdf.yaml")
        x = np.load(package / "test_input.npy")
        for wf in ("pytorch_state_dict", "torchscript"):
            # predict() loads and unloads the pipeline itself (a second unload would wait forever)
            pipeline = create_prediction_pipeline(descr, weight_format=wf)
            sample = predict(model=pipeline, inputs={"raw": x})
            outputs[wf] = sample.members["probabilities"].data.to_numpy()
    return outputs


def _finetune_predict(run, package, tmp_path) -> np.ndarray:
    """What ``finetune predict`` writes for the package's test input (float32 probabilities)."""
    x = np.load(package / "test_input.npy")[0, 0]
    write_volume(tmp_path / "test_input.tif", x if x.ndim == 3 else x[None])
    out = tmp_path / "probs.npy"
    args = ["predict", str(run), str(tmp_path / "test_input.tif"), str(out), "--prob-dtype", "float32"]
    assert main(args + ["--device", "cpu", "--quiet"]) == 0
    return np.load(out)


def _check_layout(package, dim: int, voxel: list[float]) -> dict:
    rdf = _rdf(package)
    space = ["z", "y", "x"][-dim:]
    (inp,), (out,) = rdf["inputs"], rdf["outputs"]
    assert [a.get("id", a["type"]) for a in inp["axes"]] == ["batch", "channel", *space]
    assert [a.get("id", a["type"]) for a in out["axes"]] == ["batch", "channel", *space]
    assert [a["scale"] for a in inp["axes"][2:]] == voxel and {a["unit"] for a in inp["axes"][2:]} == {"nanometer"}
    assert all(a["size"] == {"tensor_id": "raw", "axis_id": a["id"]} for a in out["axes"][2:])
    assert inp["data"]["type"] == "uint8"
    ops = [p["id"] for p in inp["preprocessing"]]
    assert ops == ["ensure_dtype", "scale_linear", "fixed_zero_mean_unit_variance", "ensure_dtype"]
    assert inp["preprocessing"][1]["kwargs"]["gain"] == pytest.approx(1 / 255)
    assert inp["preprocessing"][2]["kwargs"] == {"mean": 0.5, "std": 0.5}  # random encoder: the default
    assert [p["id"] for p in out["postprocessing"]] == ["sigmoid"]
    assert set(rdf["weights"]) == {"pytorch_state_dict", "torchscript"}
    assert rdf["weights"]["pytorch_state_dict"]["architecture"]["import_from"].startswith("finetune.models.")
    for entry in [inp["test_tensor"], out["test_tensor"], rdf["documentation"], *rdf["covers"], *rdf["attachments"]]:
        assert file_sha256(package / entry["source"]) == entry["sha256"], entry
    for entry in rdf["weights"].values():
        assert file_sha256(package / entry["source"]) == entry["sha256"]
    # Parameterised sizes the network takes: the test input is one of them.
    test_shape = np.load(package / "test_input.npy").shape[2:]
    for axis, n in zip(inp["axes"][2:], test_shape):
        assert (n - axis["size"]["min"]) % axis["size"]["step"] == 0 and n >= axis["size"]["min"]
    assert rdf["cite"][0]["doi"] == "10.7554/eLife.65894" and rdf["license"] == "CC-BY-4.0"
    docs = (package / "README.md").read_text()
    assert docs.startswith("# finetune model") and "## Validation" in docs and "IoU" in docs
    cover = iio.imread(package / "cover.png")
    assert cover.ndim == 3 and cover.shape[1] == 2 * cover.shape[0] and cover.shape[0] >= 256
    assert not [p for p in package.parent.iterdir() if p.name.startswith(".")]  # no temporary left
    return rdf


def test_2d_package_passes_bioimageio_and_reproduces_finetune_predict(run2d, package2d, tmp_path):
    rdf = _check_layout(package2d, 2, [18.4, 18.4])
    assert [a["name"] for a in rdf["authors"]] == [AUTHOR, "Second Author"]
    assert rdf["git_repo"] == REPOSITORY and rdf["cite"][1]["url"] == REPOSITORY
    assert np.load(package2d / "test_input.npy").shape == (1, 1, 256, 256)
    assert rdf["inputs"][0]["axes"][2]["size"] == {"min": 32, "step": 32}
    prov = rdf["config"]["cem_toolkit"]["provenance"]
    assert prov["images"] == ["raw/0[0-3].png"] and prov["validation_mean_foreground_iou"] is not None
    assert (package2d / "training_config.yaml").is_file() and (package2d / "val_log.csv").is_file()

    # Our own predictor, through the command line, gives the package's test output, and bioimageio.core's
    # pipeline gives it from both weight formats.
    ours = _finetune_predict(run2d, package2d, tmp_path)  # (1, H, W) foreground
    expected = np.load(package2d / "test_output.npy")
    np.testing.assert_allclose(expected[0], ours, atol=1e-5)
    for wf, probs in _bioimageio_outputs(package2d).items():
        assert probs.shape == expected.shape, wf
        np.testing.assert_allclose(probs, expected, atol=1e-4, err_msg=wf)


def test_3d_package_passes_bioimageio_and_reproduces_finetune_predict(run3d, package3d, tmp_path):
    rdf = _check_layout(package3d, 3, [10.0, 10.0, 10.0])  # the voxel size the run recorded
    # planar geometry: no z pooling, so any depth
    assert [a["size"] for a in rdf["inputs"][0]["axes"][2:]] == [
        {"min": 1, "step": 1},
        {"min": 32, "step": 32},
        {"min": 32, "step": 32},
    ]
    kwargs = rdf["weights"]["pytorch_state_dict"]["architecture"]["kwargs"]
    assert kwargs["geometry"] == {"kernel_depth": [1] * 5, "z_stride": [1] * 5} and (kwargs["mean"], kwargs["std"]) == (
        0,
        1,
    )
    assert np.load(package3d / "test_input.npy").shape == (1, 1, 32, 64, 64)
    assert "git_repo" not in rdf and len(rdf["cite"]) == 1
    ours = _finetune_predict(run3d, package3d, tmp_path)  # (z, y, x) foreground
    expected = np.load(package3d / "test_output.npy")
    np.testing.assert_allclose(expected[0, 0], ours, atol=1e-5)
    for wf, probs in _bioimageio_outputs(package3d).items():
        np.testing.assert_allclose(probs, expected, atol=1e-4, err_msg=wf)


def test_a_corrupted_test_tensor_fails_bioimageio_test(package2d, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(package2d, bad)
    expected = np.load(bad / "test_output.npy")
    np.save(bad / "test_output.npy", (1 - expected).astype(np.float32))
    # Other numbers, the old sha256: the file no longer matches its hash.
    result = check_package(bad, weight_format="torchscript")
    assert not result.passed and "sha" in result.summary.lower(), result.summary
    # The hash fixed too: the test tensors are no longer reproduced.
    rdf = _rdf(bad)
    rdf["outputs"][0]["test_tensor"]["sha256"] = file_sha256(bad / "test_output.npy")
    (bad / "rdf.yaml").write_text(yaml.safe_dump(rdf, sort_keys=False))
    result = check_package(bad, weight_format="torchscript")
    assert not result.passed and "disagree with expected values" in result.summary, result.summary


def test_export_refuses_a_non_empty_dir_and_never_leaves_a_half_written_one(run2d, tmp_path, monkeypatch, capsys):
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("mine")
    assert main(["export", str(run2d), str(taken), "--author", AUTHOR, "--quiet"]) == 2
    assert "exists and is not empty; pass --overwrite" in capsys.readouterr().err
    assert [p.name for p in taken.iterdir()] == ["keep.txt"]
    # A package that fails bioimageio.core's test: an error naming it, DIR untouched, no temporary left.
    monkeypatch.setattr(exporter, "check_package", lambda path: CheckResult(False, "failed", "| ❌ | broken |"))
    assert main(["export", str(run2d), str(taken), "--author", AUTHOR, "--overwrite", "--test-shape", "64", "64"]) == 2
    err = capsys.readouterr().err
    assert f"{taken}: the bioimage.io package failed bioimageio.core's test" in err
    assert [p.name for p in taken.iterdir()] == ["keep.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]
    # A model without authors is refused before anything is written.
    with pytest.raises(ValueError, match="at least one author"):
        export_bioimageio(run2d, tmp_path / "new", authors=[])
    assert not (tmp_path / "new").exists()


def test_bioimageio_is_imported_only_when_an_export_runs():
    """``finetune --help`` and ``cemcurate --help`` never load bioimageio: no project module imports it
    at the top, the exporter binds it with lazy_import (read from the source, as test_architecture does)."""
    found = {}
    for package in ("cemcurate", "pretrain", "finetune"):
        for path in (REPO / package).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
                names += [node.module or ""] if isinstance(node, ast.ImportFrom) else []
                if any(n.split(".")[0] == "bioimageio" for n in names):
                    found[str(path.relative_to(REPO))] = ast.unparse(node)
    assert not found, found
    assert isinstance(exporter.bioimageio_spec, type(lazy_import("x"))) and "bioimageio" in repr(
        exporter.bioimageio_core
    )

"""Whole-model transfer (``finetune train --init-model``) on real data.

Sources are tiny models that ``finetune train`` itself trains for a few iterations: a 2D
resnet18 UNet on the VNC stack-1 mitochondria (4x downsampled, see the ``vnc`` fixture) and
a 3D one on NeuroProof boundaries. A target run must start from exactly the source's
weights (its own head where the classes differ), honour the freeze options, record where it
came from, inflate a 2D model into 3D so that it computes the 2D output on a z-constant
volume, and refuse settings that cannot hold the source's tensors, saying what to pass.
"""

from __future__ import annotations

import imageio.v3 as iio
import numpy as np
import pytest
import timm
import torch

from cemcurate.common.atomic import file_sha256
from cemcurate.common.config import build_config
from cemcurate.io import write_volume
from finetune.cli import main
from finetune.config import TrainConfig
from finetune.models.geometry import StageGeometry
from finetune.models.transfer import read_saved_model
from finetune.predict.command import load_model
from finetune.train import train
from finetune.training_model import build_training_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TRAIN = dict(images=["raw/0?.png"], masks=["mito/0?.png"], mask_threshold=127)


def _cfg(vnc, **kw) -> TrainConfig:
    base = dict(
        **TRAIN,
        data_dir=str(vnc),
        arch="resnet18",
        iters=2,
        batch_size=2,
        crop=64,
        checkpoint_every=2,
        workers=0,
        device="cpu",
    )
    return build_config(TrainConfig, **{**base, **kw})


@pytest.fixture(scope="module")
def source_run(vnc, tmp_path_factory):
    """A 2D model trained for 4 iterations: its weights differ from any fresh initialisation."""
    run = tmp_path_factory.mktemp("source") / "run"
    assert train(_cfg(vnc, iters=4, seed=7), run, progress=False).finished
    return run


def _encoder_decoder(state: dict) -> dict:
    return {k: v for k, v in state.items() if k.startswith(("net.encoder.", "net.decoder."))}


def test_same_classes_start_from_exactly_the_source_weights_and_train_end_to_end(vnc, source_run, tmp_path):
    source = read_saved_model(source_run)
    cfg = _cfg(vnc, init_model=str(source_run))
    model, origin = build_training_model(cfg, source=source)
    start = model.state_dict()
    assert start.keys() == source.state.keys()
    for key, value in start.items():
        assert torch.equal(value, source.state[key]), key
    fresh = build_training_model(_cfg(vnc))[0].state_dict()
    assert not all(torch.equal(fresh[k], start[k]) for k in start)  # the comparison above is not vacuous
    # A whole transferred model fine-tunes end to end unless told otherwise.
    assert not model.encoder_frozen and not model.decoder_frozen
    assert origin.init_model["sha256"] == file_sha256(source_run / "model.pth")

    run = tmp_path / "target"
    assert train(cfg, run, progress=False).finished
    payload = torch.load(run / "model.pth", weights_only=True)
    assert payload["init_model"]["classes"] == ["background", "foreground"]
    assert payload["init_model"]["images"] == TRAIN["images"] and payload["init_model"]["iterations"] == 4
    moved = [k for k in _encoder_decoder(payload["state_dict"]) if k.endswith("conv1.weight")]
    assert moved and all(not torch.equal(payload["state_dict"][k], source.state[k]) for k in moved)
    card = (run / "model_card.md").read_text()
    assert str((source_run / "model.pth").resolve()) in card and "resnet18" in card


def test_other_classes_reinitialise_only_the_head(vnc, source_run):
    source = read_saved_model(source_run)
    for classes, extra in ((["background", "mitochondria"], {}), (["background", "mito", "membrane"], {})):
        kw = dict(classes=classes, **extra)
        if len(classes) > 2:
            kw["mask_threshold"] = None
        with pytest.warns(UserWarning, match="output head is re-initialised"):
            model, _ = build_training_model(_cfg(vnc, init_model=str(source_run), **kw), source=source)
        fresh = build_training_model(_cfg(vnc, **kw))[0].state_dict()
        head = [k for k in fresh if k.startswith(model.head_prefix)]
        assert head == ["net.segmentation_head.0.weight", "net.segmentation_head.0.bias"]
        assert fresh[head[0]].shape[0] == (1 if len(classes) == 2 else len(classes))
        for key, value in model.state_dict().items():
            reference = fresh[key] if key in head else source.state[key]
            assert torch.equal(value, reference), key


def test_freeze_encoder_and_decoder_trains_only_the_head(vnc, source_run, tmp_path):
    run = tmp_path / "head_only"
    cfg = _cfg(vnc, init_model=str(source_run), freeze_encoder=True, freeze_decoder=True)
    assert train(cfg, run, progress=False).finished
    source = read_saved_model(source_run).state
    trained = torch.load(run / "model.pth", weights_only=True)["state_dict"]
    frozen = _encoder_decoder(trained)
    assert frozen and all(torch.equal(v, source[k]) for k, v in frozen.items())  # BatchNorm statistics too
    assert not torch.equal(trained["net.segmentation_head.0.weight"], source["net.segmentation_head.0.weight"])


def test_a_2d_model_inflated_into_3d_computes_its_2d_output_on_a_z_constant_volume(vnc, source_run, tmp_path):
    source = read_saved_model(source_run)
    # The defaults (inflate auto -> center, upsample auto -> nearest for a 2D source) start the
    # 3D model as exactly the 2D model on every slice.
    cfg = _cfg(vnc, dim="3d", init_model=str(source_run), geometry="isotropic")
    model3d, _ = build_training_model(cfg, StageGeometry.preset("isotropic"), source)
    assert model3d.upsample == "nearest"
    model2d = load_model(source_run)[0]
    section = torch.from_numpy(iio.imread(vnc / "raw/17.png")[64:128, 96:160].astype(np.float32) / 255)
    volume = section[None, None, None].expand(1, 1, 32, 64, 64).contiguous()
    with torch.no_grad():
        ref = model2d(section[None, None])[0, 0]
        got = model3d.eval()(volume)[0, 0]
    scale = float(ref.abs().max())
    assert scale > 0.1
    assert max(float((got[z] - ref).abs().max()) for z in range(32)) < 1e-4 * scale
    # The I3D rule, whose zero z padding reaches the middle of a 32-slice window, does not.
    i3d = _cfg(vnc, dim="3d", init_model=str(source_run), geometry="isotropic", inflate="i3d")
    with torch.no_grad():
        mid = build_training_model(i3d, StageGeometry.preset("isotropic"), source)[0].eval()(volume)[0, 0, 16]
    assert float((mid - ref).abs().max()) > 0.05 * scale

    # And the CLI trains it: a unet3d whose provenance names the 2D source.
    vol = np.stack([iio.imread(vnc / f"raw/{i:02d}.png") for i in range(8)])
    mask = np.stack([iio.imread(vnc / f"mito/{i:02d}.png") > 127 for i in range(8)]).astype(np.uint8)
    write_volume(tmp_path / "vol.tif", vol)
    write_volume(tmp_path / "mask.tif", mask)
    run = tmp_path / "run3d"
    rc = main(
        ["train", "--dim", "3d", "--images", str(tmp_path / "vol.tif"), "--masks", str(tmp_path / "mask.tif")]
        + ["--init-model", str(source_run / "model.pth"), "--arch", "resnet18", "--crop", "64", "--crop-depth", "8"]
        + ["--batch-size", "1", "--iters", "1", "--workers", "0", "--quiet", "--out", str(run)]
    )
    assert rc == 0
    payload = torch.load(run / "model.pth", weights_only=True)
    assert payload["model_config"]["model"] == "unet3d" and payload["init_model"]["model"]["model"] == "unet2d"


@pytest.fixture(scope="module")
def source_3d(neuroproof_boundaries, tmp_path_factory):
    """A 3D model (in-plane first stages, small decoder) trained 2 iterations on NeuroProof boundaries."""
    image, _, labels = neuroproof_boundaries
    d = tmp_path_factory.mktemp("np3d")
    write_volume(d / "image.tif", image[:32, :64, :64], (10.0, 10.0, 10.0))
    write_volume(d / "boundary.tif", labels[:32, :64, :64], (10.0, 10.0, 10.0))
    cfg = build_config(
        TrainConfig,
        dim="3d",
        images=[str(d / "image.tif")],
        masks=[str(d / "boundary.tif")],
        mask_threshold=0,
        arch="resnet18",
        geometry="anisotropic",
        decoder_channels=[16, 8, 8, 4, 4],
        crop=32,
        crop_depth=16,
        batch_size=1,
        iters=2,
        workers=0,
    )
    assert train(cfg, d / "run", progress=False).finished
    return d


def test_3d_to_3d_keeps_the_source_geometry_and_names_what_must_match(source_3d, tmp_path):
    d = source_3d
    source = read_saved_model(d / "run")

    def cfg(**kw) -> TrainConfig:
        base = dict(
            dim="3d",
            images=[str(d / "image.tif")],
            masks=[str(d / "boundary.tif")],
            mask_threshold=0,
            arch="resnet18",
            init_model=str(d / "run"),
            decoder_channels=[16, 8, 8, 4, 4],
            crop=32,
            crop_depth=16,
            batch_size=1,
            iters=1,
            workers=0,
        )
        return build_config(TrainConfig, **{**base, **kw})

    # geometry auto would give isotropic for these 10 nm voxels; the source's kernels say anisotropic.
    run = tmp_path / "t"
    assert train(cfg(), run, progress=False).finished
    saved = torch.load(run / "model.pth", weights_only=True)
    assert saved["model_config"]["geometry"] == StageGeometry.preset("anisotropic").to_dict()
    assert saved["init_model"]["voxel_size"] == [10.0, 10.0, 10.0]
    model, _ = build_training_model(cfg(), StageGeometry.preset("anisotropic"), source)
    assert all(torch.equal(v, source.state[k]) for k, v in model.state_dict().items())

    with pytest.raises(ValueError, match="pass --decoder-channels 16 8 8 4 4"):
        train(cfg(decoder_channels=[256, 128, 64, 32, 16]), tmp_path / "a", progress=False)
    with pytest.raises(ValueError, match="its kernels fix the geometry"):
        train(cfg(geometry="isotropic"), tmp_path / "b", progress=False)
    with pytest.raises(ValueError, match="pass --upsample trilinear or auto"):
        train(cfg(upsample="nearest"), tmp_path / "c", progress=False)
    with pytest.raises(ValueError, match="3D model; train with --dim 3d"):
        train(cfg(dim="2d"), tmp_path / "e", progress=False)


def test_bad_init_models_fail_before_training_naming_the_file(vnc, source_run, tmp_path, capsys):
    common = ["--images", str(vnc / "raw/00.png"), "--masks", str(vnc / "mito/00.png"), "--mask-threshold", "127"]
    common += ["--iters", "1", "--crop", "64", "--batch-size", "1", "--workers", "0", "--quiet"]

    def run(*args):
        rc = main(["train", *common, *args, "--out", str(tmp_path / "r")])
        return rc, capsys.readouterr().err

    rc, err = run("--init-model", str(source_run), "--arch", "resnet34")
    assert rc == 2 and "holds a resnet18 model" in err and "pass --arch resnet18" in err
    encoder = tmp_path / "encoder.pth"
    torch.save(timm.create_model("resnet18", num_classes=0, in_chans=1).state_dict(), encoder)
    rc, err = run("--init-model", str(encoder), "--arch", "resnet18")
    assert rc == 2 and "encoder.pth" in err and "an encoder file goes to --encoder" in err
    rc, err = run("--init-model", str(source_run), "--encoder", str(encoder), "--arch", "resnet18")
    assert rc == 2 and "brings its own encoder" in err
    rc, err = run("--init-model", str(tmp_path / "missing"), "--arch", "resnet18")
    assert rc == 2 and "missing" in err and "not found" in err
    assert not (tmp_path / "r" / "checkpoint.pth").exists()

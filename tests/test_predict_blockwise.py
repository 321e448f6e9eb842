"""``finetune predict --scheduler``: blockwise prediction on a Dask ``LocalCluster`` (2 workers)
equals single-process prediction on real NeuroProof FIB-SEM crops, in stack, 3D sliding and
orthoplane modes; the model is loaded once per worker; only zarr outputs are accepted.

One cluster serves the module; the commands join it by its ``tcp://`` address.
"""

from __future__ import annotations

import glob
import os
import signal
import threading
import time

import imageio.v3 as iio
import numpy as np
import pytest
import torch
import zarr

from cemcurate.common.dask_cluster import dask_client
from cemcurate.io import write_volume
from cemcurate.io.ngff import NgffStore, array_path
from finetune.cli import main
from finetune.config import PredictConfig
from finetune.models import build_model
from finetune.predict import blockwise
from finetune.predict.command import predict_path
from finetune.predict.sliding import predict_sliding
from finetune.train import MODEL
from finetune.volumes import open_input

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SMALL_3D = (32, 16, 8, 8, 4)  # decoder channels of a fast 3D UNet


@pytest.fixture(scope="module")
def client():
    with dask_client("local:2", quiet=True) as c:
        yield c


def _crop(data_root, folder, shape, z0=60, y0=90, x0=70):
    files = sorted(glob.glob(str(data_root / "neuroproof_flyem/training_sample2/grayscale_maps/*.png")))
    if len(files) < z0 + shape[0]:
        pytest.skip("neuroproof training_sample2 grayscale maps not found")
    vol = np.stack([iio.imread(f)[y0 : y0 + shape[1], x0 : x0 + shape[2]] for f in files[z0 : z0 + shape[0]]])
    path = folder / "crop.tif"
    write_volume(path, vol, voxel_size=(10.0, 10.0, 10.0))
    return path


def _save_run(folder, name, **kwargs):
    torch.manual_seed(0)
    model = build_model(name, **kwargs)
    folder.mkdir(parents=True, exist_ok=True)
    classes = ["background", "mito"] if model.num_classes <= 2 else [f"c{i}" for i in range(model.num_classes)]
    torch.save(
        {"state_dict": model.state_dict(), "model_config": model.config(), "classes": classes, "config": {}},
        folder / MODEL,
    )
    return folder


def _read(path, key="0"):
    return np.asarray(zarr.open_group(str(path), mode="r")[key])


def _loads(client, run):
    """Loads of ``run``'s model file per worker process."""
    file = str((run / MODEL).resolve())
    return {addr: loads.get(file, 0) for addr, loads in client.run(blockwise.model_loads).items()}


def test_array_path_opens_the_level0_array_of_a_store_being_built(tmp_path):
    with NgffStore(tmp_path / "s.zarr") as store:
        array = store.add_labels("prediction", (3, 4, 5), ["bg", "fg"], chunks=(1, 4, 5))
        path = array_path(array)
        assert path == store.tmp / "labels" / "prediction" / "0"
        zarr.open_array(str(path), mode="r+")[1:2] = 1
        assert array[:, 0, 0].tolist() == [0, 1, 0]
    with pytest.raises(ValueError, match="local directory store"):
        array_path(zarr.zeros((2, 2)))


def test_plan_blocks_are_chunk_aligned_z_slabs():
    assert blockwise.plan_blocks((40, 7, 9), (16, 7, 9), "stack", 8) == [
        ((0, 16), (0, 7), (0, 9)),
        ((16, 32), (0, 7), (0, 9)),
        ((32, 40), (0, 7), (0, 9)),
    ]
    assert [b[0] for b in blockwise.plan_blocks((100, 5, 5), (16, 5, 5), "stack", 12)] == [(0, 48), (48, 96), (96, 100)]
    sliding = blockwise.plan_blocks((70, 600, 300), (16, 256, 256), "sliding", 16, window=(20, 128, 128))
    assert [b[0] for b in sliding[::6]] == [(0, 48), (48, 70)]  # 2 windows deep: 40 -> 48 slices
    assert sorted({b[1] for b in sliding}) == [(0, 256), (256, 512), (512, 600)]
    assert sorted({b[2] for b in sliding}) == [(0, 256), (256, 300)] and len(sliding) == 12
    assert blockwise.touching_starts((0, 12, 24, 28), 16, 2, 16, 32) == [12, 24, 28]  # padded [18, 34)
    assert blockwise.touching_starts((0, 12, 24, 28), 16, 2, 0, 10) == [0]
    with pytest.raises(ValueError, match="supports modes"):
        blockwise.plan_blocks((4, 4, 4), (4, 4, 4), "tiles", 4)


def test_a_non_zarr_output_is_refused_before_any_cluster_starts(tmp_path, capsys):
    run = _save_run(tmp_path / "run", "unet2d", arch="resnet18", num_classes=2)
    out = str(tmp_path / "probs.nii.gz")
    assert main(["predict", str(run), "in.tif", out, "--scheduler", "local:2", "--quiet"]) == 2
    assert f"{out}: prediction on a Dask cluster (--scheduler) writes a .zarr" in capsys.readouterr().err
    cfg = PredictConfig(scheduler="local:1")
    with pytest.raises(ValueError, match=r"probs\.tif.*\.zarr"):
        predict_path(run, "anything.tif", str(tmp_path / "probs.tif"), cfg, progress=False)
    with pytest.raises(ValueError, match="not a folder"):
        predict_path(run, "anything.tif", str(tmp_path) + "/", cfg, progress=False)


def test_stack_mode_on_dask_equals_single_process(client, data_root, tmp_path):
    """Tiled 2D prediction (64-pixel tiles over 60 x 70 slices), float32 probabilities and the input
    image in one store; 33 slices in 16-slice chunks are 3 blocks for 2 workers."""
    volume = _crop(data_root, tmp_path, (33, 60, 70))
    run = _save_run(tmp_path / "run", "unet2d", arch="resnet18", num_classes=2)
    common = dict(tile=64, overlap=16, chunk=8, prob_dtype="float32", with_input=True, pyramid_levels=2)
    [local] = predict_path(run, str(volume), str(tmp_path / "local.zarr"), PredictConfig(**common), progress=False)
    cfg = PredictConfig(scheduler=client.scheduler.address, **common)
    [dask] = predict_path(run, str(volume), str(tmp_path / "dask.zarr"), cfg, progress=False)
    assert dask == tmp_path / "dask.zarr" and not list(tmp_path.glob(".dask.zarr*"))
    expected = _read(local, "prediction/0")
    assert expected.shape == (33, 60, 70) and expected.dtype == np.float32 and expected.std() > 1e-4
    # Same slices in every forward pass, same thread count: the same bits.
    np.testing.assert_array_equal(_read(dask, "prediction/0"), expected)
    np.testing.assert_array_equal(_read(dask, "prediction/1"), _read(local, "prediction/1"))  # pyramid
    np.testing.assert_array_equal(_read(dask, "0"), open_input(str(volume)).read_uint8(0, 33))
    for key in ("prediction", "labels"):
        if key in zarr.open_group(str(local)):
            assert zarr.open_group(str(dask))[key].attrs.asdict() == zarr.open_group(str(local))[key].attrs.asdict()
    scale = zarr.open_group(str(dask))["prediction"].attrs["multiscales"][0]["datasets"][0]
    assert scale["coordinateTransformations"][0]["scale"] == [10.0, 10.0, 10.0]
    loads = _loads(client, run)
    assert sum(loads.values()) <= 2 and max(loads.values()) == 1, loads  # 3 blocks, at most one load per worker


def test_sliding_mode_on_dask_equals_single_process(client, data_root, tmp_path):
    """A 3D UNet in 16 x 32 x 32 windows over a 40 x 48 x 56 crop: every block recomputes the global
    windows that touch it (blocks of 32 and 8 slices, windows every 12 slices: 36 windows for 24)."""
    volume = _crop(data_root, tmp_path, (40, 48, 56))
    run = _save_run(
        tmp_path / "run3d", "unet3d", arch="resnet18", num_classes=2, geometry="isotropic", decoder_channels=SMALL_3D
    )
    common = dict(window=[16, 32, 32], window_overlap=[4, 8, 8], batch_size=1, prob_dtype="float32", pyramid_levels=1)
    [local] = predict_path(run, str(volume), str(tmp_path / "local.zarr"), PredictConfig(**common), progress=False)
    cfg = PredictConfig(scheduler=client.scheduler.address, **common)
    [dask] = predict_path(run, str(volume), str(tmp_path / "dask.zarr"), cfg, progress=False)
    expected = _read(local)
    assert expected.shape == (40, 48, 56) and expected.dtype == np.float32 and expected.std() > 1e-4
    np.testing.assert_array_equal(_read(dask), expected)
    assert max(_loads(client, run).values()) == 1


def test_a_sliding_block_of_any_box_equals_the_whole_volume(data_root, tmp_path):
    """The block computation on boxes that split y and x too (in this process, no cluster)."""
    volume = _crop(data_root, tmp_path, (14, 30, 44))
    run = _save_run(
        tmp_path / "run3d", "unet3d", arch="resnet18", num_classes=2, geometry="isotropic", decoder_channels=SMALL_3D
    )
    settings = blockwise.PredictSettings(
        str(run), str(volume), "sliding", window=(12, 24, 24), window_overlap=(4, 8, 8), batch_size=2, device="cpu"
    )
    source = open_input(str(volume))
    job = blockwise.BlockJob(settings, source.window, source.shape, 1, ())
    model, _ = blockwise.load_model(run)
    whole = predict_sliding(model, source, (12, 24, 24), (4, 8, 8), batch_size=2)
    for box in [((0, 7), (0, 30), (0, 44)), ((7, 14), (5, 29), (30, 44)), ((3, 4), (29, 30), (0, 1))]:
        got = blockwise._sliding_block(job, box)
        np.testing.assert_array_equal(got, whole[(slice(None),) + tuple(slice(a, b) for a, b in box)])


def test_orthoplane_mode_on_dask_equals_single_process(client, data_root, tmp_path):
    """xy, xz and yz passes into scratch float32 sums, then averaged output slabs."""
    volume = _crop(data_root, tmp_path, (18, 40, 34))
    run = _save_run(tmp_path / "run", "unet2d", arch="resnet18", num_classes=2)
    common = dict(mode="orthoplane", chunk=5, prob_dtype="float32", pyramid_levels=1)
    [local] = predict_path(run, str(volume), str(tmp_path / "local.zarr"), PredictConfig(**common), progress=False)
    cfg = PredictConfig(scheduler=client.scheduler.address, **common)
    [dask] = predict_path(run, str(volume), str(tmp_path / "dask.zarr"), cfg, progress=False)
    np.testing.assert_array_equal(_read(dask), _read(local))
    assert not list(tmp_path.glob(".*orthoplane*")), "the scratch arrays are removed"


def test_a_worker_killed_mid_prediction_changes_no_voxel(client, data_root, tmp_path):
    """kill -9 of a worker while it predicts a block: the block re-runs (on the other worker or
    the restarted one) and the output equals single-process prediction. Last in the module: the
    restarted worker is a fresh process."""
    volume = _crop(data_root, tmp_path, (48, 64, 64))
    run = _save_run(tmp_path / "run", "unet2d", arch="resnet18", num_classes=2)
    common = dict(tile=64, overlap=16, chunk=4, prob_dtype="float32", pyramid_levels=1)
    [local] = predict_path(run, str(volume), str(tmp_path / "local.zarr"), PredictConfig(**common), progress=False)
    killed = []

    def kill_a_busy_worker() -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not killed:
            busy = [w for w, keys in client.processing().items() if any("predict-stack" in k for k in keys)]
            if busy:
                pid = client.run(os.getpid, workers=[busy[0]])[busy[0]]
                os.kill(pid, signal.SIGKILL)
                killed.append(busy[0])
            time.sleep(0.05)

    thread = threading.Thread(target=kill_a_busy_worker, daemon=True)
    thread.start()
    cfg = PredictConfig(scheduler=client.scheduler.address, **common)
    [dask] = predict_path(run, str(volume), str(tmp_path / "dask.zarr"), cfg, progress=False)
    thread.join()
    assert killed, "no worker was seen predicting a block"
    np.testing.assert_array_equal(_read(dask), _read(local))

"""RUN/report.html and the benchmark page: overlays, slice choice, curves and scores from the logs."""

from __future__ import annotations

import base64
import csv
import io
import re

import imageio.v3 as iio
import numpy as np
import pytest
from PIL import Image

from cemcurate.common.config import build_config
from finetune.config import TrainConfig
from finetune.losses import IGNORE_INDEX
from finetune.report import (
    CLASS_COLOURS,
    IGNORE_DOTS,
    PANEL_SIDE,
    TRUTH_OUTLINE,
    central_crop,
    outline,
    overlay,
    pick_slices,
    slice_iou,
    write_run_report,
)
from finetune.train import train

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _embedded_pngs(page: str) -> list[np.ndarray]:
    return [
        np.asarray(Image.open(io.BytesIO(base64.b64decode(data))))
        for data in re.findall(r"src='data:image/png;base64,([^']+)'", page)
    ]


def test_overlay_tints_predictions_and_outlines_the_labels():
    image = np.full((20, 20), 100, np.uint8)
    pred = np.zeros((20, 20), np.uint8)
    pred[2:6, 2:6] = 1
    pred[10:12, 10:12] = 2
    truth = np.zeros((20, 20), np.uint8)
    truth[8:16, 8:16] = 1
    truth[0:4, 16:20] = IGNORE_INDEX
    rgb = overlay(image, pred, truth)
    assert rgb.shape == (20, 20, 3) and rgb.dtype == np.uint8
    assert tuple(rgb[0, 8]) == (100, 100, 100)  # background stays grey
    # 45% of the class colour over the grey value.
    assert tuple(rgb[3, 3]) == tuple(np.rint(0.55 * 100 + 0.45 * np.array(CLASS_COLOURS[0])).astype(int))
    assert tuple(rgb[11, 11]) == tuple(np.rint(0.55 * 100 + 0.45 * np.array(CLASS_COLOURS[1])).astype(int))
    edge = outline(truth == 1)
    assert edge.sum() == 4 * 8 - 4 and not edge[9:15, 9:15].any()  # the square's perimeter only
    assert tuple(rgb[8, 12]) == TRUTH_OUTLINE and tuple(rgb[12, 12]) == (100, 100, 100)
    assert tuple(rgb[0, 16]) == IGNORE_DOTS and tuple(rgb[0, 17]) == (100, 100, 100)


def test_slice_choice_crop_and_slice_iou():
    labels = np.zeros((10, 8, 8), np.uint8)
    labels[7, :4] = 1  # most foreground
    labels[2, :2] = 1
    other = np.zeros((3, 8, 8), np.uint8)
    other[1, 0, 0] = 1
    picked = pick_slices([labels, other], n=3)
    # Items take turns; within an item the slices with the most foreground come first.
    assert picked == [(0, 2), (0, 7), (1, 1)]
    assert central_crop((1000, 300), 384) == (slice(308, 692), slice(0, 300))
    truth = np.array([[1, 1, 0, IGNORE_INDEX]])
    assert slice_iou(np.array([[1, 0, 0, 1]]), truth) == 0.5  # the ignored pixel does not count
    assert slice_iou(np.zeros((1, 4)), np.zeros((1, 4))) is None


def _logs(run, rows_train, rows_val):
    for name, header, rows in (
        ("train_log.csv", ["iteration", "loss", "lr", "seconds"], rows_train),
        ("val_log.csv", ["iteration", "iou_background", "iou_mito", "mean_foreground_iou", "loss"], rows_val),
    ):
        with open(run / name, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(header)
            writer.writerows(rows)


def test_report_shows_real_slices_with_their_iou(data_root, tmp_path):
    """Real VNC sections and masks, a threshold 'model': the captions' slice IoUs are the ones
    computed here by hand, on the central crop the page shows."""
    src = data_root / "drosophila_vnc_gerhard/stack1"
    names = ["16.tif", "17.tif"]
    images = [iio.imread(src / f"raw/{n}")[np.newaxis] for n in names]
    labels = [(iio.imread(src / f"mitochondria/{n[:2]}.png") > 127).astype(np.uint8)[np.newaxis] for n in names]

    def dark(crop):
        return (crop < 70).astype(np.uint8)

    run = tmp_path / "run"
    run.mkdir()
    _logs(run, [[10, 0.5, 1e-4, 1.0], [20, 0.3, 1e-4, 2.0]], [[20, 0.9, 0.25, 0.25, 0.4]])
    path = write_run_report(
        run,
        "a run",
        {"network": "2d resnet18"},
        ["background", "mito"],
        list(zip(names, images, labels)),
        "Validation slices",
        lambda item, z: dark(images[item][z]),
        scores={"iou": [0.9, 0.25], "mean_foreground_iou": 0.25, "loss": 0.4},
    )
    page = path.read_text()
    ys, xs = central_crop(images[0].shape[1:])
    for name, image, label in zip(names, images, labels):
        iou = slice_iou(dark(image[0][ys, xs]), label[0][ys, xs])
        assert f"{name} z=0: slice IoU {iou:.3f}" in page
    assert "Validation slices" in page and "0.2500" in page and "validation cross-entropy 0.4000" in page
    curves, *panels = _embedded_pngs(page)
    assert curves.ndim == 3 and curves.shape[1] > 600  # the two-panel curve figure
    assert [p.shape for p in panels] == [(PANEL_SIDE, PANEL_SIDE, 3)] * 2
    np.testing.assert_array_equal(
        panels[0], overlay(images[0][0][ys, xs], dark(images[0][0][ys, xs]), labels[0][0][ys, xs])
    )


def test_training_writes_a_report_of_the_run(vnc, tmp_path):
    base = dict(
        images=["raw/0[0-3].png"],
        masks=["mito/0[0-3].png"],
        data_dir=str(vnc),
        mask_threshold=127,
        arch="resnet18",
        iters=4,
        batch_size=2,
        crop=64,
        checkpoint_every=2,
        log_every=1,
        workers=0,
        device="cpu",
    )
    run = tmp_path / "run"
    train(build_config(TrainConfig, **base, val_images=["raw/16.png"], val_masks=["mito/16.png"]), run, progress=False)
    page = (run / "report.html").read_text()
    with open(run / "val_log.csv") as f:
        last = list(csv.DictReader(f))[-1]
    assert "Validation slices" in page and "16.png z=0" in page and "4 of 4" in page
    assert f"<td>{float(last['iou_foreground']):.4f}</td>" in page
    assert len(_embedded_pngs(page)) == 2  # the curves and the one validation slice (256 px, shown whole)
    assert _embedded_pngs(page)[1].shape == (256, 256, 3)
    # Without a validation set the page says its slices were trained on.
    run = tmp_path / "no_val"
    train(build_config(TrainConfig, **{**base, "iters": 2}), run, progress=False)
    page = (run / "report.html").read_text()
    assert "no validation set: the model has seen these" in page
    assert len(_embedded_pngs(page)) == 1 + 4  # curves + one slice of each training image

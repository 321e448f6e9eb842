"""ASEM's valid-convolution 3D U-Net (``--arch asem_unet``): 204^3 in -> 110^3 out, its parameter
count, the same-size forward the toolkit uses, and a short real-data run on NeuroProof boundaries
(isotropic FIB-SEM, as ASEM's data) that beats the all-foreground baseline.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cemcurate.io import write_volume
from finetune.cli import main
from finetune.metrics import confusion_matrix, iou_from_confusion
from finetune.models import ASEMUNet, build_model
from finetune.models.asem_unet import NATIVE_INPUT, NATIVE_OUTPUT, reflect_pad, valid_output_size
from finetune.volumes import read_array

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def described_parameter_count(f: int = 32, k: int = 2, out_channels: int = 1) -> int:
    """By hand: four levels of two biased 3x3x3 convolutions (widths f, fk, fk^2, fk^3), three
    2x2x2 transposed convolutions keeping the channels, two convolutions per up level on the
    concatenation, and a 3x3x3 output convolution."""
    widths = [f * k**i for i in range(4)]
    conv = lambda cin, cout: cin * cout * 27 + cout  # noqa: E731
    count = sum(conv(cin, w) + conv(w, w) for cin, w in zip([1] + widths[:-1], widths))
    for fine, coarse in zip(widths[:-1], widths[1:]):
        count += coarse * coarse * 8 + coarse + conv(fine + coarse, fine) + conv(fine, fine)
    return count + conv(widths[0], out_channels)


def test_204_in_110_out_and_the_parameter_count():
    assert valid_output_size(NATIVE_INPUT) == NATIVE_OUTPUT == 110
    tiny = ASEMUNet(num_fmaps=1).eval()
    with torch.no_grad():
        assert tiny.valid_logits(torch.rand(1, 1, 204, 204, 204)).shape == (1, 1, 110, 110, 110)
        for n in (100, 116, 132):  # the size arithmetic is the network's
            assert tiny.valid_logits(torch.rand(1, 1, n, 100, 100)).shape[2] == valid_output_size(n)
    assert valid_output_size(101) is None and valid_output_size(106) is None  # odd sizes at a pooling
    model = build_model("asem_unet", num_classes=2)
    n_params = sum(p.numel() for p in model.parameters())
    assert n_params == described_parameter_count() and 5.5e6 < n_params < 7e6  # ASEM: "~6 million"


def test_forward_is_the_valid_network_on_the_reflected_input():
    torch.manual_seed(0)
    model = ASEMUNet(num_fmaps=2).eval()
    x = torch.rand(1, 1, 10, 21, 30)
    with torch.no_grad():
        out = model(x)
        assert out.shape == (1, 1, 10, 21, 30)
        # The smallest valid inputs covering 10, 21, 30 voxels: 108 -> 14, 116 -> 22, 124 -> 30 (47
        # voxels of context before each output).
        assert [valid_output_size(n) for n in (100, 108, 116, 124)] == [6, 14, 22, 30]
        pads = [(47, 108 - 10 - 47), (47, 116 - 21 - 47), (47, 124 - 30 - 47)]
        direct = model.valid_logits(reflect_pad(model.normalise(x), pads))[:, :, :10, :21, :30]
        torch.testing.assert_close(out, direct)
    assert np.array_equal(
        reflect_pad(torch.arange(5.0).reshape(1, 1, 5), [(7, 9)])[0, 0].numpy(),
        np.pad(np.arange(5.0), (7, 9), "reflect"),
    )


@pytest.mark.slow
def test_short_real_data_run_beats_the_trivial_baselines(neuroproof_boundaries, tmp_path):
    image, _, boundary = neuroproof_boundaries
    for name, region in (("train", np.s_[0:64, 0:64, 0:64]), ("test", np.s_[186:250, 0:64, 0:64])):
        write_volume(tmp_path / f"{name}.tif", image[region], (10.0, 10.0, 10.0))
        write_volume(tmp_path / f"{name}_boundary.tif", boundary[region], (10.0, 10.0, 10.0))
    run = tmp_path / "run"
    # GPU-sized network on a CPU budget: a quarter of the widths, 25 crops of 16 x 32 x 32 (each
    # 116 x 132 x 132 voxels in, with the reflected context), about 50 s here (15 crops are too few: IoU 0.01).
    args = ["train", "--dim", "3d", "--arch", "asem_unet", "--width-scale", "0.25"]
    args += ["--images", str(tmp_path / "train.tif"), "--masks", str(tmp_path / "train_boundary.tif")]
    args += ["--mask-threshold", "0", "--crop", "32", "--crop-depth", "16", "--batch-size", "1", "--iters", "25"]
    args += ["--lr", "0.001", "--seed", "0", "--class-weighting", "balanced", "--workers", "0", "--quiet"]
    assert main([*args, "--out", str(run)]) == 0
    payload = torch.load(run / "model.pth", weights_only=True)
    assert payload["model_config"]["model"] == "asem_unet" and payload["model_config"]["num_fmaps"] == 8
    pred = tmp_path / "pred.tif"
    rc = main(["predict", str(run), str(tmp_path / "test.tif"), str(pred), "--output-type", "labels", "--quiet"])
    assert rc == 0
    truth = boundary[186:250, 0:64, 0:64]
    iou = iou_from_confusion(confusion_matrix(read_array(pred), truth, 2))[1]
    all_foreground = iou_from_confusion(confusion_matrix(np.ones_like(truth), truth, 2))[1]
    assert 0.1 < all_foreground < 0.25
    # Measured: 0.319 against 0.165.
    assert iou > all_foreground + 0.03, f"boundary IoU {iou:.3f} vs all-foreground {all_foreground:.3f}"

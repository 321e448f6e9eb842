"""`pretrain analyze` (the paper's Fig. 3): the measurements on constructed cases, then one CLI run on
the real CEM500K example images with two small encoders."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import require

from cemcurate.common.weights import CEM500K_MEAN
from pretrain.analyze import (
    DISTORTIONS,
    cosine_similarity,
    distort,
    firing_rates,
    firing_thresholds,
    is_identity,
    load_encoder,
    occlusion_map,
    occlusion_squares,
    parse_encoder_arg,
    point_biserial,
    selectivity,
)
from pretrain.cli import main
from pretrain.moco import create_backbone

ORGANELLES = ("er", "mitochondria2", "nuclei", "canalicular_channels")
EXACT = [("rotation", 90), ("rotation", 180), ("rotation", 270), ("hflip", 1), ("vflip", 1)]


class GlobalStats(torch.nn.Module):
    """Features that depend on the multiset of pixel values only: exactly invariant to rotations
    by 90 degrees and flips (as to any permutation of the pixels)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.flatten(1)
        qs = torch.quantile(flat, torch.linspace(0.05, 0.95, 16, dtype=flat.dtype), dim=1).T
        return torch.cat([flat.mean(1, keepdim=True), flat.std(1, keepdim=True), qs], dim=1)


class TopLeft(torch.nn.Module):
    """Features of the top-left quadrant only (4 x 4 average pools): not invariant to rotations or flips."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        return torch.nn.functional.adaptive_avg_pool2d(x[..., : h // 2, : w // 2], 4).flatten(1)


def _images(n: int = 60, size: int = 32, seed: int = 0) -> np.ndarray:
    """Smooth random images in [0, 1] whose quadrants differ (so position matters)."""
    rng = np.random.default_rng(seed)
    coarse = rng.random((n, 4, 4)).astype(np.float32)
    return np.clip(np.kron(coarse, np.ones((size // 4, size // 4), np.float32)), 0, 1)


def _embed(model: torch.nn.Module):
    def embed(batch: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return model(torch.from_numpy(np.asarray(batch, np.float32))[:, None]).double().numpy()

    return embed


@pytest.mark.parametrize("kind,strength", EXACT)
def test_an_invariant_encoder_scores_one_and_a_positional_one_less(kind, strength):
    images = _images()
    noise = np.random.default_rng(1).random((200, 32, 32)).astype(np.float32)
    for model, invariant in ((GlobalStats(), True), (TopLeft(), False)):
        embed = _embed(model)
        thresholds = firing_thresholds(embed(noise))
        clean = embed(images)
        distorted = embed(np.stack([distort(im, kind, strength) for im in images]))
        rate = firing_rates(clean, distorted, thresholds)
        sim = cosine_similarity(clean, distorted).mean()
        assert rate.neurons > 0
        if invariant:
            assert rate.mean == pytest.approx(1.0) and sim == pytest.approx(1.0)
        else:
            assert rate.mean < 0.9 and sim < 0.999, (kind, rate.mean, sim)


def test_firing_rate_definition_on_constructed_responses():
    # Neuron 0: images 18 and 19 are its top 10% and above threshold 0.5; one keeps firing when distorted.
    # Neuron 1: never above its threshold on the test images -> ignored.
    clean = np.zeros((20, 2))
    clean[:, 0] = np.arange(20) / 10
    clean[:, 1] = 0.1
    distorted = clean.copy()
    distorted[19, 0] = 0.0
    distorted[:18, 0] = 9.0  # images outside Z do not count, however they respond
    rate = firing_rates(clean, distorted, np.array([0.5, 5.0]))
    assert rate.neurons == 1 and rate.mean == pytest.approx(0.5) and np.isnan(rate.per_neuron[1])
    assert firing_rates(clean, clean, np.array([0.5, 5.0])).mean == 1.0
    assert np.isnan(firing_rates(clean, clean, np.array([5.0, 5.0])).mean)
    assert firing_thresholds(np.arange(101.0)[:, None])[0] == pytest.approx(99.0)


def test_distortions_keep_shape_and_range_and_identities_are_exact():
    image = _images(1, 64)[0]
    rng = np.random.default_rng(0)
    for kind, values in DISTORTIONS.items():
        for s in values:
            out = distort(image, kind, s, rng)
            assert out.shape == image.shape and out.dtype == np.float32 and 0 <= out.min() <= out.max() <= 1
            if is_identity(kind, s):
                assert np.array_equal(out, image)
            else:
                assert not np.array_equal(out, image), (kind, s)
    assert np.array_equal(distort(image, "rotation", 90), np.rot90(image))
    # scale 2: the centre 32 x 32 crop blown up to 64 x 64
    assert distort(image, "scale", 2)[30:34, 30:34].std() < image.std()
    with pytest.raises(ValueError, match="unknown distortion"):
        distort(image, "shear", 1)


def test_a_channel_equal_to_the_mask_is_the_best_with_correlation_and_iou_one():
    rng = np.random.default_rng(0)
    mask = np.zeros((40, 50), bool)
    mask[5:20, 10:35] = True
    maps = rng.normal(0, 1, (64, 40, 50)).astype(np.float32)
    maps[17] = mask
    maps[3] = 5.0  # a constant channel: correlation 0, no division by zero
    res = selectivity(maps, mask, top_k=1)
    assert res.top_channels[0] == 17 and res.correlations[17] == pytest.approx(1.0)
    assert res.correlation == pytest.approx(1.0) and res.iou == 1.0
    assert np.array_equal(res.binary, mask) and res.correlations[3] == 0.0
    # The paper's top 32: the mask channel still ranks first; the mean of 32 is worse than it alone.
    res32 = selectivity(maps, mask)
    assert res32.top_channels[0] == 17 and len(res32.top_channels) == 32
    assert 0 <= res32.mean_response.min() and res32.mean_response.max() == pytest.approx(1.0)
    assert res32.correlation < 1.0
    inverted = point_biserial(maps[17:18] * -1, mask)
    assert inverted[0] == pytest.approx(-1.0)


def test_occlusion_peaks_where_the_embed_looks():
    view = _images(1, 224, seed=3)[0]

    def embed(batch: np.ndarray) -> np.ndarray:  # looks at rows 120-160, cols 40-80 only
        region = np.asarray(batch)[:, 120:160, 40:80]
        return np.stack([region.mean(axis=(1, 2)), region.std(axis=(1, 2)), np.ones(len(batch))], axis=1)

    reference = embed(view[None])[0]
    result = occlusion_map(embed, view, reference, fill=0.0)
    ys, xs = occlusion_squares(224, 224)
    assert ys == xs == list(range(0, 181, 30))  # the last square is clipped at the border
    assert result.heatmap.shape == (224, 224) and result.heatmap.min() == 0 and result.heatmap.max() == 1
    r, c = np.unravel_index(np.argmax(result.drops), result.drops.shape)
    y, x = ys[r], xs[c]  # the most important square overlaps the region the embed looks at
    assert y < 160 and y + 61 > 120 and x < 80 and x + 61 > 40
    inside = np.zeros((224, 224), bool)
    inside[120:160, 40:80] = True
    assert result.heatmap[inside].mean() > 3 * result.heatmap[~inside].mean()
    assert result.heatmap[:60, 150:].max() == 0  # squares far from the region change nothing
    assert result.drops.shape == (7, 7)


def test_encoder_arguments():
    assert parse_encoder_arg("moco=runs/export") == ("moco", "runs/export")
    assert parse_encoder_arg("random") == ("random", "random")
    assert parse_encoder_arg("cem500k:w/cem.pth.tar") == ("cem.pth.tar", "cem500k:w/cem.pth.tar")
    assert parse_encoder_arg("ours=cem500k:w/a=b.pth") == ("ours", "cem500k:w/a=b.pth")


def test_load_encoder_takes_the_arch_and_norm_from_the_file(tmp_path):
    """A CEM500K-layout checkpoint of a resnet18: the arch is inferred from its keys (not --arch), the
    CEM500K statistics apply, the weights load strictly."""
    torch.manual_seed(1)
    state = create_backbone("resnet18").state_dict()
    wrapped = {f"module.encoder_q.{k}": v for k, v in state.items()}
    wrapped["module.encoder_q.fc.0.weight"] = torch.zeros(4, 512)
    torch.save({"state_dict": wrapped, "epoch": 3}, tmp_path / "cem.pth.tar")
    enc = load_encoder("c", f"cem500k:{tmp_path / 'cem.pth.tar'}", "resnet50", torch.device("cpu"))
    assert enc.arch == "resnet18" and enc.mean == pytest.approx(CEM500K_MEAN) and enc.norm_from == "weights"
    assert torch.equal(enc.model.state_dict()["layer4.1.conv2.weight"], state["layer4.1.conv2.weight"])
    rand = load_encoder("r", "random", "resnet18", torch.device("cpu"), seed=3)
    assert rand.norm_from.startswith("CEM500K") and rand.model.num_features == 512
    image = np.random.default_rng(0).random((40, 56)).astype(np.float32)
    maps = rand.feature_maps(image, 8)
    assert maps.shape == (512, 40, 56)


def test_cli_on_the_real_examples(tmp_path, data_root, capsys, one_torch_thread):
    examples = require(data_root / "cem500k_examples")
    # An encoder the test writes: a random resnet18 state dict with a config.json giving arch and norm.
    torch.manual_seed(5)
    weights = tmp_path / "mine"
    weights.mkdir()
    torch.save(create_backbone("resnet18").state_dict(), weights / "encoder.pth")
    (weights / "config.json").write_text(json.dumps({"arch": "resnet18", "mean": 0.6, "std": 0.1}))
    # One image per organelle (the run's cost is mostly forward passes: ~100 per encoder here).
    corr = tmp_path / "correlation"
    for sub in ("images", "masks"):
        (corr / sub).mkdir(parents=True)
        for stem in ORGANELLES:
            (corr / sub / f"{stem}.png").symlink_to(require(examples / "correlation" / sub / f"{stem}.png"))
    out = tmp_path / "an"
    argv = ["analyze", "random=random", f"mine={weights}", "--arch", "resnet18", "--out", str(out)]
    argv += ["--noise-images", "16", "--device", "cpu", "--no-progress", "--batch-size", "16"]
    argv += ["--images", str(examples / "occlusion" / "example[0-3].tiff"), "--n-images", "3"]
    argv += ["--correlation", str(corr), "--occlusion", str(examples / "occlusion")]
    argv += ["--distortions", "rotation=90,0", "hflip=1", "scale=2", "--max-occlusion-images", "1"]
    assert main(argv) == 0, capsys.readouterr().err
    doc = json.loads((out / "analyze.json").read_text())
    assert [e["name"] for e in doc["encoders"]] == ["random", "mine"]
    assert doc["encoders"][0]["mean"] == pytest.approx(CEM500K_MEAN) and doc["encoders"][1]["mean"] == 0.6
    assert {e["arch"] for e in doc["encoders"]} == {"resnet18"} and doc["encoders"][0]["num_features"] == 512
    assert doc["settings"]["n_images"] == 3 and "example[0-3].tiff" in doc["settings"]["images"]
    for name in ("random", "mine"):
        inv = doc["invariance"][name]
        assert set(inv) == {"rotation", "hflip", "scale"}
        assert [r["strength"] for r in inv["rotation"]] == [0, 90]
        assert inv["rotation"][0]["firing_rate"] == 1.0 and inv["rotation"][0]["cosine_similarity"] == pytest.approx(1)
        for rows in inv.values():
            for r in rows:
                assert r["firing_rate"] is None or 0 <= r["firing_rate"] <= 1
                assert -1 <= r["cosine_similarity"] <= 1.0 + 1e-9
        sel = doc["selectivity"][name]
        assert set(sel["images"]) == set(ORGANELLES)
        assert set(sel["by_organelle"]) == {"er", "mitochondria", "nuclei", "canalicular_channels"}
        assert sel["images"]["nuclei"]["output_stride"] == 16 and sel["images"]["er"]["output_stride"] == 8
        for row in sel["images"].values():
            corrs = [c["correlation"] for c in row["best_channels"]]
            assert len(corrs) == 10 and corrs == sorted(corrs, reverse=True) and row["top_k"] == 32
            assert -1 <= row["mean_response_correlation"] <= 1 and 0 <= row["iou"] <= 1
        occ = doc["occlusion"][name]
        assert list(occ) == ["example0"] and np.array(occ["example0"]["drops"]).shape == (7, 7)
    assert doc["invariance"]["random"] != doc["invariance"]["mine"]
    for png in ("invariance.png", "selectivity.png", "occlusion.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert (out / png).stat().st_size < 300_000
    assert sorted(doc["files"]) == ["analyze.json", "invariance.png", "occlusion.png", "selectivity.png"]
    assert "analyze.json" in capsys.readouterr().out


def test_cli_refuses_bad_input(tmp_path, capsys):
    assert main(["analyze", "a=random", "a=random", "--out", str(tmp_path)]) == 2
    assert "unique" in capsys.readouterr().err
    assert main(["analyze", f"x={tmp_path / 'missing'}", "--out", str(tmp_path)]) == 2
    assert "not found" in capsys.readouterr().err
    assert main(["analyze", "x=random", "--distortions", "shear=1", "--out", str(tmp_path)]) == 2
    assert "shear" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["analyze", "--help"])
    text = capsys.readouterr().out
    for flag in ("--images", "--n-images", "--noise-images", "--arch", "--device", "--seed", "--batch-size"):
        assert flag in text
    assert "correlation" in text and "occlusion" in text

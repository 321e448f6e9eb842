"""The ResNet filter: training on real labelled patches, weight mapping, inference, make_filter."""

from __future__ import annotations

import json
import shutil

import imageio.v3 as iio
import numpy as np
import pytest
import tifffile
import torch
import yaml
from PIL import Image
from test_filter_rules import PLATE_EMPTY

from cemcurate.common.weights import WeightsError
from cemcurate.filtering.classifier import (
    CLASSIFIER_KIND,
    FilterError,
    convert_torchvision_classifier,
    create_model,
    load_classifier,
    predict_logits,
    resolve_init,
    save_classifier,
)
from cemcurate.filtering.filters import make_filter
from cemcurate.filtering.labels import append_labels, labels_path
from cemcurate.filtering.train import FilterTrainConfig, stratified_split, train_filter
from cemcurate.store import write_patch_store

P = 64  # tiny patches for the mechanics (DESIGN: resnet18, 64 px)


def _resize(a: np.ndarray, size: int) -> np.ndarray:
    return np.asarray(Image.fromarray(a).resize((size, size), Image.BILINEAR))


def uninformative_patches(data_root, rng) -> np.ndarray:
    """Empty ice of the cryo-ET tomogram, empty SEM background and the SEM data bar (38 patches)."""
    tomo = tifffile.imread(data_root / "cryoet_tomo_napari_bio/tomo.tif")
    lo, hi = np.percentile(tomo, [0.1, 99.9])
    tomo = (np.clip((tomo - lo) / (hi - lo), 0, 1) * 255).round().astype(np.uint8)
    out = []
    # Slices 0-24 and 88-100 hold no particles (only noise and the grid edge), seen by eye.
    for z in list(range(0, 25, 3)) + list(range(88, 101, 3)):
        y, x = rng.integers(0, tomo.shape[1] - P, 2)
        out.append(tomo[z, y : y + P, x : x + P])
    plate = tifffile.imread(data_root / "sem_plate_databar/plateImage2D.tif")
    for y, x in PLATE_EMPTY:
        out.append(_resize(plate[y : y + 112, x : x + 112], P))
    for x in range(0, 1024 - 55, 56):
        out.append(_resize(plate[886:942, x : x + 56], P))
    return np.stack(out)


def informative_patches(data_root, rng) -> np.ndarray:
    """Membrane-rich crops of the VNC ssTEM stack and the neuroproof FIB-SEM cube (40 patches)."""
    out = []
    for f in sorted((data_root / "drosophila_vnc_gerhard/stack1/raw").glob("*.tif")):
        # 4x smaller: a 64-px crop then spans ~1.2 um, several neurites wide.
        image = _resize(tifffile.imread(f), 256)
        y, x = rng.integers(0, 256 - P, 2)
        out.append(image[y : y + P, x : x + P])
    for f in sorted((data_root / "neuroproof_flyem/training_sample2/grayscale_maps").glob("*.png"))[::12][:20]:
        image = _resize(iio.imread(f), 125)
        y, x = rng.integers(0, 125 - P, 2)
        out.append(image[y : y + P, x : x + P])
    return np.stack(out)


@pytest.fixture(scope="module")
def labelled_build(data_root, tmp_path_factory):
    """A store of real 64-px patches with every patch labelled in labels.csv."""
    rng = np.random.default_rng(0)
    bad, good = uninformative_patches(data_root, rng), informative_patches(data_root, rng)
    patches = np.concatenate([bad, good])
    labels = np.r_[np.zeros(len(bad), int), np.ones(len(good), int)]
    out = tmp_path_factory.mktemp("filter_build")
    write_patch_store(out, patches, source="real-mix")
    append_labels(labels_path(out), zip(range(len(patches)), labels))
    return out, patches, labels


@pytest.mark.slow
def test_train_end_to_end_on_real_patches(labelled_build, tmp_path):
    out, patches, labels = labelled_build
    # Initial weights from a local encoder file (as exported by pretraining: plain timm keys, no head).
    torch.manual_seed(1)
    encoder = create_model("resnet18").state_dict()
    encoder = {k: v for k, v in encoder.items() if not k.startswith("fc.")}
    weights = tmp_path / "encoder.pth"
    torch.save(encoder, weights)
    cfg = FilterTrainConfig(
        arch="resnet18",
        weights=str(weights),
        epochs=3,
        batch_size=16,
        test_fraction=0.3,
        seed=0,
        forest_trees=50,
        output=str(tmp_path / "filter"),
    )
    metrics = train_filter(out, cfg, progress=False)

    dest = tmp_path / "filter"
    for name in ("classifier.pth", "stats_forest.pkl", "metrics.json", "roc.png", "filter_train.yaml"):
        assert (dest / name).is_file(), name
    assert (dest / "roc.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    on_disk = json.loads((dest / "metrics.json").read_text())
    assert on_disk["auroc"] == metrics["auroc"]
    # Stratified split: both classes held out in proportion.
    assert metrics["n_test"] == round(0.3 * len(labels)) and metrics["n_train"] + metrics["n_test"] == len(labels)
    assert 0.3 < metrics["test_informative"] / metrics["n_test"] < 0.7
    # Held-out separation well above chance, for the ResNet and the forest baseline alike.
    assert metrics["auroc"]["resnet"] > 0.85, metrics["auroc"]
    assert metrics["auroc"]["forest"] > 0.85, metrics["auroc"]
    assert len(metrics["train_loss"]) == 3 and metrics["train_loss"][-1] < metrics["train_loss"][0]

    classifier = load_classifier(dest / "classifier.pth")
    assert (classifier.arch, classifier.input_size, classifier.threshold) == ("resnet18", P, 0.5)
    state = classifier.model.state_dict()
    # Frozen stages keep the file's weights; layer4 and the head were trained.
    assert torch.equal(state["conv1.weight"], encoder["conv1.weight"])
    assert torch.equal(state["layer3.0.conv1.weight"], encoder["layer3.0.conv1.weight"])
    assert not torch.equal(state["layer4.0.conv1.weight"], encoder["layer4.0.conv1.weight"])

    # The saved file reproduces the reported AUROC through the pipeline's entry point.
    from sklearn.metrics import roc_auc_score

    test_ids = np.array(metrics["test_patch_ids"])
    patch_filter = make_filter(str(dest / "classifier.pth"))
    probs = patch_filter(patches[test_ids])
    assert probs.dtype == np.float32 and probs.shape == (len(test_ids),) and ((probs >= 0) & (probs <= 1)).all()
    assert roc_auc_score(labels[test_ids], probs) == pytest.approx(metrics["auroc"]["resnet"], abs=1e-6)
    forest = make_filter(str(dest / "stats_forest.pkl"))
    assert roc_auc_score(labels[test_ids], forest(patches[test_ids])) == pytest.approx(
        metrics["auroc"]["forest"], abs=1e-6
    )


def test_cem500k_state_dict_maps_to_timm(tmp_path, labelled_build):
    import timm
    import torchvision

    torch.manual_seed(0)
    tv = torchvision.models.resnet34()
    tv.fc = torch.nn.Linear(512, 1)
    # Non-trivial batch-norm statistics, so that folding the normalisation matters.
    with torch.no_grad():
        for m in tv.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.2)
                m.running_var.uniform_(0.5, 2.0)
    tv.eval()
    # torchvision and timm ResNets share their key names; only conv1's channels differ.
    timm_keys = set(timm.create_model("resnet34", in_chans=1, num_classes=1).state_dict())
    assert timm_keys == set(tv.state_dict())
    path = tmp_path / "patch_quality_classifier_nn.pth"
    torch.save(tv.state_dict(), path)

    classifier = load_classifier(path)
    assert (classifier.arch, classifier.input_size) == ("resnet34", 224)
    # Real patches, enlarged to 224 px as the released model expects.
    _, patches, _ = labelled_build
    x = np.stack([_resize(p, 224) for p in patches[[20, 60]]])  # empty SEM background, VNC
    ours = predict_logits(classifier.model, x, 224, classifier.mean, classifier.std, progress=False)
    rgb = torch.from_numpy(x).float().div(255).unsqueeze(1).repeat(1, 3, 1, 1)
    rgb = (rgb - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) / torch.tensor([0.229, 0.224, 0.225]).view(
        1, 3, 1, 1
    )
    with torch.no_grad():
        reference = tv(rgb).reshape(-1).numpy()
    # Identical up to the 3-px border, where the two zero paddings differ slightly.
    assert np.abs(ours - reference).max() < 2e-3 * np.abs(reference).max()
    # A naive channel sum without the normalisation fold is far off, so the fold is tested.
    naive_state = {k: v.clone() for k, v in tv.state_dict().items()}
    naive_state["conv1.weight"] = naive_state["conv1.weight"].sum(1, keepdim=True)
    naive = create_model("resnet34")
    naive.load_state_dict(naive_state)
    naive_logits = predict_logits(naive, x, 224, classifier.mean, classifier.std, progress=False)
    assert np.abs(naive_logits - reference).max() > 10 * np.abs(ours - reference).max()

    # DataParallel prefixes and one-channel conv1 are accepted; a two-output head is not.
    state = {f"module.{k}": v for k, v in tv.state_dict().items()}
    state["module.conv1.weight"] = state["module.conv1.weight"][:, :1].clone()
    mapped, _, _ = convert_torchvision_classifier(state)
    assert mapped["conv1.weight"].shape == (64, 1, 7, 7) and "fc.weight" in mapped
    two = dict(tv.state_dict())
    two["fc.weight"], two["fc.bias"] = torch.zeros(2, 512), torch.zeros(2)
    with pytest.raises(FilterError, match="one output"):
        convert_torchvision_classifier(two, "two.pth")


def test_predict_is_batch_independent_and_resizes(labelled_build):
    _, patches, _ = labelled_build
    torch.manual_seed(0)
    model = create_model("resnet18").eval()
    a = predict_logits(model, patches[:10], 64, 0.5, 0.2, batch_size=3, progress=False)
    b = predict_logits(model, patches[:10], 64, 0.5, 0.2, batch_size=64, progress=False)
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
    # 64-px patches into a 96-px network input: resized on the fly.
    c = predict_logits(model, patches[:4], 96, 0.5, 0.2, progress=False)
    assert c.shape == (4,) and np.isfinite(c).all() and not np.allclose(c, a[:4])
    with pytest.raises(ValueError, match="uint8"):
        predict_logits(model, patches[:2].astype(np.float32), 64, 0.5, 0.2, progress=False)


def test_make_filter_identity_follows_file_content(tmp_path, labelled_build):
    _, patches, _ = labelled_build
    assert make_filter("none").name == "none" and (make_filter("none")(patches[:3]) == 1).all()
    assert make_filter("stats").name == make_filter("stats").name
    assert make_filter("none")(np.zeros((0, 64, 64), np.uint8)).shape == (0,)
    torch.manual_seed(0)
    model = create_model("resnet18")
    path = tmp_path / "clf.pth"
    save_classifier(path, model, "resnet18", 64, 0.5, 0.2)
    first = make_filter(path)
    assert first.name == make_filter(path).name and "resnet18" in first.name
    copy = tmp_path / "copy.pth"
    shutil.copy(path, copy)
    assert first.name.split("sha256=")[1] == make_filter(copy).name.split("sha256=")[1]
    with torch.no_grad():
        model.fc.bias += 1.0
    save_classifier(path, model, "resnet18", 64, 0.5, 0.2)
    second = make_filter(path)
    assert second.name != first.name
    assert (second(patches[:4]) > first(patches[:4])).all()  # the bias shift is really loaded
    with pytest.raises(ValueError, match="no such file"):
        make_filter(tmp_path / "missing.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="junk.pth"):
        make_filter(tmp_path / "junk.pth")


def test_weight_errors_are_helpful(monkeypatch, tmp_path):
    import timm

    with pytest.raises(ValueError, match="resnet18"):
        create_model("resnet_does_not_exist")

    real = timm.create_model

    def offline(*args, **kwargs):
        if kwargs.get("pretrained"):
            raise OSError("We couldn't connect to 'https://huggingface.co'")
        return real(*args, **kwargs)

    monkeypatch.setattr(timm, "create_model", offline)
    with pytest.raises(WeightsError, match=r"ImageNet weights for resnet18.*--weights random"):
        resolve_init("imagenet", "resnet18")
    # Our classifier file of another arch as initial weights: the message names the fix.
    path = tmp_path / "r18.pth"
    save_classifier(path, create_model("resnet18"), "resnet18", 64, 0.5, 0.2)
    with pytest.raises(FilterError, match="--arch resnet18"):
        resolve_init(str(path), "resnet34")
    assert torch.load(path, weights_only=True)["kind"] == CLASSIFIER_KIND


def test_config_yaml_matches_dataclass_and_split():
    import dataclasses
    from pathlib import Path

    from cemcurate.common.config import load_config

    yaml_path = Path(__file__).resolve().parents[1] / "configs/curate/filter_train.yaml"
    data = yaml.safe_load(yaml_path.read_text())
    assert set(data) == {f.name for f in dataclasses.fields(FilterTrainConfig)}
    assert load_config(FilterTrainConfig, yaml_path) == FilterTrainConfig()
    assert (FilterTrainConfig().arch, FilterTrainConfig().epochs, FilterTrainConfig().lr) == ("resnet34", 30, 1e-3)
    with pytest.raises(ValueError, match="test_fraction"):
        FilterTrainConfig(test_fraction=1.5)
    labels = np.r_[np.zeros(30, int), np.ones(70, int)]
    train, test = stratified_split(labels, 0.2, seed=0)
    assert len(test) == 20 and labels[test].sum() == 14 and not set(train) & set(test)
    assert np.array_equal(test, stratified_split(labels, 0.2, seed=0)[1])
    assert not np.array_equal(test, stratified_split(labels, 0.2, seed=1)[1])
    with pytest.raises(FilterError, match="at least 4"):
        stratified_split(np.r_[np.zeros(3, int), np.ones(50, int)], 0.2, seed=0)

"""A trained run as a bioimage.io model package (spec 0.5): ``finetune export RUN DIR --format bioimageio``.

The package (``DIR/rdf.yaml`` and the files it names, each with its sha256) holds:

* one input ``raw``: ``uint8`` grey EM, axes batch, channel and space (``z``, ``y``, ``x`` for a
  3D model), voxel size in nm where the run recorded one, sizes ``min + n * step`` the network
  takes without internal padding. Preprocessing is the toolkit's: ``scale_linear`` by 1/255
  (what ``finetune`` does to 8-bit data) then ``fixed_zero_mean_unit_variance`` with the mean
  and std the model was trained with (the encoder's). The network in the package therefore
  holds no normalisation of its own: its two normalisation buffers are 0 and 1.
* one output ``probabilities``: float32 in [0, 1], the input's space axes; postprocessing
  ``sigmoid`` (binary, one channel: the foreground) or ``softmax`` over the channel axis (one
  channel per class). Preprocessing, network and postprocessing compute what
  ``finetune predict`` computes on one window.
* weights twice: ``pytorch_state_dict`` whose architecture is imported from this installed
  library (``finetune.models.unet2d.UNet2D`` and its siblings, with the run's keyword
  arguments), and ``torchscript`` (a trace, checked against the eager network at a second size,
  which runs with torch alone). ``asem_unet`` picks its reflection per input size in Python,
  which a trace cannot follow: its package has the fixed size of its test crop and its trace is
  :class:`FixedSizeASEM`.
* test tensors: a centred crop of the run's first validation image (else training image) and
  the probabilities our own predictor gives for it; a cover image (the crop and the predicted
  foreground over it); documentation from ``RUN/model_card.md`` with the training data, the
  validation and benchmark IoU the run recorded; the training config and validation log as
  attachments; license, authors, citations (CEM500K; this repository when its URL is given).

The package is written into a temporary sibling of ``DIR``, validated by ``bioimageio.spec``
and tested by ``bioimageio.core`` (the test tensors reproduced with both weight formats and
the parameterised sizes run), and only then renamed to ``DIR``. Nothing here goes to the
network: every URL the package names is registered as known to the validation, so no
request checks it.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import tempfile
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
import yaml

from cemcurate.common.atomic import file_sha256
from cemcurate.common.lazy import lazy_import
from finetune.metrics import probs_to_classes
from finetune.models import MODELS, ASEMUNet, SegmentationModel, build_model
from finetune.models.asem_unet import fitting_input_size, reflect_pad
from finetune.models.transfer import SavedModel, read_saved_model
from finetune.predict.slices import SlicePredictor
from finetune.predict.sliding import predict_sliding
from finetune.report import overlay, read_log
from finetune.volumes import expand_patterns, open_input

bioimageio_spec = lazy_import("bioimageio.spec")
bioimageio_core = lazy_import("bioimageio.core")
loguru = lazy_import("loguru")
iio = lazy_import("imageio.v3")

FORMATS = ("bioimageio",)
RDF = "rdf.yaml"
INPUT_ID = "raw"
OUTPUT_ID = "probabilities"
# The model zoo's recommended license for models: weights and documentation, not code (the
# code they need is this repository's, under its own BSD-3-Clause license).
DEFAULT_LICENSE = "CC-BY-4.0"
CEM500K_CITATION = {
    "text": "Conrad R, Narayan K (2021). CEM500K, a large-scale heterogeneous unlabeled cellular electron "
    "microscopy image dataset for deep learning. eLife 10:e65894.",
    "doi": "10.7554/eLife.65894",
}
# Centred test crop, (y, x) for 2D and (z, y, x) for 3D, rounded down to the size step.
DEFAULT_TEST_SHAPE_2D = (256, 256)
DEFAULT_TEST_SHAPE_3D = (32, 64, 64)
TRACE_ATOL = 1e-4
_FILES = {
    "input": "test_input.npy",
    "output": "test_output.npy",
    "sample_input": "sample_input.tif",
    "sample_output": "sample_output.tif",
    "cover": "cover.png",
    "docs": "README.md",
    "state_dict": "weights_state_dict.pt",
    "torchscript": "weights_torchscript.pt",
    "env": "environment.yaml",
}


@dataclass(frozen=True)
class ExportResult:
    """A written package: ``path`` (``DIR``), its ``rdf`` and bioimageio.core's test summary as text."""

    path: Path
    rdf: Path
    summary: str


@dataclass(frozen=True)
class CheckResult:
    """``bioimageio.core``'s test of a package: ``passed`` and the summary as text."""

    passed: bool
    status: str
    summary: str


@contextmanager
def _quiet_bioimageio() -> Iterator[None]:
    """bioimageio logs every step at INFO through loguru; the summary says what matters."""
    loguru.logger.disable("bioimageio")
    try:
        yield
    finally:
        loguru.logger.enable("bioimageio")


def _sources(node: Any) -> Iterator[str]:
    """Every ``source`` an rdf names (files and URLs), and its ``git_repo`` and citation URLs."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("source", "url", "git_repo") and isinstance(value, str):
                yield value
            else:
                yield from _sources(value)
    elif isinstance(node, list):
        for value in node:
            yield from _sources(value)


def validation_context(rdf_path: str | Path) -> Any:
    """A bioimageio validation context for a package on disk that sends no request.

    Every URL and file the rdf names is registered as known without a hash: bioimageio.spec then
    checks no URL over the network, still hashes every local file when it performs io checks, and
    (when it does not, as in its own file listing) knows the files exist rather than refusing them.
    """
    rdf_path = Path(rdf_path)
    rdf = yaml.safe_load(rdf_path.read_text())
    known = {source: None for source in _sources(rdf)}
    return bioimageio_spec.ValidationContext(
        root=rdf_path.parent, perform_io_checks=True, known_files=known, log_warnings=False
    )


def check_package(path: str | Path, weight_format: str | None = None) -> CheckResult:
    """Validate ``path`` (a package folder or its ``rdf.yaml``) with bioimageio.spec and run
    bioimageio.core's test on it: the test tensors reproduced with every weight format and the
    parameterised sizes run, as ``bioimageio test DIR/rdf.yaml`` does, without network access
    (``weight_format``: test that one only)."""
    rdf_path = Path(path) / RDF if Path(path).is_dir() else Path(path)
    with _quiet_bioimageio(), validation_context(rdf_path):
        summary = bioimageio_core.test_model(rdf_path, weight_format=weight_format)
    return CheckResult(summary.status == "passed", str(summary.status), summary.format())


def _numbers(values: Sequence[float] | None, dim: int) -> tuple[float, ...] | None:
    if values is None:
        return None
    values = tuple(float(v) for v in values)
    return values[-dim:] if len(values) >= dim else None


def _rebuild(saved: SavedModel) -> SegmentationModel:
    """The trained model as ``finetune predict`` rebuilds it (eval mode, CPU)."""
    cfg = dict(saved.model_config)
    model = build_model(cfg.pop("model"), **cfg)
    model.load_state_dict(saved.state, strict=True)
    return model.eval()


def export_network(saved: SavedModel) -> tuple[SegmentationModel, dict[str, Any]]:
    """The network of the package: the trained one with its input normalisation moved out into
    the preprocessing (buffers 0 and 1), and the keyword arguments of its class that rebuild it."""
    kwargs = {k: v for k, v in saved.model_config.items() if k != "model"}
    kwargs.update(mean=0.0, std=1.0)
    net = MODELS[saved.model_config["model"]](**kwargs)
    state = dict(saved.state)
    state["norm_mean"] = torch.zeros_like(state["norm_mean"])
    state["norm_std"] = torch.ones_like(state["norm_std"])
    net.load_state_dict(state, strict=True)
    return net.eval(), json.loads(json.dumps(kwargs))  # YAML-safe (tuples become lists)


def size_rule(model: SegmentationModel) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
    """``(min, step)`` per space axis of the input sizes the network takes without padding inside
    (2D: multiples of 32; 3D: its ``size_multiple``), or None for a network whose forward adapts
    its padding to the size in Python (``asem_unet``), which a trace cannot follow: its package
    has the fixed size of its test crop."""
    if model.dim == 2:
        return (32, 32), (32, 32)
    multiple = getattr(model, "size_multiple", None)
    if multiple is None:
        return None
    return tuple(int(m) for m in multiple), tuple(int(m) for m in multiple)


def _first_image(saved: SavedModel, sample: str | None) -> Path:
    if sample:
        return expand_patterns([sample], what="--sample")[0]
    data = (saved.info.get("config") or {}).get("data", {})
    base = data.get("data_dir") or None
    for key in ("val_images", "images"):
        if data.get(key):
            try:
                return expand_patterns(list(data[key]), base, what=key.replace("_", "-"))[0]
            except ValueError:
                continue
    raise ValueError(
        f"{saved.path}: the run's training and validation images are not found (data_dir {base!r}); "
        "pass --sample IMAGE for the test input"
    )


def sample_crop(source: Any, dim: int, step: Sequence[int], shape: Sequence[int] | None = None) -> np.ndarray:
    """A centred uint8 crop of ``source`` (a :class:`~finetune.volumes.InputVolume`, or a ``uint8[z, y, x]``
    array): ``(y, x)`` of its middle slice for 2D, ``(z, y, x)`` for 3D, each side the largest
    multiple of ``step`` up to ``shape`` (default 256 x 256 or 32 x 64 x 64). Only the slices the
    crop needs are read, with the 0-255 window ``finetune`` uses for the file."""
    target = tuple(shape) if shape else (DEFAULT_TEST_SHAPE_2D if dim == 2 else DEFAULT_TEST_SHAPE_3D)
    if len(target) != dim:
        raise ValueError(f"test shape {tuple(target)} must have {dim} sizes for a {dim}D model")
    full = tuple(int(n) for n in source.shape)
    sizes = full[1:] if dim == 2 else full
    box = []
    for axis, (n, want, m) in enumerate(zip(sizes, target, step)):
        side = min(n, int(want)) // m * m
        if side < m:
            raise ValueError(
                f"the test image is {sizes} voxels; axis {axis} needs at least {m} (pass --sample with a larger image)"
            )
        start = (n - side) // 2
        box.append(slice(start, start + side))
    z = slice(full[0] // 2, full[0] // 2 + 1) if dim == 2 else box[0]
    read = source.read_uint8 if hasattr(source, "read_uint8") else (lambda z0, z1: source[z0:z1])
    slab = np.asarray(read(z.start, z.stop), dtype=np.uint8)
    crop = slab[0][tuple(box)] if dim == 2 else slab[(slice(None),) + tuple(box[1:])]
    return np.ascontiguousarray(crop)


def predictor_probabilities(model: SegmentationModel, crop: np.ndarray) -> np.ndarray:
    """Our own predictor's probabilities ``float32[C, *crop.shape]`` for a uint8 crop that fits one
    window: :class:`~finetune.predict.slices.SlicePredictor` (2D) or
    :func:`~finetune.predict.sliding.predict_sliding` (3D), as ``finetune predict`` runs them."""
    if model.dim == 2:
        tile = max(crop.shape)
        predictor = SlicePredictor(model, "cpu", amp=False, tile=tile, overlap=min(64, tile // 2), batch_size=1)
        return predictor(crop[None].astype(np.float32) / np.float32(255.0))[0]
    return predict_sliding(model, crop, window=crop.shape, batch_size=1, device="cpu", amp=False)


class FixedSizeASEM(torch.nn.Module):
    """:class:`~finetune.models.asem_unet.ASEMUNet`'s forward for one input size, its reflection worked
    out beforehand: ``forward`` picks the padding per size in Python, which a trace cannot follow
    (tracing it does not finish), so its torchscript weights hold this instead, at the package's
    fixed input size."""

    def __init__(self, net: ASEMUNet, shape: Sequence[int]):
        super().__init__()
        self.net, self.shape = net, tuple(int(n) for n in shape)
        self.pads = []
        for n in self.shape:
            size, out = fitting_input_size(n)
            left = (size - out) // 2
            self.pads.append((left, size - n - left))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.net.valid_logits(reflect_pad(self.net.normalise(x), self.pads))
        return logits[:, :, : self.shape[0], : self.shape[1], : self.shape[2]]


def _trace(net: torch.nn.Module, example: torch.Tensor, check: torch.Tensor | None) -> torch.jit.ScriptModule:
    """``torch.jit.trace`` of ``net``, checked against the eager network on ``check`` (another size)."""
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", FutureWarning)  # "torch.jit.trace is deprecated": still what the zoo runs
        traced = torch.jit.trace(net, example, check_trace=False)
        for x in [example] + ([check] if check is not None else []):
            want, got = net(x), traced(x)
            if want.shape != got.shape or not torch.allclose(want, got, atol=TRACE_ATOL, rtol=1e-4):
                raise ValueError(
                    f"the torchscript trace of {type(net).__name__} does not reproduce it at input shape "
                    f"{tuple(x.shape)}; this network cannot be exported as torchscript"
                )
    return traced


def _cover(image: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """``uint8[h, 2w, 3]``: the grey crop beside the same with the predicted classes over it (the
    colours of ``finetune train``'s report), enlarged to at least 256 px high."""
    grey = np.repeat(image[..., None], 3, axis=-1)
    cover = np.concatenate([grey, overlay(image, probs_to_classes(probs))], axis=1)
    scale = max(1, int(np.ceil(256 / cover.shape[0])))
    return cover.repeat(scale, 0).repeat(scale, 1)


def provenance(run: Path, saved: SavedModel) -> dict[str, Any]:
    """What the run recorded about its data and scores: images, masks, voxel size, encoder, a whole
    model it started from, iterations, the last and best validation IoU, the benchmark test IoU."""
    cfg = saved.info.get("config") or {}
    data = cfg.get("data", {})
    val_rows = read_log(run / "val_log.csv")
    best = max(val_rows, key=lambda r: float(r.get("mean_foreground_iou") or "nan"), default=None)
    test_scores = json.loads((run / "test_scores.json").read_text()) if (run / "test_scores.json").is_file() else None
    chain, source = [], saved.info.get("init_model")
    while source:
        chain.append({k: source.get(k) for k in ("path", "sha256", "classes", "images", "voxel_size")})
        source = source.get("init_model")
    val = saved.info.get("val") or {}
    return {
        "name": (cfg.get("runtime") or {}).get("name") or "",
        "classes": saved.classes,
        "data_dir": data.get("data_dir") or "",
        "images": list(data.get("images") or []),
        "masks": list(data.get("masks") or []),
        "val_images": list(data.get("val_images") or []),
        "val_masks": list(data.get("val_masks") or []),
        "voxel_size_nm": saved.info.get("voxel_size"),
        "encoder": saved.info.get("encoder_source"),
        "started_from": chain,
        "iterations": saved.info.get("iterations"),
        "training_seconds": saved.info.get("seconds"),
        "validation_iou": val.get("iou"),
        "validation_mean_foreground_iou": val.get("mean_foreground_iou"),
        "best_validation": None if best is None else {k: _number(v) for k, v in best.items()},
        "benchmark_test": None
        if test_scores is None
        else {k: test_scores.get(k) for k in ("iou", "mean_foreground_iou") if k in test_scores},
    }


def _number(text: str) -> Any:
    try:
        value = float(text)
    except (TypeError, ValueError):
        return text
    return int(value) if value.is_integer() and "." not in str(text) else value


def _fmt_iou(values: Any, classes: Sequence[str]) -> str:
    if isinstance(values, dict):
        return ", ".join(f"{k} {float(v):.4f}" for k, v in values.items())
    if isinstance(values, (list, tuple)):
        return ", ".join(f"{c} {float(v):.4f}" for c, v in zip(classes, values))
    return "not recorded"


def _documentation(
    run: Path, prov: dict, dim: int, voxel: tuple[float, ...] | None, mean: float, std: float, tested: bool
) -> str:
    card = (run / "model_card.md").read_text() if (run / "model_card.md").is_file() else "# finetune model\n"
    classes = prov["classes"]
    lines = [
        card.rstrip(),
        "",
        "## Using this package",
        "",
        f"- input `{INPUT_ID}`: one grey channel of 8-bit (uint8) electron microscopy, axes "
        + ("batch, channel, z, y, x" if dim == 3 else "batch, channel, y, x")
        + "; other bit depths are windowed to 0-255 first, as `finetune predict` does (0.1st-99.9th "
        "percentiles of up to 32 slices mapped to 0-255).",
        f"- preprocessing: scale by 1/255 to [0, 1], then subtract {mean:.6g} and divide by {std:.6g} "
        "(the normalisation the model was trained with).",
        f"- output `{OUTPUT_ID}`: "
        + (
            f"the probability of {classes[1]} (sigmoid of one logit channel)"
            if len(classes) == 2
            else f"one probability per class ({', '.join(classes)}; softmax over the channels)"
        )
        + "; threshold at 0.5 (or take the arg-max) for labels.",
        "- voxel size the model was trained at: "
        + (" x ".join(f"{v:g}" for v in voxel) + " nm" if voxel else "not recorded by the run")
        + "; resample other data to it.",
        "- large images: tile them with an overlap (`bioimageio.core` does); the network sees no context "
        "beyond its input.",
        "",
        "## Training data",
        "",
        f"- images: {prov['images']}, masks: {prov['masks']}"
        + (f" (under {prov['data_dir']})" if prov["data_dir"] else ""),
        f"- validation images: {prov['val_images'] or 'none'}",
        f"- encoder initialisation: {prov['encoder']}",
    ]
    for source in prov["started_from"]:
        lines.append(
            f"- started from the whole model {source['path']} (sha256 {source['sha256']}), "
            f"trained on {source['images']}"
        )
    lines += [
        f"- iterations: {prov['iterations']}",
        "",
        "## Validation",
        "",
        (
            "`bioimageio.core`'s test passed on this package at export (the test tensors reproduced with both "
            "weight formats, the parameterised sizes run)"
            if tested
            else "`bioimageio.core`'s test was not run at export (`--no-test`)"
        )
        + "; the test output is what `finetune predict` computes for the test input.",
        "",
        f"- last validation IoU: {_fmt_iou(prov['validation_iou'], classes)}",
    ]
    if prov["best_validation"]:
        best = prov["best_validation"]
        lines.append(
            f"- best validation mean foreground IoU: {float(best.get('mean_foreground_iou', 'nan')):.4f} "
            f"at iteration {best.get('iteration')}"
        )
    if prov["benchmark_test"]:
        benchmark = f"benchmark {prov['name']}" if prov["name"] else "benchmark"
        lines.append(f"- {benchmark} test IoU: {_fmt_iou(prov['benchmark_test'].get('iou'), classes)}")
    lines += [
        "",
        "## Exported with",
        "",
        "cem-toolkit (`finetune export RUN DIR --format bioimageio`), after CEM500K (Conrad & Narayan, "
        "eLife 2021, doi:10.7554/eLife.65894). The `pytorch_state_dict` weights need this library installed "
        "(`environment.yaml`); the `torchscript` weights need only PyTorch.",
        "",
    ]
    return "\n".join(lines)


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def _environment(repository_url: str) -> str:
    package = f"cem-toolkit @ git+{repository_url}" if repository_url else "cem-toolkit"
    torch_version = torch.__version__.split("+")[0]
    return yaml.safe_dump(
        {
            "name": "cem-toolkit",
            "channels": ["conda-forge", "nodefaults"],
            "dependencies": ["python>=3.10", "pip", {"pip": [f"torch=={torch_version}", package]}],
        },
        sort_keys=False,
    )


class _NoAliases(yaml.SafeDumper):
    """Every list written out in full (no ``&id001`` anchors for lists that appear twice)."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def _file(folder: Path, name: str) -> dict[str, str]:
    return {"source": name, "sha256": file_sha256(folder / name)}


def build_package(
    run: str | Path,
    folder: Path,
    *,
    authors: Sequence[str],
    license: str = DEFAULT_LICENSE,
    name: str = "",
    description: str = "",
    repository_url: str = "",
    voxel_size: Sequence[float] | None = None,
    sample: str | None = None,
    test_shape: Sequence[int] | None = None,
    tested: bool = True,
) -> Path:
    """Write the package files and ``rdf.yaml`` into ``folder`` (empty, existing); returns the rdf path.

    See :func:`export_bioimageio` for the arguments; no validation or test here.
    """
    if not authors:
        raise ValueError("a bioimage.io model names at least one author (--author NAME)")
    run = Path(run)
    saved = read_saved_model(run)
    run = saved.path.parent
    model = _rebuild(saved)
    net, kwargs = export_network(saved)
    dim = model.dim
    classes = saved.classes or [str(i) for i in range(model.num_classes)]
    mean, std = float(model.norm_mean), float(model.norm_std)
    rule = size_rule(model)

    crop = sample_crop(open_input(str(_first_image(saved, sample))), dim, rule[1] if rule else (1,) * dim, test_shape)
    probs = predictor_probabilities(model, crop)[None]  # (1, C, *crop)
    x = torch.from_numpy(crop[None, None].astype(np.float32) / np.float32(255.0))
    x = (x - mean) / std
    check = None
    if rule is not None:
        bigger = tuple(lo + st for lo, st in zip(*rule))
        check = torch.randn((2, 1) + bigger)
    traced = _trace(FixedSizeASEM(net, crop.shape) if isinstance(net, ASEMUNet) else net, x, check)

    np.save(folder / _FILES["input"], crop[None, None])
    np.save(folder / _FILES["output"], probs.astype(np.float32))
    iio.imwrite(folder / _FILES["sample_input"], crop[None, None])
    iio.imwrite(folder / _FILES["sample_output"], probs.astype(np.float32))
    torch.save(net.state_dict(), folder / _FILES["state_dict"])
    traced.save(str(folder / _FILES["torchscript"]))
    middle = (lambda a: a[a.shape[0] // 2]) if dim == 3 else (lambda a: a)
    iio.imwrite(
        folder / _FILES["cover"], _cover(middle(crop), probs[0][:, crop.shape[0] // 2] if dim == 3 else probs[0])
    )
    prov = provenance(run, saved)
    if voxel_size and len(voxel_size) not in (dim, 3):
        raise ValueError(f"--voxel-size takes {dim} values (z y x, or y x for 2D), got {list(voxel_size)}")
    voxel = _numbers(voxel_size if voxel_size else saved.info.get("voxel_size"), dim)
    (folder / _FILES["docs"]).write_text(_documentation(run, prov, dim, voxel, mean, std, tested))
    (folder / _FILES["env"]).write_text(_environment(repository_url))
    attachments = []
    for extra in ("config.yaml", "val_log.csv", "test_scores.json"):
        if (run / extra).is_file():
            target = "training_" + extra if extra == "config.yaml" else extra
            shutil.copyfile(run / extra, folder / target)
            attachments.append(_file(folder, target))

    axis_names = ("z", "y", "x")[-dim:]
    in_axes: list[dict[str, Any]] = [{"type": "batch"}, {"type": "channel", "channel_names": ["em"]}]
    out_channels = [classes[1]] if len(classes) == 2 else list(classes)
    out_axes: list[dict[str, Any]] = [{"type": "batch"}, {"type": "channel", "channel_names": out_channels}]
    for i, axis in enumerate(axis_names):
        size: Any = {"min": rule[0][i], "step": rule[1][i]} if rule else int(crop.shape[i])
        scale = {"unit": "nanometer", "scale": voxel[i]} if voxel else {}
        in_axes.append({"type": "space", "id": axis, "size": size, **scale})
        out_axes.append({"type": "space", "id": axis, "size": {"tensor_id": INPUT_ID, "axis_id": axis}, **scale})

    model_kind = saved.model_config["model"]
    arch = saved.model_config.get("arch", model_kind)
    what = ", ".join(out_channels) if len(classes) > 2 else classes[1]
    title = name or prov["name"] or f"cem-toolkit {dim}D {model_kind} {arch} {what}"
    cls = MODELS[model_kind]
    params = sum(p.numel() for p in net.parameters())
    cite = [dict(CEM500K_CITATION)]
    if repository_url:
        cite.append({"text": "cem-toolkit: curate, pretrain and fine-tune for cellular EM", "url": repository_url})
    summary = description or (
        f"{dim}D semantic segmentation of {what} in electron microscopy: a {model_kind} network "
        f"({arch}{' encoder' if arch != model_kind else ''}, {params / 1e6:.1f} M parameters) fine-tuned with "
        f"cem-toolkit (after CEM500K) from {prov['encoder']}. Input uint8 EM"
        + (f" at {' x '.join(f'{v:g}' for v in voxel)} nm" if voxel else "")
        + "; output class probabilities."
    )
    tolerance = {"relative_tolerance": 1e-3, "absolute_tolerance": 1e-4, "mismatched_elements_per_million": 100}
    rdf: dict[str, Any] = {
        "type": "model",
        "format_version": str(bioimageio_spec.model.v0_5.ModelDescr.implemented_format_version),
        "name": " ".join(re.sub(r"[^A-Za-z0-9_+\-() ]", " ", title).split())[:128],  # the characters the spec allows
        "description": summary,
        # No github_user: bioimageio.spec checks one against the GitHub API, a request we do not make.
        "authors": [{"name": a} for a in authors],
        "cite": cite,
        "license": license,
        "documentation": _file(folder, _FILES["docs"]),
        "covers": [_file(folder, _FILES["cover"])],
        "attachments": attachments,
        "tags": list(
            dict.fromkeys(
                ["electron-microscopy", "semantic-segmentation", f"{dim}d", "unet", "pytorch", "cem500k"]
                + [_slug(c) for c in out_channels]
            )
        ),
        "inputs": [
            {
                "id": INPUT_ID,
                "description": "grey EM, 8 bits (windowed to 0-255 if the data has more)",
                "axes": in_axes,
                "test_tensor": _file(folder, _FILES["input"]),
                "sample_tensor": _file(folder, _FILES["sample_input"]),
                "data": {"type": "uint8", "range": [0, 255]},
                "preprocessing": [
                    {"id": "ensure_dtype", "kwargs": {"dtype": "float32"}},
                    {"id": "scale_linear", "kwargs": {"gain": 1 / 255, "offset": 0.0}},
                    {"id": "fixed_zero_mean_unit_variance", "kwargs": {"mean": mean, "std": std}},
                    # without it bioimageio casts the result back to the input's uint8 (all zeros)
                    {"id": "ensure_dtype", "kwargs": {"dtype": "float32"}},
                ],
            }
        ],
        "outputs": [
            {
                "id": OUTPUT_ID,
                "description": "foreground probability" if len(classes) == 2 else "class probabilities",
                "axes": out_axes,
                "test_tensor": _file(folder, _FILES["output"]),
                "sample_tensor": _file(folder, _FILES["sample_output"]),
                "data": {"type": "float32", "range": [0.0, 1.0]},
                "postprocessing": [{"id": "sigmoid"}]
                if len(classes) == 2
                else [{"id": "softmax", "kwargs": {"axis": "channel"}}],
            }
        ],
        "weights": {
            "pytorch_state_dict": {
                **_file(folder, _FILES["state_dict"]),
                "architecture": {"callable": cls.__name__, "import_from": cls.__module__, "kwargs": kwargs},
                "pytorch_version": torch.__version__.split("+")[0],
                "dependencies": _file(folder, _FILES["env"]),
            },
            "torchscript": {
                **_file(folder, _FILES["torchscript"]),
                "parent": "pytorch_state_dict",
                "pytorch_version": torch.__version__.split("+")[0],
            },
        },
        "config": {
            "bioimageio": {
                "reproducibility_tolerance": [tolerance],
                "architecture_type": "unet",
                "architecture_description": f"{model_kind} ({cls.__module__}.{cls.__name__}) with {arch}",
                "modality": "electron microscopy",
                "target_structure": out_channels,
                "task": "semantic segmentation",
                "model_parameter_count": int(params),
                "training": {
                    "training_preprocessing": "8-bit images scaled to [0, 1], normalised with the encoder's "
                    f"mean {mean:.6g} and std {std:.6g}; random crops, flips, rotations, brightness/contrast",
                    "training_batch_size": float(
                        (saved.info.get("config") or {}).get("optim", {}).get("batch_size") or 0
                    )
                    or None,
                    "optimizer": "torch.optim.AdamW",
                    "learning_rate_schedule": "one-cycle",
                },
            },
            "cem_toolkit": {"model_config": dict(saved.model_config), "provenance": prov},
        },
    }
    if repository_url:
        rdf["git_repo"] = repository_url
    rdf_path = folder / RDF
    rdf_path.write_text(yaml.dump(rdf, Dumper=_NoAliases, sort_keys=False, allow_unicode=True))
    return rdf_path


def validate_package(rdf_path: Path) -> None:
    """bioimageio.spec's format validation (file hashes included); raises ValueError with its summary."""
    with _quiet_bioimageio(), validation_context(rdf_path):
        descr = bioimageio_spec.load_description(rdf_path, perform_io_checks=True)
    summary = descr.validation_summary
    if summary.status not in ("valid-format", "passed"):
        raise ValueError(f"not a valid bioimage.io model:\n{summary.format()}")


def export_bioimageio(
    run: str | Path,
    out: str | Path,
    *,
    authors: Sequence[str],
    license: str = DEFAULT_LICENSE,
    name: str = "",
    description: str = "",
    repository_url: str = "",
    voxel_size: Sequence[float] | None = None,
    sample: str | None = None,
    test_shape: Sequence[int] | None = None,
    overwrite: bool = False,
    run_test: bool = True,
    log: Callable[[str], None] = print,
) -> ExportResult:
    """Write ``run`` (a ``finetune train`` run folder or model file) as a bioimage.io package ``out``.

    Args:
        authors: names for the package's ``authors`` (at least one).
        license: SPDX identifier (default CC-BY-4.0, the model zoo's recommendation for models).
        name, description: the package's; default from the run (its name, classes and network).
        repository_url: this repository's URL, cited and named as ``git_repo`` and in the
            environment of the state-dict weights (no citation of it without one).
        voxel_size: nm, ``(z, y, x)`` (or ``(y, x)``); default the run's recorded voxel size.
        sample: image or volume for the test input (default the run's first validation image, else
            its first training image).
        test_shape: test crop size (default 256 x 256, 3D 32 x 64 x 64; rounded to the size step).
        overwrite: replace a non-empty ``out`` (else refused).
        run_test: run bioimageio.core's test (format validation always runs).
        log: where the test summary goes.

    Raises:
        ValueError: a non-empty ``out`` without ``overwrite``, a run that cannot be exported, or a
            package that fails validation or bioimageio.core's test (names ``out``; ``out`` is
            then left as it was).
    """
    if importlib.util.find_spec("bioimageio.core") is None:
        raise ValueError("bioimage.io export needs bioimageio.core: pip install -e '.[publish]'")
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise ValueError(f"{out}: exists and is not empty; pass --overwrite to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    try:
        rdf_path = build_package(
            run,
            tmp,
            authors=authors,
            license=license,
            name=name,
            description=description,
            repository_url=repository_url,
            voxel_size=voxel_size,
            sample=sample,
            test_shape=test_shape,
            tested=run_test,
        )
        try:
            validate_package(rdf_path)
        except ValueError as exc:
            raise ValueError(f"{out}: {exc}") from None
        text = "bioimageio.core test not run (--no-test)"
        if run_test:
            result = check_package(rdf_path)
            text = result.summary
            log(text)
            if not result.passed:
                raise ValueError(f"{out}: the bioimage.io package failed bioimageio.core's test ({result.status})")
        os.chmod(tmp, 0o755)
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
            os.replace(out, old / out.name)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return ExportResult(out, out / RDF, text)

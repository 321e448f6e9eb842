"""The network a ``finetune train`` run starts from: built, initialised and frozen as its config says.

* encoder weights (:func:`cemcurate.common.weights.resolve`: random, ImageNet, CEM500K, our
  export), loaded strictly, inflated to 3D for a 3D model (:mod:`finetune.models.inflate`);
* or a whole trained model (``init_model``, :mod:`finetune.models.transfer`), with the checks
  that the config can hold its tensors (arch, 3D geometry, decoder widths, upsampling);
* the 3D stage geometry (a 3D source's, a preset, or from the first volume's voxel size);
* whole networks without a ResNet encoder (``arch: rsunet``, Xie et al.'s; ``arch: asem_unet``,
  ASEM's), whose widths and kernels are fixed.

Random initialisation is seeded right before construction, so runs with the same seed start
from the same weights whatever the source.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from cemcurate.common.weights import RANDOM, ResolvedWeights, resolve
from finetune.config import Dim3DConfig, TrainConfig
from finetune.models import NETWORK_ARCHS, build_model
from finetune.models.asem_unet import DEFAULT_FMAPS as ASEM_FMAPS
from finetune.models.geometry import StageGeometry
from finetune.models.rsunet import WIDTHS as RSUNET_WIDTHS
from finetune.models.transfer import SavedModel, check_can_start, provenance, transferred_state
from finetune.models.unet3d import DEFAULT_DECODER_CHANNELS
from finetune.volumes import open_volume


def resolve_geometry(
    cfg: TrainConfig, first_image: str | Path | None = None, source: SavedModel | None = None
) -> StageGeometry:
    """The 3D stage geometry of ``cfg``: a 3D ``source`` model's (``init_model``; its kernels fix
    it), else a preset, or for ``auto`` one derived from the voxel size of ``first_image``
    (isotropic when the file records none)."""
    if source is not None and source.dim == 3:
        found = StageGeometry.from_any(source.model_config["geometry"])
        if cfg.dim3d.geometry != "auto" and StageGeometry.preset(cfg.dim3d.geometry) != found:
            raise ValueError(
                f"init_model {source.path} has geometry {found.to_dict()}, not {cfg.dim3d.geometry!r}: "
                "its kernels fix the geometry (leave --geometry at auto)"
            )
        return found
    if cfg.dim3d.geometry != "auto":
        return StageGeometry.preset(cfg.dim3d.geometry)
    voxel = open_volume(first_image).voxel_size if first_image is not None else None
    if voxel is None or not all(np.isfinite(v) and v > 0 for v in voxel):
        return StageGeometry.preset("isotropic")
    return StageGeometry.from_spacing(voxel)


@dataclass(frozen=True)
class ModelOrigin:
    """Where a run's starting weights and data came from, saved with its models.

    Attributes:
        encoder_source: the encoder weights' source (a path, ``timm:...`` or ``random``).
        init_model: :func:`finetune.models.transfer.provenance` of ``init_model``, or None.
        voxel_size: ``(z, y, x)`` of the first training volume in its file's units, or None.
    """

    encoder_source: str
    init_model: dict | None = None
    voxel_size: tuple[float, float, float] | None = None


def check_source_structure(cfg: TrainConfig, source: SavedModel) -> None:
    """Refuse settings that cannot hold an ``init_model``'s tensors, naming what to pass instead.

    The arch must be the source's; a 3D model also needs the source's decoder widths and
    upsampling (a 3D source) or the 2D UNet's widths (a 2D source, whose decoder is inflated).
    """
    m, d3 = cfg.model, cfg.dim3d
    check_can_start(source, m.arch, 3 if m.dim == "3d" else 2)
    if m.dim == "2d":
        return
    widths = list(source.model_config.get("decoder_channels", DEFAULT_DECODER_CHANNELS))
    if list(d3.decoder_channels) != widths:
        raise ValueError(
            f"init_model {source.path} has decoder widths {widths}; "
            f"pass --decoder-channels {' '.join(map(str, widths))}"
        )
    upsample = source.model_config.get("upsample")
    if source.dim == 3 and d3.upsample not in ("auto", upsample):
        raise ValueError(f"init_model {source.path} upsamples by {upsample!r}; pass --upsample {upsample} or auto")


def check_network_settings(cfg: TrainConfig) -> None:
    """Refuse 3D UNet-ResNet settings given with a whole-network arch (``rsunet``, ``asem_unet``),
    whose widths, kernels and pooling are fixed (they would be ignored)."""
    d3, defaults = cfg.dim3d, Dim3DConfig()
    given = [
        f"--{key.replace('_', '-')}"
        for key in ("geometry", "inflate", "upsample", "decoder_channels")
        if getattr(d3, key) != getattr(defaults, key)
    ]
    if given:
        raise ValueError(
            f"{', '.join(given)} set the inflated UNet-ResNet; arch {cfg.model.arch} has fixed kernels, "
            "pooling and transposed-convolution upsampling (its widths scale with --width-scale): leave them unset"
        )


def network_widths(arch: str, scale: float) -> dict:
    """The width argument of a whole-network arch scaled by ``scale`` (at least one channel)."""
    if arch == "rsunet":
        return {"widths": [max(1, round(w * scale)) for w in RSUNET_WIDTHS]}
    return {"num_fmaps": max(1, round(ASEM_FMAPS * scale))}


def resolve_3d_options(cfg: TrainConfig, source: SavedModel | None = None) -> tuple[str, str]:
    """``(inflate, upsample)`` with ``auto`` resolved: a 2D ``init_model`` gets center inflation
    and nearest upsampling (the 3D model then computes the 2D one on every slice), a 3D one its
    own upsampling; otherwise the I3D rule and trilinear upsampling."""
    d3 = cfg.dim3d
    from_2d = source is not None and source.dim == 2
    inflate = d3.inflate if d3.inflate != "auto" else ("center" if from_2d else "i3d")
    if d3.upsample != "auto":
        upsample = d3.upsample
    elif source is not None:
        upsample = "nearest" if from_2d else source.model_config.get("upsample", "trilinear")
    else:
        upsample = "trilinear"
    return inflate, upsample


def build_training_model(
    cfg: TrainConfig, geometry: StageGeometry | None = None, source: SavedModel | None = None
) -> tuple[torch.nn.Module, ModelOrigin]:
    """The 2D or 3D UNet with seeded random init, then the ``source`` model's weights
    (``init_model``; :mod:`finetune.models.transfer`) or the encoder's, loaded strictly
    (inflated for 3D, with ``geometry``, default isotropic), frozen as configured. The input
    normalisation is the config's, else the source model's or encoder's, else 0.5/0.5."""
    m = cfg.model
    if m.encoder == "random" and source is None and m.encoder_frozen:
        warnings.warn(
            "the encoder is random and frozen (--freeze-encoder): only the decoder learns, on features of "
            "random weights - a baseline, not a model to use; leave --freeze-encoder unset to train the encoder",
            stacklevel=2,
        )
    if m.arch in NETWORK_ARCHS:
        check_network_settings(cfg)
    if source is not None:
        check_source_structure(cfg, source)
        weights = ResolvedWeights(
            "file", None, source.model_config.get("mean"), source.model_config.get("std"), str(source.path)
        )
    else:
        weights = RANDOM if m.arch in NETWORK_ARCHS else resolve(m.encoder, m.arch)
    # Seeding right before construction makes every randomly initialised parameter the
    # same in every experiment with the same seed (as in the paper), whatever the source.
    torch.manual_seed(cfg.optim.seed)
    common = dict(
        weights=weights,
        freeze_encoder=m.encoder_frozen,
        arch=m.arch,
        num_classes=len(cfg.data.classes),
        mean=m.norm_mean,
        std=m.norm_std,
    )
    inflate, upsample = resolve_3d_options(cfg, source)
    if m.arch in NETWORK_ARCHS:
        model = build_model(
            m.arch,
            num_classes=len(cfg.data.classes),
            mean=common["mean"],
            std=common["std"],
            **network_widths(m.arch, cfg.dim3d.width_scale),
        )
    elif m.dim == "3d":
        model = build_model(
            "unet3d",
            **common,
            inflate=inflate,
            geometry=geometry,
            upsample=upsample,
            decoder_channels=cfg.dim3d.decoder_channels,
        )
    else:
        model = build_model("unet2d", **common)
    if source is not None:
        state, notes = transferred_state(source, model, cfg.data.classes, inflate)
        model.load_state_dict(state, strict=True)
        for note in notes:
            warnings.warn(note, stacklevel=2)
    model.freeze_decoder(m.freeze_decoder)
    origin = ModelOrigin(weights.source, provenance(source) if source is not None else None)
    return model, origin

"""Config schemas of the ``finetune`` commands: one dataclass per command.

:class:`TrainConfig` is made of sections (data, model, augment, dim2d, dim3d, optim,
runtime), each a dataclass that validates its own fields; YAML files in ``configs/finetune/``
fill them (a section as a mapping, or its fields flat), and every field also has a
``--flag`` of its own name (flags win over the file). Compute modules take the section or
the settings they need, never the whole config. Paper settings (Conrad & Narayan 2021,
"Benchmark segmentation tasks") are the defaults, except the crop scale, whose default is
native resolution with a 0.7-1.4x zoom (see ``crop_mode``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from cemcurate.common.archs import ARCHS, get_arch
from cemcurate.common.dask_cluster import SCHEDULER_HELP
from finetune.augment2d import CROP_MODES, Augment2D
from finetune.augment3d import Augment3D
from finetune.data import PLANES
from finetune.labels import LabelSpec, parse_label_map, parse_unmapped
from finetune.losses import LOSSES
from finetune.models import NETWORK_ARCHS
from finetune.models.inflate import INFLATE_MODES
from finetune.models.unet3d import UPSAMPLE_MODES
from finetune.predict.sliding import DEFAULT_WINDOW
from finetune.sampling import SAMPLING_RULES

WEIGHTINGS = ("auto", "prevalence", "balanced", "none")
DEVICES = ("auto", "cpu", "cuda", "mps")
DEVICE_HELP = "auto (CUDA when available, else Apple MPS, else the CPU), cpu, cuda or mps (no MPS: the CPU, warned)"
DIMS = ("2d", "3d")
PREDICT_MODES = ("auto", "stack", "orthoplane", "sliding")
GEOMETRIES = ("auto", "isotropic", "anisotropic", "planar")


def _help(text: str, **extra: Any) -> dict[str, Any]:
    return {"help": text, **extra}


def _check_range(name: str, values: list[float], low: float, high: float | None = None) -> None:
    if len(values) != 2 or not low < values[0] <= values[1] or (high is not None and values[1] > high):
        bound = f" and <= {high}" if high is not None else ""
        raise ValueError(f"{name} must be two numbers MIN MAX with {low} < MIN <= MAX{bound}, got {values}")


@dataclass
class DataConfig:
    """Training and validation data and how label values become classes."""

    data_dir: str = field(
        default="",
        metadata=_help("folder that relative image/mask globs are resolved against (empty: the working directory)"),
    )
    images: list[str] = field(
        default_factory=list,
        metadata=_help(
            "training images: globs or files (2D images, or 3D volumes in any format the readers read); "
            "several patterns are concatenated in order, each sorted naturally",
            metavar="GLOB",
        ),
    )
    masks: list[str] = field(
        default_factory=list,
        metadata=_help("training labels, paired with images in the same order and of the same shapes", metavar="GLOB"),
    )
    val_images: list[str] = field(
        default_factory=list, metadata=_help("optional validation images (scored at checkpoints)", metavar="GLOB")
    )
    val_masks: list[str] = field(
        default_factory=list, metadata=_help("validation labels paired with val_images", metavar="GLOB")
    )
    classes: list[str] = field(
        default_factory=lambda: ["background", "foreground"],
        metadata=_help("class names, index 0 first; two classes make a binary task (one sigmoid output)"),
    )
    mask_threshold: float | None = field(
        default=None,
        metadata=_help("binary masks: foreground where the mask value is > T (e.g. 127 for anti-aliased 0-255 masks)"),
    )
    label_map: list[str] = field(
        default_factory=list,
        metadata=_help(
            "raw label value to class, as VALUE:CLASS (name or index), e.g. 0:membrane 255:background; "
            "empty: mask values are class indices (after mask_threshold)"
        ),
    )
    unmapped: str = field(
        default="error",
        metadata=_help(
            "label values missing from label_map: error, ignore, background, or a class name/index they all map to"
        ),
    )
    ignore_label: float | None = field(
        default=None, metadata=_help("raw label value excluded from the loss and the metrics")
    )
    mask_volume: list[str] = field(
        default_factory=list,
        metadata=_help(
            "labelled-region masks paired with images (same shapes): voxels where the mask is 0 are not "
            "labelled and count neither as background nor at all in the loss (sparse annotation, ASEM)",
            metavar="GLOB",
        ),
    )
    val_mask_volume: list[str] = field(
        default_factory=list,
        metadata=_help("labelled-region masks paired with val_images (0: excluded from validation)", metavar="GLOB"),
    )

    def __post_init__(self) -> None:
        if not self.images or not self.masks:
            raise ValueError("no training data: set images and masks in the config or pass --images GLOB --masks GLOB")
        if bool(self.val_images) != bool(self.val_masks):
            raise ValueError("val_images and val_masks must be given together")
        if self.val_mask_volume and not self.val_images:
            raise ValueError("val_mask_volume is given but there are no val_images to apply it to")
        if len(self.classes) < 2 or len(set(self.classes)) != len(self.classes):
            raise ValueError(f"classes must list at least two distinct names (background first), got {self.classes}")
        parse_unmapped(self.unmapped, self.classes)
        parse_label_map(self.label_map, self.classes)
        if self.mask_threshold is not None and (self.label_map or len(self.classes) != 2):
            raise ValueError("mask_threshold makes a binary task: use it with two classes and no label_map")

    def label_spec(self) -> LabelSpec:
        """How label files become class maps under these settings."""
        return LabelSpec.from_settings(
            self.classes, self.mask_threshold, self.label_map, self.ignore_label, self.unmapped
        )


@dataclass
class ModelConfig:
    """The network and where its encoder weights come from."""

    dim: str = field(
        default="2d",
        metadata=_help(
            "2d: UNet-ResNet on 2D slices (the paper's); 3d: U-Net whose 2D encoder weights are inflated "
            "into 3D, trained on sub-volumes of crop_depth x crop x crop voxels"
        ),
    )
    arch: str = field(
        default="resnet50",
        metadata=_help(
            f"encoder architecture: {', '.join(ARCHS)}; or, with dim 3d, a whole network without a ResNet "
            "encoder, trained from scratch or init_model: rsunet (Xie et al.'s residual symmetric anisotropic "
            "3D U-Net) or asem_unet (ASEM's valid-convolution 3D U-Net)"
        ),
    )
    encoder: str = field(
        default="random",
        metadata=_help(
            "encoder weights: random, imagenet (timm; needs the Hugging Face cache or internet), "
            "cem500k:PATH (released CEM500K MoCoV2 checkpoint) or PATH (our export, file or folder)"
        ),
    )
    init_model: str = field(
        default="",
        metadata=_help(
            "start the whole network (encoder and decoder) from a model finetune train saved: RUN, "
            "RUN/model.pth or RUN/model_best.pth, 2D or 3D (a 2D model into dim 3d is inflated); other "
            "classes re-initialise the output head. Arch (and for a 3D source its geometry, decoder_channels "
            "and upsample) must be the source's (default: empty, start from encoder)",
            metavar="MODEL",
        ),
    )
    freeze_encoder: bool | None = field(
        default=None,
        metadata=_help(
            "freeze the encoder (weights and BatchNorm statistics); unset: a pre-trained encoder is frozen (the "
            "paper's protocol), a random one and one from init_model train (frozen, random ones stay noise)"
        ),
    )
    freeze_decoder: bool = field(
        default=False,
        metadata=_help(
            "freeze the decoder too (weights and BatchNorm statistics; the output head still trains), "
            "e.g. to adapt only the head of an init_model"
        ),
    )
    norm_mean: float | None = field(
        default=None,
        metadata=_help("input normalisation mean for images in [0, 1] (default: from the encoder source, else 0.5)"),
    )
    norm_std: float | None = field(
        default=None, metadata=_help("input normalisation std (default: from the encoder source, else 0.5)")
    )

    def __post_init__(self) -> None:
        if self.dim not in DIMS:
            raise ValueError(f"dim must be one of {DIMS}, got {self.dim!r}")
        if self.arch in NETWORK_ARCHS:
            if self.dim != "3d" or self.encoder != "random":
                raise ValueError(
                    f"arch {self.arch} is a 3D network without a ResNet encoder: use it with dim 3d and encoder "
                    f"random (got dim {self.dim!r}, encoder {self.encoder!r}); init_model can start it"
                )
        else:
            get_arch(self.arch)
        if self.norm_std is not None and not self.norm_std > 0:
            raise ValueError(f"norm_std must be > 0, got {self.norm_std}")
        if self.init_model and self.encoder != "random":
            raise ValueError(
                f"init_model {self.init_model!r} brings its own encoder; encoder {self.encoder!r} would be "
                "ignored: give one of the two"
            )

    @property
    def encoder_frozen(self) -> bool:
        """Whether training freezes the encoder: ``freeze_encoder`` when set, else frozen
        exactly when the encoder is a pre-trained encoder (not ``random``), as in the paper's
        Table 2; a whole model from ``init_model`` trains end to end, as Xie et al. and ASEM
        fine-tune it."""
        if self.freeze_encoder is not None:
            return self.freeze_encoder
        return self.encoder != "random" and not self.init_model


@dataclass
class AugmentConfig:
    """Training crops and the augmentations 2D and 3D share."""

    crop: int = field(default=512, metadata=_help("training crop side in pixels (multiple of 32)"))
    rotate: bool = field(
        default=True,
        metadata=_help("random rotation: any angle (0-360 degrees) in 2D, multiples of 90 degrees in-plane in 3D"),
    )
    flips: bool = field(default=True, metadata=_help("random flips: horizontal and vertical (3D: also along z)"))
    brightness_contrast: float = field(
        default=0.3, metadata=_help("random brightness and contrast change limit (0.3 = +-30%%; 0 disables)")
    )
    noise_var: list[float] = field(
        default_factory=list,
        metadata=_help("Gaussian noise variance range in 8-bit grey levels squared, e.g. 400 1200 (empty: off)"),
    )
    sampling: str = field(
        default="uniform",
        metadata=_help(
            "which random crops train: uniform (all) or asem (reject crops with over 25%% unlabelled voxels, "
            "and with probability 0.9 those with under 5%% foreground: ASEM's block sampling)"
        ),
    )

    def __post_init__(self) -> None:
        if self.sampling not in SAMPLING_RULES:
            raise ValueError(f"sampling must be one of {tuple(SAMPLING_RULES)}, got {self.sampling!r}")
        if self.crop < 32 or self.crop % 32:
            raise ValueError(f"crop must be a positive multiple of 32 (the UNet stride), got {self.crop}")
        if self.noise_var:
            _check_range("noise_var", self.noise_var, 0.0)
        if not 0 <= self.brightness_contrast < 1:
            raise ValueError("brightness_contrast must be in [0, 1)")


@dataclass
class Dim2DConfig:
    """Settings of 2D models only (``dim: 2d``)."""

    planes: list[str] = field(
        default_factory=lambda: ["xy"],
        metadata=_help(
            "planes 3D volumes are sliced along for training: xy for anisotropic data, xy xz yz for isotropic"
        ),
    )
    crop_mode: str = field(
        default="native",
        metadata=_help(
            "native: crops at native resolution with a zoom in the zoom range (matches whole-slice "
            "prediction); paper: RandomResizedCrop with paper_scale of the image area and paper_ratio"
        ),
    )
    zoom: list[float] = field(
        default_factory=lambda: [0.7, 1.4],
        metadata=_help("native crop mode: zoom range relative to native resolution (>1 magnifies)"),
    )
    paper_scale: list[float] = field(
        default_factory=lambda: [0.08, 1.0],
        metadata=_help("paper crop mode: crop area as a fraction of the image area"),
    )
    paper_ratio: list[float] = field(
        default_factory=lambda: [0.5, 1.5], metadata=_help("paper crop mode: crop aspect-ratio range")
    )
    blur_sigma: float = field(
        default=0.0, metadata=_help("maximum Gaussian blur sigma in pixels (0: off; paper Guay: 7)")
    )

    def __post_init__(self) -> None:
        bad = [p for p in self.planes if p not in PLANES]
        if bad or not self.planes:
            raise ValueError(f"planes must be a non-empty subset of {PLANES}, got {self.planes}")
        if self.crop_mode not in CROP_MODES:
            raise ValueError(f"crop_mode must be one of {CROP_MODES}, got {self.crop_mode!r}")
        _check_range("zoom", self.zoom, 0.0)
        _check_range("paper_scale", self.paper_scale, 0.0, 1.0)
        _check_range("paper_ratio", self.paper_ratio, 0.0)
        if self.blur_sigma < 0:
            raise ValueError("blur_sigma must be >= 0")


@dataclass
class Dim3DConfig:
    """Settings of 3D models only (``dim: 3d``)."""

    geometry: str = field(
        default="auto",
        metadata=_help(
            "kernel depth and z stride per encoder stage: auto (from the first training volume's voxel "
            "size; isotropic when unknown), isotropic (3x3x3 kernels, z pooled like x, y), anisotropic "
            "(first two stages in-plane only, for z spacing ~4-8x coarser) or planar (2D network per slice)"
        ),
    )
    inflate: str = field(
        default="auto",
        metadata=_help(
            "how 2D kernels become 3D: i3d (repeated along z, divided by depth), center (middle slice only) "
            "or auto: i3d for encoder weights, center for a 2D init_model (the 3D model then starts as "
            "exactly the 2D model on every slice; i3d's z padding changes it in short windows)"
        ),
    )
    decoder_channels: list[int] = field(
        default_factory=lambda: [256, 128, 64, 32, 16],
        metadata=_help("widths of the five decoder blocks (the 2D UNet's; smaller saves memory and time)"),
    )
    upsample: str = field(
        default="auto",
        metadata=_help(
            "decoder upsampling: trilinear, nearest, transpose (learned transposed convolution) or auto: "
            "a 3D init_model's, nearest for a 2D init_model (as its smp decoder), else trilinear"
        ),
    )
    crop_depth: int = field(
        default=32, metadata=_help("training sub-volume depth in slices (volumes thinner than this are mirrored)")
    )
    width_scale: float = field(
        default=1.0,
        metadata=_help(
            "arch rsunet / asem_unet: scale their channel widths (1: the papers' 28-80 and 32-256; e.g. 0.25 "
            "to fit a CPU)"
        ),
    )
    elastic_alpha: float = field(
        default=0.0, metadata=_help("elastic deformation, std of the displacements in voxels (0: off; e.g. 2)")
    )

    def __post_init__(self) -> None:
        if self.geometry not in GEOMETRIES:
            raise ValueError(f"geometry must be one of {GEOMETRIES}, got {self.geometry!r}")
        if self.inflate not in ("auto",) + INFLATE_MODES:
            raise ValueError(f"inflate must be auto or one of {INFLATE_MODES}, got {self.inflate!r}")
        if self.upsample not in ("auto",) + UPSAMPLE_MODES:
            raise ValueError(f"upsample must be auto or one of {UPSAMPLE_MODES}, got {self.upsample!r}")
        if len(self.decoder_channels) != 5 or min(self.decoder_channels) < 1:
            raise ValueError(f"decoder_channels must be five positive ints, got {self.decoder_channels}")
        if not self.width_scale > 0:
            raise ValueError(f"width_scale must be > 0, got {self.width_scale}")
        if self.crop_depth < 1 or self.elastic_alpha < 0:
            raise ValueError(
                f"need crop_depth >= 1 and elastic_alpha >= 0, got {self.crop_depth}, {self.elastic_alpha}"
            )


@dataclass
class OptimConfig:
    """The optimisation recipe (the paper's: AdamW, one-cycle lr, BCE / weighted cross-entropy)."""

    iters: int = field(default=1000, metadata=_help("training iterations (optimizer steps)"))
    batch_size: int = field(default=16, metadata=_help("crops per iteration"))
    lr: float = field(default=0.003, metadata=_help("maximum learning rate of the one-cycle schedule (AdamW)"))
    weight_decay: float = field(default=0.1, metadata=_help("AdamW weight decay"))
    loss: str = field(
        default="ce",
        metadata=_help(
            "ce: BCE-with-logits (binary) or weighted cross-entropy (multi-class), the paper's; "
            "dice_ce: ce plus soft Dice over the foreground classes (helps thin or rare structures)"
        ),
    )
    class_weighting: str = field(
        default="auto",
        metadata=_help(
            "cross-entropy class weights: prevalence (3 for classes under 10%% of labelled pixels, 1 above, "
            "0.1 background), balanced (per batch, inversely proportional to each class's share of labelled "
            "voxels, clipped at 1:100, ASEM's), none, or auto (prevalence for multi-class, none for binary)"
        ),
    )
    class_weights: list[float] = field(
        default_factory=list,
        metadata=_help(
            "explicit loss weight per class, index 0 first (e.g. 1 5 to weight a thin foreground up); "
            "overrides class_weighting"
        ),
    )
    background_classes: list[int] = field(
        default_factory=lambda: [0],
        metadata=_help("class indices weighted as background (0.1) by prevalence weighting"),
    )
    seed: int = field(default=42, metadata=_help("random seed for initialisation and data sampling"))
    early_stop: int = field(
        default=0,
        metadata=_help(
            "stop once N validations in a row have not beaten the best validation mean foreground IoU "
            "(0: off; needs val_images); model.pth is then the last model, model_best.pth the best"
        ),
    )

    def __post_init__(self) -> None:
        if self.early_stop < 0:
            raise ValueError(f"early_stop must be >= 0, got {self.early_stop}")
        for name in ("iters", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.lr > 0 or self.weight_decay < 0:
            raise ValueError(f"need lr > 0 and weight_decay >= 0, got {self.lr}, {self.weight_decay}")
        if self.loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {self.loss!r}")
        if self.class_weighting not in WEIGHTINGS:
            raise ValueError(f"class_weighting must be one of {WEIGHTINGS}, got {self.class_weighting!r}")


@dataclass
class RuntimeConfig:
    """Where and how the run executes: its name, logging and checkpoint cadence, device and workers."""

    name: str = field(default="", metadata=_help("run/benchmark name, for logs and tables"))
    checkpoint_every: int = field(
        default=500, metadata=_help("save a resumable checkpoint (and score the validation set) every N iterations")
    )
    log_every: int = field(default=10, metadata=_help("log the training loss every N iterations"))
    device: str = field(default="auto", metadata=_help(DEVICE_HELP))
    amp: bool = field(default=True, metadata=_help("mixed precision on CUDA (ignored on CPU)"))
    workers: int = field(default=2, metadata=_help("data-loading worker processes (0: in the main process)"))

    def __post_init__(self) -> None:
        for name in ("checkpoint_every", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.workers < 0:
            raise ValueError(f"workers must be >= 0, got {self.workers}")
        if self.device not in DEVICES:
            raise ValueError(f"device must be one of {DEVICES}, got {self.device!r}")


@dataclass
class TrainConfig:
    """``finetune train``: fine-tune a UNet-ResNet on 2D images or 3D volumes with labels.

    Sections (YAML keys of their own, or their fields given flat): ``data``, ``model``,
    ``augment``, ``dim2d`` (2D models only), ``dim3d`` (3D models only), ``optim``, ``runtime``.
    """

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    dim2d: Dim2DConfig = field(default_factory=Dim2DConfig)
    dim3d: Dim3DConfig = field(default_factory=Dim3DConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)

    def __post_init__(self) -> None:
        classes, optim = self.data.classes, self.optim
        if optim.class_weights and (
            len(optim.class_weights) != len(classes) or min(optim.class_weights) < 0 or not max(optim.class_weights) > 0
        ):
            raise ValueError(
                f"class_weights must give one weight >= 0 per class ({len(classes)}), "
                f"not all zero, got {optim.class_weights}"
            )
        if optim.early_stop and not self.data.val_images:
            raise ValueError("early_stop needs validation data: give val_images and val_masks")
        bad_bg = [b for b in optim.background_classes if not 0 <= b < len(classes)]
        if bad_bg:
            raise ValueError(f"background_classes {bad_bg} out of range for {len(classes)} classes")
        if self.model.dim == "3d" and (self.dim2d.crop_mode != "native" or self.dim2d.blur_sigma > 0):
            raise ValueError(
                "crop_mode paper and blur_sigma are 2D augmentations; 3D training crops sub-volumes "
                "at native resolution without blur (set crop_mode native and blur_sigma 0)"
            )
        if self.dim3d.width_scale != 1 and self.model.arch not in NETWORK_ARCHS:
            raise ValueError(
                f"width_scale applies to {' and '.join(NETWORK_ARCHS)}; the UNet-ResNet's decoder widths are "
                "decoder_channels"
            )
        if self.model.dim == "2d" and self.dim3d.elastic_alpha > 0:
            raise ValueError("elastic_alpha is a 3D augmentation (dim 3d)")

    def augment_3d(self, elastic_z: bool = True) -> Augment3D:
        """The 3D counterpart of the augmentations this config asks for.

        ``flips`` -> flips along z, y and x; ``rotate`` -> 90-degree rotations in-plane;
        ``brightness_contrast`` -> brightness shift and contrast change of up to that fraction;
        ``noise_var`` (8-bit grey levels squared) -> noise of std up to ``sqrt(max) / 255``;
        ``elastic_alpha`` -> elastic deformation (``elastic_z=False`` keeps z fixed, for
        geometries that do not mix slices in the first stage).
        """
        a = self.augment
        return Augment3D(
            flip_z=a.flips,
            flip_yx=a.flips,
            rot90=a.rotate,
            brightness=a.brightness_contrast,
            contrast=a.brightness_contrast,
            noise_std=math.sqrt(max(a.noise_var)) / 255.0 if a.noise_var else 0.0,
            elastic_alpha=self.dim3d.elastic_alpha,
            elastic_z=elastic_z,
        )

    def augment_2d(self) -> Augment2D:
        """The 2D augmentation settings of this config."""
        a, d = self.augment, self.dim2d
        return Augment2D(
            crop=a.crop,
            crop_mode=d.crop_mode,
            zoom=tuple(d.zoom),
            paper_scale=tuple(d.paper_scale),
            paper_ratio=tuple(d.paper_ratio),
            rotate=a.rotate,
            flips=a.flips,
            brightness_contrast=a.brightness_contrast,
            noise_var=tuple(a.noise_var),
            blur_sigma=d.blur_sigma,
        )


# Keys that may change between an interrupted run and its resumption without changing the
# result (logging cadence, hardware); every other key must match the checkpoint.
RESUME_SAFE_KEYS = frozenset({"checkpoint_every", "log_every", "device", "amp", "workers", "data_dir"})


@dataclass
class PredictConfig:
    """``finetune predict``: whole-volume prediction with a trained model."""

    mode: str = field(
        default="auto",
        metadata=_help(
            "auto: stack for 2D models, sliding for 3D models; stack: predict every xy slice (2D models); "
            "orthoplane: predict xy, xz and yz slices and average the probabilities (2D models, isotropic "
            "volumes); sliding: overlapping 3D windows blended with Gaussian weights (3D models)"
        ),
    )
    output_type: str = field(
        default="probs",
        metadata=_help(
            "probs: class probabilities (binary: foreground; multi-class: one file per class, named "
            "OUTPUT_<class>); labels: class index per voxel"
        ),
    )
    prob_dtype: str = field(default="uint8", metadata=_help("probability encoding: uint8 (0-255) or float32 (0-1)"))
    threshold: float = field(default=0.5, metadata=_help("binary foreground threshold for output_type labels"))
    tile: int = field(default=512, metadata=_help("largest tile side in pixels; bigger slices are tiled"))
    overlap: int = field(default=64, metadata=_help("overlap between tiles in pixels (blended)"))
    window: list[int] = field(
        default_factory=lambda: list(DEFAULT_WINDOW),
        metadata=_help("sliding mode: window size z y x in voxels (shrunk on axes shorter than the window)"),
    )
    window_overlap: list[int] = field(
        default_factory=lambda: [16, 32, 32],
        metadata=_help("sliding mode: overlap of neighbouring windows z y x in voxels (blended)"),
    )
    batch_size: int = field(default=8, metadata=_help("most tiles (sliding mode: windows) per forward pass"))
    batch_pixels: int = field(
        default=0,
        metadata=_help(
            "most pixels (voxels) per forward pass (0: 512x512 on CPU, where batching large tiles is slower, "
            "8x512x512 on CUDA); at least one tile or window"
        ),
    )
    chunk: int = field(default=16, metadata=_help("slices read and predicted together"))
    memory_limit_gb: float = field(
        default=4.0,
        metadata=_help(
            "orthoplane mode keeps the input and the probability sums in RAM up to this size, "
            "else in memory-mapped files beside OUTPUT"
        ),
    )
    suffix: str = field(
        default=".tif", metadata=_help("file suffix when OUTPUT is a folder (one output per input image)")
    )
    pyramid_levels: int = field(
        default=0,
        metadata=_help(
            ".zarr/.ome.zarr outputs: OME-Zarr resolution levels (0: auto, halving y and x, and z where "
            "isotropic, until the largest side is at most 256 px; 1: full resolution only); other formats "
            "hold full resolution only"
        ),
    )
    with_input: bool = field(
        default=False,
        metadata=_help(
            ".zarr/.ome.zarr outputs: write the input (uint8, as the model saw it) as the store's root image "
            "with the prediction inside it (labels: the NGFF label image labels/prediction; probabilities: "
            "the image 'prediction'), so napari, Fiji and neuroglancer overlay them"
        ),
    )
    scheduler: str = field(
        default="",
        metadata=_help(
            SCHEDULER_HELP
            + "; predicts blockwise on the Dask workers into a .zarr/.ome.zarr OUTPUT (chunk-aligned blocks, "
            "sliding mode's with the windows' halo; equal to the single-process result in every mode; the model "
            "is loaded once per worker; "
            "RUN, INPUT and OUTPUT's folder must be on a file system the workers share). Empty: one process here"
        ),
    )
    device: str = field(default="auto", metadata=_help(DEVICE_HELP))
    amp: bool = field(default=True, metadata=_help("mixed precision on CUDA (ignored on CPU)"))

    def __post_init__(self) -> None:
        if self.pyramid_levels < 0:
            raise ValueError(f"pyramid_levels must be 0 (auto) or a number of levels >= 1, got {self.pyramid_levels}")
        if self.mode not in PREDICT_MODES:
            raise ValueError(f"mode must be one of {PREDICT_MODES}, got {self.mode!r}")
        if (
            len(self.window) != 3
            or len(self.window_overlap) != 3
            or min(self.window) < 1
            or any(not 0 <= o < w for o, w in zip(self.window_overlap, self.window))
        ):
            raise ValueError(
                f"window must be three positive ints z y x and window_overlap three ints with "
                f"0 <= overlap < window, got {self.window} and {self.window_overlap}"
            )
        if self.output_type not in ("probs", "labels"):
            raise ValueError(f"output_type must be probs or labels, got {self.output_type!r}")
        if self.prob_dtype not in ("uint8", "float32"):
            raise ValueError(f"prob_dtype must be uint8 or float32, got {self.prob_dtype!r}")
        if self.tile < 32 or not 0 <= self.overlap < self.tile:
            raise ValueError(f"need tile >= 32 and 0 <= overlap < tile, got tile={self.tile} overlap={self.overlap}")
        if self.batch_size < 1 or self.chunk < 1 or self.batch_pixels < 0 or not self.memory_limit_gb > 0:
            raise ValueError("batch_size and chunk must be >= 1, batch_pixels >= 0 and memory_limit_gb > 0")
        if not 0 < self.threshold < 1:
            raise ValueError(f"threshold must be in (0, 1), got {self.threshold}")
        if self.device not in DEVICES:
            raise ValueError(f"device must be one of {DEVICES}, got {self.device!r}")
        if not self.suffix.startswith("."):
            raise ValueError(f"suffix must start with a dot, e.g. .tif, got {self.suffix!r}")


@dataclass
class EvaluateConfig:
    """``finetune evaluate``: IoU, F1 (Dice), precision and recall of a prediction against labels."""

    classes: list[str] = field(
        default_factory=lambda: ["background", "foreground"], metadata=_help("class names, index 0 first")
    )
    label_threshold: float | None = field(
        default=None, metadata=_help("binary labels: foreground where the label value is > T")
    )
    label_map: list[str] = field(
        default_factory=list, metadata=_help("raw label value to class as VALUE:CLASS (see finetune train --label-map)")
    )
    unmapped: str = field(
        default="error",
        metadata=_help(
            "label values missing from label_map: error, ignore, background, or a class name/index they all map to"
        ),
    )
    ignore_label: float | None = field(default=None, metadata=_help("raw label value excluded from scoring"))
    ignore_mask: str = field(
        default="", metadata=_help("file/glob of a mask (non-zero = excluded from scoring), same shape as the labels")
    )
    instances_only: bool = field(
        default=False,
        metadata=_help(
            "Perez-style: ignore predicted connected regions that touch no labelled instance of their class"
        ),
    )
    pred_kind: str = field(
        default="auto",
        metadata=_help(
            "labels (class indices), probs (binary foreground probability: float 0-1 or uint8 0-255) or "
            "auto (float: probs; integers all < number of classes: labels; else uint8 probs)"
        ),
    )
    pred_threshold: float = field(default=0.5, metadata=_help("foreground threshold for probability predictions"))
    json: str = field(default="", metadata=_help("write the scores to this JSON file"))

    def __post_init__(self) -> None:
        if len(self.classes) < 2:
            raise ValueError(f"classes must list at least two names, got {self.classes}")
        if self.pred_kind not in ("auto", "labels", "probs"):
            raise ValueError(f"pred_kind must be auto, labels or probs, got {self.pred_kind!r}")
        if not 0 < self.pred_threshold < 1:
            raise ValueError(f"pred_threshold must be in (0, 1), got {self.pred_threshold}")
        parse_unmapped(self.unmapped, self.classes)
        parse_label_map(self.label_map, self.classes)

"""The ``pretrain moco`` config: one dataclass, filled by ``configs/pretrain/*.yaml`` and flags.

The defaults are the CEM500K MoCoV2 settings (Conrad & Narayan 2021, "Momentum contrast
pre-training"): ResNet50 on one-channel 224 px patches, global batch 128, queue 65,536,
lr 0.015 divided by 10 at epochs 120 and 160, 200 epochs, 360 degree rotations and Gaussian
noise added to the MoCoV2 augmentations (He et al.; Chen et al. 2020: MLP head, temperature
0.2, blur, key-encoder momentum 0.999). ``configs/pretrain/mocov2_cem500k.yaml`` holds the
same values key for key.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from cemcurate.common.archs import ARCHS

# Keys that may differ between a checkpoint and the command that resumes it: they change
# how long or how verbosely a run goes, not the numbers it computes.
RESUMABLE_CHANGES = frozenset(
    {"epochs", "max_steps", "workers", "checkpoint_every", "log_every", "snapshot_every", "tensorboard"}
)

LR_SCHEDULES = ("step", "cosine")
KEY_BN_MODES = ("shuffle", "sync", "none")


def _help(text: str, **extra) -> dict:
    return {"help": text, **extra}


@dataclass
class MocoConfig:
    """Settings of one MoCoV2 pre-training run (see ``pretrain moco --help``)."""

    # --- model -------------------------------------------------------------------------
    arch: str = field(
        default="resnet50",
        metadata=_help(
            f"backbone, built by timm with one input channel: one of {', '.join(ARCHS)} (the archs every later "
            "stage, export and 2D/3D fine-tuning, supports)"
        ),
    )
    feature_dim: int = field(default=128, metadata=_help("output size of the projection head (MoCoV2: 128)"))
    mlp: bool = field(
        default=True,
        metadata=_help("2-layer MLP projection head (MoCoV2); --no-mlp uses a single linear layer (MoCo v1)"),
    )
    temperature: float = field(default=0.2, metadata=_help("softmax temperature of the InfoNCE loss"))
    key_momentum: float = field(
        default=0.999, metadata=_help("momentum of the key encoder: k <- m*k + (1-m)*q after every step")
    )
    queue_size: int = field(
        default=65536, metadata=_help("number of negative keys in the queue; must be divisible by --batch-size")
    )
    key_bn: str = field(
        default="shuffle",
        metadata=_help(
            "how the key encoder's BatchNorm avoids leaking batch identity: 'shuffle' (shuffle the batch "
            "across processes before it and unshuffle after), 'sync' (SyncBatchNorm in both encoders; "
            "CUDA only) or 'none'"
        ),
    )
    key_bn_groups: int = field(
        default=4,
        metadata=_help(
            "with key_bn 'shuffle' in a single process (nothing to shuffle across): the key batch is "
            "shuffled and its BatchNorm statistics taken in this many groups, as the paper's 4 GPUs "
            "would, so no BatchNorm batch holds both views of an image (at most batch/2 groups: a group needs "
            "two samples); not used with more processes"
        ),
    )

    # --- optimisation ------------------------------------------------------------------
    epochs: int = field(default=200, metadata=_help("passes through the curated patches"))
    batch_size: int = field(
        default=128,
        metadata=_help("global batch: images per step summed over all processes (each gets batch_size / processes)"),
    )
    lr: float = field(
        default=0.015,
        metadata=_help("learning rate for a global batch of --lr-batch; scaled linearly for other batch sizes"),
    )
    lr_batch: int = field(default=128, metadata=_help("the batch size that --lr refers to"))
    lr_schedule: str = field(
        default="step",
        metadata=_help(
            "'step': divide by 10 at each of --lr-milestones; 'cosine': half-cosine decay to 0 over --epochs"
        ),
    )
    lr_milestones: list[int] = field(
        default_factory=lambda: [120, 160],
        metadata=_help("epochs at which the step schedule divides the lr by 10", metavar="EPOCH"),
    )
    sgd_momentum: float = field(default=0.9, metadata=_help("SGD momentum"))
    weight_decay: float = field(default=1e-4, metadata=_help("SGD weight decay"))
    seed: int = field(
        default=42,
        metadata=_help(
            "seed of the initial weights, the data order, every augmentation and the shuffle-BN permutations"
        ),
    )
    max_steps: int | None = field(
        default=None,
        metadata=_help(
            "stop after this many optimizer steps in total (counted from the start of the run, "
            "so re-running with a larger value continues); default: all epochs"
        ),
    )

    # --- augmentation (1-channel uint8 patches) ----------------------------------------
    image_size: int = field(default=224, metadata=_help("edge of the augmented views in pixels"))
    crop_scale: list[float] = field(
        default_factory=lambda: [0.2, 1.0],
        metadata=_help("random resized crop: range of the crop area as a fraction of the patch", metavar="FRACTION"),
    )
    crop_ratio: list[float] = field(
        default_factory=lambda: [3 / 4, 4 / 3],
        metadata=_help("random resized crop: range of the crop aspect ratio (width / height)", metavar="RATIO"),
    )
    rotation_p: float = field(
        default=0.5,
        metadata=_help("probability of a rotation by a uniform angle in [-180, 180) degrees (CEM500K addition)"),
    )
    hflip_p: float = field(default=0.5, metadata=_help("probability of a horizontal flip"))
    vflip_p: float = field(default=0.5, metadata=_help("probability of a vertical flip"))
    jitter_p: float = field(
        default=0.8, metadata=_help("probability of brightness/contrast jitter (grayscale, so no saturation or hue)")
    )
    brightness: float = field(default=0.4, metadata=_help("brightness factor drawn from [1-b, 1+b]"))
    contrast: float = field(default=0.4, metadata=_help("contrast factor drawn from [1-c, 1+c]"))
    blur_p: float = field(default=0.5, metadata=_help("probability of a Gaussian blur"))
    blur_sigma: list[float] = field(
        default_factory=lambda: [0.1, 2.0],
        metadata=_help("range of the blur standard deviation, in output pixels", metavar="SIGMA"),
    )
    noise_p: float = field(default=0.5, metadata=_help("probability of additive Gaussian noise (CEM500K addition)"))
    noise_var: list[float] = field(
        default_factory=lambda: [1e-5, 1e-4],
        metadata=_help(
            "range of the noise variance, drawn log-uniformly, for intensities scaled to [0, 1]", metavar="VAR"
        ),
    )

    # --- runtime -----------------------------------------------------------------------
    workers: int = field(default=8, metadata=_help("data-loading worker processes per training process"))
    amp: bool = field(default=True, metadata=_help("mixed precision (float16 autocast) on CUDA; ignored on the CPU"))
    channels_last: bool = field(default=True, metadata=_help("channels-last memory format on CUDA; ignored on the CPU"))
    checkpoint_every: int = field(
        default=1000,
        metadata=_help("also write RUN/checkpoint.pth every this many steps (0: only at the end of each epoch)"),
    )
    snapshot_every: int = field(
        default=20, metadata=_help("keep a copy RUN/checkpoint_epochNNNN.pth every this many epochs (0: never)")
    )
    log_every: int = field(default=10, metadata=_help("log loss, lr and images/s every this many steps"))
    tensorboard: bool = field(
        default=True,
        metadata=_help(
            "also write TensorBoard event files to RUN/tensorboard (the console and RUN/log.csv always get the log)"
        ),
    )

    def __post_init__(self) -> None:
        def positive(name: str) -> None:
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")

        for name in (
            "feature_dim",
            "queue_size",
            "epochs",
            "batch_size",
            "lr_batch",
            "image_size",
            "log_every",
            "temperature",
            "lr",
        ):
            positive(name)
        for name in ("workers", "checkpoint_every", "snapshot_every", "weight_decay", "sgd_momentum"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.max_steps is not None and self.max_steps <= 0:
            raise ValueError(f"max_steps must be positive (or unset for all epochs), got {self.max_steps}")
        if not 0.0 <= self.key_momentum < 1.0:
            raise ValueError(f"key_momentum must be in [0, 1), got {self.key_momentum}")
        if self.queue_size % self.batch_size:
            raise ValueError(
                f"queue_size {self.queue_size} is not divisible by the global batch_size {self.batch_size}: "
                "every step replaces one whole batch of keys in the queue; pick e.g. "
                f"--queue-size {max(1, self.queue_size // self.batch_size) * self.batch_size}"
            )
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule must be one of {LR_SCHEDULES}, got {self.lr_schedule!r}")
        if self.key_bn not in KEY_BN_MODES:
            raise ValueError(f"key_bn must be one of {KEY_BN_MODES}, got {self.key_bn!r}")
        if not 1 <= self.key_bn_groups <= self.batch_size:
            raise ValueError(f"key_bn_groups must be in [1, batch_size {self.batch_size}], got {self.key_bn_groups}")
        if any(m <= 0 for m in self.lr_milestones):
            raise ValueError(f"lr_milestones must be positive epochs, got {self.lr_milestones}")
        for name in ("rotation_p", "hflip_p", "vflip_p", "jitter_p", "blur_p", "noise_p"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} is a probability in [0, 1], got {getattr(self, name)}")
        for name in ("brightness", "contrast"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1) so the factor stays positive, got {getattr(self, name)}")
        for name, lo in (("crop_scale", 0.0), ("crop_ratio", 0.0), ("blur_sigma", 0.0), ("noise_var", 0.0)):
            pair = getattr(self, name)
            if len(pair) != 2 or not (lo < pair[0] <= pair[1]) or not all(math.isfinite(v) for v in pair):
                raise ValueError(f"{name} must be two positive numbers low <= high, got {pair}")
        if self.crop_scale[1] > 1.0:
            raise ValueError(f"crop_scale is a fraction of the patch area, at most 1, got {self.crop_scale}")
        # YAML and argparse hand over lists; keep them as plain lists of the right type.
        self.lr_milestones = [int(m) for m in self.lr_milestones]
        for name in ("crop_scale", "crop_ratio", "blur_sigma", "noise_var"):
            setattr(self, name, [float(v) for v in getattr(self, name)])

    @property
    def base_lr(self) -> float:
        """The lr actually applied at step 0: ``lr * batch_size / lr_batch`` (linear scaling rule)."""
        return self.lr * self.batch_size / self.lr_batch

"""``FilterTrainConfig``: the settings of ``cemcurate filter train`` (``configs/curate/filter_train.yaml``
fills it, flags override it).

Kept apart from :mod:`cemcurate.filtering.train`, which imports torch, so that building the
command line (``cemcurate --help``) does not.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class FilterTrainConfig:
    """Settings of ``cemcurate filter train``; the defaults are the CEM500K paper's."""

    labels: str | None = field(
        default=None,
        metadata={
            "help": "labels CSV (patch_id,label,time; 1 informative, 0 uninformative); None = OUT/labels.csv",
            "metavar": "CSV",
        },
    )
    output: str | None = field(
        default=None,
        metadata={
            "help": (
                "folder for classifier.pth, stats_forest.pkl, metrics.json, roc.png, filter_train.yaml; None = "
                "OUT/filter"
            ),
            "metavar": "DIR",
        },
    )
    arch: str = field(
        default="resnet34", metadata={"help": "timm ResNet architecture (resnet34 in the paper; resnet18 is faster)"}
    )
    weights: str = field(
        default="imagenet",
        metadata={
            "help": (
                "initial weights: 'imagenet' (timm pretrained download or cache), 'random', or a file: our "
                "classifier, the CEM500K filter state dict, or a ResNet encoder (our pretraining export / MoCo "
                "checkpoint)"
            ),
            "metavar": "SPEC",
        },
    )
    train_layers: list[str] = field(
        default_factory=lambda: ["layer4", "fc"],
        metadata={
            "help": (
                "top-level modules to train, the rest stay frozen (batch-norm statistics included); 'all' trains "
                "everything"
            ),
            "metavar": "NAME",
        },
    )
    epochs: int = field(default=30, metadata={"help": "training epochs"})
    lr: float = field(default=1e-3, metadata={"help": "Adam learning rate"})
    batch_size: int = field(default=64, metadata={"help": "patches per training step"})
    input_size: int | None = field(
        default=None,
        metadata={
            "help": (
                "edge in px the patches are resized to for the network; None = the store's patch size (224 in "
                "the paper)"
            )
        },
    )
    test_fraction: float = field(
        default=0.15,
        metadata={"help": "fraction of the labels held out (stratified) for the AUROC report (paper: 2000 of 14000)"},
    )
    seed: int = field(
        default=0, metadata={"help": "seed of the split, the initialisation, the batch order and the augmentations"}
    )
    augment: bool = field(
        default=True,
        metadata={"help": "augment training patches (flips, 90-degree turns, brightness/contrast, noise, blur)"},
    )
    threshold: float = field(
        default=0.5, metadata={"help": "keep a patch when its informative probability is at least this (paper: 0.5)"}
    )
    device: str = field(
        default="auto", metadata={"help": "auto (CUDA, else Apple MPS, else the CPU), cpu, cuda, cuda:N or mps"}
    )
    amp: bool = field(default=True, metadata={"help": "mixed precision (float16 autocast) on CUDA; ignored on CPU"})
    workers: int = field(
        default=0, metadata={"help": "DataLoader worker processes for augmentation (0 = in the main process)"}
    )
    forest_trees: int = field(default=200, metadata={"help": "trees of the Random Forest statistics baseline"})
    bootstrap: bool = field(
        default=False,
        metadata={
            "help": (
                "start without hand labels: add, for the build's patches without one, the labels the label-free "
                "rules are sure of (score <= bootstrap_low: uninformative, >= bootstrap_high: informative); hand "
                "labels in labels.csv win. The held-out AUROC then measures agreement with the rules: judge the "
                "classifier with `cemcurate filter evaluate` on a hand-labelled set, or correct it with `cemcurate "
                "label` and train again"
            )
        },
    )
    bootstrap_low: float = field(
        default=0.27,
        metadata={"help": "rules score at or below which a patch is a bootstrap uninformative (0.27: margin -1)"},
    )
    bootstrap_high: float = field(
        default=0.95,
        metadata={"help": "rules score at or above which a patch is a bootstrap informative (0.95: margin 3)"},
    )
    bootstrap_max: int = field(
        default=2000,
        metadata={"help": "at most this many bootstrap labels per class, the most confident first"},
    )

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {self.epochs}")
        if not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        if self.batch_size < 2:
            raise ValueError(f"batch_size must be >= 2 (batch norm), got {self.batch_size}")
        if self.input_size is not None and self.input_size < 32:
            raise ValueError(f"input_size must be at least 32 px, got {self.input_size}")
        if not 0 < self.test_fraction < 1:
            raise ValueError(f"test_fraction must be between 0 and 1, got {self.test_fraction}")
        if not 0 <= self.threshold <= 1:
            raise ValueError(f"threshold must be in [0, 1], got {self.threshold}")
        if self.workers < 0:
            raise ValueError(f"workers must be >= 0, got {self.workers}")
        if self.forest_trees < 1:
            raise ValueError(f"forest_trees must be >= 1, got {self.forest_trees}")
        if not 0 <= self.bootstrap_low < self.bootstrap_high <= 1:
            raise ValueError(
                f"need 0 <= bootstrap_low < bootstrap_high <= 1, got {self.bootstrap_low}, {self.bootstrap_high}"
            )
        if self.bootstrap_max < 1:
            raise ValueError(f"bootstrap_max must be >= 1, got {self.bootstrap_max}")
        if isinstance(self.train_layers, str):
            self.train_layers = [self.train_layers]
        if not self.train_layers:
            raise ValueError("train_layers must name at least one module (or 'all')")

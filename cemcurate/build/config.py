"""``BuildConfig``: the settings of ``cemcurate build`` (``configs/curate/build.yaml`` fills it,
flags override it)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class BuildConfig:
    """Settings of ``cemcurate build``; the defaults are the CEM500K paper's."""

    patch_size: int = field(default=224, metadata={"help": "edge of the square patches in pixels"})
    min_edge: int = field(
        default=112,
        metadata={
            "help": "an edge crop is kept only if both its sides are at least this many pixels "
            "(it is then resized to patch-size)"
        },
    )
    low_percentile: float = field(
        default=0.1, metadata={"help": "percentile mapped to 0 when converting non-uint8 data to uint8"}
    )
    high_percentile: float = field(
        default=99.9, metadata={"help": "percentile mapped to 255 when converting non-uint8 data to uint8"}
    )
    window_sample_slices: int = field(
        default=32,
        metadata={"help": "number of z slices, spread over the volume, sampled to compute the intensity window"},
    )
    isotropy_tolerance: float = field(
        default=0.2,
        metadata={"help": "cut xz and yz planes too when |z - xy| / xy spacing is at most this (0.2 = within 20%%)"},
    )
    dedup: bool = field(
        default=True, metadata={"help": "remove near-duplicate patches (difference hash + greedy grouping)"}
    )
    dedup_scope: str = field(
        default="source",
        metadata={
            "help": "'source': group near-duplicates inside each source (the paper); 'corpus': also across sources"
        },
    )
    max_hamming: int = field(
        default=11,
        metadata={
            "help": "patches whose 64-bit dHashes differ in at most this many bits are near-duplicates "
            "(inclusive: 11 is the paper's '< 12'; the released CEM500K code used <= 12)"
        },
    )
    seed: int = field(
        default=0, metadata={"help": "seed of the random order in which near-duplicate groups pick their exemplar"}
    )
    filter: str = field(
        default="stats",
        metadata={
            "help": "uninformative-patch filter: 'stats' (label-free rules), 'none', a classifier.pth or "
            "stats_forest.pkl from `cemcurate filter train`, or the released CEM500K filter weights",
            "metavar": "stats|none|PATH",
        },
    )
    filter_threshold: float = field(
        default=0.5, metadata={"help": "keep a patch when its informative probability is at least this"}
    )
    filter_batch_size: int = field(default=256, metadata={"help": "patches per batch for classifier inference"})
    filter_device: str = field(
        default="auto",
        metadata={
            "help": "where a classifier filter runs: auto (CUDA, else Apple MPS, else the CPU), cpu, cuda, "
            "cuda:N or mps (mps without MPS: the CPU, warned); the label-free rules always run on the CPU"
        },
    )
    workers: int = field(
        default=0, metadata={"help": "sources processed in parallel on this machine (0 = all CPU cores)"}
    )
    scheduler: str = field(
        default="",
        metadata={
            "help": "process the sources on a Dask cluster instead of this machine's process pool: "
            "tcp://HOST:PORT joins a running scheduler, local:N starts N worker processes here, FILE.yaml "
            "starts a dask-jobqueue cluster (SLURM, PBS, LSF, ...). Workers read RAW and write OUT "
            "directly (a shared file system); the result equals the local build's",
            "metavar": "tcp://HOST:PORT|local:N|FILE.yaml",
        },
    )
    dask_chunk_voxels: int = field(
        default=1 << 26,
        metadata={
            "help": "with --scheduler: voxels per task when a volume is split (xy slabs, xz/yz blocks); volumes "
            "of more than 4 such chunks are cut by many workers at once"
        },
    )
    sources: str | None = field(
        default=None,
        metadata={
            "help": "sidecar YAML with per-source options (default: RAW/cemcurate.yaml if present)",
            "metavar": "FILE",
        },
    )
    allow_unmatched: bool = field(
        default=False,
        metadata={
            "help": "a sidecar entry that matches no file is a warning instead of an error (a typo in a path "
            "would otherwise let label images in or drop a voxel size without a word)"
        },
    )
    montage_patches: int = field(default=48, metadata={"help": "random kept patches shown in report.html"})

    def __post_init__(self) -> None:
        if self.patch_size < 16:
            raise ValueError(f"patch_size must be at least 16, got {self.patch_size}")
        if not 1 <= self.min_edge <= self.patch_size:
            raise ValueError(f"min_edge must be between 1 and patch_size ({self.patch_size}), got {self.min_edge}")
        if not 0 <= self.low_percentile < self.high_percentile <= 100:
            raise ValueError(
                f"need 0 <= low_percentile < high_percentile <= 100, got {self.low_percentile}, {self.high_percentile}"
            )
        if self.dedup_scope not in ("source", "corpus"):
            raise ValueError(f"dedup_scope must be 'source' or 'corpus', got {self.dedup_scope!r}")
        if not 0 <= self.max_hamming <= 64:
            raise ValueError(f"max_hamming must be between 0 and 64, got {self.max_hamming}")
        if self.workers < 0:
            raise ValueError(f"workers must be >= 0, got {self.workers}")
        if self.dask_chunk_voxels < 1:
            raise ValueError(f"dask_chunk_voxels must be >= 1, got {self.dask_chunk_voxels}")
        if self.scheduler and self.workers:
            raise ValueError(
                f"workers {self.workers} is for this machine's process pool; with scheduler {self.scheduler} "
                "the cluster's workers process the sources (size the cluster instead)"
            )
        if not 0.0 <= self.filter_threshold <= 1.0:
            raise ValueError(f"filter_threshold must be in [0, 1], got {self.filter_threshold}")
        if self.window_sample_slices < 1:
            raise ValueError(f"window_sample_slices must be >= 1, got {self.window_sample_slices}")

    def patch_settings(self) -> dict:
        """The settings that change which pixels a source's part holds."""
        keys = (
            "patch_size",
            "min_edge",
            "low_percentile",
            "high_percentile",
            "window_sample_slices",
            "isotropy_tolerance",
            "dedup",
            "max_hamming",
            "seed",
        )
        return {k: getattr(self, k) for k in keys}

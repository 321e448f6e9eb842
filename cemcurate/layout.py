"""Every path of a ``cemcurate build`` output folder, in one place.

::

    OUT/manifest.parquet            one row per raw patch (see cemcurate.manifest)
    OUT/sources.parquet             one row per source volume (and per skipped file)
    OUT/store.json                  patch size and intensity statistics of the kept patches
    OUT/store/<shard>.u8            the packed patches of one source (see cemcurate.store)
    OUT/report.html                 the build report
    OUT/build_config.yaml           the resolved build settings
    OUT/parts/<key>.json|.parquet   one finished source: its record and its manifest rows
    OUT/parts/patch_ids.json        the patch-id blocks of every source
    OUT/parts/filter/<id>/<shard>.npy  cached filter scores of one shard, per filter
    OUT/parts/work/                 scratch files of a running build
    OUT/.cemcurate-output           marks OUT as an output (never read as input); records RAW
    OUT/.lock                       held by the running build (who holds it, inside)
    OUT/.commit/                    the next outputs while they are published (see cemcurate.commit)
    OUT/labels.csv                  human labels (cemcurate label)
    OUT/filter/                     the trained filter (cemcurate filter train)
    OUT/dedup_preview.html, OUT/lorenz.png   the dedup preview (cemcurate dedup-preview)
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from cemcurate.common.lazy import lazy_import

yaml = lazy_import("yaml")

SHARD_SUFFIX = ".u8"
# Written into every folder cemcurate writes (a build OUT, a patch export): such a folder
# inside RAW is never read as input, so a build does not curate its own outputs.
OUTPUT_MARKER = ".cemcurate-output"


class BuildLayout:
    """The paths of build folder ``root``; nothing is read or created on construction."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def __repr__(self) -> str:
        return f"BuildLayout({str(self.root)!r})"

    # -- outputs of a finished build
    @property
    def manifest(self) -> Path:
        return self.root / "manifest.parquet"

    @property
    def sources(self) -> Path:
        return self.root / "sources.parquet"

    @property
    def store_info(self) -> Path:
        return self.root / "store.json"

    @property
    def store_dir(self) -> Path:
        return self.root / "store"

    def shard(self, name: str) -> Path:
        """The packed patches of shard ``name``."""
        return self.store_dir / f"{name}{SHARD_SUFFIX}"

    def shards(self) -> list[Path]:
        """Every shard file present in the store."""
        return list(self.store_dir.glob(f"*{SHARD_SUFFIX}"))

    @property
    def report(self) -> Path:
        return self.root / "report.html"

    @property
    def build_config(self) -> Path:
        return self.root / "build_config.yaml"

    def recorded_setting(self, key: str, default):
        """The build setting ``key`` as the last build recorded it in ``build_config.yaml``;
        ``default`` when the file or the key is absent.

        Raises:
            ValueError: the file exists but is not a YAML mapping (names it).
        """
        if not self.build_config.is_file():
            return default
        try:
            settings = yaml.safe_load(self.build_config.read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise ValueError(f"{self.build_config}: cannot be read ({exc})") from exc
        if not isinstance(settings, dict):
            raise ValueError(f"{self.build_config}: expected a mapping of build settings")
        return settings.get(key, default)

    # -- the running build
    @property
    def marker(self) -> Path:
        """Marks the folder as a cemcurate output; holds the RAW folder and sidecar of the build (JSON)."""
        return self.root / OUTPUT_MARKER

    @property
    def lock(self) -> Path:
        return self.root / ".lock"

    @property
    def commit_dir(self) -> Path:
        """Where the next manifest, source table, store.json, config and report are staged."""
        return self.root / ".commit"

    def staged(self, path: Path) -> Path:
        """The staged copy of output ``path`` (one of the files above, directly in OUT)."""
        return self.commit_dir / path.name

    # -- resume state of the build
    @property
    def parts_dir(self) -> Path:
        return self.root / "parts"

    def part_json(self, key: str) -> Path:
        """The record of the finished source with key ``key``."""
        return self.parts_dir / f"{key}.json"

    def part_parquet(self, key: str) -> Path:
        """The manifest rows of the finished source with key ``key``."""
        return self.parts_dir / f"{key}.parquet"

    @property
    def patch_ids(self) -> Path:
        return self.parts_dir / "patch_ids.json"

    @property
    def work_dir(self) -> Path:
        """Scratch space of a running build, removed when it finishes."""
        return self.parts_dir / "work"

    def work_file(self, shard: str, kind: str) -> Path:
        """Scratch file ``kind`` (e.g. ``.all.u8``, ``.std.npy``) of shard ``shard`` being made."""
        return self.work_dir / f"{shard}{kind}"

    @property
    def filter_caches(self) -> Path:
        return self.parts_dir / "filter"

    def filter_cache(self, filter_name: str) -> Path:
        """The score cache folder of the filter whose ``PatchFilter.name`` is ``filter_name``."""
        return self.filter_caches / hashlib.sha1(filter_name.encode()).hexdigest()[:16]

    def filter_scores(self, filter_name: str, shard: str) -> Path:
        """The cached scores (float32 ``.npy``, one per shard row) of ``shard`` under that filter."""
        return self.filter_cache(filter_name) / f"{shard}.npy"

    def filter_deciders(self, filter_name: str, shard: str) -> Path:
        """What decided each cached score (uint8 ``.npy`` of indices in
        :data:`cemcurate.filtering.filters.DECIDED_BY`), beside :meth:`filter_scores`."""
        return self.filter_cache(filter_name) / f"{shard}.decided.npy"

    # -- written by the other commands
    @property
    def labels(self) -> Path:
        return self.root / "labels.csv"

    @property
    def filter_dir(self) -> Path:
        return self.root / "filter"

    @property
    def dedup_preview(self) -> Path:
        return self.root / "dedup_preview.html"

    @property
    def lorenz_png(self) -> Path:
        return self.root / "lorenz.png"

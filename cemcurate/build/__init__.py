"""``cemcurate build``: RAW files in, curated patch store + manifest out.

Each source (a file, or a folder read as a stack) is processed on its own, in parallel:
read -> standardise -> slice -> tile -> hash -> group near-duplicates -> write its shard
and a *part* (its manifest rows and source-table rows) under ``OUT/parts``. A finished
part is never redone unless its files or the settings that shape its patches change, so
re-running the same command resumes, and files added to RAW are added. The merge step
then assigns stable ``patch_id`` values and writes ``manifest.parquet``,
``sources.parquet``, ``store.json`` and ``report.html``, each atomically.

Modules, in the order a build runs them:

* :mod:`~cemcurate.build.config` - :class:`BuildConfig`, the settings;
* :mod:`~cemcurate.build.orchestrate` - :func:`build`, the process pool, :class:`BuildSummary`;
* :mod:`~cemcurate.build.resume` - fingerprints of sources and the lookup of finished parts;
* :mod:`~cemcurate.build.source` - one source to one part;
* :mod:`~cemcurate.build.cut` - one volume to patches, hashes and statistics;
* :mod:`~cemcurate.build.extend` - a stack that gained files, extended in place;
* :mod:`~cemcurate.build.merge` - parts to the manifest and the source table;
* :mod:`~cemcurate.build.patch_ids` - the registry of stable patch ids;
* :mod:`~cemcurate.build.scoring` - the filter stage, cached per shard;
* :mod:`~cemcurate.build.records` - the typed records they hand each other.

The paths of the output folder are those of :class:`cemcurate.layout.BuildLayout`.
"""

from cemcurate.build.config import BuildConfig
from cemcurate.common.lazy import lazy_import

__all__ = ["BuildConfig", "BuildSummary", "build"]

# Lazy, so that reading the settings (``cemcurate build --help`` imports BuildConfig) does
# not load pandas and pyarrow through the orchestration modules.
_orchestrate = lazy_import("cemcurate.build.orchestrate")


def __getattr__(name: str):
    if name in ("BuildSummary", "build"):
        return getattr(_orchestrate, name)
    raise AttributeError(f"module 'cemcurate.build' has no attribute {name!r}")

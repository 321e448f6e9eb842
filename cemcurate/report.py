"""``OUT/report.html``: what a build did, for a person to check at a glance.

Self-contained (images are embedded as base64 PNG), so it can be mailed or archived.
"""

from __future__ import annotations

import html
from pathlib import Path

import pandas as pd

from cemcurate.common.atomic import atomic_path
from cemcurate.filtering.report import filter_report_section
from cemcurate.layout import BuildLayout
from cemcurate.montage import html_page, html_table, montage, png_data_uri, sample_patches

_SOURCE_COLUMNS = (
    "source",
    "status",
    "reader",
    "shape",
    "dtype",
    "voxel_size",
    "voxel_size_from",
    "planes",
    "window_low",
    "window_high",
    "invert",
    "n_raw",
    "n_unique",
    "error",
    "notes",
)
_STYLE = (
    "body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;font-size:90%}"
    "td,th{border:1px solid #ccc;padding:2px 6px;text-align:left;vertical-align:top}.bad{color:#b00}"
)


def stage_counts(manifest: pd.DataFrame) -> pd.DataFrame:
    """Patches per source after each stage: raw, after deduplication, after filtering (kept)."""
    by = manifest.groupby("source", sort=False)
    counts = pd.DataFrame(
        {
            "raw": by.size(),
            "deduplicated": by["duplicate"].apply(lambda d: int((~d.astype(bool)).sum())),
            "informative (kept)": by["kept"].sum().astype(int),
        }
    )
    counts.loc["all sources"] = counts.sum()
    return counts.reset_index(names="source")


def write_report(
    out_dir: str | Path, manifest: pd.DataFrame, sources: pd.DataFrame, cfg, path: str | Path | None = None
) -> None:
    """Write the report of build folder ``out_dir`` (to ``path``, default ``OUT/report.html``):
    stage counts, the source table and a montage of kept patches.

    ``cfg`` is the :class:`cemcurate.build.BuildConfig` of the build (``montage_patches``,
    ``patch_size`` and ``seed`` are used). The patches are read from the store's shards.
    """
    layout = BuildLayout(out_dir)
    sections = [f"<h1>cemcurate build: {html.escape(str(layout.root))}</h1>"]
    failed = sources[sources["status"] == "failed"]
    if len(failed):
        sections.append(f"<p class=bad>{len(failed)} source(s) failed; see the source table.</p>")
    sections.append(
        "<h2>Patches per stage</h2>" + (html_table(stage_counts(manifest)) if len(manifest) else "<p>No patches.</p>")
    )
    kept = manifest[manifest["kept"]]
    picks = sample_patches(layout.root, kept, cfg.montage_patches, cfg.patch_size, cfg.seed)
    sections.append(
        f"<h2>Random kept patches ({len(picks)} of {len(kept)})</h2><img src='{png_data_uri(montage(picks))}'>"
    )
    sections.append(filter_report_section(layout.root, manifest, seed=cfg.seed, patch_size=cfg.patch_size))
    columns = [c for c in _SOURCE_COLUMNS if c in sources]
    sections.append("<h2>Sources</h2>" + html_table(sources[columns]))
    with atomic_path(path or layout.report) as tmp:
        tmp.write_text(html_page("cemcurate report", _STYLE, sections))

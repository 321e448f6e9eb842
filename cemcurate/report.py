"""``OUT/report.html``: what a build did, for a person to check at a glance.

Self-contained (images are embedded as base64 PNG), so it can be mailed or archived.
"""

from __future__ import annotations

import html
from pathlib import Path

import numpy as np
import pandas as pd

from cemcurate.charts import curves_image, histogram_image
from cemcurate.common.atomic import atomic_path
from cemcurate.dedup.inequality import gini, lorenz_curve
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


def curation_section(manifest: pd.DataFrame, threshold: float) -> str:
    """HTML: the histogram of ``informative_prob`` with the threshold, and the Lorenz curves of
    patches per source (raw, deduplicated, kept) with their Gini coefficients."""
    parts = ["<h2>Curation at a glance</h2>"]
    probs = manifest["informative_prob"].to_numpy(np.float64) if "informative_prob" in manifest else np.zeros(0)
    scored = np.isfinite(probs)
    if scored.any():
        below = int((probs[scored] < threshold).sum())
        image = histogram_image(probs[scored], marker=threshold, xlabel="informative_prob (dashed: threshold)")
        parts.append(
            f"<p>{int(scored.sum())} deduplicated patches scored; {below} ({below / scored.sum():.0%}) below "
            f"the threshold {threshold:g}, dropped. A filter that ranks patches spreads them over the range; "
            f"one that only keeps or drops puts them at 0 and 1.</p><img alt='' src='{png_data_uri(image)}'>"
        )
    per_source = stage_counts(manifest).iloc[:-1]  # less the "all sources" row
    columns = {"kept": "informative (kept)", "deduplicated": "deduplicated", "raw": "raw"}
    counts = {name: per_source[column].to_numpy(np.float64) for name, column in columns.items()}
    if len(per_source) >= 2 and counts["kept"].sum() > 0:
        ginis = {name: gini(c) for name, c in counts.items()}
        image = curves_image([lorenz_curve(c) for c in counts.values()], "fraction of sources", "fraction of patches")
        shades = ("black", "grey", "light grey")
        legend = ", ".join(f"{shade}: {name} (Gini {ginis[name]:.2f})" for shade, name in zip(shades, counts))
        parts.append(
            f"<p>Patches per source, Lorenz curves (sources sorted by count; the dotted diagonal is equality): "
            f"{legend}. A Gini near 1 means a few sources dominate the curated set.</p>"
            f"<img alt='' src='{png_data_uri(image)}'>"
        )
    return "".join(parts) if len(parts) > 1 else ""


def write_report(
    out_dir: str | Path, manifest: pd.DataFrame, sources: pd.DataFrame, cfg, path: str | Path | None = None
) -> None:
    """Write the report of build folder ``out_dir`` (to ``path``, default ``OUT/report.html``):
    stage counts, a montage of kept patches, the curation charts (:func:`curation_section`),
    the filter's kept and dropped patches per source and the source table.

    ``cfg`` is the :class:`cemcurate.build.BuildConfig` of the build (``montage_patches``,
    ``patch_size``, ``seed`` and ``filter_threshold`` are used). The patches are read from the store's shards.
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
    if len(manifest):
        sections.append(curation_section(manifest, cfg.filter_threshold))
    sections.append(filter_report_section(layout.root, manifest, patch_size=cfg.patch_size))
    columns = [c for c in _SOURCE_COLUMNS if c in sources]
    sections.append("<h2>Sources</h2>" + html_table(sources[columns]))
    with atomic_path(path or layout.report) as tmp:
        tmp.write_text(html_page("cemcurate report", _STYLE, sections))

"""The filter section of ``OUT/report.html``: kept vs dropped patches, side by side per source."""

from __future__ import annotations

import html
from pathlib import Path

import numpy as np
import pandas as pd

from cemcurate.montage import montage, png_data_uri, sample_patches
from cemcurate.store import read_store_info

UNINFORMATIVE_REASON = "uninformative"


def _spread_by_score(rows: pd.DataFrame, n: int) -> pd.DataFrame:
    """Up to ``n`` of the stored ``rows``, evenly spaced through their order by
    ``informative_prob`` (lowest first; ties in manifest order), so a montage shows the range
    of scores of a source rather than a random draw from its most common score."""
    rows = rows[rows["shard_row"] >= 0].sort_values("informative_prob", kind="stable")
    if len(rows) <= n:
        return rows
    return rows.iloc[np.unique(np.linspace(0, len(rows) - 1, n).round().astype(int))]


# Sources shown with montages; the others get a line each in a table (a corpus of 10,000
# images would otherwise embed 20,000 PNGs: hundreds of MB of HTML and a minute of encoding).
MAX_MONTAGE_SOURCES = 40


def filter_report_section(
    out_dir: str | Path,
    manifest: pd.DataFrame,
    per_source: int = 12,
    columns: int = 6,
    tile: int = 96,
    patch_size: int | None = None,
    max_sources: int = MAX_MONTAGE_SOURCES,
) -> str:
    """HTML for the uninformative-patch filter: per source, kept and dropped patches spread over
    their scores, lowest score first.

    Args:
        out_dir: build folder (its shards hold the pixels of kept *and* filtered-out patches).
        manifest: the full manifest; uses ``kept``, ``reason`` (``'uninformative'`` for
            patches the filter dropped), ``shard``/``shard_row``, ``informative_prob`` and,
            when present, ``decided_by``.
        per_source: patches shown per side and source.
        columns, tile: montage layout (patches per row, tile edge in px).
        patch_size: edge of the stored patches; None reads it from ``OUT/store.json`` (a build
            writing its report passes it: its store.json is not published yet).
        max_sources: sources shown with montages - those with the most dropped patches, then
            the most scored; every other source gets a line of counts in a second table.

    Returns:
        an HTML fragment (``<h2>`` heading, one table row per source shown with montages, two
        embedded PNGs each, then the table of the other sources).
    """
    out_dir = Path(out_dir)
    head = "<h2>Uninformative-patch filter</h2>"
    if "informative_prob" not in manifest.columns:
        return head + "<p>The filter was not run on this build (no <code>informative_prob</code> column).</p>"
    patch_size = patch_size or read_store_info(out_dir).patch_size
    # Only the columns used: the per-source selections below then copy a few columns, not all.
    used = ["source", "kept", "reason", "informative_prob", "shard", "shard_row"]
    manifest = manifest[used + (["decided_by"] if "decided_by" in manifest.columns else [])]
    manifest = manifest[manifest["informative_prob"].notna().to_numpy()]
    if not len(manifest):
        return head + "<p>No patch has an informative probability yet.</p>"
    dropped_all = (manifest["reason"].astype(str) == UNINFORMATIVE_REASON).to_numpy()
    kept_all = manifest["kept"].astype(bool).to_numpy()
    groups = manifest.groupby("source", sort=False).indices  # source -> row positions, one pass
    counts = {source: (int(dropped_all[rows].sum()), len(rows)) for source, rows in groups.items()}
    order = sorted(groups, key=lambda source: (-counts[source][0], -counts[source][1]))

    def summary(source, rows: np.ndarray) -> str:
        dropped = rows[dropped_all[rows]]
        by = ""
        if "decided_by" in manifest.columns and len(dropped):
            tally = manifest["decided_by"].iloc[dropped].astype(str).value_counts()
            by = "<br>dropped by: " + ", ".join(f"{html.escape(k)} {v}" for k, v in tally.items())
        probs = manifest["informative_prob"].iloc[rows].to_numpy(np.float64)
        return (
            f"{html.escape(str(source))}<br>{int(kept_all[rows].sum())} kept, {len(dropped)} dropped "
            f"({len(dropped) / len(rows):.0%}){by}<br>median p(informative) {np.median(probs):.2f}"
        )

    rows_html = []
    for source in order[:max_sources]:
        rows = groups[source]
        cells = []
        for part in (manifest.iloc[rows[kept_all[rows]]], manifest.iloc[rows[dropped_all[rows]]]):
            picks = sample_patches(out_dir, _spread_by_score(part, per_source), per_source, patch_size)
            if len(picks):
                cells.append(f"<img alt='' src='{png_data_uri(montage(picks, columns=columns, tile=tile))}'>")
            else:
                cells.append("<i>none</i>")
        rows_html.append(f"<tr><td>{summary(source, rows)}</td><td>{cells[0]}</td><td>{cells[1]}</td></tr>")
    rest = order[max_sources:]
    intro = (
        f"<p>{int(dropped_all.sum())} patch(es) dropped as uninformative. Per source, patches spread over "
        "their scores, lowest first: look for informative patches on the right (filter too strict) "
        "and empty, uniform or artefact patches at the start of the left (too lenient).</p>"
    )
    if rest:
        intro += (
            f"<p>Montages for the {max_sources} sources with the most dropped patches; the other "
            f"{len(rest)} are listed after them.</p>"
        )
    table = (
        "<table><tr><th>source</th><th>kept (informative)</th><th>dropped (uninformative)</th></tr>"
        + "".join(rows_html)
        + "</table>"
    )
    if rest:
        table += (
            "<table><tr><th>other sources</th></tr>"
            + "".join(f"<tr><td>{summary(source, groups[source])}</td></tr>" for source in rest)
            + "</table>"
        )
    return head + intro + table

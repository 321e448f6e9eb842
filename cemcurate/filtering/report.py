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


def filter_report_section(
    out_dir: str | Path,
    manifest: pd.DataFrame,
    per_source: int = 12,
    columns: int = 6,
    tile: int = 96,
    patch_size: int | None = None,
) -> str:
    """HTML for the uninformative-patch filter: per source, kept and dropped patches spread over
    their scores, lowest score first.

    Args:
        out_dir: build folder (its shards hold the pixels of kept *and* filtered-out patches).
        manifest: the full manifest; uses ``kept``, ``reason`` (``'uninformative'`` for
            patches the filter dropped), ``shard``/``shard_row`` and, when present,
            ``informative_prob``.
        per_source: patches shown per side and source.
        columns, tile: montage layout (patches per row, tile edge in px).
        patch_size: edge of the stored patches; None reads it from ``OUT/store.json`` (a build
            writing its report passes it: its store.json is not published yet).

    Returns:
        an HTML fragment (``<h2>`` heading, one table row per source with two embedded PNGs).
    """
    out_dir = Path(out_dir)
    head = "<h2>Uninformative-patch filter</h2>"
    if "informative_prob" not in manifest.columns:
        return head + "<p>The filter was not run on this build (no <code>informative_prob</code> column).</p>"
    patch_size = patch_size or read_store_info(out_dir).patch_size
    # Only the columns used: the per-source selections below then copy a few columns, not all.
    used = ["source", "kept", "reason", "informative_prob", "shard", "shard_row"]
    manifest = manifest[used + (["decided_by"] if "decided_by" in manifest.columns else [])]
    dropped_all = manifest["reason"].astype(str) == UNINFORMATIVE_REASON
    kept_all = manifest["kept"].astype(bool)
    scored = manifest["informative_prob"].notna()
    rows = []
    for source in pd.unique(manifest.loc[scored, "source"]):
        mine = (manifest["source"] == source).to_numpy()
        kept, dropped = manifest[mine & kept_all.to_numpy()], manifest[mine & dropped_all.to_numpy()]
        cells = []
        for part in (kept, dropped):
            picks = sample_patches(out_dir, _spread_by_score(part, per_source), per_source, patch_size)
            if len(picks):
                cells.append(f"<img alt='' src='{png_data_uri(montage(picks, columns=columns, tile=tile))}'>")
            else:
                cells.append("<i>none</i>")
        n_scored = int((mine & scored.to_numpy()).sum())
        share = len(dropped) / n_scored if n_scored else 0.0
        probs = manifest.loc[mine & scored.to_numpy(), "informative_prob"].to_numpy(np.float64)
        by = ""
        if "decided_by" in dropped.columns and len(dropped):
            counts = dropped["decided_by"].astype(str).value_counts()
            by = "<br>dropped by: " + ", ".join(f"{html.escape(k)} {v}" for k, v in counts.items())
        rows.append(
            f"<tr><td>{html.escape(str(source))}<br>{len(kept)} kept, {len(dropped)} dropped ({share:.0%}){by}"
            f"<br>median p(informative) {np.median(probs):.2f}</td><td>{cells[0]}</td><td>{cells[1]}</td></tr>"
        )
    if not rows:
        return head + "<p>No patch has an informative probability yet.</p>"
    total_dropped = int(dropped_all.sum())
    intro = (
        f"<p>{total_dropped} patch(es) dropped as uninformative. Per source, patches spread over "
        "their scores, lowest first: look for informative patches on the right (filter too strict) "
        "and empty, uniform or artefact patches at the start of the left (too lenient).</p>"
    )
    table = (
        "<table><tr><th>source</th><th>kept (informative)</th><th>dropped (uninformative)</th></tr>"
        + "".join(rows)
        + "</table>"
    )
    return head + intro + table

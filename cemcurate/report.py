"""``OUT/report.html``: what a build did, for a person to check at a glance.

Self-contained (images are embedded as base64 PNG), so it can be mailed or archived.
"""

from __future__ import annotations

import base64
import html
import io

import numpy as np
import pandas as pd
from PIL import Image

from cemcurate.common.atomic import atomic_path
from cemcurate.store import open_shard


def montage(patches: np.ndarray, columns: int = 8, tile: int = 112, gap: int = 2) -> np.ndarray:
    """Lay out uint8 ``(n, p, p)`` patches, downsized to ``tile`` px, in a grid (uint8 2D image)."""
    n = len(patches)
    if n == 0:
        return np.full((tile, tile), 255, np.uint8)
    rows = -(-n // columns)
    cols = min(columns, n)
    canvas = np.full((rows * (tile + gap) - gap, cols * (tile + gap) - gap), 255, np.uint8)
    for i, patch in enumerate(patches):
        small = np.asarray(Image.fromarray(patch).resize((tile, tile), Image.BILINEAR))
        r, c = divmod(i, columns)
        canvas[r * (tile + gap):r * (tile + gap) + tile, c * (tile + gap):c * (tile + gap) + tile] = small
    return canvas


def png_data_uri(image: np.ndarray) -> str:
    """A ``data:image/png;base64,...`` URI of a uint8 2D image."""
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def sample_patches(out_dir, rows: pd.DataFrame, n: int, patch_size: int, seed: int = 0) -> np.ndarray:
    """Pixels of up to ``n`` random manifest ``rows`` that are stored in the shards."""
    rows = rows[rows["shard_row"] >= 0]
    if len(rows) > n:
        rows = rows.sample(n, random_state=seed)
    out = np.zeros((len(rows), patch_size, patch_size), np.uint8)
    for i, (shard, r) in enumerate(zip(rows["shard"], rows["shard_row"])):
        out[i] = open_shard(out_dir / "store" / f"{shard}.u8", patch_size)[r]
    return out


def _table(frame: pd.DataFrame) -> str:
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in frame.columns)
    body = "".join("<tr>" + "".join(f"<td>{html.escape('' if pd.isna(v) else str(v))}</td>" for v in row) + "</tr>"
                   for row in frame.itertuples(index=False))
    return f"<table><tr>{head}</tr>{body}</table>"


def stage_counts(manifest: pd.DataFrame) -> pd.DataFrame:
    """Patches per source after each stage: raw, after deduplication, after filtering (kept)."""
    by = manifest.groupby("source", sort=False)
    counts = pd.DataFrame({"raw": by.size(), "deduplicated": by["duplicate"].apply(lambda d: int((~d.astype(bool)).sum())),
                           "informative (kept)": by["kept"].sum().astype(int)})
    counts.loc["all sources"] = counts.sum()
    return counts.reset_index(names="source")


def write_report(out_dir, manifest: pd.DataFrame, sources: pd.DataFrame, cfg) -> None:
    """Write ``OUT/report.html``: stage counts, the source table and a montage of kept patches."""
    from pathlib import Path

    out_dir = Path(out_dir)
    sections = [f"<h1>cemcurate build: {html.escape(str(out_dir))}</h1>"]
    failed = sources[sources["status"] == "failed"]
    if len(failed):
        sections.append(f"<p class=bad>{len(failed)} source(s) failed; see the source table.</p>")
    sections.append("<h2>Patches per stage</h2>" + (_table(stage_counts(manifest)) if len(manifest) else "<p>No patches.</p>"))
    kept = manifest[manifest["kept"]]
    picks = sample_patches(out_dir, kept, cfg.montage_patches, cfg.patch_size, cfg.seed)
    sections.append(f"<h2>Random kept patches ({len(picks)} of {len(kept)})</h2><img src='{png_data_uri(montage(picks))}'>")
    from cemcurate.filtering import filter_report_section

    sections.append(filter_report_section(out_dir, manifest, seed=cfg.seed))
    columns = [c for c in ("source", "status", "reader", "shape", "dtype", "voxel_size", "voxel_size_from", "planes",
                           "window_low", "window_high", "invert", "n_raw", "n_unique", "error", "notes") if c in sources]
    sections.append("<h2>Sources</h2>" + _table(sources[columns]))
    style = ("body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;font-size:90%}"
             "td,th{border:1px solid #ccc;padding:2px 6px;text-align:left;vertical-align:top}.bad{color:#b00}")
    page = f"<!doctype html><html><head><meta charset=utf-8><title>cemcurate report</title><style>{style}</style></head><body>{''.join(sections)}</body></html>"
    with atomic_path(out_dir / "report.html") as tmp:
        tmp.write_text(page)

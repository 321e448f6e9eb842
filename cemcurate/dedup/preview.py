"""``cemcurate dedup-preview``: see what deduplication grouped, to choose the cutoff by eye.

The paper's authors chose the Hamming cutoff "by visual inspection of groups". This page
shows, for a sample of near-duplicate groups, the exemplar beside its dropped duplicates
with their distances, and pairs of patches of one source just below and just above the
cutoff; plus patches per source before/after deduplication and the Lorenz curve and Gini
coefficient of patches per source (the paper's Appendix 1 figure 6).

Duplicates are not stored in the patch store, so their pixels are re-cut from the source
files with the source's recorded intensity window.
"""

from __future__ import annotations

import html
import io
from pathlib import Path

import numpy as np
import pandas as pd

from cemcurate.build.records import SourceRow
from cemcurate.common.atomic import atomic_path
from cemcurate.common.lazy import lazy_import
from cemcurate.dedup.grouping import DEFAULT_MAX_HAMMING
from cemcurate.dedup.hamming import hamming_distance
from cemcurate.dedup.inequality import gini, lorenz_curve
from cemcurate.dhash import hex_to_dhash
from cemcurate.io import Volume
from cemcurate.layout import BuildLayout
from cemcurate.manifest import read_manifest
from cemcurate.montage import html_page, html_table, png_data_uri, thumbnail
from cemcurate.patch_grid import crop_patches
from cemcurate.sources import open_volumes
from cemcurate.standardize import IntensityWindow
from cemcurate.store import ShardReader, read_store_info

matplotlib = lazy_import("matplotlib")
pyplot = lazy_import("matplotlib.pyplot")

_STYLE = (
    "body{font-family:sans-serif;margin:2em}.row{display:flex;flex-wrap:wrap;gap:8px}"
    ".pair{display:flex;border:1px solid #ccc}figure{margin:2px;font-size:75%;text-align:center}"
    "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:2px 6px}"
)


def _plane_image(vol: Volume, window: IntensityWindow, plane: str, index: int) -> np.ndarray:
    """One standardised cross-section of ``vol`` (uint8, rows x cols as in the manifest)."""
    if plane == "xy":
        return window.apply(vol.read_slices(index, index + 1))[0]
    z = vol.shape[0]
    rows = [window.apply(vol.read_slices(z0, min(z, z0 + 16))) for z0 in range(0, z, 16)]
    block = np.concatenate(rows)
    return np.ascontiguousarray(block[:, index, :] if plane == "xz" else block[:, :, index])


def patch_pixels(out_dir: str | Path, rows: pd.DataFrame, patch_size: int = 224) -> np.ndarray:
    """Pixels of manifest ``rows`` (uint8 ``(n, p, p)``): from the store, or re-cut from the source."""
    layout = BuildLayout(out_dir)
    store = ShardReader(layout.root, patch_size)
    out = np.zeros((len(rows), patch_size, patch_size), np.uint8)
    sources = None
    planes: dict[tuple, np.ndarray] = {}
    volumes: dict[str, Volume] = {}
    for i, row in enumerate(rows.itertuples(index=False)):
        if row.shard_row >= 0:
            out[i] = store.shard(row.shard)[row.shard_row]
            continue
        if sources is None:
            sources = pd.read_parquet(layout.sources).drop_duplicates("source").set_index("source", drop=False)
        key = (row.source, row.plane, row.slice)
        if key not in planes:
            src = SourceRow.from_table(sources.loc[row.source])
            if row.source not in volumes:
                volumes[row.source] = open_volumes(src.spec())[0]
            planes[key] = _plane_image(volumes[row.source], src.window(), row.plane, int(row.slice))
        grid = np.array([[row.y, row.x, row.h, row.w]], np.int64)
        out[i] = crop_patches(planes[key], grid, patch_size)[0]
    return out


def boundary_pairs(
    manifest: pd.DataFrame, max_hamming: int, per_distance: int = 3, sample: int = 2000, seed: int = 0
) -> pd.DataFrame:
    """Pairs of patches of one source at distances ``max_hamming - 1 .. max_hamming + 2``.

    Returns a frame with ``a``, ``b`` (manifest row positions) and ``distance``; pairs are
    searched among up to ``sample`` random patches per source.
    """
    rng = np.random.default_rng(seed)
    hashes = hex_to_dhash(manifest["dhash"].tolist())
    wanted = range(max(0, max_hamming - 1), max_hamming + 3)
    found: dict[int, list[tuple[int, int]]] = {d: [] for d in wanted}
    for _, idx in manifest.groupby("source", sort=False).indices.items():
        idx = rng.permutation(idx)[:sample]
        dist = hamming_distance(hashes[idx][:, None], hashes[idx][None, :])
        for d in wanted:
            a, b = np.nonzero(np.triu(dist == d, 1))
            for k in rng.permutation(len(a))[:per_distance]:
                found[d].append((int(idx[a[k]]), int(idx[b[k]])))
    rows = [(a, b, d) for d, pairs in found.items() for a, b in pairs[:per_distance]]
    return pd.DataFrame(rows, columns=["a", "b", "distance"])


def lorenz_png(counts: np.ndarray) -> tuple[bytes, float]:
    """PNG bytes of the Lorenz curve of patches per source, and the Gini coefficient."""
    matplotlib.use("Agg")
    x, y = lorenz_curve(counts)
    g = gini(counts)
    fig, ax = pyplot.subplots(figsize=(4, 4), dpi=100)
    ax.plot(x, y, label=f"patches per source (Gini {g:.2f})")
    ax.plot([0, 1], [0, 1], "k--", lw=0.8, label="equality")
    ax.set_xlabel("fraction of sources")
    ax.set_ylabel("fraction of patches")
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    pyplot.close(fig)
    return buf.getvalue(), g


def _img(pixels: np.ndarray, caption: str) -> str:
    src = png_data_uri(thumbnail(pixels, 112))
    return f"<figure><img src='{src}'><figcaption>{html.escape(caption)}</figcaption></figure>"


def dedup_preview(
    out_dir: str | Path, groups: int = 12, per_group: int = 7, max_hamming: int | None = None, seed: int = 0
) -> Path:
    """Write ``OUT/dedup_preview.html`` and ``OUT/lorenz.png``; return the page's path.

    ``max_hamming`` is the cutoff to illustrate; None: the one the build used (from
    ``OUT/build_config.yaml``).
    """
    layout = BuildLayout(out_dir)
    out_dir = layout.root
    manifest = read_manifest(layout.manifest)
    if max_hamming is None:
        max_hamming = int(layout.recorded_setting("max_hamming", DEFAULT_MAX_HAMMING))
    patch_size = read_store_info(out_dir).patch_size
    hashes = hex_to_dhash(manifest["dhash"].tolist()) if len(manifest) else np.zeros(0, np.uint64)
    position = pd.Series(np.arange(len(manifest)), index=manifest["patch_id"].to_numpy())
    sections = [
        f"<h1>Near-duplicate groups: {html.escape(str(out_dir))}</h1>",
        f"<p>Cutoff: Hamming distance &le; {max_hamming} of 64 bits (the paper's &lt; {max_hamming + 1}). "
        "Each row: the kept exemplar, then dropped duplicates with their distance to it.</p>",
    ]

    rng = np.random.default_rng(seed)
    dup_groups = manifest.loc[manifest["duplicate"] & manifest["group"].isin(manifest["patch_id"]), "group"].unique()
    for gid in rng.permutation(dup_groups)[:groups]:
        ex = int(position[gid])
        members = np.flatnonzero((manifest["group"].to_numpy() == gid) & (np.arange(len(manifest)) != ex))[:per_group]
        pix = patch_pixels(out_dir, manifest.iloc[np.r_[ex, members]], patch_size)
        dists = hamming_distance(hashes[members], hashes[ex])
        figures = [_img(pix[0], f"exemplar {gid}")] + [
            _img(p, f"{manifest['patch_id'].iat[m]}: d={d}") for p, m, d in zip(pix[1:], members, dists)
        ]
        sections.append(f"<h3>{html.escape(manifest['source'].iat[ex])}</h3><div class=row>{''.join(figures)}</div>")

    pairs = (
        boundary_pairs(manifest, max_hamming, seed=seed)
        if len(manifest)
        else pd.DataFrame(columns=["a", "b", "distance"])
    )
    sections.append(
        "<h2>Pairs near the cutoff</h2>"
        "<p>Distances at or below the cutoff are grouped; above it they are kept apart.</p>"
    )
    for d, chunk in pairs.groupby("distance"):
        side = "grouped" if d <= max_hamming else "kept apart"
        figures = []
        for a, b in zip(chunk["a"], chunk["b"]):
            pix = patch_pixels(out_dir, manifest.iloc[[a, b]], patch_size)
            pair = _img(pix[0], str(manifest["patch_id"].iat[a])) + _img(pix[1], str(manifest["patch_id"].iat[b]))
            figures.append(f"<div class=pair>{pair}</div>")
        sections.append(f"<h3>distance {d} ({side})</h3><div class=row>{''.join(figures)}</div>")

    if len(manifest):
        per_source = manifest.groupby("source").agg(
            raw=("patch_id", "size"), deduplicated=("duplicate", lambda s: int((~s).sum()))
        )
        png, g = lorenz_png(per_source["deduplicated"].to_numpy())
        with atomic_path(layout.lorenz_png) as tmp:
            tmp.write_bytes(png)
        sections.append(
            f"<h2>Patches per source</h2>{html_table(per_source.reset_index())}"
            f"<p>Gini coefficient of deduplicated patches per source: {g:.3f}</p>"
            f"<img src='{layout.lorenz_png.name}'>"
        )
    with atomic_path(layout.dedup_preview) as tmp:
        tmp.write_text(html_page("dedup preview", _STYLE, sections))
    return layout.dedup_preview

"""``cemcurate export``: the curated patches as one image file each (CEM500K-style folder)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import imageio.v3 as iio
from tqdm import tqdm

from cemcurate.common.atomic import atomic_path
from cemcurate.layout import OUTPUT_MARKER
from cemcurate.store import open_patches


def patch_filename(row, ext: str) -> str:
    """``<patch_id>_<source>_<plane><slice>_y<y>_x<x>.<ext>``: unique, and says where the patch came from."""
    slug = re.sub(r"[^A-Za-z0-9]+", "-", str(row.source)).strip("-")[-60:]
    return f"{row.patch_id:08d}_{slug}_{row.plane}{row.slice}_y{row.y}_x{row.x}.{ext}"


def export_patches(out_dir: str | Path, dest: str | Path, fmt: str = "tiff", progress: bool = True) -> int:
    """Write every kept patch of build folder ``out_dir`` to ``dest`` as ``fmt`` (tiff or png).

    Files are written atomically; re-running skips files already present. ``dest`` gets the
    output marker (:data:`cemcurate.layout.OUTPUT_MARKER`), so a build whose RAW holds it does
    not read the patches back as input. Returns the number of kept patches.
    """
    if fmt not in ("tiff", "png"):
        raise ValueError(f"unknown export format {fmt!r}; use 'tiff' or 'png'")
    store = open_patches(out_dir)
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    (dest / OUTPUT_MARKER).write_text(json.dumps({"export_of": str(Path(out_dir).resolve())}) + "\n")
    for i, row in enumerate(
        tqdm(store.manifest.itertuples(index=False), total=len(store), disable=not progress, desc="export")
    ):
        target = dest / patch_filename(row, fmt)
        if target.exists():
            continue
        with atomic_path(target) as tmp:
            iio.imwrite(tmp, store[i], extension=f".{fmt}")
    return len(store)

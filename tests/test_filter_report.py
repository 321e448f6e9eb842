"""The filter section of report.html, on a store of real patches filtered by the label-free rules."""

from __future__ import annotations

import base64
import io
import re

import numpy as np
import pytest
import tifffile
from PIL import Image

from cemcurate.filtering.filters import make_filter
from cemcurate.filtering.report import filter_report_section
from cemcurate.manifest import read_manifest, write_manifest
from cemcurate.store import write_patch_store


@pytest.fixture()
def filtered_build(data_root, tmp_path):
    """Two sources - VNC tiles and SEM background/data-bar patches - scored by ``--filter stats``."""
    vnc = tifffile.imread(data_root / "drosophila_vnc_gerhard/stack1/raw/05.tif")
    plate = tifffile.imread(data_root / "sem_plate_databar/plateImage2D.tif")
    cells = [vnc[y : y + 224, x : x + 224] for y in range(0, 896, 224) for x in range(0, 896, 224)][:6]
    sem = [
        np.asarray(Image.fromarray(plate[y : y + 112, x : x + 112]).resize((224, 224))) for y, x in [(252, 0), (364, 0)]
    ]
    sem += [np.asarray(Image.fromarray(plate[886:942, x : x + 56]).resize((224, 224), Image.NEAREST)) for x in (0, 280)]
    sem.append(plate[224:448, 224:448])  # the sieve plate itself: informative
    patches = np.stack(cells + sem)
    out = tmp_path / "out"
    write_patch_store(out, patches)
    manifest = read_manifest(out / "manifest.parquet")
    manifest["source"] = ["vnc"] * len(cells) + ["sem_plate"] * len(sem)
    probs = make_filter("stats")(patches)
    manifest["informative_prob"] = probs
    manifest["kept"] = probs >= 0.5
    manifest["reason"] = np.where(probs >= 0.5, "", "uninformative")
    write_manifest(manifest, out / "manifest.parquet")
    return out, manifest


def _images(fragment: str) -> list[np.ndarray]:
    return [
        np.asarray(Image.open(io.BytesIO(base64.b64decode(b))))
        for b in re.findall(r"data:image/png;base64,([A-Za-z0-9+/=]+)", fragment)
    ]


def test_section_shows_kept_and_dropped_per_source(filtered_build):
    out, manifest = filtered_build
    assert manifest.groupby("source")["kept"].sum().to_dict() == {"sem_plate": 1, "vnc": 6}
    html = filter_report_section(out, manifest, per_source=12, columns=4, tile=64)
    assert "<h2>Uninformative-patch filter</h2>" in html and "4 patch(es) dropped" in html
    assert "vnc<br>6 kept, 0 dropped" in html and "sem_plate<br>1 kept, 4 dropped" in html
    images = _images(html)
    # vnc: kept montage only (its dropped cell says 'none'); sem_plate: kept and dropped.
    assert len(images) == 3 and html.count("<i>none</i>") == 1
    # Montage widths follow the number of patches shown: 4 columns of 64 px (+2 px gaps).
    assert images[0].shape == (2 * 64 + 2, 4 * 64 + 3 * 2)
    assert images[2].shape == (64, 4 * 64 + 3 * 2)


def test_section_without_filter_column(filtered_build):
    out, manifest = filtered_build
    html = filter_report_section(out, manifest.drop(columns=["informative_prob"]))
    assert "not run" in html and "data:image" not in html

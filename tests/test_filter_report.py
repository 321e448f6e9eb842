"""The curation parts of report.html - the filter section, the histogram of scores and the
Lorenz curves - on a store of real patches filtered by the label-free rules."""

from __future__ import annotations

import base64
import io
import re

import numpy as np
import pytest
import tifffile
from PIL import Image

from cemcurate.charts import curves_image, histogram_image
from cemcurate.dedup.inequality import gini, lorenz_curve
from cemcurate.filtering.filters import DECIDED_BY, make_filter
from cemcurate.filtering.report import filter_report_section
from cemcurate.manifest import read_manifest, write_manifest
from cemcurate.report import curation_section
from cemcurate.store import ShardReader, write_patch_store


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
    probs, deciders = make_filter("stats").decide(patches)
    manifest["informative_prob"] = probs
    manifest["decided_by"] = np.asarray(DECIDED_BY, object)[deciders]
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
    assert "vnc<br>6 kept, 0 dropped (0%)<br>median" in html and "sem_plate<br>1 kept, 4 dropped" in html
    # The two enlarged background crops are uniform, the two data-bar crops overlays.
    assert "dropped by: uniform 2, overlay 2" in html or "dropped by: overlay 2, uniform 2" in html
    images = _images(html)
    # sem_plate first (the most dropped): kept (1) and dropped (4); vnc: kept only ('none' dropped).
    assert len(images) == 3 and html.count("<i>none</i>") == 1
    assert html.index("sem_plate<br>") < html.index("vnc<br>")
    # Montage sizes follow the number of patches shown: up to 4 columns of 64 px (+2 px gaps).
    assert images[0].shape == (64, 64) and images[1].shape == (64, 4 * 64 + 3 * 2)
    assert images[2].shape == (2 * 64 + 2, 4 * 64 + 3 * 2)


def test_section_without_filter_column(filtered_build):
    out, manifest = filtered_build
    html = filter_report_section(out, manifest.drop(columns=["informative_prob"]))
    assert "not run" in html and "data:image" not in html


def test_montages_follow_the_scores_lowest_first(filtered_build):
    """With continuous scores (a classifier's), each side shows patches evenly spread over the
    source's score order, lowest first: here all 6 VNC tiles with scores given in reverse."""
    out, manifest = filtered_build
    scored = manifest.copy()
    vnc = (scored["source"] == "vnc").to_numpy()
    scored.loc[vnc, "informative_prob"] = np.linspace(0.99, 0.6, vnc.sum(), dtype=np.float32)  # last lowest
    html = filter_report_section(out, scored[vnc], per_source=6, columns=6, tile=64)
    montage = _images(html)[0]
    tiles = [montage[:, i * 66 : i * 66 + 64] for i in range(6)]
    stored = ShardReader(out, 224).read(
        manifest.loc[vnc, "shard"].to_numpy(), manifest.loc[vnc, "shard_row"].to_numpy()
    )
    expected = [np.asarray(Image.fromarray(p).resize((64, 64), Image.BILINEAR)) for p in stored[::-1]]
    assert all(np.array_equal(a, b) for a, b in zip(tiles, expected))


def test_many_sources_get_montages_for_the_most_dropped_and_a_line_each_for_the_rest(filtered_build):
    out, manifest = filtered_build
    many = manifest.copy()
    many["source"] = [f"image_{i:02d}" for i in range(len(many))]  # one patch per source
    html = filter_report_section(out, many, per_source=4, max_sources=3)
    dropped = many.loc[many["reason"] == "uninformative", "source"].tolist()
    assert len(dropped) == 4 and "Montages for the 3 sources with the most dropped patches; the other 8" in html
    montaged, listed = html.split("<th>other sources</th>")
    assert sum(name in montaged for name in dropped) == 3  # three of the four with a drop
    assert all(name in montaged or name in listed for name in many["source"])
    assert len(_images(montaged)) == 3 and not _images(listed)  # one dropped montage each, 'none' kept


def test_curation_section_histogram_and_lorenz(filtered_build):
    out, manifest = filtered_build
    manifest = manifest.assign(duplicate=False)  # a build's manifest has the column; this store none
    html = curation_section(manifest, threshold=0.5)
    assert "11 deduplicated patches scored; 4 (36%) below the threshold 0.5, dropped" in html
    by_source = manifest.groupby("source")
    kept = by_source["kept"].sum().to_numpy(float)
    assert f"black: kept (Gini {gini(kept):.2f})" in html and f"raw (Gini {gini(by_source.size()):.2f})" in html
    histogram, lorenz = _images(html)
    assert histogram.shape == (180, 420) and lorenz.shape == (280, 300)


def test_histogram_bars_stand_where_the_values_are():
    image = histogram_image(np.array([0.02] * 10 + [0.97] * 5 + [np.nan]), bins=20, size=(420, 180))
    left, top, right, bottom = 44, 22, 420 - 12, 180 - 34
    width = (right - left) / 20
    bar_rows = lambda b: (image[top + 1 : bottom - 1, int(left + (b + 0.5) * width)] == 140).sum()  # noqa: E731
    full, half = bar_rows(0), bar_rows(19)
    assert full > 0 and half == pytest.approx(full / 2, abs=2)  # 10 vs 5 values
    assert all(bar_rows(b) == 0 for b in range(1, 19))
    # One patch among thousands still draws a bar (it used to fail: a rectangle of negative height).
    rare = histogram_image(np.array([0.02] * 5000 + [0.55]), bins=20, size=(420, 180))
    assert (rare[top + 1 : bottom - 1, int(left + 11.5 * width)] == 140).sum() >= 1


def test_lorenz_of_equal_sources_is_the_diagonal():
    image = curves_image([lorenz_curve(np.ones(4))], size=(300, 280))
    left, top, right, bottom = 44, 22, 300 - 12, 280 - 34
    for t in (0.25, 0.5, 0.75):  # the black curve runs on the diagonal
        x, y = int(left + t * (right - left)), int(round(bottom - t * (bottom - top)))
        assert (image[y - 2 : y + 3, x] == 0).any()

"""cemcurate build end to end on real EM data, with bad files mixed in."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pandas as pd
import pytest
import tifffile

import cemcurate.build.cut as cut_module
import cemcurate.build.merge as merge_module
import cemcurate.build.orchestrate as orchestrate
from cemcurate import open_patches
from cemcurate.build import BuildConfig, build
from cemcurate.cli import main
from cemcurate.dedup.preview import boundary_pairs, patch_pixels
from cemcurate.dhash import dhash64, dhash_hex
from cemcurate.filtering.filters import DECIDED_BY, make_filter
from cemcurate.sources import SourceSpec
from cemcurate.store import ShardReader


def tiles(length: int, patch: int = 224, min_edge: int = 112) -> int:
    return length // patch + (length % patch >= min_edge)


def make_raw(root: Path, data_root: Path) -> Path:
    """A RAW folder of real files (symlinked) with a sidecar."""
    raw = root / "raw"
    (raw / "vnc").mkdir(parents=True)
    for i in range(6):  # 6 sections keep the test fast
        os.symlink(data_root / f"drosophila_vnc_gerhard/stack1/raw/{i:02d}.tif", raw / "vnc" / f"{i:02d}.tif")
    (raw / "neuroproof").mkdir()
    for p in sorted((data_root / "neuroproof_flyem/training_sample2/grayscale_maps").glob("*.png")):
        os.symlink(p, raw / "neuroproof" / p.name)
    os.symlink(data_root / "sem_plate_databar/plateImage2D.tif", raw / "plate.tif")
    os.symlink(data_root / "cryoet_tomo_napari_bio/tomo.tif", raw / "tomo.tif")
    os.symlink(data_root / "mrcfile_testdata/EMD-3001.map", raw / "emd3001.map")
    (raw / "notes.md").write_text("not an image")
    (raw / "cemcurate.yaml").write_text(
        "sources:\n"
        "  - {path: 'vnc/*.tif', stack: true, voxel_size: [50, 4.6, 4.6]}\n"
        "  - {path: 'neuroproof/*.png', stack: true, voxel_size: [10, 10, 10]}\n"
    )
    return raw


@pytest.fixture(scope="module")
def built(tmp_path_factory, data_root):
    root = tmp_path_factory.mktemp("build")
    raw = make_raw(root, data_root)
    out = root / "out"
    summary = build(raw, out, BuildConfig(workers=1), progress=False)
    return raw, out, summary


def test_patch_counts_follow_the_rules(built):
    raw, out, summary = built
    m = pd.read_parquet(out / "manifest.parquet")
    counts = m.groupby("source").size().to_dict()
    # VNC: 1024^2 sections, anisotropic -> xy only, 5x5 tiles (4 full + a 128 px edge).
    assert counts["vnc"] == 6 * tiles(1024) ** 2 == 150
    # neuroproof: isotropic 250^3 -> three planes, one 224 tile per 250x250 section.
    assert counts["neuroproof"] == 3 * 250 * tiles(250) ** 2 == 750
    assert set(m[m.source == "neuroproof"].plane) == {"xy", "xz", "yz"}
    # SEM plate 943 x 1024: 4 x 5 tiles.
    assert counts["plate.tif"] == tiles(943) * tiles(1024) == 20
    # Tomogram (101, 135, 135) float32 with unknown spacing: xy only, one resized 135 px crop per slice.
    assert counts["tomo.tif"] == 101
    assert "emd3001.map" not in counts  # (25, 43, 73) is smaller than the 112 px minimum edge
    src = pd.read_parquet(out / "sources.parquet").set_index("source")
    assert src.loc["tomo.tif", "planes"] == "xy" and "unknown" in src.loc["tomo.tif", "notes"]
    assert src.loc["tomo.tif", "dtype"] == "float32" and np.isfinite(src.loc["tomo.tif", "window_low"])
    assert src.loc["neuroproof", "planes"] == "xy,xz,yz" and src.loc["neuroproof", "voxel_size_from"] == "sidecar"
    assert "smaller than min-edge" in src.loc["emd3001.map", "notes"]
    assert src.loc["notes.md", "status"] == "skipped"
    assert not summary.failed


def test_full_crops_are_bit_identical_to_source_pixels(built, data_root):
    raw, out, _ = built
    store = open_patches(out)
    rows = store.manifest
    assert len(store) == int(pd.read_parquet(out / "manifest.parquet")["kept"].sum())
    vnc = rows[(rows.source == "vnc") & (rows.h == 224) & (rows.w == 224)]
    assert len(vnc) > 50
    for i in vnc.index[::7]:
        r = rows.loc[i]
        image = iio.imread(raw / r.file)
        assert r.file == f"vnc/{r.slice:02d}.tif"
        assert np.array_equal(store[i], image[r.y : r.y + 224, r.x : r.x + 224])
    # An xz patch of the isotropic volume equals the same cut of the stacked pngs.
    npf = rows[(rows.source == "neuroproof") & (rows.plane == "xz")].iloc[0]
    volume = np.stack([iio.imread(p) for p in sorted((raw / "neuroproof").glob("*.png"))[:224]])
    i = int(np.flatnonzero(rows.patch_id == npf.patch_id)[0])
    assert np.array_equal(store[i], volume[npf.y : npf.y + 224, npf.slice, npf.x : npf.x + 224])


def test_dedup_columns_are_consistent(built):
    _, out, _ = built
    m = pd.read_parquet(out / "manifest.parquet")
    assert m["dhash"].str.len().eq(16).all()
    dup = m[m.duplicate]
    assert (dup.reason == "duplicate").all() and not dup.kept.any() and (dup.shard_row == -1).all()
    ex = m[~m.duplicate]
    assert (ex.group == ex.patch_id).all()
    assert set(dup.group) <= set(ex.patch_id)
    # Adjacent 10 nm FIB-SEM sections are near-duplicates: the isotropic volume shrinks a lot.
    npf = m[m.source == "neuroproof"]
    assert npf.duplicate.mean() > 0.5


def test_resume_reuses_sources_and_adds_new_files(built, tmp_path, data_root):
    raw, out, _ = built
    work = tmp_path / "out"
    shutil.copytree(out, work)
    before = pd.read_parquet(work / "manifest.parquet")
    again = build(raw, work, BuildConfig(workers=1), progress=False)
    assert again.reused == again.n_sources
    pd.testing.assert_frame_equal(pd.read_parquet(work / "manifest.parquet"), before)
    os.symlink(data_root / "isbi2012_unet/train/image/0.png", raw / "isbi0.png")
    try:
        added = build(raw, work, BuildConfig(workers=1), progress=False)
        after = pd.read_parquet(work / "manifest.parquet")
        assert added.reused == again.n_sources
        assert (after.source == "isbi0.png").sum() == 4
        old = after[after.source != "isbi0.png"].reset_index(drop=True)
        pd.testing.assert_frame_equal(old, before)  # ids and rows of old sources unchanged
        assert after[after.source == "isbi0.png"].patch_id.min() > before.patch_id.max()
    finally:
        (raw / "isbi0.png").unlink()


def test_interrupted_build_keeps_old_outputs_and_resumes(built, tmp_path, monkeypatch):
    raw, out, _ = built
    work = tmp_path / "out"
    shutil.copytree(out, work)
    before = pd.read_parquet(work / "manifest.parquet")
    real, done = orchestrate.process_source, []

    def interrupted(spec, *args, **kwargs):
        if len(done) == 2:
            raise KeyboardInterrupt  # Ctrl-C while the third source is processed
        done.append(spec.name)
        return real(spec, *args, **kwargs)

    monkeypatch.setattr(orchestrate, "process_source", interrupted)
    changed = BuildConfig(workers=1, max_hamming=5)  # new settings: every source must be redone
    with pytest.raises(KeyboardInterrupt):
        build(raw, work, changed, progress=False)
    pd.testing.assert_frame_equal(pd.read_parquet(work / "manifest.parquet"), before)
    store = open_patches(work)  # the old store still matches the old manifest, pixel for pixel
    assert dhash_hex(dhash64(store[:])) == store.manifest["dhash"].tolist()
    monkeypatch.setattr(orchestrate, "process_source", real)
    resumed = build(raw, work, changed, progress=False)
    assert resumed.reused == 2 and not resumed.failed
    assert not list(work.glob("**/.*.tmp"))


def test_parallel_build_equals_serial(built, tmp_path):
    raw, out, _ = built
    par = build(raw, tmp_path / "par", BuildConfig(workers=2), progress=False)
    assert not par.failed
    a = pd.read_parquet(out / "manifest.parquet").drop(columns=["shard"])
    b = pd.read_parquet(tmp_path / "par" / "manifest.parquet").drop(columns=["shard"])
    pd.testing.assert_frame_equal(a, b)


def test_the_merge_reads_back_only_the_parts_it_reuses(built, tmp_path, monkeypatch):
    """Fresh parts come back from the workers with their rows; reused ones are read from disk.
    Either way the manifest is the same."""
    raw, out, _ = built
    reads = []
    real_read = merge_module.pd.read_parquet

    def counting(path, *args, **kwargs):
        if "columns" not in kwargs:  # the resume check reads a part's shard columns only
            reads.append(Path(path).name)
        return real_read(path, *args, **kwargs)

    monkeypatch.setattr(merge_module.pd, "read_parquet", counting)
    fresh = tmp_path / "fresh"
    build(raw, fresh, BuildConfig(workers=2), progress=False)
    assert not [name for name in reads if name.endswith(".parquet")]
    again = build(raw, fresh, BuildConfig(workers=2), progress=False)
    assert again.reused == again.n_sources and len(reads) == again.n_sources
    expected = pd.read_parquet(out / "manifest.parquet").drop(columns=["shard"])
    pd.testing.assert_frame_equal(real_read(fresh / "manifest.parquet").drop(columns=["shard"]), expected)


def test_the_pool_takes_the_largest_sources_first(tmp_path):
    sizes = {"small.tif": 10, "large.tif": 1000, "medium.tif": 100}
    specs = []
    for name, size in sizes.items():
        (tmp_path / name).write_bytes(b"x" * size)
        specs.append(SourceSpec(name=name, files=[tmp_path / name]))
    specs.append(SourceSpec(name="gone.tif", files=[tmp_path / "gone.tif"]))  # fails in its worker
    order = [spec.name for spec in orchestrate._largest_first(specs)]
    assert order == ["large.tif", "medium.tif", "small.tif", "gone.tif"]


def test_bad_files_fail_alone_with_clear_messages(tmp_path, data_root):
    raw = tmp_path / "raw"
    raw.mkdir()
    good = iio.imread(data_root / "isbi2012_unet/train/image/5.png")
    iio.imwrite(raw / "good.png", good)
    data = (data_root / "drosophila_vnc_gerhard/stack1/raw/00.tif").read_bytes()
    (raw / "truncated.tif").write_bytes(data[: len(data) // 3])
    (raw / "empty.tif").write_bytes(b"")
    (raw / "text.png").write_text("this is not a png")
    (raw / "data.xyz").write_text("?")
    iio.imwrite(raw / "one_pixel.png", good[:1, :1])
    iio.imwrite(raw / "constant.png", np.full((300, 300), 77, np.uint8))
    nan_vol = good[None, :256, :256].astype(np.float32).repeat(3, 0)
    nan_vol[1, 10:50, 10:50] = np.nan
    tifffile.imwrite(raw / "nan_float.tif", nan_vol, photometric="minisblack")
    tifffile.imwrite(raw / "four_d.tif", np.zeros((2, 3, 240, 240), np.uint8), photometric="minisblack")
    mrc = (data_root / "mrcfile_testdata/EMD-3197.map").read_bytes()
    (raw / "bad_header.mrc").write_bytes(b"\x00" * 212 + mrc[212:])
    out = tmp_path / "out"
    code = main(["build", str(raw), str(out), "--workers", "1", "--quiet"])
    assert code == 1
    src = pd.read_parquet(out / "sources.parquet").set_index("source")
    failed = src[src.status == "failed"]
    assert set(failed.index) == {"truncated.tif", "empty.tif", "text.png", "four_d.tif", "bad_header.mrc"}
    for name, error in failed["error"].items():
        assert name in error, (name, error)
    assert src.loc["data.xyz", "status"] == "skipped"
    m = pd.read_parquet(out / "manifest.parquet")
    counts = m.groupby("source").size().to_dict()
    assert counts["good.png"] == 4 and counts["constant.png"] == 1 and counts["nan_float.tif"] == 3
    assert "one_pixel.png" not in counts and src.loc["one_pixel.png", "status"] == "ok"
    # The good source's pixels were not touched by the failures around it.
    store = open_patches(out)
    g = store.manifest.reset_index(drop=True)
    i = int(np.flatnonzero((g.source == "good.png") & (g.y == 0) & (g.x == 0))[0])
    assert np.array_equal(store[i], good[:224, :224])
    assert (out / "report.html").read_text().count("failed") >= 1


def test_export_writes_one_file_per_kept_patch(built, tmp_path):
    _, out, _ = built
    assert main(["export", str(out), str(tmp_path / "png"), "--format", "png"]) == 0
    store = open_patches(out)
    files = sorted((tmp_path / "png").glob("*.png"))
    assert len(files) == len(store)
    first = iio.imread(files[0])
    assert np.array_equal(first, store[0])


def test_source_keys_are_unique_for_similar_names():
    a = SourceSpec("a/b c.tif", [Path("x")])
    b = SourceSpec("a/b_c.tif", [Path("y")])
    assert a.key != b.key


def test_dedup_preview_recuts_duplicates_from_the_source(built):
    _, out, _ = built
    m = pd.read_parquet(out / "manifest.parquet")
    stored = (
        m[(m.shard_row >= 0) & m.source.isin(["vnc", "neuroproof", "tomo.tif"])].groupby(["source", "plane"]).head(2)
    )
    from_store = patch_pixels(out, stored)
    recut = patch_pixels(out, stored.assign(shard_row=-1))  # force the re-cut path
    assert np.array_equal(from_store, recut)
    pairs = boundary_pairs(m, 11)
    hashes = m.dhash.apply(lambda h: int(h, 16)).to_numpy()
    for a, b, d in pairs.itertuples(index=False):
        assert bin(int(hashes[a]) ^ int(hashes[b])).count("1") == d
        assert m.source.iat[a] == m.source.iat[b]
    assert main(["dedup-preview", str(out), "--groups", "3"]) == 0
    page = (out / "dedup_preview.html").read_text()
    assert page.count("exemplar") >= 3 and "Gini" in page and (out / "lorenz.png").stat().st_size > 0


def test_filter_stage_marks_uninformative_and_rescoring_reuses_sources(tmp_path, data_root):
    raw = tmp_path / "raw"
    raw.mkdir()
    os.symlink(data_root / "isbi2012_unet/train/image/7.png", raw / "isbi7.png")
    os.symlink(data_root / "sem_plate_databar/plateImage2D.tif", raw / "plate.tif")
    # Empty resin/padding: the real image's median grey with faint noise, 448 x 448 (4 patches).
    image = iio.imread(data_root / "isbi2012_unet/train/image/7.png")
    flat = np.clip(np.median(image) + np.random.default_rng(0).normal(0, 1, (448, 448)), 0, 255).astype(np.uint8)
    iio.imwrite(raw / "resin.png", flat)
    work = tmp_path / "out"
    build(raw, work, BuildConfig(workers=1), progress=False)
    m = pd.read_parquet(work / "manifest.parquet")
    stored = (m.shard_row >= 0).to_numpy()
    # Each stored patch carries the stats filter's score of its own stored pixels: a score in
    # (0, 1) that ranks them, and kept / reason follow the 0.5 threshold.
    pixels = ShardReader(work, 224).read(m.loc[stored, "shard"].to_numpy(), m.loc[stored, "shard_row"].to_numpy())
    probs = m.loc[stored, "informative_prob"].to_numpy()
    np.testing.assert_array_equal(probs, make_filter("stats")(pixels))
    assert ((probs > 0) & (probs < 1)).all() and len(np.unique(probs)) > 20
    assert m.loc[~stored, "informative_prob"].isna().all()
    informative = m.informative_prob.fillna(0).to_numpy() >= 0.5
    np.testing.assert_array_equal(m.kept.to_numpy(), ~m.duplicate.to_numpy() & informative)
    expected_reason = np.where(m.duplicate, "duplicate", np.where(informative, "", "uninformative"))
    assert m.reason.tolist() == expected_reason.tolist()
    resin = m[m.source == "resin.png"]
    assert (resin.reason.isin(["uninformative", "duplicate"])).all() and not resin.kept.any()
    assert (resin.reason == "uninformative").any()
    assert m[m.source == "isbi7.png"].kept.all()
    assert (m[m.kept].informative_prob >= 0.5).all()
    # decided_by names the rule that dropped a patch (the resin is uniform), 'rules' for the
    # patches no rule dropped, '' for the near-duplicates not stored.
    reasons = make_filter("stats")  # the same rules, asked directly
    assert m.columns.get_loc("decided_by") == m.columns.get_loc("informative_prob") + 1
    assert (m.loc[~stored, "decided_by"] == "").all()
    assert set(m.loc[stored & (m.informative_prob >= 0.5).to_numpy(), "decided_by"]) == {"rules"}
    dropped = stored & (m.informative_prob < 0.5).to_numpy()
    assert set(m.loc[dropped & (m.source == "resin.png").to_numpy(), "decided_by"]) == {"uniform"}
    codes = reasons.decide(pixels)[1]
    assert m.loc[stored, "decided_by"].tolist() == [DECIDED_BY[c] for c in codes]
    store = open_patches(work)
    assert "resin.png" not in set(store.manifest.source)
    none = build(raw, work, BuildConfig(workers=1, filter="none"), progress=False)
    assert none.reused == none.n_sources  # only the cheap filter stage ran again
    m2 = pd.read_parquet(work / "manifest.parquet")
    assert m2.kept.sum() == (~m2.duplicate).sum() and (m2.reason != "uninformative").all()
    assert len(list((work / "parts" / "filter").iterdir())) == 2  # one score cache per filter
    assert "Uninformative-patch filter" in (work / "report.html").read_text()


def test_growing_stack_is_deduplicated_incrementally(tmp_path, data_root, monkeypatch):
    raw = tmp_path / "raw"
    (raw / "vnc").mkdir(parents=True)
    files = [data_root / f"drosophila_vnc_gerhard/stack1/raw/{i:02d}.tif" for i in range(6)]
    for i in (0, 2, 4):  # the stack's first acquisition; 1, 3 and 5 arrive later, in between
        os.symlink(files[i], raw / "vnc" / files[i].name)
    (raw / "cemcurate.yaml").write_text("- {path: 'vnc/*.tif', stack: true, voxel_size: [50, 4.6, 4.6]}\n")
    out = tmp_path / "out"
    cfg = BuildConfig(workers=1, filter="none")
    build(raw, out, cfg, progress=False)
    before = pd.read_parquet(out / "manifest.parquet")
    for i in (1, 3, 5):
        os.symlink(files[i], raw / "vnc" / files[i].name)
    hashed = []
    real_dhash = cut_module.dhash64
    monkeypatch.setattr(cut_module, "dhash64", lambda p, *a, **k: hashed.append(len(p)) or real_dhash(p, *a, **k))
    build(raw, out, cfg, progress=False)
    after = pd.read_parquet(out / "manifest.parquet")
    assert sum(hashed) == 3 * 25  # only the new files' patches were hashed
    assert len(after) == 6 * 25
    old = after[after.patch_id.isin(before.patch_id)].sort_values("patch_id").reset_index(drop=True)
    # Old patches keep ids, hashes and groups; their slice numbers follow the new order.
    pd.testing.assert_frame_equal(
        old[["patch_id", "file", "y", "x", "dhash", "group", "duplicate"]],
        before[["patch_id", "file", "y", "x", "dhash", "group", "duplicate"]],
    )
    assert (old.slice.to_numpy() == [int(f[-6:-4]) for f in old.file]).all()
    new = after[~after.patch_id.isin(before.patch_id)]
    assert set(new.file) == {f"vnc/{i:02d}.tif" for i in (1, 3, 5)}
    # Every kept patch is farther than the threshold from every other kept patch of the source.
    ex = after[~after.duplicate]
    h = np.array([int(x, 16) for x in ex.dhash], dtype=np.uint64)
    d = np.bitwise_count(h[:, None] ^ h[None, :])
    np.fill_diagonal(d, 64)
    assert d.min() > 11
    dup = after[after.duplicate].merge(
        after[["patch_id", "dhash"]], left_on="group", right_on="patch_id", suffixes=("", "_ex")
    )
    assert all(bin(int(a, 16) ^ int(b, 16)).count("1") <= 11 for a, b in zip(dup.dhash, dup.dhash_ex))
    store = open_patches(out)  # store and manifest agree pixel for pixel
    assert dhash_hex(dhash64(store[:])) == store.manifest["dhash"].tolist()
    src = pd.read_parquet(out / "sources.parquet").set_index("source")
    assert "extended incrementally by 3 file(s)" in src.loc["vnc", "notes"]

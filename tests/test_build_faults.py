"""`cemcurate build` under faults: OUT is never left broken, bad sidecars are refused up front,
and interruptions, crashes and closed pipes end cleanly. Each case of issue 13 has a test
that reproduces it; all run on real EM images (ISBI-2012 ssTEM sections, VNC slices).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pandas as pd
import pytest

from cemcurate.build import BuildConfig, build
from cemcurate.build.check import check_build
from cemcurate.build.lock import BuildLock, BuildLockedError
from cemcurate.cli import main
from cemcurate.commit import commit, finish_interrupted_commit, stage
from cemcurate.layout import BuildLayout
from cemcurate.store import open_patches

REPO = Path(__file__).resolve().parents[1]
CFG = BuildConfig(workers=1, filter="none", montage_patches=4)


@pytest.fixture
def raw(tmp_path, data_root) -> Path:
    """Three real 512 x 512 ssTEM sections as single-image sources."""
    folder = tmp_path / "raw"
    folder.mkdir()
    for i in range(3):
        shutil.copy(data_root / f"isbi2012_unet/train/image/{i}.png", folder / f"sec{i}.png")
    return folder


def _state(out: Path) -> tuple[str, str, str]:
    """What a committed build is: its manifest, source table and store.json (as text)."""
    layout = BuildLayout(out)
    manifest = pd.read_parquet(layout.manifest).to_csv(index=False)
    return manifest, pd.read_parquet(layout.sources).to_csv(index=False), layout.store_info.read_text()


def _run(args: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "cemcurate.cli", *args], capture_output=True, text=True, cwd=REPO, **kw
    )


# ------------------------------------------------------------------- 1: OUT never broken


def test_a_source_that_leaves_and_returns_is_rebuilt_and_out_stays_valid(raw, tmp_path):
    out = tmp_path / "out"
    build(raw, out, CFG, progress=False)
    ids = set(open_patches(out).manifest["patch_id"])
    aside = tmp_path / "sec1.png"
    shutil.move(raw / "sec1.png", aside)
    build(raw, out, CFG, progress=False)
    assert "sec1.png" not in set(open_patches(out).manifest["source"])
    shutil.move(aside, raw / "sec1.png")
    summary = build(raw, out, CFG, progress=False)
    assert not summary.failed and check_build(out).ok
    assert set(open_patches(out).manifest["patch_id"]) == ids  # the returning source keeps its ids
    # The same by excluding it in the sidecar and including it again.
    (raw / "cemcurate.yaml").write_text("- {path: sec1.png, exclude: true}\n")
    build(raw, out, CFG, progress=False)
    (raw / "cemcurate.yaml").write_text("- {path: sec1.png, exclude: false}\n")
    assert not build(raw, out, CFG, progress=False).failed
    assert check_build(out).ok and len(open_patches(out)) == len(ids)


def test_a_part_whose_shard_is_lost_is_redone_with_a_note(raw, tmp_path):
    out = tmp_path / "out"
    build(raw, out, CFG, progress=False)
    layout = BuildLayout(out)
    manifest = pd.read_parquet(layout.manifest)
    shard = layout.shard(manifest["shard"].iloc[0])
    shard.unlink()
    result = check_build(out)
    assert not result.ok and any("shard missing" in p for p in result.problems)
    with pytest.raises(ValueError, match="shard missing.*cemcurate check .* --repair"):
        open_patches(out)
    summary = build(raw, out, CFG, progress=False)
    assert summary.reused == 2 and any("its shard" in n and "is missing" in n for n in summary.notes)
    assert check_build(out).ok and shard.is_file()
    sources = pd.read_parquet(layout.sources).set_index("source")
    assert "redone" in sources.loc[manifest["source"].iloc[0], "notes"]


def test_check_detects_deleted_truncated_and_overrun_shards_and_repair_fixes_them(raw, tmp_path):
    out = tmp_path / "out"
    build(raw, out, CFG, progress=False)
    layout = BuildLayout(out)
    assert check_build(out).ok
    names = sorted(pd.read_parquet(layout.manifest)["shard"].unique())
    layout.shard(names[0]).unlink()
    with open(layout.shard(names[1]), "r+b") as fh:  # cut short by a patch and a half
        fh.truncate(layout.shard(names[1]).stat().st_size - 224 * 224 * 3 // 2)
    data = bytearray(layout.shard(names[2]).read_bytes())  # same size, other pixels
    data[: 224 * 224] = bytes(224 * 224)
    layout.shard(names[2]).write_bytes(bytes(data))
    result = check_build(out)
    assert result.bad_shards == set(names)
    text = "\n".join(result.problems)
    assert "shard missing" in text and "not a whole number of" in text and "do not match their dHash" in text
    # A manifest row pointing past the end of a shard whose size is whole.
    manifest = pd.read_parquet(layout.manifest)
    assert main(["check", str(out), "--repair", "--quiet"]) == 0
    assert check_build(out).ok
    manifest = pd.read_parquet(layout.manifest)
    stored = manifest.index[manifest["shard_row"] >= 0][0]
    manifest.loc[stored, "shard_row"] = 10_000
    manifest.to_parquet(layout.manifest, index=False)
    assert any("points at row 10000" in p for p in check_build(out).problems)


def test_a_second_build_on_the_same_out_is_refused_and_out_stays_valid(raw, tmp_path):
    out = tmp_path / "out"
    build(raw, out, CFG, progress=False)
    before = _state(out)
    with BuildLock(BuildLayout(out)):
        with pytest.raises(BuildLockedError, match=rf"another build is writing this folder \(pid {os.getpid()}"):
            build(raw, out, CFG, progress=False)
        done = _run(["build", str(raw), str(out), "--quiet", "--workers", "1", "--filter", "none"])
        assert done.returncode == 2 and "another build is writing this folder" in done.stderr
        assert "--wait" in done.stderr and "Traceback" not in done.stderr
    assert _state(out) == before and check_build(out).ok


def _killed_build(raw: Path, out: Path, patch: str) -> subprocess.CompletedProcess:
    """Run the build in a child process whose ``patch`` code (run first) kills it with SIGKILL."""
    script = (
        textwrap.dedent(f"""
        import os, signal, sys
        sys.path.insert(0, {str(REPO)!r})
        import cemcurate.build.orchestrate as orchestrate
        from cemcurate.build import BuildConfig
        def die():
            os.kill(os.getpid(), signal.SIGKILL)
    """)
        + textwrap.dedent(patch)
        + textwrap.dedent(f"""
        orchestrate.build({str(raw)!r}, {str(out)!r}, BuildConfig(workers=1, filter="none", montage_patches=4),
                          progress=False)
    """)
    )
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)


def test_kill_9_at_every_commit_step_leaves_the_old_or_the_new_outputs(raw, tmp_path):
    out = tmp_path / "out"
    build(raw, out, CFG, progress=False)
    old = _state(out)
    shutil.copy(raw / "sec0.png", raw / "sec9.png")  # a new source: the next build changes every output
    reference = tmp_path / "reference"
    shutil.copytree(out, reference)
    build(raw, reference, CFG, progress=False)
    new = _state(reference)
    assert new != old
    # While the new outputs are being staged (before the point of no return): the old ones stay.
    staging = """
        real = orchestrate.write_report
        def write_report(*args, **kwargs):
            real(*args, **kwargs)
            die()
        orchestrate.write_report = write_report
    """
    # After READY, before rename k of the 5 (manifest, sources, store.json, config, report).
    renaming = """
        real_commit, done = orchestrate.commit, []
        def rename(src, dst):
            if len(done) == {k}:
                die()
            os.replace(src, dst)
            done.append(dst)
        orchestrate.commit = lambda layout, names: real_commit(layout, names, rename=rename)
    """
    for name, patch, expected in [("staging", staging, old)] + [
        (f"rename{k}", renaming.replace("{k}", str(k)), new) for k in range(5)
    ]:
        trial = tmp_path / name
        shutil.copytree(out, trial)
        proc = _killed_build(raw, trial, patch)
        assert proc.returncode == -signal.SIGKILL, proc.stderr
        result = check_build(trial)  # finishes a commit that passed its point of no return
        assert result.ok, (name, result.problems)
        assert _state(trial) == expected, name
        assert open_patches(trial).patch_ids.size > 0
        # The next build (the lock died with the killed one) completes to the uninterrupted result.
        build(raw, trial, CFG, progress=False)
        assert _state(trial) == new and check_build(trial).ok


def test_commit_protocol_leaves_old_or_new_at_every_rename(tmp_path):
    layout = BuildLayout(tmp_path / "out")
    layout.root.mkdir()
    names = ["a.txt", "b.txt", "c.txt"]
    for name in names:
        (layout.root / name).write_text("old")

    class Crash(Exception):
        pass

    for k in range(len(names) + 1):
        for name in names:
            (layout.root / name).write_text("old")
        stage(layout)
        for name in names:
            (layout.commit_dir / name).write_text("new")
        done = []

        def rename(src, dst, k=k, done=done):
            if len(done) == k:
                raise Crash
            os.replace(src, dst)
            done.append(dst)

        try:
            commit(layout, names, rename=rename)
        except Crash:
            assert k < len(names)
        finish_interrupted_commit(layout)
        assert {(layout.root / n).read_text() for n in names} == {"new"}
        assert not layout.commit_dir.exists()
    # Staged but not READY (a crash while writing the new files): the old set stays, untouched.
    stage(layout)
    (layout.commit_dir / "a.txt").write_text("half")
    assert not finish_interrupted_commit(layout)
    assert (layout.root / "a.txt").read_text() == "new"


# ------------------------------------------------------------------- 2, 3: the sidecar


@pytest.mark.parametrize(
    "entry,key,expected",
    [
        ("{path: sec0.png, invert: 'false'}", "invert", "true or false"),
        ("{path: sec0.png, exclude: 'false'}", "exclude", "true or false"),
        ("{path: 'sec*', stack: 'no'}", "stack", "true or false"),
        ("{path: sec0.png, voxel_size: [4, 4]}", "voxel_size", "three positive numbers"),
        ("{path: sec0.png, dataset: 3}", "dataset", "a key"),
    ],
)
def test_sidecar_values_are_type_checked_before_any_work(raw, tmp_path, entry, key, expected):
    out = tmp_path / "out"
    build(raw, out, CFG, progress=False)
    before = _state(out)
    (raw / "cemcurate.yaml").write_text(f"- {{path: sec2.png}}\n- {entry}\n")
    done = _run(["build", str(raw), str(out), "--quiet", "--workers", "1", "--filter", "none"])
    assert done.returncode == 2
    assert "cemcurate.yaml: entry 2 (path '" in done.stderr and f"'{key}' must be {expected}" in done.stderr
    assert "Traceback" not in done.stderr and done.stderr.count("\n") == 1
    assert _state(out) == before


def test_sidecar_entries_that_match_nothing_are_errors(raw, tmp_path):
    (raw / "cemcurate.yaml").write_text("- {path: 'sec*.png'}\n- {path: 'labels/*', exclude: true}\n")
    with pytest.raises(ValueError, match=r"1 sidecar entry match no file .*entry 2 \(path 'labels/\*'\)"):
        build(raw, tmp_path / "out", CFG, progress=False)
    assert not (tmp_path / "out").exists()
    summary = build(raw, tmp_path / "out", BuildConfig(workers=1, filter="none", allow_unmatched=True), progress=False)
    assert summary.n_sources == 3 and any("match no file" in n for n in summary.notes)
    done = _run(["build", str(raw), str(tmp_path / "out2"), "--quiet", "--workers", "1", "--allow-unmatched"])
    assert done.returncode == 0 and "note:" in done.stderr and "match no file" in done.stderr


def test_a_bare_folder_is_its_files_and_existing_names_match_literally(tmp_path, data_root):
    raw = tmp_path / "raw"
    (raw / "vnc_stack").mkdir(parents=True)
    for i in range(3):
        shutil.copy(data_root / f"drosophila_vnc_gerhard/stack1/raw/{i:02d}.tif", raw / "vnc_stack" / f"{i:02d}.tif")
    shutil.copy(data_root / "isbi2012_unet/train/image/0.png", raw / "scan[1].png")
    shutil.copy(data_root / "isbi2012_unet/train/image/1.png", raw / "scan1.png")
    (raw / "cemcurate.yaml").write_text(
        "- {path: vnc_stack, stack: true, voxel_size: [50, 4.6, 4.6]}\n- {path: 'scan[1].png', exclude: true}\n"
    )
    out = tmp_path / "out"
    summary = build(raw, out, CFG, progress=False)
    sources = pd.read_parquet(BuildLayout(out).sources).set_index("source")
    assert summary.n_sources == 2  # the stack, and scan1.png (the literal scan[1].png is excluded)
    assert sources.loc["vnc_stack", "voxel_size"] == "(50.0, 4.6, 4.6)" and bool(sources.loc["vnc_stack", "stack"])
    assert sources.loc["scan[1].png", "status"] == "skipped" and "scan1.png" in sources.index
    record = json.loads(sources.loc["vnc_stack", "sidecar"])
    assert record["entries"] == [1] and record["options"] == {"voxel_size": [50.0, 4.6, 4.6], "stack": True}
    assert sources.loc["scan1.png", "sidecar"] == ""


# ------------------------------------------------------------------- 4, 6: inputs


def test_out_inside_raw_is_not_curated(raw):
    out = raw / "out"
    first = build(raw, out, CFG, progress=False)
    assert main(["export", str(out), str(raw / "exported"), "--format", "png"]) == 0
    assert main(["dedup-preview", str(out)]) == 0  # writes out/lorenz.png
    second = build(raw, out, CFG, progress=False)
    assert second.n_sources == first.n_sources == 3 and second.reused == 3
    skipped = pd.read_parquet(BuildLayout(out).sources)
    skipped = skipped[skipped["status"] == "skipped"].set_index("source")["error"]
    assert skipped["out/"] == skipped["exported/"] == "a cemcurate output folder (not input)"


def test_an_empty_raw_gives_a_clear_message_and_an_empty_valid_out(tmp_path, capsys):
    (tmp_path / "raw").mkdir()
    (tmp_path / "raw" / "notes.txt").write_text("no images here")
    assert main(["build", str(tmp_path / "raw"), str(tmp_path / "out"), "--quiet"]) == 0
    err = capsys.readouterr().err
    assert "holds no file cemcurate reads (1 skipped)" in err and "Traceback" not in err
    assert check_build(tmp_path / "out").ok and len(open_patches(tmp_path / "out")) == 0


# ------------------------------------------------------------------- 5, 7: processes and messages


def test_workers_die_with_the_build(tmp_path, data_root):
    raw = tmp_path / "raw"
    raw.mkdir()
    for i in range(8):  # enough sources that both workers are busy when the parent is killed
        shutil.copy(data_root / f"drosophila_vnc_gerhard/stack1/raw/{i:02d}.tif", raw / f"{i:02d}.tif")
    proc = subprocess.Popen(
        [sys.executable, "-m", "cemcurate.cli", "build", str(raw), str(tmp_path / "out"), "--workers", "2", "--quiet"],
        cwd=REPO,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    parts = tmp_path / "out" / "parts"
    deadline = time.time() + 60
    while time.time() < deadline and not any(parts.glob("*.json")):  # workers are running
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    deadline = time.time() + 10
    while time.time() < deadline:
        try:
            os.killpg(proc.pid, 0)  # any process left in the build's group?
        except ProcessLookupError:
            break
        time.sleep(0.2)
    else:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail("worker processes outlived the killed build")


def test_errors_are_one_line_naming_the_file(raw, tmp_path, monkeypatch):
    import cemcurate.build.source as source

    def boom(*args, **kwargs):
        raise RuntimeError("decoder gave up\nat frame 3")

    monkeypatch.setattr(source, "cut_patches", boom)
    summary = build(raw, tmp_path / "out", CFG, progress=False)
    errors = pd.read_parquet(BuildLayout(tmp_path / "out").sources).set_index("source")["error"]
    assert set(summary.failed) == {"sec0.png", "sec1.png", "sec2.png"}
    assert errors["sec0.png"] == "sec0.png: RuntimeError: decoder gave up at frame 3"


def test_a_full_disk_names_the_file(raw, tmp_path, monkeypatch, capsys):
    import cemcurate.store as store

    def full(self, patches):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(store.ShardWriter, "append", full)
    out = tmp_path / "out"
    summary = build(raw, out, CFG, progress=False)
    error = summary.failed["sec0.png"]
    assert "No space left on device" in error and str(out / "parts" / "work") in error


def test_ctrl_c_stops_with_one_line_and_a_closed_stdout_is_not_an_error(raw, tmp_path, data_root):
    slow = tmp_path / "slow"
    slow.mkdir()
    for i in range(20):
        shutil.copy(data_root / f"drosophila_vnc_gerhard/stack1/raw/{i:02d}.tif", slow / f"{i:02d}.tif")
    proc = subprocess.Popen(
        [sys.executable, "-m", "cemcurate.cli", "build", str(slow), str(tmp_path / "out"), "--workers", "2", "--quiet"],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    deadline = time.time() + 60
    while time.time() < deadline and not any((tmp_path / "out" / "parts").glob("*.json")):
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C reaches the whole foreground group
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "Traceback" not in err
    assert "interrupted; outputs already written stay valid" in err and err.count("\n") == 1
    # `cemcurate build ... | head -c 1`: the reader goes away; the build still finishes, exit 0.
    done = subprocess.run(
        f"{sys.executable} -m cemcurate.cli build {raw} {tmp_path / 'out2'} --quiet --workers 1 | head -c 1",
        shell=True,
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert done.returncode == 0 and "Broken pipe" not in done.stderr and "Traceback" not in done.stderr
    assert check_build(tmp_path / "out2").ok

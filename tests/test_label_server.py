"""The labelling page and labels.csv: durability under kill -9, 4xx on bad input, loopback only, sheets."""

from __future__ import annotations

import argparse
import json
import os
import re
import select
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tifffile
from PIL import Image

from cemcurate.filtering.cli import add_label_command
from cemcurate.filtering.label_server import make_label_app, serve
from cemcurate.filtering.labels import LabelPool, append_labels, export_sheets, import_sheet, labels_path, read_labels
from cemcurate.manifest import read_manifest, write_manifest
from cemcurate.store import write_patch_store

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture()
def build(data_root, tmp_path):
    """A store of 16 real 224-px VNC tiles; ids 12-13 dropped as uninformative, 14-15 duplicates."""
    image = tifffile.imread(data_root / "drosophila_vnc_gerhard/stack1/raw/03.tif")
    patches = np.stack([image[y : y + 224, x : x + 224] for y in range(0, 896, 224) for x in range(0, 896, 224)])
    out = tmp_path / "out"
    write_patch_store(out, patches, source="vnc03")
    manifest = read_manifest(out / "manifest.parquet")
    manifest.loc[[12, 13], ["kept", "reason"]] = [False, "uninformative"]
    manifest.loc[[14, 15], ["kept", "reason", "shard_row"]] = [False, "duplicate", -1]
    write_manifest(manifest, out / "manifest.parquet")
    return out, patches


def test_pool_holds_deduplicated_patches(build):
    out, patches = build
    pool = LabelPool(out)
    # Filtered-out patches can be labelled (to correct the filter); duplicates cannot.
    assert pool.patch_ids.tolist() == list(range(14))
    np.testing.assert_array_equal(pool.patches([13, 2]), patches[[13, 2]])
    with pytest.raises(KeyError, match="15"):
        pool.patches([15])


def test_routes_reject_bad_requests(build):
    out, _ = build
    client = make_label_app(out, seed=0).test_client()
    page = client.get("/")
    assert page.status_code == 200 and b"cemcurate label" in page.data
    png = client.get("/patch/3.png")
    assert png.status_code == 200 and png.data[:4] == b"\x89PNG"
    assert client.get("/patch/15.png").status_code == 404  # a duplicate: not stored
    assert client.get("/patch/999.png").status_code == 404
    bad = [
        (dict(data="{not json", content_type="application/json"), 400),
        (dict(data='{"patch_id": 1, "label": 1}', content_type="text/plain"), 415),
        (dict(json=[1, 1]), 400),
        (dict(json={"patch_id": 1}), 400),
        (dict(json={"patch_id": 1, "label": 2}), 400),
        (dict(json={"patch_id": 1, "label": True}), 400),
        (dict(json={"patch_id": "1", "label": 1}), 400),
        (dict(json={"patch_id": 999, "label": 1}), 404),
        (dict(json={"patch_id": 15, "label": 0}), 404),
    ]
    for kwargs, code in bad:
        response = client.post("/api/label", **kwargs)
        assert response.status_code == code, (kwargs, response.status_code)
        assert "error" in response.get_json()
    assert client.get("/api/patches?start=-1").status_code == 400
    assert client.get("/api/patches?count=abc").status_code == 400
    assert client.get("/api/patches?count=100000").status_code == 400
    # Requests addressed to another host name (DNS rebinding) are refused.
    assert client.get("/", headers={"Host": "evil.example"}).status_code == 403
    # None of the bad requests wrote anything.
    assert not labels_path(out).exists()
    ok = client.post("/api/label", json={"patch_id": 1, "label": 0})
    assert ok.status_code == 200 and ok.get_json()["labelled"] == 1
    assert read_labels(labels_path(out))[["patch_id", "label"]].values.tolist() == [[1, 0]]


def test_reopening_shows_unlabelled_first(build):
    out, _ = build
    client = make_label_app(out, seed=0).test_client()
    first = client.get("/api/patches?start=0&count=5").get_json()["patches"]
    for i, item in enumerate(first):
        assert client.post("/api/label", json={"patch_id": item["patch_id"], "label": i % 2}).status_code == 200
    # Relabelling keeps the latest label.
    client.post("/api/label", json={"patch_id": first[0]["patch_id"], "label": 1})
    labelled = {item["patch_id"] for item in first}
    again = make_label_app(out, seed=0).test_client().get("/api/patches?start=0&count=14").get_json()
    ids = [item["patch_id"] for item in again["patches"]]
    assert sorted(ids) == list(range(14)) and again["unlabelled"] == 9
    assert not set(ids[:9]) & labelled and set(ids[9:]) == labelled
    labels = {item["patch_id"]: item["label"] for item in again["patches"]}
    assert labels[first[0]["patch_id"]] == 1 and labels[first[1]["patch_id"]] == 1 and labels[first[2]["patch_id"]] == 0


def _listening_sockets(port: int) -> list[str]:
    """Local addresses (hex, as in /proc/net/tcp*) of sockets listening on ``port``."""
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        if not os.path.exists(table):
            continue
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            address, hex_port = fields[1].split(":")
            if int(hex_port, 16) == port and fields[3] == "0A":  # 0A = LISTEN
                found.append(address)
    return found


def _post(url: str, body: bytes, content_type: str = "application/json") -> tuple[int, dict]:
    request = urllib.request.Request(url, data=body, headers={"Content-Type": content_type}, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


@pytest.mark.slow
def test_labels_survive_kill_9_and_server_is_loopback_only(build):
    out, _ = build
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    code = (
        "import sys; from cemcurate.filtering.label_server import serve; serve(sys.argv[1], port=0, "
        "open_browser=False, seed=0)"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code, str(out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=REPO,
    )
    try:
        deadline = time.monotonic() + 120
        line = ""
        while time.monotonic() < deadline and "http://" not in line:
            ready, _, _ = select.select([proc.stdout], [], [], 1.0)
            if ready:
                line = proc.stdout.readline()
                if not line and proc.poll() is not None:
                    break
        match = re.search(r"http://([\d.]+):(\d+)/", line)
        assert match, f"server did not start: {line!r} {proc.stderr.read() if proc.poll() is not None else ''}"
        host, port = match.group(1), int(match.group(2))
        assert host == "127.0.0.1"
        if os.path.exists("/proc/net/tcp"):
            # Bound to 127.0.0.1 only: one listening socket, address 0100007F (little-endian hex).
            assert _listening_sockets(port) == ["0100007F"]
        base = f"http://127.0.0.1:{port}"
        sent = [(0, 1), (5, 0), (9, 1), (5, 1)]
        for pid, lab in sent:
            status, body = _post(base + "/api/label", json.dumps({"patch_id": pid, "label": lab}).encode())
            assert status == 200 and body["ok"], body
        status, body = _post(base + "/api/label", b"{oops")
        assert status == 400 and "error" in body
        status, _ = _post(base + "/api/label", json.dumps({"patch_id": 777, "label": 1}).encode())
        assert status == 404
        # No graceful shutdown: whatever was acknowledged must already be on disk.
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        assert proc.returncode == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
        proc.stdout.close()
        proc.stderr.close()
    every = read_labels(labels_path(out), latest=False)
    assert every[["patch_id", "label"]].values.tolist() == [[0, 1], [5, 0], [9, 1], [5, 1]]
    latest = read_labels(labels_path(out))
    assert dict(zip(latest["patch_id"], latest["label"])) == {0: 1, 5: 1, 9: 1}
    assert all(re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", t) for t in every["time"])


def test_serve_refuses_other_hosts(build):
    out, _ = build
    with pytest.raises(ValueError, match="127.0.0.1"):
        serve(out, host="0.0.0.0", open_browser=False)


def test_torn_last_line_is_skipped_and_appends_continue(tmp_path):
    path = tmp_path / "labels.csv"
    append_labels(path, [(1, 1), (2, 0)])
    with open(path, "a") as fh:
        fh.write("3,")  # a write cut short by a crash
    with pytest.warns(UserWarning, match="skipped 1"):
        assert read_labels(path)["patch_id"].tolist() == [1, 2]
    append_labels(path, [(4, 0)])
    with pytest.warns(UserWarning):
        table = read_labels(path)
    assert table[["patch_id", "label"]].values.tolist() == [[1, 1], [2, 0], [4, 0]]
    with pytest.raises(ValueError, match="label of patch 5"):
        append_labels(path, [(5, 3)])


def test_contact_sheets_round_trip(build, tmp_path):
    out, _ = build
    append_labels(labels_path(out), [(0, 1)])
    parser = argparse.ArgumentParser()
    add_label_command(parser.add_subparsers(dest="command"))
    sheets_dir = tmp_path / "sheets"
    args = parser.parse_args(
        [
            "label",
            str(out),
            "--export-sheet",
            str(sheets_dir),
            "--sheet-patches",
            "10",
            "--sheet-size",
            "6",
            "--sheet-columns",
            "3",
            "--seed",
            "1",
        ]
    )
    assert args.func(args) == 0
    pngs = sorted(sheets_dir.glob("sheet_*.png"))
    assert [p.name for p in pngs] == ["sheet_001.png", "sheet_002.png"]
    assert Image.open(pngs[0]).size[0] == 3 * 224 + 2 * 6  # 3 columns of 224-px tiles
    table = pd.read_csv(sheets_dir / "sheet_labels.csv", keep_default_na=False)
    assert list(table.columns) == ["patch_id", "sheet", "position", "label"] and len(table) == 10
    assert 0 not in table["patch_id"].tolist()  # already labelled patches are not exported
    assert table["position"].tolist() == [1, 2, 3, 4, 5, 6, 1, 2, 3, 4]

    table["label"] = ["1", "0", "i", "u", "informative", "", "1", "0", "", "Uninformative"]
    filled = tmp_path / "filled.csv"
    table.to_csv(filled, index=False)
    bad = table.copy()
    bad.loc[3, "label"] = "maybe"
    bad.to_csv(tmp_path / "bad.csv", index=False)
    with pytest.raises(ValueError, match=r"bad.csv: line 5: label 'maybe'"):
        import_sheet(out, tmp_path / "bad.csv")
    assert len(read_labels(labels_path(out))) == 1  # nothing written from the bad file

    args = parser.parse_args(["label", str(out), "--import-sheet", str(filled)])
    assert args.func(args) == 0
    latest = read_labels(labels_path(out))
    expected = {0: 1}
    for pid, word in zip(table["patch_id"], table["label"]):
        if word:
            expected[int(pid)] = 0 if word.lower() in ("0", "u", "uninformative") else 1
    assert dict(zip(latest["patch_id"].tolist(), latest["label"].tolist())) == expected
    # The next export skips everything labelled so far.
    _, csv_path = export_sheets(out, tmp_path / "more", count=50, seed=2)
    remaining = pd.read_csv(csv_path)["patch_id"].tolist()
    assert len(remaining) == 14 - len(expected) and not set(remaining) & set(expected)


def _score(out: Path, probs) -> None:
    """Give the build's manifest these informative probabilities (as a classifier's build would)."""
    manifest = read_manifest(out / "manifest.parquet")
    manifest["informative_prob"] = np.asarray(probs, np.float32)
    write_manifest(manifest, out / "manifest.parquet")


def test_a_classifier_scored_build_is_labelled_most_uncertain_first(build):
    out, _ = build
    # Distance from the 0.5 threshold grows with the id among 0-9; ids 10-13 are sure.
    probs = [0.5, 0.45, 0.56, 0.4, 0.67, 0.3, 0.2, 0.85, 0.9, 0.05, 0.99, 0.0, 0.01, 1.0, 0.5, 0.5]
    _score(out, probs)
    append_labels(labels_path(out), [(1, 1)])  # labelled: goes last whatever its score
    client = make_label_app(out, seed=3).test_client()
    page = client.get("/api/patches?start=0&count=14").get_json()
    ids = [p["patch_id"] for p in page["patches"]]
    assert page["order"] == "uncertain"
    assert ids[:9] == [0, 2, 3, 4, 5, 6, 7, 8, 9] and ids[-1] == 1
    assert set(ids[9:13]) == {10, 11, 12, 13}
    # The same order for the contact sheets; --order random shuffles instead.
    _, csv_path = export_sheets(out, out / "sheets", count=3, seed=3)
    assert pd.read_csv(csv_path)["patch_id"].tolist() == [0, 2, 3]
    shuffled = make_label_app(out, seed=3, order="random").test_client().get("/api/patches?count=13").get_json()
    assert shuffled["order"] == "random" and [p["patch_id"] for p in shuffled["patches"]][:9] != ids[:9]


def test_rule_scores_leave_the_order_random(build):
    out, _ = build
    _score(out, [1.0] * 12 + [0.0] * 4)  # the rules only keep or drop
    page = make_label_app(out, seed=0).test_client().get("/api/patches?count=14").get_json()
    assert page["order"] == "random"
    with pytest.raises(ValueError, match="order must be one of auto, uncertain, random"):
        make_label_app(out, order="smart")

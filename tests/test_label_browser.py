"""The ``cemcurate label`` page in a real browser (Playwright + the machine's Chromium).

Clicks and keys record labels in labels.csv and on the page (keys pressed faster than the
server answers label one patch each), paging back shows the page seen before, a reload shows
the server's labels, a server killed with ``kill -9`` keeps every label the page
acknowledged, and two tabs labelling at once leave labels.csv whole.
"""

from __future__ import annotations

import contextlib
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import tifffile
from werkzeug.serving import make_server

from cemcurate.filtering.label_server import make_label_app
from cemcurate.filtering.labels import labels_path, read_labels
from cemcurate.manifest import read_manifest, write_manifest
from cemcurate.store import write_patch_store

try:
    from playwright.sync_api import expect, sync_playwright
except ImportError:  # the test extra is not installed
    expect = sync_playwright = None

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium" if os.path.exists("/usr/bin/chromium") else shutil.which("chromium")
# The machine's network is closed: no background fetches, no QUIC, no component updates.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
LABELLABLE = 14  # patches 0-13 of the build fixture (14, 15 are duplicates)
ROW = re.compile(r"\d+,[01],\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")

pytestmark = [
    pytest.mark.skipif(sync_playwright is None, reason="playwright is not installed (pip install -e '.[test]')"),
    pytest.mark.skipif(
        CHROMIUM is None, reason="no Chromium at /usr/bin/chromium or on PATH (apt-get install chromium)"
    ),
]


@pytest.fixture(scope="module")
def vnc_patches(data_root):
    image = tifffile.imread(data_root / "drosophila_vnc_gerhard/stack1/raw/03.tif")
    return np.stack([image[y : y + 224, x : x + 224] for y in range(0, 896, 224) for x in range(0, 896, 224)])


@pytest.fixture()
def build(vnc_patches, tmp_path):
    """A store of 16 real 224-px VNC tiles; ids 12-13 dropped as uninformative, 14-15 duplicates."""
    out = tmp_path / "out"
    write_patch_store(out, vnc_patches, source="vnc03")
    manifest = read_manifest(out / "manifest.parquet")
    manifest.loc[[12, 13], ["kept", "reason"]] = [False, "uninformative"]
    manifest.loc[[14, 15], ["kept", "reason", "shard_row"]] = [False, "duplicate", -1]
    write_manifest(manifest, out / "manifest.parquet")
    return out


@pytest.fixture(scope="module")
def browser():
    with sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        expect.set_options(timeout=15_000)  # two shared cores in CI
        yield chromium
        chromium.close()


@pytest.fixture()
def context(browser):
    ctx = browser.new_context(viewport={"width": 1400, "height": 1000})
    ctx.set_default_timeout(15_000)
    yield ctx
    ctx.close()


@contextlib.contextmanager
def label_server(out: Path, page_size: int, seed: int = 0):
    """The labelling app on a free 127.0.0.1 port in a thread of this process; yields its URL."""
    server = make_server("127.0.0.1", 0, make_label_app(out, seed=seed, page_size=page_size), threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}/"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def tile(page, pid: int):
    return page.locator(f'.tile[data-patch-id="{pid}"]')


def front(page):
    """``page`` as the active tab (a background tab's animation frames, which clicks wait for, are throttled)."""
    page.bring_to_front()
    return page


def shown(page) -> dict[int, int | None]:
    """``{patch_id: label or None}`` of the tiles on the page, in page order (from the CSS classes)."""
    pairs = page.eval_on_selector_all(
        ".tile",
        "ts => ts.map(t => [+t.dataset.patchId, "
        "t.classList.contains('l1') ? 1 : t.classList.contains('l0') ? 0 : null])",
    )
    return {pid: lab for pid, lab in pairs}


def open_page(page, url: str, count: int) -> list[int]:
    """Load the page, wait for its grid of ``count`` tiles and return the patch ids shown."""
    page.goto(url)
    return wait_for_grid(page, count)


def wait_for_grid(page, count: int, other_than: list[int] | None = None) -> list[int]:
    """Wait for ``count`` tiles (replacing the page that showed ``other_than``); the patch ids shown."""
    expect(page.locator(".tile")).to_have_count(count)
    if other_than is not None:
        page.wait_for_function(
            'old => !document.querySelector(`.tile[data-patch-id="${old}"]`)', arg=other_than[0], timeout=15_000
        )
        expect(page.locator(".tile")).to_have_count(count)
    return list(shown(page))


def expect_label(page, pid: int, label: int) -> None:
    """Wait until the page shows ``pid`` as saved with ``label`` (it is told so only after fsync)."""
    expect(tile(page, pid)).to_have_class(re.compile(rf"(^|\s)l{label}(\s|$)"))


def rows(out: Path) -> list[list[int]]:
    """Every ``[patch_id, label]`` row of labels.csv in file order (checking no line is torn)."""
    text = labels_path(out).read_text()
    assert text.endswith("\n")
    lines = text.splitlines()
    assert lines[0] == "patch_id,label,time"
    assert all(ROW.fullmatch(line) for line in lines[1:]), lines
    return read_labels(labels_path(out), latest=False)[["patch_id", "label"]].values.tolist()


def latest(out: Path) -> dict[int, int]:
    table = read_labels(labels_path(out))
    return dict(zip(table["patch_id"].tolist(), table["label"].tolist()))


def test_clicks_and_keys_label_patches(build, context):
    with label_server(build, page_size=5) as url:
        page = context.new_page()
        ids = open_page(page, url, 5)
        assert len(set(ids)) == 5 and set(ids) <= set(range(LABELLABLE))
        assert all(label is None for label in shown(page).values())
        expect(tile(page, ids[0])).to_have_class(re.compile(r"\bcur\b"))

        tile(page, ids[0]).click()  # click: informative
        expect_label(page, ids[0], 1)
        tile(page, ids[1]).click(button="right")  # right-click: uninformative
        expect_label(page, ids[1], 0)
        # The cursor moved past the last labelled patch; keys label the patch under it.
        expect(tile(page, ids[2])).to_have_class(re.compile(r"\bcur\b"))
        page.keyboard.press("u")
        expect_label(page, ids[2], 0)
        page.keyboard.press("i")
        expect_label(page, ids[3], 1)
        page.keyboard.press("ArrowLeft")  # back to ids[3]: relabel it with the digit key
        expect(tile(page, ids[3])).to_have_class(re.compile(r"\bcur\b"))
        page.keyboard.press("0")
        expect_label(page, ids[3], 0)
        page.keyboard.press("1")
        expect_label(page, ids[4], 1)
        expect(page.locator("#counts")).to_have_text(
            re.compile(r"^5 of 14 labelled \(2 informative, 3 uninformative\)")
        )
        expect(page.locator("#err")).to_have_text("")

    assert rows(build) == [[ids[0], 1], [ids[1], 0], [ids[2], 0], [ids[3], 1], [ids[3], 0], [ids[4], 1]]
    assert latest(build) == {ids[0]: 1, ids[1]: 0, ids[2]: 0, ids[3]: 0, ids[4]: 1}


def test_fast_key_presses_label_consecutive_patches(build, context):
    """Keys pressed faster than the server answers label one patch each, in order."""
    with label_server(build, page_size=14) as url:
        page = context.new_page()
        ids = open_page(page, url, LABELLABLE)
        keys = "iuiuuiiu"
        for key in keys:  # no waiting between presses
            page.keyboard.press(key)
        want = [int(key == "i") for key in keys]
        for pid, label in zip(ids, want):
            expect_label(page, pid, label)
        expect(page.locator("#counts")).to_have_text(re.compile(r"^8 of 14 labelled"))
        assert [lab for lab in shown(page).values()][len(keys) :] == [None] * (LABELLABLE - len(keys))
    assert rows(build) == [[pid, label] for pid, label in zip(ids, want)]


def test_paging_back_shows_the_same_patches_and_labels(build, context):
    with label_server(build, page_size=5) as url:
        page = context.new_page()
        first = open_page(page, url, 5)
        tile(page, first[0]).click()
        expect_label(page, first[0], 1)
        tile(page, first[3]).click(button="right")
        expect_label(page, first[3], 0)

        page.click("#next")
        second = wait_for_grid(page, 5, other_than=first)
        assert not set(second) & set(first)
        page.keyboard.press("u")  # the cursor starts on the first patch of a page
        expect_label(page, second[0], 0)

        page.keyboard.press("n")
        third = wait_for_grid(page, LABELLABLE - 10, other_than=second)
        assert sorted(first + second + third) == list(range(LABELLABLE))

        page.click("#prev")
        assert wait_for_grid(page, 5, other_than=third) == second
        assert shown(page) == {pid: (0 if pid == second[0] else None) for pid in second}
        page.click("#prev")
        # Back on page 1: the patches seen there, not a fresh unlabelled-first order.
        assert wait_for_grid(page, 5, other_than=second) == first
        assert shown(page) == {first[0]: 1, first[1]: None, first[2]: None, first[3]: 0, first[4]: None}
        expect(page.locator("#counts")).to_have_text(re.compile(r"^3 of 14 labelled"))
    assert latest(build) == {first[0]: 1, first[3]: 0, second[0]: 0}


def test_reload_shows_labels_from_the_server(build, context):
    with label_server(build, page_size=5) as url:
        page = context.new_page()
        first = open_page(page, url, 5)
        tile(page, first[1]).click()
        expect_label(page, first[1], 1)
        tile(page, first[2]).click(button="right")
        expect_label(page, first[2], 0)

        page.reload()
        # A reopened page shows unlabelled patches first; the labelled ones come last.
        again = wait_for_grid(page, 5)
        assert not {first[1], first[2]} & set(again)
        assert all(label is None for label in shown(page).values())
        expect(page.locator("#counts")).to_have_text(
            re.compile(r"^2 of 14 labelled \(1 informative, 1 uninformative\)")
        )
        page.keyboard.press("n")
        second = wait_for_grid(page, 5, other_than=again)
        page.keyboard.press("n")
        last = wait_for_grid(page, LABELLABLE - 10, other_than=second)
        labels = shown(page)
        assert labels[first[1]] == 1 and labels[first[2]] == 0
        assert list(labels)[-2:] in ([first[1], first[2]], [first[2], first[1]])
        assert sum(label is not None for label in labels.values()) == 2
        assert len(last) == 4
    assert latest(build) == {first[1]: 1, first[2]: 0}


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_labels_acknowledged_by_the_page_survive_kill_9(build, context):
    port = _free_port()
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    command = [sys.executable, "-m", "cemcurate.cli", "label", str(build), "--port", str(port), "--no-browser"]
    proc = subprocess.Popen(
        command + ["--seed", "0", "--page-size", "5"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=REPO,
    )
    try:
        line, deadline = "", time.monotonic() + 60
        while time.monotonic() < deadline and "http://" not in line and proc.poll() is None:
            if select.select([proc.stdout], [], [], 0.5)[0]:
                line = proc.stdout.readline()
        assert f"http://127.0.0.1:{port}/" in line, f"server did not start: {line!r}"

        page = context.new_page()
        ids = open_page(page, f"http://127.0.0.1:{port}/", 5)
        tile(page, ids[0]).click()
        tile(page, ids[2]).click(button="right")
        page.keyboard.press("i")  # ids[3]
        page.keyboard.press("u")  # ids[4]
        tile(page, ids[0]).click(button="right")  # relabel
        acknowledged = [[ids[0], 1], [ids[2], 0], [ids[3], 1], [ids[4], 0], [ids[0], 0]]
        for pid, label in [[ids[2], 0], [ids[3], 1], [ids[4], 0], [ids[0], 0]]:
            expect_label(page, pid, label)
        expect(page.locator("#counts")).to_have_text(re.compile(r"^4 of 14 labelled"))

        os.kill(proc.pid, signal.SIGKILL)  # no shutdown: what was acknowledged must be on disk
        proc.wait(timeout=30)
        assert proc.returncode == -signal.SIGKILL
        # A label after the crash is reported as not saved, and not shown as saved.
        tile(page, ids[1]).click()
        expect(page.locator("#err")).to_have_text(re.compile(r"NOT SAVED"))
        assert shown(page)[ids[1]] is None
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
        proc.stdout.close()
        proc.stderr.close()
    assert rows(build) == acknowledged
    assert latest(build) == {ids[0]: 0, ids[2]: 0, ids[3]: 1, ids[4]: 0}


def burst(page, ids: list[int], label: int) -> None:
    """Click (label 1) or right-click (label 0) the tiles ``ids`` in one go, faster than the server answers."""
    page.evaluate(
        """([ids, type]) => { for (const id of ids) {
             document.querySelector(`.tile[data-patch-id="${id}"]`)
               .dispatchEvent(new MouseEvent(type, {bubbles: true, cancelable: true}));
           } }""",
        [ids, "click" if label else "contextmenu"],
    )


def test_two_tabs_labelling_at_once_keep_labels_csv_whole(build, context):
    with label_server(build, page_size=LABELLABLE) as url:
        a, b = context.new_page(), context.new_page()
        assert sorted(open_page(a, url, LABELLABLE)) == list(range(LABELLABLE))
        assert sorted(open_page(b, url, LABELLABLE)) == list(range(LABELLABLE))
        # Both tabs label at once: different patches, and two patches (10, 11) from both.
        burst(a, [0, 2, 10, 4, 6, 11], 1)
        burst(b, [1, 10, 3, 5, 11, 7], 0)
        actions = [(pid, 1) for pid in [0, 2, 10, 4, 6, 11]] + [(pid, 0) for pid in [1, 10, 3, 5, 11, 7]]
        for pid, label in actions:
            expect_label(a if label else b, pid, label)
        every = rows(build)
        assert sorted(map(tuple, every)) == sorted(actions)
        # Each tab's labels reach the file in the order that tab gave them.
        assert [pid for pid, label in every if label == 1] == [0, 2, 10, 4, 6, 11]
        assert [pid for pid, label in every if label == 0] == [1, 10, 3, 5, 11, 7]

        # The same patch from one tab, then the other (real clicks): the latest label wins.
        sequence = [(a, 8, 1), (b, 8, 0), (b, 9, 0), (a, 9, 1), (a, 2, 0), (b, 2, 1), (b, 10, 1), (a, 10, 0)]
        for page, pid, label in sequence:
            tile(front(page), pid).click(button="left" if label else "right")
            expect_label(page, pid, label)
        every = rows(build)
        assert len(every) == len(actions) + len(sequence)
        assert every[-len(sequence) :] == [[pid, label] for _, pid, label in sequence]
        table = latest(build)
        assert {pid: table[pid] for pid in range(10)} == {0: 1, 1: 0, 2: 1, 3: 0, 4: 1, 5: 0, 6: 1, 7: 0, 8: 0, 9: 1}
        assert table[10] == 0 and table[11] in (0, 1) and sorted(table) == list(range(12))
        # Both tabs, reloaded, show what labels.csv holds.
        for page in (a, b):
            front(page).reload()
            wait_for_grid(page, LABELLABLE)
            assert shown(page) == {pid: table.get(pid) for pid in range(LABELLABLE)}
            informative = sum(table.values())
            counts = rf"^12 of 14 labelled \({informative} informative, {12 - informative} uninformative\), 2 to go"
            expect(page.locator("#counts")).to_have_text(re.compile(counts))

"""``cemcurate label OUT``: a local web page for labelling patches informative / uninformative.

The page shows a grid of deduplicated patches of a build, unlabelled ones first: in random
order, or - once the build was scored by a classifier (``cemcurate build --filter
OUT/filter/classifier.pth``) - the most uncertain first (active learning; ``--order``).
Click a patch (or press ``i``) to mark it informative, right-click (or press ``u``) to mark
it uninformative; arrow keys move the cursor, ``n`` shows the next page. Every label is
appended to ``OUT/labels.csv`` and fsynced before the page is told it was saved, so killing
the server loses nothing. Clicking a labelled patch again replaces its label (the latest
row of a patch wins).

The server binds to 127.0.0.1 only and accepts only requests addressed to ``127.0.0.1`` or
``localhost`` (a guard against DNS rebinding); labels must be posted as JSON, which browsers
do not send cross-site without a CORS preflight that this server never grants.

Routes (JSON errors with 4xx codes for bad input):

* ``GET /`` the page;
* ``GET /api/patches?start=S&count=C`` patches ``S..S+C`` of the labelling order (the order
  is recomputed - unlabelled first - when ``start`` is 0, unless ``keep=1``: the page's
  previous-page button, which shows the patches seen there before; ``order`` says which
  order was used);
* ``GET /patch/<patch_id>.png`` the pixels of one patch;
* ``POST /api/label`` with ``{"patch_id": int, "label": 0 or 1}``;
* ``GET /api/stats`` label counts.
"""

from __future__ import annotations

import html
import io
import logging
import sys
import threading
import webbrowser
from pathlib import Path

import numpy as np
from PIL import Image

from cemcurate.common.lazy import lazy_import
from cemcurate.filtering.labels import LabelPool, append_labels, labelling_order, labels_path, read_labels

flask = lazy_import("flask")
werkzeug_exceptions = lazy_import("werkzeug.exceptions")
werkzeug_serving = lazy_import("werkzeug.serving")

LOOPBACK = "127.0.0.1"
_ALLOWED_HOSTS = {"127.0.0.1", "localhost"}
MAX_PAGE = 200


def _host_name(host: str) -> str:
    """``host[:port]`` -> ``host`` (IPv6 literals are never allowed, so no brackets to handle)."""
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def make_label_app(out_dir: str | Path, seed: int | None = None, page_size: int = 24, order: str = "auto"):
    """The Flask app of the labelling page for build folder ``out_dir``.

    Args:
        out_dir: a finished ``cemcurate build`` output folder.
        seed: random order of the patches (``None``: different on every start).
        page_size: patches per page shown by the web page.
        order: which unlabelled patches come first: ``uncertain`` (nearest the build's
            threshold: active learning on a classifier's scores), ``random``, or ``auto``
            (uncertain when the build's scores rank patches); see
            :func:`cemcurate.filtering.labels.labelling_order`.

    Returns:
        a ``flask.Flask`` app; use ``app.test_client()`` in tests or :func:`serve`.
    """
    pool = LabelPool(out_dir)
    if len(pool) == 0:
        raise ValueError(f"{out_dir}: the build has no stored patches to label")
    csv_path = labels_path(out_dir)
    existing = read_labels(csv_path)
    known = existing["patch_id"].isin(pool.patch_ids)
    labels: dict[int, int] = dict(zip(existing.loc[known, "patch_id"].tolist(), existing.loc[known, "label"].tolist()))
    rng = np.random.default_rng(seed)
    lock = threading.Lock()
    state = {"order": np.zeros(0, np.int64), "order_used": order}

    def reorder() -> None:
        state["order"], state["order_used"] = labelling_order(pool, list(labels), rng, order)

    def counts() -> dict:
        informative = sum(1 for v in labels.values() if v == 1)
        return {
            "total": int(len(pool)),
            "labelled": len(labels),
            "informative": informative,
            "uninformative": len(labels) - informative,
            "unlabelled": int(len(pool)) - len(labels),
        }

    reorder()
    app = flask.Flask("cemcurate.filtering.label_server")
    # Which order ``auto`` resolved to: it depends on the build's scores, not on the labels.
    app.config["LABEL_ORDER"] = state["order_used"]
    app.config["MAX_CONTENT_LENGTH"] = 4096  # a label is a few dozen bytes

    def error(code: int, message: str):
        response = flask.jsonify({"error": message})
        response.status_code = code
        return response

    @app.errorhandler(werkzeug_exceptions.HTTPException)
    def _http_error(exc):
        return error(exc.code or 500, exc.description or exc.name)

    @app.before_request
    def _only_loopback_hosts():
        host = flask.request.host
        if _host_name(host) not in _ALLOWED_HOSTS:
            return error(403, f"host {host!r} refused; open http://127.0.0.1:<port>/")
        return None

    @app.get("/")
    def page():
        text = PAGE_HTML.replace("__PAGE_SIZE__", str(int(page_size))).replace("__OUT__", html.escape(str(out_dir)))
        return flask.Response(text, mimetype="text/html")

    @app.get("/api/patches")
    def patches():
        try:
            start = int(flask.request.args.get("start", "0"))
            count = int(flask.request.args.get("count", str(page_size)))
        except ValueError:
            return error(400, "start and count must be integers")
        if start < 0 or not 1 <= count <= MAX_PAGE:
            return error(400, f"need start >= 0 and 1 <= count <= {MAX_PAGE}")
        with lock:
            if start == 0 and flask.request.args.get("keep") != "1":
                reorder()
            ids = state["order"][start : start + count]
            items = [
                {
                    "patch_id": int(pid),
                    "label": labels.get(int(pid)),
                    "source": str(pool.rows.at[int(pid), "source"]),
                    "url": f"/patch/{int(pid)}.png",
                }
                for pid in ids
            ]
            return flask.jsonify({"start": start, "patches": items, "order": state["order_used"], **counts()})

    @app.get("/patch/<int:patch_id>.png")
    def patch_png(patch_id: int):
        if patch_id not in pool:
            return error(404, f"patch_id {patch_id} is not a stored patch of this build")
        buf = io.BytesIO()
        Image.fromarray(pool.patches([patch_id])[0]).save(buf, format="PNG")
        response = flask.Response(buf.getvalue(), mimetype="image/png")
        response.headers["Cache-Control"] = "private, max-age=3600"
        return response

    @app.post("/api/label")
    def post_label():
        if not flask.request.is_json:
            return error(415, "send the label as JSON (Content-Type: application/json)")
        body = flask.request.get_json(silent=True)
        if not isinstance(body, dict):
            return error(400, 'malformed JSON; expected {"patch_id": <int>, "label": 0 or 1}')
        pid, lab = body.get("patch_id"), body.get("label")
        # bool is a subclass of int in Python: reject true/false explicitly.
        if not isinstance(pid, int) or isinstance(pid, bool):
            return error(400, f"patch_id must be an integer, got {pid!r}")
        if not isinstance(lab, int) or isinstance(lab, bool) or lab not in (0, 1):
            return error(400, f"label must be 1 (informative) or 0 (uninformative), got {lab!r}")
        if pid not in pool:
            return error(404, f"patch_id {pid} is not a stored patch of this build")
        with lock:
            append_labels(csv_path, [(pid, lab)])
            labels[pid] = lab
            return flask.jsonify({"ok": True, "patch_id": pid, "label": lab, **counts()})

    @app.get("/api/stats")
    def stats():
        with lock:
            return flask.jsonify(counts())

    return app


def serve(
    out_dir: str | Path,
    port: int = 0,
    open_browser: bool = True,
    seed: int | None = None,
    page_size: int = 24,
    host: str = LOOPBACK,
    order: str = "auto",
) -> int:
    """Serve the labelling page on ``127.0.0.1:port`` until Ctrl-C; returns an exit code.

    Args:
        out_dir: build folder.
        port: TCP port; 0 picks a free one. The URL is printed (and flushed) on start.
        open_browser: open the page in the default web browser.
        seed, page_size, order: see :func:`make_label_app`.
        host: must be a loopback address; anything else is refused (the page writes files).
    """
    if host != LOOPBACK:
        raise ValueError(f"the labelling server only binds to {LOOPBACK}, not {host!r}: it can write to {out_dir}")
    if not 0 <= port <= 65535:
        raise ValueError(f"port must be 0-65535, got {port}")
    app = make_label_app(out_dir, seed=seed, page_size=page_size, order=order)
    # One log line per click would bury the URL and any real warning.
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    server = werkzeug_serving.make_server(host, port, app, threaded=True)
    bound_host, bound_port = server.socket.getsockname()[:2]
    url = f"http://{bound_host}:{bound_port}/"
    uncertain = app.config["LABEL_ORDER"] == "uncertain"
    shown = "most uncertain first (nearest the build's threshold)" if uncertain else "random"
    print(f"cemcurate label: {url}  (labels -> {labels_path(out_dir)}; order: {shown}; Ctrl-C to stop)", flush=True)
    if open_browser:
        threading.Timer(0.5, webbrowser.open, args=(url,)).start()
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    table = read_labels(labels_path(out_dir))
    print(
        f"cemcurate label: {len(table)} patch(es) labelled "
        f"({int(table['label'].sum())} informative) in {labels_path(out_dir)}",
        file=sys.stderr,
    )
    return 0


PAGE_HTML = """<!doctype html>
<html><head><meta charset="utf-8"><title>cemcurate label</title>
<style>
body{font-family:sans-serif;margin:1em;background:#222;color:#eee}
#bar{position:sticky;top:0;background:#222;padding:.4em 0;z-index:2}
#grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(var(--tile),1fr));gap:8px}
.tile{position:relative;border:5px solid #555;cursor:pointer;user-select:none}
.tile img{width:100%;display:block;image-rendering:pixelated}
.tile.l1{border-color:#2c2}.tile.l0{border-color:#d33}
.tile.cur{outline:3px dashed #fc0;outline-offset:2px}
.tile .tag{position:absolute;left:4px;top:4px;background:#000a;padding:1px 4px;font-size:80%}
#err{color:#f66;font-weight:bold}
button{font-size:100%}
kbd{background:#444;border-radius:3px;padding:0 4px}
</style></head><body>
<div id="bar">
<b>cemcurate label</b> __OUT__ &mdash; <span id="counts"></span>
<button id="prev">&larr; previous page</button> <button id="next">next page (<kbd>n</kbd>) &rarr;</button>
size <input id="zoom" type="range" min="96" max="448" value="200">
<div>Click or <kbd>i</kbd> = <span style="color:#2c2">informative</span>;
right-click or <kbd>u</kbd> = <span style="color:#d33">uninformative</span>
(80%+ uniform, low contrast, artefacts, non-cellular objects); arrow keys move. Every label is saved at once.</div>
<div id="err"></div>
</div>
<div id="grid"></div>
<script>
const PAGE = __PAGE_SIZE__;
let start = 0, items = [], cur = 0;
// Labels are posted one at a time, in the order given, so labels.csv and the page agree on
// which label of a patch is the latest.
let saving = Promise.resolve();
const grid = document.getElementById('grid'), err = document.getElementById('err');
function showCounts(c){document.getElementById('counts').textContent =
  `${c.labelled} of ${c.total} labelled (${c.informative} informative, ${c.uninformative} uninformative), `
  + `${c.unlabelled} to go`;}
async function load(s, keep){
  await saving;  // a page shown after a label shows that label
  const r = await fetch(`/api/patches?start=${s}&count=${PAGE}` + (keep ? '&keep=1' : ''));
  const d = await r.json();
  if(!r.ok){err.textContent = d.error; return;}
  if(d.patches.length === 0 && s > 0){err.textContent = 'no more patches'; return;}
  start = s; items = d.patches; cur = 0; showCounts(d); render(); window.scrollTo(0, 0);
}
function render(){
  grid.innerHTML = '';
  items.forEach((it, i) => {
    const t = document.createElement('div');
    t.className = 'tile' + (it.label === null ? '' : ' l' + it.label) + (i === cur ? ' cur' : '');
    t.dataset.patchId = it.patch_id;
    t.innerHTML = `<img src="${it.url}" alt="patch ${it.patch_id}"><span class="tag">${it.patch_id}</span>`;
    t.onclick = () => { cur = i; label(1); };
    t.oncontextmenu = (e) => { e.preventDefault(); cur = i; label(0); };
    grid.appendChild(t);
  });
}
function label(value){
  const it = items[cur]; if(!it) return;
  // Move on at once: keys pressed faster than the server answers label the next patches.
  if(cur < items.length - 1) cur += 1;
  render();
  saving = saving.then(() => save(it, value));
}
async function save(it, value){
  err.textContent = '';
  try{
    const r = await fetch('/api/label', {method:'POST', headers:{'Content-Type':'application/json'},
      body: JSON.stringify({patch_id: it.patch_id, label: value})});
    const d = await r.json();
    if(!r.ok){err.textContent = `NOT SAVED (patch ${it.patch_id}): ` + d.error; return;}
    it.label = value; showCounts(d); render();
  }catch(e){err.textContent = `NOT SAVED (patch ${it.patch_id}, server unreachable): ` + e;}
}
function cols(){const w = grid.children[0];
  return w ? Math.max(1, Math.round(grid.clientWidth / (w.offsetWidth + 8))) : 1;}
document.addEventListener('keydown', (e) => {
  const k = e.key;
  if(k === 'i' || k === '1'){label(1);}
  else if(k === 'u' || k === '0'){label(0);}
  else if(k === 'n'){load(start + PAGE);}
  else if(k === 'ArrowRight'){cur = Math.min(items.length - 1, cur + 1); render();}
  else if(k === 'ArrowLeft'){cur = Math.max(0, cur - 1); render();}
  else if(k === 'ArrowDown'){cur = Math.min(items.length - 1, cur + cols()); render(); e.preventDefault();}
  else if(k === 'ArrowUp'){cur = Math.max(0, cur - cols()); render(); e.preventDefault();}
});
document.getElementById('next').onclick = () => load(start + PAGE);
document.getElementById('prev').onclick = () => load(Math.max(0, start - PAGE), true);
const zoom = document.getElementById('zoom');
zoom.oninput = () => document.documentElement.style.setProperty('--tile', zoom.value + 'px');
zoom.oninput();
load(0);
</script></body></html>
"""

"""What a person looks at after training: ``RUN/report.html`` and the benchmark's ``results.html``.

One self-contained HTML page per run (images embedded as PNG data URIs, no files beside
it): the training loss and the validation curves, a grid of validation slices with the
ground truth outlined and the prediction filled in, and the final scores. The benchmark
page shows its results table and one such overlay per task and initialisation, so a
column of numbers can be checked against what the models actually segment.

Overlays: the image in grey; each predicted foreground class filled in its colour at 45%
opacity; the labelled foreground's outline in cyan (ignored pixels, label 255, dotted in
yellow). Slices larger than :data:`PANEL_SIDE` are shown as their central crop.
"""

from __future__ import annotations

import base64
import csv
import html
import io
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from PIL import Image

from cemcurate.common.atomic import atomic_path
from cemcurate.common.lazy import lazy_import
from cemcurate.montage import html_page, html_table, png_data_uri
from finetune.losses import IGNORE_INDEX

matplotlib = lazy_import("matplotlib")
pyplot = lazy_import("matplotlib.pyplot")
pandas = lazy_import("pandas")

REPORT = "report.html"
PANEL_SIDE = 384  # px: the central crop shown per slice
PANELS = 6
# Fill colours (RGB) of predicted classes 1, 2, ... (class 0 is background, not filled).
CLASS_COLOURS = [(255, 0, 255), (0, 200, 0), (255, 140, 0), (60, 120, 255), (255, 0, 0), (180, 0, 255)]
TRUTH_OUTLINE = (0, 255, 255)
IGNORE_DOTS = (255, 255, 0)
_ALPHA = 0.45
_STYLE = (
    "body{font-family:sans-serif;margin:24px;max-width:1200px}table{border-collapse:collapse;margin:8px 0}"
    "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}th{background:#f3f3f3}"
    "figure{display:inline-block;margin:6px;vertical-align:top}figcaption{font-size:12px;max-width:390px}"
    ".legend span{display:inline-block;width:12px;height:12px;margin:0 4px 0 12px;vertical-align:middle}"
    "pre{background:#f7f7f7;padding:8px;overflow-x:auto}"
)


def central_crop(shape: tuple[int, int], side: int = PANEL_SIDE) -> tuple[slice, slice]:
    """The central ``side`` x ``side`` window of a ``(y, x)`` image (the whole axis where shorter)."""
    return tuple(slice(max(0, (n - side) // 2), max(0, (n - side) // 2) + min(n, side)) for n in shape)


def outline(mask: np.ndarray) -> np.ndarray:
    """Boundary pixels of a boolean ``(y, x)`` mask: inside pixels with a 4-neighbour outside."""
    padded = np.pad(mask, 1, mode="edge")
    inner = padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    return mask & ~inner


def overlay(image: np.ndarray, pred: np.ndarray, truth: np.ndarray | None = None) -> np.ndarray:
    """An RGB picture of a prediction on its image.

    Args:
        image: ``uint8[y, x]``.
        pred: ``[y, x]`` predicted class indices (0 = background).
        truth: ``[y, x]`` labelled class indices (255 = ignored) or ``None``.

    Returns:
        ``uint8[y, x, 3]``: see the module docstring for the colours.
    """
    rgb = np.repeat(image[..., None].astype(np.float32), 3, axis=2)
    for c in range(1, int(pred.max(initial=0)) + 1):
        where = pred == c
        colour = np.array(CLASS_COLOURS[(c - 1) % len(CLASS_COLOURS)], np.float32)
        rgb[where] = (1 - _ALPHA) * rgb[where] + _ALPHA * colour
    if truth is not None:
        ignored = truth == IGNORE_INDEX
        rgb[outline((truth > 0) & ~ignored)] = TRUTH_OUTLINE
        dots = ignored & ((np.indices(truth.shape).sum(axis=0) % 4) == 0)
        rgb[dots] = IGNORE_DOTS
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)


def slice_iou(pred: np.ndarray, truth: np.ndarray) -> float | None:
    """Foreground IoU of one slice (labelled pixels only; ``None`` when both are empty)."""
    known = truth != IGNORE_INDEX
    p, t = (pred > 0) & known, (truth > 0) & known
    union = int((p | t).sum())
    return None if union == 0 else float((p & t).sum()) / union


def pick_slices(labels: Sequence[np.ndarray], n: int = PANELS) -> list[tuple[int, int]]:
    """``(item, z)`` of up to ``n`` slices to show: per item, among up to 8 evenly spaced
    slices, those with the most labelled foreground, items taking turns."""
    per_item = []
    for labels_i in labels:
        candidates = np.unique(np.linspace(0, labels_i.shape[0] - 1, num=min(8, labels_i.shape[0])).astype(int))
        fg = [int(((labels_i[z] > 0) & (labels_i[z] != IGNORE_INDEX)).sum()) for z in candidates]
        per_item.append([int(candidates[i]) for i in np.argsort(fg, kind="stable")[::-1]])
    picked = []
    for rank in range(max((len(c) for c in per_item), default=0)):
        for item, order in enumerate(per_item):
            if rank < len(order) and len(picked) < n:
                picked.append((item, order[rank]))
    return sorted(picked)


def read_log(path: Path) -> list[dict]:
    """Rows of a run's ``train_log.csv`` / ``val_log.csv`` (empty when the file does not exist)."""
    if not path.is_file():
        return []
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def _column(rows: list[dict], key: str) -> tuple[np.ndarray, np.ndarray]:
    pairs = [(float(r["iteration"]), float(r[key])) for r in rows if r.get(key) not in (None, "")]
    return (np.array([p[0] for p in pairs]), np.array([p[1] for p in pairs])) if pairs else (np.array([]),) * 2


def curves_png(train_rows: list[dict], val_rows: list[dict]) -> bytes:
    """PNG of the training loss (left) and the validation IoU and loss (right) against the iteration."""
    matplotlib.use("Agg", force=False)
    fig, (left, right) = pyplot.subplots(1, 2, figsize=(10, 3.4), dpi=100)
    x, y = _column(train_rows, "loss")
    left.plot(x, y, color="0.2", lw=1)
    left.set(xlabel="iteration", ylabel="training loss", title="training loss")
    if y.size and y.min() > 0 and y.max() > 10 * y.min():  # losses falling by decades read better on a log axis
        left.set_yscale("log")
    x, iou = _column(val_rows, "mean_foreground_iou")
    right.plot(x, iou, marker="o", color="tab:purple", label="mean foreground IoU")
    right.set(xlabel="iteration", ylabel="validation IoU", title="validation", ylim=(0, 1))
    lx, loss = _column(val_rows, "loss")
    if loss.size:
        twin = right.twinx()
        twin.plot(lx, loss, marker=".", color="tab:orange", label="cross-entropy")
        twin.set_ylabel("validation cross-entropy")
        right.plot([], [], marker=".", color="tab:orange", label="cross-entropy")
    if not iou.size:
        right.text(0.5, 0.5, "no validation set", ha="center", va="center", transform=right.transAxes)
    else:
        right.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    pyplot.close(fig)
    return buf.getvalue()


def panels(
    images: Sequence[np.ndarray],
    labels: Sequence[np.ndarray],
    names: Sequence[str],
    predicted: Callable[[int, int], np.ndarray],
) -> list[tuple[str, np.ndarray]]:
    """Overlays of the slices :func:`pick_slices` picks: ``[(caption, uint8[y, x, 3])]``.

    Args:
        images, labels: per item ``uint8[z, y, x]`` image and class map (255 = ignored).
        names: per item, for the caption.
        predicted: ``(item, z) -> [y, x]`` predicted class indices of that whole slice.
    """
    out = []
    for item, z in pick_slices(labels):
        ys, xs = central_crop(images[item].shape[1:])
        pred = predicted(item, z)[ys, xs]
        truth = labels[item][z, ys, xs]
        iou = slice_iou(pred, truth)
        caption = f"{names[item]} z={z}: slice IoU {'-' if iou is None else f'{iou:.3f}'}"
        out.append((caption, overlay(images[item][z, ys, xs], pred, truth)))
    return out


def _legend(classes: Sequence[str]) -> str:
    spans = [
        f"<span style='background:rgb{CLASS_COLOURS[(c - 1) % len(CLASS_COLOURS)]}'></span>"
        f"predicted {html.escape(name)}"
        for c, name in enumerate(classes)
        if c
    ]
    spans.append(f"<span style='border:2px solid rgb{TRUTH_OUTLINE}'></span>labelled foreground (outline)")
    spans.append(f"<span style='background:rgb{IGNORE_DOTS}'></span>ignored (dots)")
    return "<p class=legend>" + "".join(spans) + "</p>"


def _figures(items: Sequence[tuple[str, np.ndarray]]) -> str:
    return "".join(
        f"<figure><img src='{png_data_uri(rgb)}'><figcaption>{html.escape(caption)}</figcaption></figure>"
        for caption, rgb in items
    )


def run_report_html(
    title: str,
    summary: dict[str, object],
    curves: bytes,
    overlays: Sequence[tuple[str, np.ndarray]],
    overlays_from: str,
    classes: Sequence[str],
    scores: dict | None,
) -> str:
    """The page of one training run (see the module docstring)."""
    frame = pandas.DataFrame({"": list(summary), "value": [str(v) for v in summary.values()]})
    sections = [f"<h1>{html.escape(title)}</h1>", html_table(frame)]
    sections.append(f"<h2>Curves</h2><img src='data:image/png;base64,{base64.b64encode(curves).decode()}'>")
    if scores:
        ious = scores.get("iou") or []
        frame = pandas.DataFrame(
            {"class": list(classes), "IoU": ["-" if v is None else f"{v:.4f}" for v in ious[: len(classes)]]}
        )
        sections.append("<h2>Final validation scores</h2>" + html_table(frame))
        if scores.get("loss") is not None:
            sections.append(f"<p>validation cross-entropy {scores['loss']:.4f}</p>")
    sections.append(f"<h2>{html.escape(overlays_from)}</h2>" + _legend(classes) + _figures(overlays))
    return html_page(title, _STYLE, sections)


def write_html(path: Path, page: str) -> Path:
    """Write ``page`` to ``path`` atomically; return ``path``."""
    with atomic_path(path) as tmp:
        tmp.write_text(page)
    return path


def save_rgb(path: Path, rgb: np.ndarray) -> Path:
    """``uint8[y, x, 3]`` as a PNG file, atomically."""
    with atomic_path(path) as tmp:
        Image.fromarray(rgb).save(tmp, format="PNG")
    return path


def benchmark_html(title: str, table_markdown: str, rows: list[dict], caption: Callable[[dict], str]) -> str:
    """The benchmark's page: its results table and the overlay PNG each row names in ``overlay``,
    captioned by ``caption(row)``."""
    sections = [f"<h1>{html.escape(title)}</h1>", f"<pre>{html.escape(table_markdown)}</pre>"]
    figures = [
        (caption(row), np.asarray(Image.open(row["overlay"]).convert("RGB")))
        for row in rows
        if row.get("overlay") and Path(row["overlay"]).is_file()
    ]
    if figures:
        classes = list((rows[0].get("iou") or {}).keys()) or ["background", "foreground"]
        sections.append("<h2>Test predictions</h2>" + _legend(classes) + _figures(figures))
    return html_page(title, _STYLE, sections)


def write_run_report(
    run: Path,
    title: str,
    summary: dict[str, object],
    classes: Sequence[str],
    items: Sequence[tuple[str, np.ndarray, np.ndarray]],
    overlays_from: str,
    predicted: Callable[[int, int], np.ndarray] | None,
    scores: dict | None = None,
) -> Path:
    """Write ``run/report.html`` from the run's logs and overlays of ``items``.

    Args:
        items: ``(name, uint8[z, y, x] image, uint8[z, y, x] class map)`` to pick slices from.
        overlays_from: the heading of the overlay grid (says whether the slices were held out).
        predicted: see :func:`panels`; ``None``: no overlays (the heading says why).
    """
    curves = curves_png(read_log(run / "train_log.csv"), read_log(run / "val_log.csv"))
    names, images, labels = zip(*items) if items else ((), (), ())
    shown = panels(images, labels, names, predicted) if predicted is not None else []
    page = run_report_html(title, summary, curves, shown, overlays_from, classes, scores)
    return write_html(run / REPORT, page)

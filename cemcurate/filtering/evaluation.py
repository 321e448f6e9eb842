"""Labelled evaluation sets, and how a filter scores on one (``cemcurate filter evaluate``).

An evaluation set is a CSV with one row per patch, naming where the patch is in the raw
files rather than holding its pixels (so a set can be shared and committed when the data
cannot):

``file``         the raw file, relative to the data root (a slice of a folder stack: that slice's file)
``dataset``      optional: which volume of a file holding several (an HDF5/zarr key); blank = the only one
``plane``        ``xy``, ``xz`` or ``yz``
``slice``        index along the plane's normal (0 for a 2D image)
``y``, ``x``     top-left corner of the crop in that plane, pixels
``h``, ``w``     size of the crop, pixels; a crop smaller than the patch is resized to it
                 bilinearly, as the build's edge crops are
``label``        1 informative, 0 uninformative

The patches are cut again from the raw files with the build's own reader and intensity
window (:func:`cemcurate.build.cut.volume_window`, the default percentiles; a test checks the
defaults against :class:`cemcurate.build.BuildConfig`), so they are the pixels a default build
stores. ``benchmarks/filter_labels.csv`` is our set on
``../shared/data``.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cemcurate.build.cut import volume_window
from cemcurate.common.atomic import atomic_path
from cemcurate.common.lazy import lazy_import
from cemcurate.io import open_file
from cemcurate.patch_grid import crop_patches

matplotlib = lazy_import("matplotlib")
pyplot = lazy_import("matplotlib.pyplot")
sklearn_metrics = lazy_import("sklearn.metrics")

SET_COLUMNS = ("file", "plane", "slice", "y", "x", "h", "w", "label")
_PLANES = ("xy", "xz", "yz")


class EvaluationSetError(ValueError):
    """A row of an evaluation set that cannot be used; the message names the file and line."""


@dataclass(frozen=True)
class WindowSettings:
    """How non-uint8 data are mapped to uint8 (percentiles 0-100, slices sampled), as in
    ``cemcurate build`` (``--low-percentile``, ``--high-percentile``, ``--window-sample-slices``);
    the defaults are the build's."""

    low_percentile: float = 0.1
    high_percentile: float = 99.9
    sample_slices: int = 32


@dataclass(frozen=True)
class LabelledCrop:
    """One row of an evaluation set (see the module docstring); ``line`` is its CSV line."""

    file: str
    dataset: str
    plane: str
    slice: int
    y: int
    x: int
    h: int
    w: int
    label: int
    line: int

    @property
    def group(self) -> str:
        """The top folder of ``file`` (the dataset it comes from), for per-source tables."""
        return self.file.split("/", 1)[0]


def read_evaluation_set(path: str | Path) -> list[LabelledCrop]:
    """Rows of the evaluation set CSV at ``path``, checked: every column present, integers
    where integers belong, ``plane`` one of xy/xz/yz, ``label`` 0 or 1, crops of at least 1 px.

    Raises:
        EvaluationSetError: naming the file, the line and what is wrong.
    """
    path = Path(path)
    try:
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            missing = [c for c in SET_COLUMNS if c not in (reader.fieldnames or [])]
            if missing:
                raise EvaluationSetError(f"{path}: missing column(s) {', '.join(missing)}; expected {SET_COLUMNS}")
            rows = []
            for line, row in enumerate(reader, start=2):
                rows.append(_crop(path, line, row))
    except OSError as exc:
        raise EvaluationSetError(f"{path}: cannot read the evaluation set ({exc.strerror or exc})") from exc
    if not rows:
        raise EvaluationSetError(f"{path}: no rows")
    return rows


def _crop(path: Path, line: int, row: dict) -> LabelledCrop:
    where = f"{path}, line {line}"
    values = {}
    for key in ("slice", "y", "x", "h", "w", "label"):
        try:
            values[key] = int(row[key])
        except (TypeError, ValueError):
            raise EvaluationSetError(f"{where}: {key} must be an integer, got {row[key]!r}") from None
    if row["plane"] not in _PLANES:
        raise EvaluationSetError(f"{where}: plane must be one of {', '.join(_PLANES)}, got {row['plane']!r}")
    if values["label"] not in (0, 1):
        raise EvaluationSetError(f"{where}: label must be 1 (informative) or 0 (uninformative), got {values['label']}")
    if min(values["h"], values["w"]) < 1 or min(values["y"], values["x"], values["slice"]) < 0:
        raise EvaluationSetError(f"{where}: the crop needs y, x, slice >= 0 and h, w >= 1")
    if not row["file"]:
        raise EvaluationSetError(f"{where}: file is empty")
    return LabelledCrop(row["file"], row.get("dataset") or "", row["plane"], line=line, **values)


def _plane_image(volume: np.ndarray, plane: str, index: int) -> np.ndarray:
    if plane == "xy":
        return volume[index]
    return volume[:, index, :] if plane == "xz" else volume[:, :, index]


def evaluation_patches(
    crops: list[LabelledCrop],
    data_root: str | Path,
    window: WindowSettings = WindowSettings(),
    patch_size: int = 224,
    source: str | Path = "set",
) -> np.ndarray:
    """The uint8 ``(n, patch_size, patch_size)`` patches of ``crops``, cut from the files under
    ``data_root`` with the build's reader and intensity window (``window``: the settings of a
    default build unless given). Each file is opened once.

    Raises:
        EvaluationSetError: a file missing or unreadable, a dataset not in its file, or a crop
            outside its plane (naming ``source``, the line and the file).
    """
    data_root = Path(data_root)
    out = np.empty((len(crops), patch_size, patch_size), np.uint8)
    volumes: dict[tuple[str, str], tuple] = {}
    for i, crop in enumerate(crops):
        where = f"{source}, line {crop.line}: {crop.file}"
        key = (crop.file, crop.dataset)
        if key not in volumes:
            volumes[key] = _open(data_root / crop.file, crop.dataset, where, window)
        vol, mapping, loaded = volumes[key]
        depth = {"xy": vol.shape[0], "xz": vol.shape[1], "yz": vol.shape[2]}[crop.plane]
        if crop.slice >= depth:
            raise EvaluationSetError(f"{where}: slice {crop.slice} of plane {crop.plane}, which has {depth}")
        if crop.plane == "xy":
            image = mapping.apply(vol.read_slices(crop.slice, crop.slice + 1))[0]
        else:
            if loaded is None:
                loaded = mapping.apply(vol.read_slices(0, vol.shape[0]))
                volumes[key] = (vol, mapping, loaded)
            image = _plane_image(loaded, crop.plane, crop.slice)
        if crop.y + crop.h > image.shape[0] or crop.x + crop.w > image.shape[1]:
            raise EvaluationSetError(
                f"{where}: crop y={crop.y} x={crop.x} h={crop.h} w={crop.w} leaves the {crop.plane} plane "
                f"({image.shape[0]} x {image.shape[1]} px)"
            )
        grid = np.array([[crop.y, crop.x, crop.h, crop.w]], np.int64)
        out[i] = crop_patches(np.ascontiguousarray(image), grid, patch_size)[0]
    return out


def _open(path: Path, dataset: str, where: str, window: WindowSettings) -> tuple:
    if not path.exists():
        raise EvaluationSetError(f"{where}: no such file under the data root")
    try:
        found = open_file(path)
    except Exception as exc:  # the reader's own message says what is wrong with the file
        raise EvaluationSetError(f"{where}: cannot be read ({exc})") from exc
    if dataset:
        chosen = [v for v in found if v.dataset == dataset]
        if not chosen:
            raise EvaluationSetError(f"{where}: no dataset {dataset!r}; it holds {[v.dataset for v in found]}")
    elif len(found) > 1:
        names = [v.dataset for v in found]
        raise EvaluationSetError(f"{where}: holds {len(found)} volumes {names}; name one in the 'dataset' column")
    else:
        chosen = found
    vol = chosen[0]
    return vol, volume_window(vol, False, window.low_percentile, window.high_percentile, window.sample_slices), None


def filter_metrics(labels: np.ndarray, scores: np.ndarray, threshold: float) -> dict:
    """How ``scores`` (informative probabilities, float ``(n,)``) separate 0/1 ``labels``
    (1 = informative): AUROC and, keeping patches whose score is at least ``threshold``,
    precision and recall of the informative class and the share of each class dropped.

    AUROC is NaN when only one class is present.
    """
    labels = np.asarray(labels).astype(bool)
    scores = np.asarray(scores, np.float64)
    kept = scores >= threshold
    n_inf, n_uninf = int(labels.sum()), int((~labels).sum())
    true_kept = int((kept & labels).sum())
    auroc = float(sklearn_metrics.roc_auc_score(labels, scores)) if n_inf and n_uninf else float("nan")
    return {
        "n": len(labels),
        "informative": n_inf,
        "uninformative": n_uninf,
        "threshold": float(threshold),
        "auroc": auroc,
        "precision": true_kept / int(kept.sum()) if kept.any() else float("nan"),
        "recall": true_kept / n_inf if n_inf else float("nan"),
        "informative_dropped": (n_inf - true_kept) / n_inf if n_inf else float("nan"),
        "uninformative_dropped": int((~kept & ~labels).sum()) / n_uninf if n_uninf else float("nan"),
    }


def roc_points(labels: np.ndarray, scores: np.ndarray) -> dict:
    """AUROC and the ROC curve of ``scores`` against 0/1 ``labels`` (JSON-ready)."""
    fpr, tpr, _ = sklearn_metrics.roc_curve(labels, scores)
    return {
        "auroc": float(sklearn_metrics.roc_auc_score(labels, scores)),
        "fpr": fpr.round(5).tolist(),
        "tpr": tpr.round(5).tolist(),
    }


def write_roc_png(path: str | Path, curves: dict[str, dict], title: str) -> None:
    """ROC curves (``name -> roc_points(...) | {"label": legend text}``) as a PNG, atomically.
    A curve named ``rules`` (a 0/1 score: a single operating point) is drawn with markers."""
    matplotlib.use("Agg", force=False)
    fig, ax = pyplot.subplots(figsize=(4.8, 4.6), dpi=120)
    styles = {"resnet": "-", "forest": "--", "rules": ":"}
    for name, c in curves.items():
        ax.plot(
            c["fpr"],
            c["tpr"],
            styles.get(name, "-"),
            marker="o" if name == "rules" else None,
            label=f"{c['label']} (AUROC {c['auroc']:.3f})",
        )
    ax.plot([0, 1], [0, 1], color="0.7", lw=0.8)
    ax.set_xlabel("false positive rate (uninformative kept)")
    ax.set_ylabel("true positive rate (informative kept)")
    ax.set_title(title, fontsize=9)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    pyplot.close(fig)

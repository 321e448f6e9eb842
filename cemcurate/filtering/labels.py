"""Human labels of patches (``OUT/labels.csv``) and the patches that can be labelled.

``labels.csv`` has the columns ``patch_id`` (int, the manifest id), ``label`` (1 =
informative, 0 = uninformative) and ``time`` (ISO 8601, UTC). Rows are only ever
appended, each write flushed and fsynced, so a killed process loses at most the row being
written; a patch labelled twice keeps its latest label. A torn last line (power loss in the
middle of a write) is skipped with a warning when reading.

Labelling candidates are the *deduplicated* patches of a build: manifest rows whose pixels
are stored (``shard_row >= 0``) and that are not near-duplicates - kept patches and, after
a filtered build, those dropped as ``uninformative`` (so a filter can be re-trained on its
own mistakes).
"""

from __future__ import annotations

import csv
import datetime as _dt
import os
import threading
import warnings
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw

from cemcurate.common.atomic import atomic_path
from cemcurate.filtering.rules import rule_informative_prob
from cemcurate.layout import BuildLayout
from cemcurate.manifest import read_manifest
from cemcurate.montage import tile_grid_image
from cemcurate.store import ShardReader, read_store_info

LABEL_COLUMNS = ("patch_id", "label", "time")
INFORMATIVE, UNINFORMATIVE = 1, 0
# Spellings accepted in a filled-in contact-sheet CSV.
_LABEL_WORDS = {"1": 1, "0": 0, "i": 1, "u": 0, "informative": 1, "uninformative": 0, "yes": 1, "no": 0, "y": 1, "n": 0}

_append_lock = threading.Lock()


def labels_path(out_dir: str | Path) -> Path:
    """``OUT/labels.csv``."""
    return BuildLayout(out_dir).labels


def utc_now() -> str:
    """Current time as ISO 8601 UTC with milliseconds, e.g. ``2024-05-01T12:00:00.123Z``."""
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def append_labels(path: str | Path, rows: Iterable[tuple[int, int]], time: str | None = None) -> int:
    """Append ``(patch_id, label)`` rows to a labels CSV, durably; returns the number written.

    The header is written when the file is new or empty. The data reach the disk
    (``fsync``) before this returns, so a label the caller has acknowledged survives a
    crash or ``kill -9``.
    """
    path = Path(path)
    rows = [(int(p), int(lab)) for p, lab in rows]
    for pid, lab in rows:
        if lab not in (0, 1):
            raise ValueError(f"{path}: label of patch {pid} must be 1 (informative) or 0 (uninformative), got {lab}")
    if not rows:
        return 0
    stamp = time or utc_now()
    with _append_lock:
        new = not path.exists()
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a+b") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            lines = []
            if size == 0:
                lines.append(",".join(LABEL_COLUMNS))
            else:
                fh.seek(size - 1)
                if fh.read(1) != b"\n":
                    # A torn last line: end it so our row starts on a line of its own.
                    lines.append("")
            lines += [f"{pid},{lab},{stamp}" for pid, lab in rows]
            fh.seek(0, os.SEEK_END)
            fh.write(("\n".join(lines) + "\n").encode())
            fh.flush()
            os.fsync(fh.fileno())
        if new:
            # Make the new directory entry durable too.
            dir_fd = os.open(path.parent, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
    return len(rows)


def read_labels(path: str | Path, latest: bool = True) -> pd.DataFrame:
    """Read a labels CSV as a DataFrame (``patch_id`` int64, ``label`` int8, ``time`` str).

    Args:
        path: the CSV; a missing file gives an empty frame.
        latest: keep only the last label of each patch (in file order).
    """
    path = Path(path)
    empty = pd.DataFrame(
        {"patch_id": pd.Series(dtype="int64"), "label": pd.Series(dtype="int8"), "time": pd.Series(dtype=object)}
    )
    if not path.is_file():
        return empty
    ids, labels, times, bad = [], [], [], []
    with open(path, newline="") as fh:
        reader = csv.reader(fh)
        header = next(reader, None)
        if header is None:
            return empty
        if [h.strip() for h in header[:2]] != ["patch_id", "label"]:
            raise ValueError(f"{path}: expected a header starting with 'patch_id,label', found {header}")
        for lineno, row in enumerate(reader, start=2):
            if not row:
                continue
            try:
                pid, lab = int(row[0]), int(row[1])
                if lab not in (0, 1):
                    raise ValueError
            except (ValueError, IndexError):
                bad.append(lineno)
                continue
            ids.append(pid)
            labels.append(lab)
            times.append(row[2] if len(row) > 2 else "")
    if bad:
        warnings.warn(
            f"{path}: skipped {len(bad)} unreadable line(s) (first: line {bad[0]}); "
            "labels must be 'patch_id,label,time' with label 1 or 0",
            stacklevel=2,
        )
    frame = pd.DataFrame(
        {
            "patch_id": np.asarray(ids, np.int64),
            "label": np.asarray(labels, np.int8),
            "time": np.asarray(times, dtype=object),
        }
    )
    if latest and len(frame):
        frame = frame.drop_duplicates("patch_id", keep="last").reset_index(drop=True)
    return frame


class LabelPool:
    """The deduplicated patches of a build folder, addressable by ``patch_id``.

    Attributes:
        out_dir: the build folder.
        patch_size: patch edge in pixels.
        mean, std: store intensity statistics in [0, 1] units (from ``store.json``).
        threshold: the build's ``filter_threshold`` (what "uncertain" is measured from).
        rows: candidate manifest rows indexed by ``patch_id`` (sorted).
        patch_ids: int64 ``(n,)`` candidate ids, sorted.
    """

    def __init__(self, out_dir: str | Path):
        layout = BuildLayout(out_dir)
        self.out_dir = layout.root
        info = read_store_info(self.out_dir)
        self.patch_size, self.mean, self.std = info.patch_size, info.mean, info.std
        manifest = read_manifest(layout.manifest)
        stored = manifest["shard_row"].to_numpy() >= 0
        if "duplicate" in manifest.columns:
            unique = ~manifest["duplicate"].astype(bool).to_numpy()
        else:
            unique = (manifest["reason"].astype(str) != "duplicate").to_numpy()
        self.rows = manifest[stored & unique].set_index("patch_id").sort_index()
        self.patch_ids = self.rows.index.to_numpy(np.int64)
        self.threshold = float(layout.recorded_setting("filter_threshold", 0.5))
        self._reader = ShardReader(self.out_dir, self.patch_size)

    def __len__(self) -> int:
        return len(self.patch_ids)

    def __contains__(self, patch_id: object) -> bool:
        try:
            return int(patch_id) in self.rows.index  # type: ignore[arg-type]
        except (TypeError, ValueError):
            return False

    def patches(self, patch_ids: Sequence[int] | np.ndarray) -> np.ndarray:
        """Pixels of ``patch_ids``: uint8 ``(n, p, p)`` in the order given.

        Raises:
            KeyError: an id is not a stored, deduplicated patch of this build.
        """
        ids = np.asarray(patch_ids, np.int64).reshape(-1)
        missing = ids[~np.isin(ids, self.patch_ids)]
        if len(missing):
            raise KeyError(
                f"{self.out_dir}: patch_id(s) {missing[:5].tolist()} are not stored, deduplicated patches of this build"
            )
        sel = self.rows.loc[ids]
        return np.array(self._reader.read(sel["shard"].to_numpy(), sel["shard_row"].to_numpy(np.int64)))


# How the unlabelled patches are ordered for labelling (``cemcurate label --order``).
LABEL_ORDERS = ("auto", "uncertain", "random")


def scores_rank(scores: np.ndarray) -> bool:
    """Whether informative probabilities rank patches (more than two distinct finite values: the
    rules' score or a classifier's) rather than only keep or drop them (0 and 1: ``--filter
    none``, or the rules of builds before they had a score)."""
    finite = np.asarray(scores, np.float64)
    finite = finite[np.isfinite(finite)]
    return len(np.unique(finite)) > 2


def labelling_order(
    pool: LabelPool, labelled: Iterable[int], rng: np.random.Generator, order: str = "auto"
) -> tuple[np.ndarray, str]:
    """The pool's patch ids in the order to label them, unlabelled first, and the order used.

    ``uncertain`` (active learning): the unlabelled patches by how close their
    ``informative_prob`` is to the build's threshold, nearest first - the patches a label
    teaches the classifier most about; ties, and patches without a score, in random order.
    ``random``: a random order. ``auto``: ``uncertain`` when the build's scores rank
    (:func:`scores_rank`), else ``random``.
    Labelled patches follow in random order.

    Raises:
        ValueError: an unknown ``order``.
    """
    if order not in LABEL_ORDERS:
        raise ValueError(f"order must be one of {', '.join(LABEL_ORDERS)}, got {order!r}")
    shuffled = rng.permutation(pool.patch_ids)
    done = np.isin(shuffled, np.fromiter(labelled, np.int64))
    scores = pool.rows["informative_prob"] if "informative_prob" in pool.rows else None
    if order == "auto":
        order = "uncertain" if scores is not None and scores_rank(scores.to_numpy()) else "random"
    todo = shuffled[~done]
    if order == "uncertain":
        distance = np.abs(pool.rows["informative_prob"].reindex(todo).to_numpy(np.float64) - pool.threshold)
        todo = todo[np.argsort(np.nan_to_num(distance, nan=np.inf), kind="stable")]
    return np.concatenate([todo, shuffled[done]]), order


def load_labelled(
    out_dir: str | Path, labels_csv: str | Path | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The labelled patches of a build: ``(patches uint8 (n, p, p), labels int64 (n,), patch_ids int64 (n,))``.

    Labels of ids that are not in the build (e.g. from an older build) are an error that
    names the CSV, since training silently on a subset would hide the problem.
    """
    labels_csv = Path(labels_csv) if labels_csv is not None else labels_path(out_dir)
    if not labels_csv.is_file():
        raise ValueError(f"{labels_csv}: labels file not found; label patches with `cemcurate label {out_dir}` first")
    table = read_labels(labels_csv)
    pool = LabelPool(out_dir)
    unknown = table.loc[~table["patch_id"].isin(pool.patch_ids), "patch_id"]
    if len(unknown):
        raise ValueError(
            f"{labels_csv}: {len(unknown)} labelled patch_id(s) are not patches of {out_dir} "
            f"(first: {unknown.iloc[:5].tolist()}); were they labelled on another build?"
        )
    ids = table["patch_id"].to_numpy(np.int64)
    return pool.patches(ids), table["label"].to_numpy(np.int64), ids


def confident_extremes(scores: np.ndarray, low: float, high: float, limit: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices ``(uninformative, informative)`` into ``scores`` (float ``(n,)``): those at or below
    ``low`` and at or above ``high``, at most ``limit`` each, the most confident first (ties in
    index order)."""
    scores = np.asarray(scores, np.float64)
    index = np.arange(len(scores))
    low_side, high_side = index[scores <= low], index[scores >= high]
    low_side = low_side[np.argsort(scores[low_side], kind="stable")][:limit]
    high_side = high_side[np.argsort(-scores[high_side], kind="stable")][:limit]
    return low_side, high_side


def bootstrap_labels(
    pool: LabelPool, labelled: np.ndarray, low: float, high: float, limit: int, batch: int = 1024
) -> tuple[np.ndarray, np.ndarray]:
    """Labels for the pool's patches the label-free rules are sure of, leaving out ``labelled`` ids:
    ``(patch_ids int64 (m,), labels int64 (m,))``, uninformative first.

    The rules score the stored pixels here (not the build's ``informative_prob``, which a
    classifier may have written), ``batch`` patches at a time.
    """
    candidates = pool.patch_ids[~np.isin(pool.patch_ids, labelled)]
    scores = np.empty(len(candidates), np.float32)
    for start in range(0, len(candidates), batch):
        ids = candidates[start : start + batch]
        scores[start : start + len(ids)] = rule_informative_prob(pool.patches(ids))
    uninformative, informative = confident_extremes(scores, low, high, limit)
    chosen = np.concatenate([uninformative, informative])
    labels = np.concatenate([np.zeros(len(uninformative), np.int64), np.ones(len(informative), np.int64)])
    return candidates[chosen], labels


# ----------------------------------------------------------------------------- contact sheets

SHEET_CSV = "sheet_labels.csv"


def _number_tile(patch: np.ndarray, number: int, strip: int = 22) -> np.ndarray:
    """A patch with its number printed in a white strip above it (uint8 2D)."""
    tile = Image.new("L", (patch.shape[1], patch.shape[0] + strip), 255)
    tile.paste(Image.fromarray(patch), (0, strip))
    ImageDraw.Draw(tile).text((4, 4), str(number), fill=0)
    return np.asarray(tile)


def export_sheets(
    out_dir: str | Path,
    dest: str | Path,
    count: int = 240,
    per_sheet: int = 48,
    columns: int = 8,
    seed: int | None = None,
    order: str = "auto",
) -> tuple[list[Path], Path]:
    """Write numbered contact sheets of unlabelled patches and a CSV to fill in.

    Args:
        out_dir: build folder.
        dest: folder for ``sheet_001.png``, ... and ``sheet_labels.csv`` (created).
        count: patches to export (fewer if fewer are unlabelled).
        per_sheet, columns: grid of each sheet.
        seed: random order of the patches (``None``: a fresh random order).
        order: which unlabelled patches come first (:func:`labelling_order`).

    Returns:
        ``(sheet paths, csv path)``. The CSV has the columns ``patch_id, sheet, position,
        label``; ``position`` is the number printed above the patch and ``label`` is left
        empty for the annotator (1 informative, 0 uninformative; blank = skip).
    """
    if count < 1 or per_sheet < 1 or columns < 1:
        raise ValueError(f"count, per_sheet and columns must be positive, got {count}, {per_sheet}, {columns}")
    pool = LabelPool(out_dir)
    done = read_labels(labels_path(out_dir))["patch_id"].to_numpy(np.int64)
    ids, _ = labelling_order(pool, done, np.random.default_rng(seed), order)
    todo = ids[: min(count, len(pool) - int(np.isin(pool.patch_ids, done).sum()))]
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    sheets, records = [], []
    for s, start in enumerate(range(0, len(todo), per_sheet), start=1):
        ids = todo[start : start + per_sheet]
        tiles = [_number_tile(patch, i + 1) for i, patch in enumerate(pool.patches(ids))]
        canvas = tile_grid_image(tiles, columns, gap=6)
        name = f"sheet_{s:03d}.png"
        with atomic_path(dest / name) as tmp:
            Image.fromarray(canvas).save(tmp, format="PNG")
        sheets.append(dest / name)
        records += [{"patch_id": int(pid), "sheet": name, "position": i + 1, "label": ""} for i, pid in enumerate(ids)]
    csv_path = dest / SHEET_CSV
    with atomic_path(csv_path) as tmp:
        pd.DataFrame(records, columns=["patch_id", "sheet", "position", "label"]).to_csv(tmp, index=False)
    return sheets, csv_path


def import_sheet(out_dir: str | Path, sheet_csv: str | Path) -> int:
    """Merge a filled-in contact-sheet CSV into ``OUT/labels.csv``; returns the labels added.

    Accepted labels (case-insensitive): 1/0, i/u, informative/uninformative, yes/no, y/n.
    Blank labels are skipped. Every row is checked before anything is written, so a bad
    row leaves ``labels.csv`` unchanged.
    """
    sheet_csv = Path(sheet_csv)
    if not sheet_csv.is_file():
        raise ValueError(f"{sheet_csv}: sheet CSV not found")
    table = pd.read_csv(sheet_csv, dtype=str, keep_default_na=False)
    for column in ("patch_id", "label"):
        if column not in table.columns:
            raise ValueError(f"{sheet_csv}: missing column {column!r} (expected patch_id, sheet, position, label)")
    pool = LabelPool(out_dir)
    rows = []
    for i, (pid, lab) in enumerate(zip(table["patch_id"], table["label"]), start=2):
        word = lab.strip().lower()
        if not word:
            continue
        if word not in _LABEL_WORDS:
            raise ValueError(f"{sheet_csv}: line {i}: label {lab!r} is not one of 1/0, i/u, informative/uninformative")
        try:
            pid_int = int(pid)
        except ValueError:
            raise ValueError(f"{sheet_csv}: line {i}: patch_id {pid!r} is not an integer") from None
        if pid_int not in pool:
            raise ValueError(f"{sheet_csv}: line {i}: patch_id {pid_int} is not a patch of {out_dir}")
        rows.append((pid_int, _LABEL_WORDS[word]))
    return append_labels(labels_path(out_dir), rows)

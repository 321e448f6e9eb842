"""Random Forest on the four CEM500K image statistics: the labelled statistics baseline.

The paper's baseline (Appendix 1 figure 1b). ``cemcurate filter train`` fits it on the same
training split as the ResNet and saves it as ``OUT/filter/stats_forest.pkl``; pass that
file to ``--filter`` to use it instead of the ResNet.

The file is a pickle (scikit-learn models have no other portable format): only load
files you or your colleagues wrote, since unpickling runs code.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np

from cemcurate.common.atomic import atomic_path
from cemcurate.common.lazy import lazy_import
from cemcurate.filtering.features import FEATURE_NAMES, image_statistics

sklearn_ensemble = lazy_import("sklearn.ensemble")

FOREST_KIND = "cemcurate-stats-forest"
FOREST_FORMAT = 1


def fit_forest(features: np.ndarray, labels: np.ndarray, seed: int = 0, trees: int = 200):
    """Fit a ``RandomForestClassifier`` on float ``(n, 4)`` features and 0/1 labels ``(n,)``."""
    labels = np.asarray(labels).astype(np.int64)
    if features.ndim != 2 or features.shape != (len(labels), len(FEATURE_NAMES)):
        raise ValueError(f"expected features ({len(labels)}, {len(FEATURE_NAMES)}), got {features.shape}")
    if set(np.unique(labels)) != {0, 1}:
        raise ValueError(f"need labels of both classes (0 and 1), got {sorted(set(np.unique(labels)))}")
    # min_samples_leaf > 1 keeps the probabilities smooth, which the ROC curve needs.
    model = sklearn_ensemble.RandomForestClassifier(n_estimators=trees, min_samples_leaf=2, random_state=seed, n_jobs=1)
    model.fit(features, labels)
    return model


def forest_prob(model, features: np.ndarray) -> np.ndarray:
    """Informative probability (float32 ``(n,)``) of a fitted forest for ``(n, 4)`` features."""
    if len(features) == 0:
        return np.zeros(0, np.float32)
    column = list(model.classes_).index(1)
    return model.predict_proba(features)[:, column].astype(np.float32)


def save_forest(path: str | Path, model, meta: dict | None = None) -> None:
    """Write a fitted forest with its feature names and ``meta`` (atomic)."""
    blob = {
        "kind": FOREST_KIND,
        "format": FOREST_FORMAT,
        "features": list(FEATURE_NAMES),
        "model": model,
        "meta": meta or {},
    }
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            pickle.dump(blob, fh, protocol=pickle.HIGHEST_PROTOCOL)


def load_forest(path: str | Path):
    """Read a forest written by :func:`save_forest`; returns the fitted model."""
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            blob = pickle.load(fh)
    except (OSError, pickle.UnpicklingError, EOFError, AttributeError, ImportError) as exc:
        raise ValueError(f"{path}: cannot read the statistics forest ({type(exc).__name__}: {exc})") from exc
    if not isinstance(blob, dict) or blob.get("kind") != FOREST_KIND:
        raise ValueError(f"{path}: not a statistics forest written by `cemcurate filter train`")
    if blob.get("format") != FOREST_FORMAT or blob.get("features") != list(FEATURE_NAMES):
        raise ValueError(
            f"{path}: forest format {blob.get('format')} with features {blob.get('features')} "
            f"does not match this version ({FOREST_FORMAT}, {list(FEATURE_NAMES)}); retrain it"
        )
    return blob["model"]


def predict_forest(model, patches: np.ndarray) -> np.ndarray:
    """Informative probability (float32 ``(n,)``) of uint8 ``(n, p, p)`` patches."""
    return forest_prob(model, image_statistics(patches))

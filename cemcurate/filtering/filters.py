"""``--filter SPEC``: one object the pipeline calls to score patches, whatever the method.

``make_filter(spec)`` accepts:

* ``none``: keep everything (probability 1);
* ``stats``: the label-free rules of :mod:`cemcurate.filtering.rules` (a score of their margins);
* a path to a ``.pkl`` written by ``cemcurate filter train``: the Random Forest on the
  four image statistics;
* any other path: a classifier file from ``cemcurate filter train`` or the released
  CEM500K filter state dict (see :mod:`cemcurate.filtering.classifier`).

Every filter has a ``name`` that identifies its behaviour - for files it includes the
SHA-256 of the file's content - so the pipeline can cache probabilities and recompute
them exactly when the filter changes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np

from cemcurate.common.atomic import file_sha256
from cemcurate.common.lazy import lazy_import
from cemcurate.filtering.features import check_patches
from cemcurate.filtering.forest import load_forest, predict_forest
from cemcurate.filtering.rules import DEFAULT_RULES, rule_scores

# The classifier module imports torch; only a classifier file needs it.
classifier_module = lazy_import("cemcurate.filtering.classifier")

# The specs that need no file: cheap to make in any process.
BUILTIN_FILTERS = ("none", "stats")

FILTER_SPECS_HELP = (
    "'stats' (label-free rules), 'none' (keep all), a classifier .pth from `cemcurate filter train` "
    "or the CEM500K filter weights, or a stats_forest.pkl from `cemcurate filter train`"
)


# What decided a patch's score (the manifest's ``decided_by``): a rule of the label-free filter
# that fired, ``rules`` when none fired, or the method itself; '' for patches not scored.
# Cached per shard as uint8 codes, so the order is fixed: only append.
DECIDED_BY = ("", "rules", "uniform", "overlay", "low-contrast", "classifier", "forest", "none", "unstructured")
_DECIDER_CODES = {name: code for code, name in enumerate(DECIDED_BY)}


class PatchFilter:
    """Scores patches: ``filter(patches uint8 (n, p, p)) -> float32 (n,)`` informative probabilities.

    Attributes:
        name: stable identity of the method and its parameters/weights (for caching).
        threshold: the pipeline keeps a patch when its probability is at least this.
        fork_safe: the method is plain numpy/Pillow code that forked worker processes can run
            side by side (the label-free rules); a classifier is not (torch and fork do not
            mix, and it runs its own threads).
        decider: what decides every patch (one of :data:`DECIDED_BY`) unless ``score`` says
            per patch: a ``score`` may return ``(probs, deciders)``, deciders an object array
            of :data:`DECIDED_BY` names (the rules name the rule that fired).
    """

    def __init__(
        self,
        name: str,
        score: Callable[[np.ndarray], np.ndarray | tuple[np.ndarray, np.ndarray]],
        threshold: float = 0.5,
        fork_safe: bool = False,
        decider: str = "classifier",
    ):
        if decider not in DECIDED_BY:
            raise ValueError(f"decider must be one of {DECIDED_BY}, got {decider!r}")
        self.name = name
        self.threshold = float(threshold)
        self.fork_safe = bool(fork_safe)
        self.decider = decider
        self._score = score

    def decide(self, patches: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(probs float32 (n,), decided_by uint8 (n,))``: the scores and, per patch, the index
        in :data:`DECIDED_BY` of what decided it."""
        patches = np.asarray(patches)
        if len(patches) == 0:
            return np.zeros(0, np.float32), np.zeros(0, np.uint8)
        check_patches(patches)
        result = self._score(patches)
        probs, deciders = result if isinstance(result, tuple) else (result, None)
        probs = np.asarray(probs, np.float32)
        if probs.shape != (len(patches),):
            raise RuntimeError(f"filter {self.name} returned shape {probs.shape} for {len(patches)} patches")
        if deciders is None:
            return probs, np.full(len(patches), _DECIDER_CODES[self.decider], np.uint8)
        return probs, np.array([_DECIDER_CODES[d] for d in deciders], np.uint8)

    def __call__(self, patches: np.ndarray) -> np.ndarray:
        return self.decide(patches)[0]

    def __repr__(self) -> str:
        return f"PatchFilter({self.name!r}, threshold={self.threshold})"


def _rules_decision(patches: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The label-free rules: their score and the rule that fired (``rules`` when none did)."""
    probs, reasons = rule_scores(patches, DEFAULT_RULES)
    return probs, np.where(reasons == "", "rules", reasons)


def make_filter(
    spec: str | Path, batch_size: int = 256, device: str | None = None, progress: bool = False
) -> PatchFilter:
    """Build the :class:`PatchFilter` for ``--filter SPEC`` (see the module docstring).

    Args:
        spec: ``stats``, ``none`` or a file path.
        batch_size, device, progress: inference settings for classifier files (``device``
            ``None`` = CUDA when available).

    Raises:
        ValueError: unknown spec or unreadable file (names the file).
    """
    text = str(spec).strip()
    if text == "none":
        return PatchFilter("none", lambda p: np.ones(len(p), np.float32), fork_safe=True, decider="none")
    if text == "stats":
        return PatchFilter(f"stats-rules-v2[{DEFAULT_RULES.identity()}]", _rules_decision, fork_safe=True)
    path = Path(text)
    if not path.is_file():
        raise ValueError(f"--filter {text!r}: not 'stats' or 'none' and no such file; expected {FILTER_SPECS_HELP}")
    sha = file_sha256(path)
    if path.suffix == ".pkl":
        forest = load_forest(path)
        return PatchFilter(
            f"stats-forest:{path.name}:sha256={sha}", lambda p: predict_forest(forest, p), decider="forest"
        )
    classifier = classifier_module.load_classifier(path)

    def score(patches: np.ndarray) -> np.ndarray:
        return classifier_module.predict_informative(
            classifier, patches, batch_size=batch_size, device=device, progress=progress
        )

    return PatchFilter(f"classifier:{classifier.arch}:{path.name}:sha256={sha}", score, classifier.threshold)

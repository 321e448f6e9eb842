"""Label-free default filter (``--filter stats``): four rules on pixel statistics, as a score.

CEM500K labelled a patch *uninformative* when 80% or more of it is uniform (nucleus or
cytoplasm interiors, resin, padding), when it is low-contrast, or when it shows
reconstruction artefacts or non-cellular objects. Without labels we can only catch the
unambiguous cases, so each rule is set to *keep* whenever in doubt; a trained classifier
(``cemcurate filter train``) is the tool for the rest. Each rule has a *margin*, 0 where it
starts to fire, positive on the informative side and one unit per ``*_width``:

``uniform``       80% or more of the patch is *flat*; margin ``(0.8 - flat) / 0.1``. A pixel
                  is flat when its 16x16 block (on the patch grid) is near-uniform - the
                  standard deviation of the block after 2x2 averaging is below the patch's
                  noise floor - or when it has the patch's most frequent grey level and that
                  level covers at least 5% of the patch (padding, saturated or burned-in
                  areas). The noise floor is the largest of 2 grey levels, 1.5 x the white
                  noise std expected after 2x2 averaging (``1.4826 * median(|horizontal
                  neighbour difference|) / sqrt(2)``, divided by 2) and 1.6 x the 5th
                  percentile of the patch's block standard deviations. The last term holds
                  for spatially correlated noise (empty ice in a cryo-ET tomogram,
                  interpolated edge crops), whose neighbour differences are far smaller than
                  its block-scale variation: its blocks are all about as rough as the
                  smoothest one, while tissue has blocks with membranes many times rougher
                  than its smoothest cytoplasm.
``overlay``       the two most frequent grey levels cover 50% or more of the patch and the
                  second of them at least 3%: two-colour rendered graphics such as data
                  bars, text and scale bars; margin ``(0.5 - share) / 0.1`` (none while the
                  second level is below 3%). Real EM intensities spread over many levels:
                  in our test data the two most frequent levels of an EM patch hold at most
                  19% of it (a CEM500K patch with a black padded edge), usually 2-3%.
``low-contrast``  the 1st-99th percentile intensity range is below 8 grey levels; margin
                  ``(range - 8) / 8``.
``unstructured``  less than 20% of the patch shows oriented structure - membranes, filaments,
                  edges: where the local structure tensor's coherence exceeds 0.5 (see
                  :func:`structure_fraction`); margin ``(structure - 0.2) / 0.1``. It
                  catches what has texture but no shape: granular cytoplasm without
                  membranes, noise that is rough at block scale (enlarged crops), smooth
                  density blobs. Coherence ignores contrast, so faint tissue keeps its score.

The patch's score is ``informative_prob = 1 / (1 + exp(-m))`` with ``m`` its smallest
margin, so the default ``--filter-threshold 0.5`` drops exactly the patches a rule fires on,
and a threshold ``t`` drops those with ``m < ln(t / (1 - t))`` (0.27: only patches about 90%
flat; 0.73: already at about 70%). The score ranks patches for the report, for an ROC and
for ``cemcurate label``; it is a monotone transform of the margin, not a probability fitted
to labels.

Chosen on our labelled set (``benchmarks/filter_labels.csv``) and checked on real data
(``tests/test_filter_rules.py``, ``tests/test_filter_evaluate.py``): they drop the data bar
and the empty background of ``sem_plate_databar`` and the empty ice of the cryo-ET tomogram,
and keep every 224-px patch of the VNC ssTEM stacks, the neuroproof FIB-SEM cubes and the
CEM500K example patches (including a low-contrast one with a 19-grey-level range). On the
set's crops a default build cuts they rank at AUROC 0.98. They do not catch artefacts nor
non-cellular objects with shape (the EMDB maps' densities); those need labels. Isotropic
content (vesicle fields, virus-like particles in cryo-ET) has the least structure of what
they keep.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image

from cemcurate.filtering.features import check_patches


@dataclass(frozen=True)
class RuleSettings:
    """Thresholds of the label-free rules (units: pixels, grey levels 0-255, fractions 0-1)."""

    block: int = 16
    smooth: int = 2
    std_floor: float = 2.0
    noise_factor: float = 1.5
    mode_share: float = 0.05
    max_flat: float = 0.8
    overlay_share: float = 0.5
    overlay_minor: float = 0.03
    min_range: float = 8.0
    # The relative noise floor: rel_factor x the rel_quantile-th percentile of the block stds
    # (0 turns it off).
    rel_factor: float = 1.6
    rel_quantile: float = 5.0
    # The structure rule: a pixel (on the 2x2-binned patch) is oriented structure where the
    # coherence of the local structure tensor exceeds min_coherence; the rule fires when less
    # than min_structure of the patch is (0 turns it off).
    min_coherence: float = 0.5
    min_structure: float = 0.2
    # Margin units (see the module docstring).
    flat_width: float = 0.1
    overlay_width: float = 0.1
    structure_width: float = 0.1

    def __post_init__(self) -> None:
        if self.block < 2 or self.smooth < 1 or self.block % self.smooth:
            raise ValueError(f"block ({self.block}) must be a multiple of smooth ({self.smooth}) and at least 2")
        for name in (
            "mode_share",
            "max_flat",
            "overlay_share",
            "overlay_minor",
            "flat_width",
            "overlay_width",
            "structure_width",
        ):
            if not 0 < getattr(self, name) <= 1:
                raise ValueError(f"{name} must be in (0, 1], got {getattr(self, name)}")
        if not 0 <= self.min_coherence < 1 or not 0 <= self.min_structure < 1:
            raise ValueError(
                f"min_coherence and min_structure must be in [0, 1), got {self.min_coherence}, {self.min_structure}"
            )
        if self.rel_factor < 0 or not 0 <= self.rel_quantile <= 100 or self.min_range <= 0:
            raise ValueError(
                f"need rel_factor >= 0, 0 <= rel_quantile <= 100 and min_range > 0, got "
                f"{self.rel_factor}, {self.rel_quantile}, {self.min_range}"
            )

    def identity(self) -> str:
        """A short string that changes whenever a threshold changes (for result caching)."""
        return ",".join(f"{k}={v}" for k, v in asdict(self).items())


DEFAULT_RULES = RuleSettings()
# Patches per internal chunk: bounds the temporaries (~25 MB for 224-px patches) whatever
# batch the caller passes.
_CHUNK = 64


def _histogram(image: np.ndarray) -> list[int]:
    """Grey-level counts (256) of a uint8 2D image. Pillow's C loop counts bytes directly;
    ``np.bincount`` first converts every pixel to intp, which takes twice as long."""
    return Image.fromarray(image).histogram()


def level_counts(patches: np.ndarray) -> np.ndarray:
    """Grey-level histogram of each patch: int64 ``(n, 256)``."""
    patches = check_patches(patches)
    out = np.empty((len(patches), 256), np.int64)
    for i, patch in enumerate(patches):
        out[i] = _histogram(patch)
    return out


def noise_sigma(patches: np.ndarray) -> np.ndarray:
    """Robust per-patch noise std in grey levels (float64 ``(n,)``), from horizontal differences.

    For white noise of std s a neighbour difference has std ``s * sqrt(2)``; the median
    absolute difference times 1.4826 estimates that std while ignoring the few large
    differences at edges.
    """
    patches = check_patches(patches)
    # |difference| of uint8 neighbours without overflow: max - min, for the whole batch at once.
    right, left = patches[:, :, 1:], patches[:, :, :-1]
    diff = np.maximum(right, left) - np.minimum(right, left)
    median = np.empty(len(patches), np.float64)
    for i, d in enumerate(diff):
        # Integer differences 0..255: the (lower) median via a histogram is exact and avoids a sort.
        cum = np.cumsum(_histogram(d))
        median[i] = np.argmax(cum >= (d.size + 1) // 2)
    return 1.4826 * median / np.sqrt(2.0)


def _block_std(core: np.ndarray, s: int, block: int) -> np.ndarray:
    """Standard deviation of the ``s x s`` pixel means within each ``block x block`` block of
    uint8 ``(n, h, w)`` (h, w multiples of ``block``): float64 ``(n, h // block, w // block)``.

    The value ``core.reshape(n, h/s, s, w/s, s).astype(float64).mean(axis=(2, 4))`` blocked and
    passed to ``std`` gives, computed from integer sums: with ``k`` means per block and ``S``
    the ``s x s`` pixel sums, ``std = sqrt(k * sum(S^2) - sum(S)^2) / (k * s^2)``, exact up to
    the final square root, and two to three times faster than a float copy of every pixel.
    """
    n, h, w = core.shape
    b, m_h, m_w = block // s, h // block, w // block
    k = b * b
    # Bounds: a sum S <= s^2 * 255, a block's sum of S^2 <= k * S_max^2.
    sum_type = np.uint16 if s * s * 255 <= np.iinfo(np.uint16).max else np.uint32
    square_type = np.uint32 if k * (s * s * 255) ** 2 <= np.iinfo(np.uint32).max else np.uint64
    rows = core[:, 0::s].astype(sum_type)
    for i in range(1, s):
        rows += core[:, i::s]
    sums = rows[:, :, 0::s].copy()
    for j in range(1, s):
        sums += rows[:, :, j::s]
    squares = sums.astype(square_type)
    np.multiply(squares, squares, out=squares)

    def per_block(values: np.ndarray, dtype) -> np.ndarray:
        # Rows of each block first, then its columns: both reductions run over contiguous axes.
        by_rows = values.reshape(n, m_h, b, m_w * b).sum(axis=2, dtype=dtype)
        return by_rows.reshape(n, m_h, m_w, b).sum(axis=3, dtype=dtype).astype(np.int64)

    total, total_sq = per_block(sums, np.uint32), per_block(squares, square_type)
    spread = (k * total_sq - total * total).astype(np.float64)
    return np.sqrt(spread) / (k * s * s)


def _flat_fraction(patches: np.ndarray, rules: RuleSettings, counts: np.ndarray | None) -> np.ndarray:
    """:func:`flat_fraction`; ``counts`` is :func:`level_counts` of the patches' block-covered core when
    the caller has it."""
    n, p, _ = patches.shape
    m = p // rules.block
    if m == 0:
        raise ValueError(f"patches of {p} px are smaller than one {rules.block}-px block")
    off = (p - m * rules.block) // 2
    side = m * rules.block
    core = patches[:, off : off + side, off : off + side]
    s = rules.smooth
    block_std = _block_std(core, s, rules.block)
    # Averaging s x s pixels of white noise divides its std by s.
    limit = np.maximum(rules.std_floor, rules.noise_factor * noise_sigma(patches) / s)
    if rules.rel_factor > 0:
        smoothest = np.percentile(block_std.reshape(n, -1), rules.rel_quantile, axis=1)
        limit = np.maximum(limit, rules.rel_factor * smoothest)
    uniform_block = block_std < limit[:, None, None]  # (n, m, m)
    counts = level_counts(core) if counts is None else counts
    mode = counts.argmax(axis=1)
    share = counts.max(axis=1) / core[0].size
    # Flat pixels: all of a uniform block, and the mode-level pixels of the other blocks
    # where the mode covers enough of the patch; counted per block, not drawn pixel by pixel.
    flat = uniform_block.sum(axis=(1, 2), dtype=np.int64) * rules.block**2
    for i in np.flatnonzero(share >= rules.mode_share):
        is_mode = core[i] == np.uint8(mode[i])
        per_block = is_mode.reshape(m, rules.block, m, rules.block).sum(axis=(1, 3))
        flat[i] += per_block[~uniform_block[i]].sum()
    return flat / (side * side)


def flat_fraction(patches: np.ndarray, rules: RuleSettings = DEFAULT_RULES) -> np.ndarray:
    """Fraction of each patch that is flat (float64 ``(n,)``); see the module docstring.

    Blocks tile the central ``(p // block) * block`` square of the patch (all of a 224 patch).
    """
    return _flat_fraction(check_patches(patches), rules, None)


def _overlay_from_counts(counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    counts = np.sort(counts, axis=1)
    total = counts.sum(axis=1)
    return (counts[:, -1] + counts[:, -2]) / total, counts[:, -2] / total


def _range_from_counts(counts: np.ndarray, low: float, high: float) -> np.ndarray:
    cum = np.cumsum(counts, axis=1)
    total = cum[:, -1:]
    lo = np.argmax(cum >= np.ceil(total * low / 100.0), axis=1)
    hi = np.argmax(cum >= np.ceil(total * high / 100.0), axis=1)
    return (hi - lo).astype(np.float64)


def overlay_shares(patches: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(share of the two most frequent grey levels, share of the second one)``, float64 ``(n,)`` each."""
    return _overlay_from_counts(level_counts(patches))


def intensity_range(patches: np.ndarray, low: float = 1.0, high: float = 99.0) -> np.ndarray:
    """Nearest-rank ``high``-th minus ``low``-th percentile of each patch, grey levels (float64 ``(n,)``)."""
    return _range_from_counts(level_counts(patches), low, high)


def structure_fraction(patches: np.ndarray, rules: RuleSettings = DEFAULT_RULES) -> np.ndarray:
    """Share of each patch that shows oriented structure (membranes, filaments, edges): float64 ``(n,)``.

    On the patch binned 4x4, Sobel gradients give the structure tensor, summed over 2x2
    cells (8x8 patch pixels) and smoothed by [1 2 1] / 4 across cells (about 6 patch pixels
    in all); a cell is oriented structure where the tensor's coherence ``(l1 - l2) / (l1 +
    l2)`` (of its eigenvalues) exceeds ``rules.min_coherence``. Coherence does not depend on
    contrast, so faint membranes count as much as strong ones, while noise (white or
    correlated), granular texture and smooth gradients stay incoherent, and a few sharp
    edges in a flat patch cover little of it.
    """
    patches = check_patches(patches)
    n, p, _ = patches.shape
    e = p // 4 * 4
    # 4x4 sums by strided adds (uint16 holds 16 x 255): much faster than a reshaped sum.
    binned = np.zeros((n, e // 4, e // 4), np.uint16)
    for i in range(4):
        for j in range(4):
            binned += patches[:, i:e:4, j:e:4]
    binned = binned.astype(np.float32)
    across_rows = binned[:, :-2] + 2 * binned[:, 1:-1] + binned[:, 2:]
    across_cols = binned[:, :, :-2] + 2 * binned[:, :, 1:-1] + binned[:, :, 2:]
    gx = across_rows[:, :, 2:] - across_rows[:, :, :-2]  # (n, p/4 - 2, p/4 - 2)
    gy = across_cols[:, 2:] - across_cols[:, :-2]
    m = gx.shape[1] // 2 * 2

    def cells(values: np.ndarray) -> np.ndarray:
        v = values[:, :m, :m]
        summed = v[:, 0::2, 0::2] + v[:, 1::2, 0::2] + v[:, 0::2, 1::2] + v[:, 1::2, 1::2]
        # [1 2 1] / 4 along each axis, edges repeated.
        padded = np.pad(summed, ((0, 0), (1, 1), (1, 1)), mode="edge")
        rows = (padded[:, :-2] + 2 * padded[:, 1:-1] + padded[:, 2:]) / 4
        return (rows[:, :, :-2] + 2 * rows[:, :, 1:-1] + rows[:, :, 2:]) / 4

    jxx, jyy, jxy = cells(gx * gx), cells(gy * gy), cells(gx * gy)
    spread = np.sqrt((jxx - jyy) ** 2 + 4 * jxy**2)
    # A cell without any gradient is incoherent; 1e-3 is far below any real gradient energy.
    coherence = spread / np.maximum(jxx + jyy, 1e-3)
    return (coherence > rules.min_coherence).reshape(n, -1).mean(axis=1)


RULES = ("uniform", "overlay", "low-contrast", "unstructured")  # the order of :func:`rule_margins`' columns


def rule_margins(patches: np.ndarray, rules: RuleSettings = DEFAULT_RULES) -> np.ndarray:
    """Each rule's margin (see the module docstring): float64 ``(n, 4)``, columns in :data:`RULES`
    order; a rule fires where its margin is below 0 (``inf``: the overlay rule does not apply)."""
    patches = check_patches(patches)
    margins = np.empty((len(patches), len(RULES)), np.float64)
    # The rules share one histogram per patch; the flat rule's is of the block-covered core,
    # which is the whole patch when its side is a multiple of the block (224 = 14 x 16).
    whole_core = patches.shape[1] % rules.block == 0
    for start in range(0, len(patches), _CHUNK):
        chunk = patches[start : start + _CHUNK]
        part = margins[start : start + len(chunk)]  # a view: assignments land in ``margins``
        counts = level_counts(chunk)
        two, second = _overlay_from_counts(counts)
        flat = _flat_fraction(chunk, rules, counts if whole_core else None)
        part[:, 0] = (rules.max_flat - flat) / rules.flat_width
        part[:, 1] = np.where(second >= rules.overlay_minor, (rules.overlay_share - two) / rules.overlay_width, np.inf)
        part[:, 2] = (_range_from_counts(counts, 1.0, 99.0) - rules.min_range) / rules.min_range
        if rules.min_structure > 0:
            part[:, 3] = (structure_fraction(chunk, rules) - rules.min_structure) / rules.structure_width
        else:  # the rule is off
            part[:, 3] = np.inf
    return margins


def rule_scores(patches: np.ndarray, rules: RuleSettings = DEFAULT_RULES) -> tuple[np.ndarray, np.ndarray]:
    """``(informative_prob float32 (n,), reasons object (n,))``: the score ``1 / (1 + exp(-m))`` of
    the smallest margin ``m``, and why a patch is dropped - '' (no rule fires), or the first
    rule of :data:`RULES` that fires."""
    margins = rule_margins(patches, rules)
    smallest = margins.min(axis=1)
    # exp of a large negative margin overflows to inf: the score is then 0, as it should be.
    with np.errstate(over="ignore"):
        probs = (1.0 / (1.0 + np.exp(-smallest))).astype(np.float32)
    fires = margins < 0
    reasons = np.where(fires.any(axis=1), np.asarray(RULES, object)[fires.argmax(axis=1)], "")
    return probs, reasons.astype(object)


def rule_reasons(patches: np.ndarray, rules: RuleSettings = DEFAULT_RULES) -> np.ndarray:
    """Why each patch is dropped: object array ``(n,)`` of '' (kept) or a rule of :data:`RULES`.

    When several rules fire, the first in that order is reported.
    """
    return rule_scores(patches, rules)[1]


def rule_informative_prob(patches: np.ndarray, rules: RuleSettings = DEFAULT_RULES) -> np.ndarray:
    """Label-free informative score: float32 ``(n,)`` in (0, 1), below 0.5 exactly where a rule fires."""
    return rule_scores(patches, rules)[0]

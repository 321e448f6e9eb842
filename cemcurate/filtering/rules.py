"""Label-free default filter (``--filter stats``): three conservative rules on pixel statistics.

CEM500K labelled a patch *uninformative* when 80% or more of it is uniform (nucleus or
cytoplasm interiors, resin, padding), when it is low-contrast, or when it shows
reconstruction artefacts or non-cellular objects. Without labels we can only catch the
unambiguous cases, so each rule is set to *keep* whenever in doubt; a trained classifier
(``cemcurate filter train``) is the tool for the rest. A patch is dropped when any rule
fires:

``uniform``       80% or more of the patch is *flat*. A pixel is flat when its 16x16 block
                  (on the patch grid) is near-uniform - the standard deviation of the block
                  after 2x2 averaging is below ``max(2 grey levels, 1.5 x the noise std
                  expected after 2x2 averaging)`` - or when it has the patch's most frequent
                  grey level and that level covers at least 5% of the patch (padding,
                  saturated or burned-in areas). The noise std is estimated per patch as
                  ``1.4826 * median(|horizontal neighbour difference|) / sqrt(2)``, so a
                  block of pure noise counts as flat while faint structure above the noise
                  does not.
``overlay``       the two most frequent grey levels cover 50% or more of the patch and the
                  second of them at least 3%: two-colour rendered graphics such as data
                  bars, text and scale bars. Real EM intensities spread over many levels:
                  in our test data the two most frequent levels of an EM patch hold at most
                  19% of it (a CEM500K patch with a black padded edge), usually 2-3%.
``low-contrast``  the 1st-99th percentile intensity range is below 8 grey levels.

Chosen and checked on real data (``tests/test_filter_rules.py``): they drop the data bar
and the empty background of ``sem_plate_databar`` and keep every 224-px patch of the VNC
ssTEM stacks, the neuroproof FIB-SEM cubes, ISBI-2012 and the CEM500K example patches
(including a low-contrast one with a 19-grey-level range). They do not catch noisy uniform
areas whose noise is spatially correlated (e.g. empty ice in a cryo-ET tomogram), nor
artefacts; those need labels.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

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

    def __post_init__(self) -> None:
        if self.block < 2 or self.smooth < 1 or self.block % self.smooth:
            raise ValueError(f"block ({self.block}) must be a multiple of smooth ({self.smooth}) and at least 2")
        for name in ("mode_share", "max_flat", "overlay_share", "overlay_minor"):
            if not 0 < getattr(self, name) <= 1:
                raise ValueError(f"{name} must be in (0, 1], got {getattr(self, name)}")

    def identity(self) -> str:
        """A short string that changes whenever a threshold changes (for result caching)."""
        return ",".join(f"{k}={v}" for k, v in asdict(self).items())


DEFAULT_RULES = RuleSettings()
# Patches per internal chunk: bounds the temporaries (~25 MB for 224-px patches) whatever
# batch the caller passes.
_CHUNK = 64


def level_counts(patches: np.ndarray) -> np.ndarray:
    """Grey-level histogram of each patch: int64 ``(n, 256)``."""
    patches = check_patches(patches)
    out = np.empty((len(patches), 256), np.int64)
    for i, patch in enumerate(patches):
        # One bincount per patch: no (n, p*p) int64 temporary for large batches.
        out[i] = np.bincount(patch.ravel(), minlength=256)
    return out


def noise_sigma(patches: np.ndarray) -> np.ndarray:
    """Robust per-patch noise std in grey levels (float64 ``(n,)``), from horizontal differences.

    For white noise of std s a neighbour difference has std ``s * sqrt(2)``; the median
    absolute difference times 1.4826 estimates that std while ignoring the few large
    differences at edges.
    """
    patches = check_patches(patches)
    median = np.empty(len(patches), np.float64)
    for i, patch in enumerate(patches):
        # |difference| of uint8 neighbours without overflow: max - min.
        diff = np.maximum(patch[:, 1:], patch[:, :-1]) - np.minimum(patch[:, 1:], patch[:, :-1])
        # Integer differences 0..255: the (lower) median via a histogram is exact and avoids a sort.
        cum = np.cumsum(np.bincount(diff.ravel(), minlength=256))
        median[i] = np.argmax(cum >= (diff.size + 1) // 2)
    return 1.4826 * median / np.sqrt(2.0)


def flat_fraction(patches: np.ndarray, rules: RuleSettings = DEFAULT_RULES) -> np.ndarray:
    """Fraction of each patch that is flat (float64 ``(n,)``); see the module docstring.

    Blocks tile the central ``(p // block) * block`` square of the patch (all of a 224 patch).
    """
    patches = check_patches(patches)
    n, p, _ = patches.shape
    m = p // rules.block
    if m == 0:
        raise ValueError(f"patches of {p} px are smaller than one {rules.block}-px block")
    off = (p - m * rules.block) // 2
    core = patches[:, off : off + m * rules.block, off : off + m * rules.block]
    s, b = rules.smooth, rules.block // rules.smooth
    binned = core.reshape(n, m * b, s, m * b, s).astype(np.float32).mean(axis=(2, 4))
    block_std = binned.reshape(n, m, b, m, b).std(axis=(2, 4))
    # Averaging s x s pixels of white noise divides its std by s.
    limit = np.maximum(rules.std_floor, rules.noise_factor * noise_sigma(patches) / s)
    uniform_block = block_std < limit[:, None, None]
    flat = np.repeat(np.repeat(uniform_block, rules.block, axis=1), rules.block, axis=2)
    counts = level_counts(core)
    mode = counts.argmax(axis=1)
    share = counts.max(axis=1) / core[0].size
    filled = (core == mode[:, None, None].astype(np.uint8)) & (share >= rules.mode_share)[:, None, None]
    return (flat | filled).reshape(n, -1).mean(axis=1)


def overlay_shares(patches: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(share of the two most frequent grey levels, share of the second one)``, float64 ``(n,)`` each."""
    counts = np.sort(level_counts(patches), axis=1)
    total = counts.sum(axis=1)
    return (counts[:, -1] + counts[:, -2]) / total, counts[:, -2] / total


def intensity_range(patches: np.ndarray, low: float = 1.0, high: float = 99.0) -> np.ndarray:
    """Nearest-rank ``high``-th minus ``low``-th percentile of each patch, grey levels (float64 ``(n,)``)."""
    counts = level_counts(patches)
    cum = np.cumsum(counts, axis=1)
    total = cum[:, -1:]
    lo = np.argmax(cum >= np.ceil(total * low / 100.0), axis=1)
    hi = np.argmax(cum >= np.ceil(total * high / 100.0), axis=1)
    return (hi - lo).astype(np.float64)


def rule_reasons(patches: np.ndarray, rules: RuleSettings = DEFAULT_RULES) -> np.ndarray:
    """Why each patch is dropped: object array ``(n,)`` of '' (kept), 'uniform', 'overlay' or 'low-contrast'.

    When several rules fire, the first in that order is reported.
    """
    patches = check_patches(patches)
    reasons = np.full(len(patches), "", dtype=object)
    for start in range(0, len(patches), _CHUNK):
        chunk = patches[start : start + _CHUNK]
        part = reasons[start : start + len(chunk)]  # a view: assignments land in ``reasons``
        two, second = overlay_shares(chunk)
        part[intensity_range(chunk) < rules.min_range] = "low-contrast"
        part[(two >= rules.overlay_share) & (second >= rules.overlay_minor)] = "overlay"
        part[flat_fraction(chunk, rules) >= rules.max_flat] = "uniform"
    return reasons


def rule_informative_prob(patches: np.ndarray, rules: RuleSettings = DEFAULT_RULES) -> np.ndarray:
    """Label-free informative probability: float32 ``(n,)``, 1.0 kept by every rule, 0.0 dropped."""
    return (rule_reasons(patches, rules) == "").astype(np.float32)

"""From raw label/mask values to class maps (pure functions).

A class map is a uint8 array of class indices 0..K-1 with
:data:`finetune.losses.IGNORE_INDEX` (255) for pixels that are not scored. Raw masks
come in many conventions (anti-aliased 0-255 masks, merged label images with one grey
value per structure, "0 = membrane"), so a :class:`LabelSpec` says how to read them:

1. ``ignore_value``: raw value excluded from loss and metrics (checked first);
2. ``threshold``: binary task, class 1 where ``raw > threshold``, else class 0;
3. ``mapping``: ``raw value -> class index``; other values are an error, ignored, or
   all sent to one class (``unmapped``; e.g. CREMI clefts: the background value is mapped
   and every cleft id is "unmapped -> cleft");
4. otherwise raw values are class indices already.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from finetune.losses import IGNORE_INDEX

UNMAPPED_POLICIES = ("error", "ignore")


def parse_unmapped(text: str, class_names: Sequence[str]) -> str | int:
    """``error``, ``ignore``, ``background`` (class 0), or a class name/index -> that class index."""
    text = str(text).strip()
    if text in UNMAPPED_POLICIES:
        return text
    if text == "background":
        return 0
    if text in class_names:
        return list(class_names).index(text)
    if text.isdigit() and int(text) < len(class_names):
        return int(text)
    raise ValueError(f"unmapped must be error, ignore, background or a class of {list(class_names)}, got {text!r}")


@dataclass(frozen=True)
class LabelSpec:
    """How to turn raw label values into class indices (see the module docstring)."""

    num_classes: int
    threshold: float | None = None
    mapping: tuple[tuple[float, int], ...] = ()
    ignore_value: float | None = None
    unmapped: str | int = "error"

    def __post_init__(self) -> None:
        if not 2 <= self.num_classes <= IGNORE_INDEX:
            raise ValueError(f"num_classes must be in 2..{IGNORE_INDEX}, got {self.num_classes}")
        if self.unmapped not in UNMAPPED_POLICIES and not (
            isinstance(self.unmapped, int) and 0 <= self.unmapped < self.num_classes
        ):
            raise ValueError(f"unmapped must be one of {UNMAPPED_POLICIES} or a class index, got {self.unmapped!r}")
        if self.threshold is not None and self.mapping:
            raise ValueError("give either a mask threshold (binary masks) or a label map, not both")
        if self.threshold is not None and self.num_classes != 2:
            raise ValueError(f"a mask threshold makes a binary task but {self.num_classes} classes are configured")
        for value, cls in self.mapping:
            if not 0 <= cls < self.num_classes:
                raise ValueError(f"label map sends value {value:g} to class {cls}, outside 0..{self.num_classes - 1}")

    @classmethod
    def from_settings(
        cls,
        classes: Sequence[str],
        threshold: float | None,
        label_map: Sequence[str],
        ignore_value: float | None,
        unmapped: str,
    ) -> "LabelSpec":
        """The spec of the command-line settings (``--classes``, ``--mask-threshold`` /
        ``--label-threshold``, ``--label-map``, ``--ignore-label``, ``--unmapped``)."""
        return cls(
            num_classes=len(classes),
            threshold=threshold,
            mapping=parse_label_map(label_map, classes),
            ignore_value=ignore_value,
            unmapped=parse_unmapped(unmapped, classes),
        )


def parse_label_map(entries: Sequence[str], class_names: Sequence[str]) -> tuple[tuple[float, int], ...]:
    """Parse ``["VALUE:CLASS", ...]`` where CLASS is a class index or name.

    Example: ISBI-2012 membranes ``["0:membrane", "255:background"]`` with classes
    ``["background", "membrane"]`` gives ``((0.0, 1), (255.0, 0))``.
    """
    out = []
    for entry in entries:
        value, sep, cls = str(entry).partition(":")
        if not sep:
            raise ValueError(f"label map entry {entry!r} must look like VALUE:CLASS (e.g. 255:mito)")
        try:
            raw = float(value)
        except ValueError:
            raise ValueError(f"label map entry {entry!r}: {value!r} is not a number") from None
        cls = cls.strip()
        if cls in class_names:
            index = list(class_names).index(cls)
        elif cls.lstrip("-").isdigit():
            index = int(cls)
        else:
            raise ValueError(f"label map entry {entry!r}: unknown class {cls!r}; classes: {list(class_names)}")
        out.append((raw, index))
    values = [v for v, _ in out]
    if len(set(values)) != len(values):
        raise ValueError(f"label map lists a value twice: {list(entries)}")
    return tuple(out)


def to_class_map(raw: np.ndarray, spec: LabelSpec, source: str = "labels") -> np.ndarray:
    """Class map of a raw label array.

    Args:
        raw: any shape, integer or float label values.
        spec: the reading rules.
        source: file name for error messages.

    Returns:
        uint8 array of ``raw.shape``: class indices, 255 = ignore.

    Raises:
        ValueError: values without a class (naming them and ``source``).
    """
    raw = np.asarray(raw)
    ignore = (raw == spec.ignore_value) if spec.ignore_value is not None else np.zeros(raw.shape, bool)
    if spec.threshold is not None:
        out = (raw > spec.threshold).astype(np.uint8)
    elif spec.mapping:
        out = np.zeros(raw.shape, np.uint8)
        known = ignore.copy()
        for value, cls in spec.mapping:
            hit = raw == value
            out[hit] = cls
            known |= hit
        if not known.all():
            if spec.unmapped == "error":
                extra = np.unique(raw[~known])
                raise ValueError(
                    f"{source}: label values {extra[:10].tolist()} are not in the label map "
                    f"{[v for v, _ in spec.mapping]}; add them or set unmapped (ignore, background "
                    "or a class)"
                )
            out[~known] = IGNORE_INDEX if spec.unmapped == "ignore" else int(spec.unmapped)
    else:
        valid = raw[~ignore]
        if valid.size and (
            valid.min() < 0
            or valid.max() >= spec.num_classes
            or (np.issubdtype(valid.dtype, np.floating) and not np.all(valid == np.round(valid)))
        ):
            extra = np.unique(valid[(valid < 0) | (valid >= spec.num_classes) | (valid != np.round(valid))])
            raise ValueError(
                f"{source}: label values {extra[:10].tolist()} are not class indices "
                f"0..{spec.num_classes - 1}; set a mask threshold or a label map"
            )
        out = raw.astype(np.uint8)
    out[ignore] = IGNORE_INDEX
    return out

"""The typed records the build's modules hand each other, and their on-disk JSON form.

* :class:`SourceRow` - one row of ``OUT/sources.parquet`` (one volume of a source);
* :class:`PartRecord` - ``OUT/parts/<key>.json``, what a finished source left behind;
* :class:`CutPatches` - the patches cut from one volume: crops, planes, hashes, statistics.

The JSON of a part keeps its keys and their order (format :data:`PART_FORMAT`), so an
output folder built by an earlier version resumes.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Mapping

import numpy as np

from cemcurate.sources import SourceOptions, SourceSpec
from cemcurate.standardize import IntensityWindow

if TYPE_CHECKING:
    import pandas as pd

PART_FORMAT = 1


def encode_files(files: list[Path]) -> str:
    """The ``files`` cell of a source row: the path of a single file, else a JSON list of paths."""
    return json.dumps([str(p) for p in files]) if len(files) > 1 else str(files[0])


def decode_files(cell: str) -> list[Path]:
    """The paths of a ``files`` cell written by :func:`encode_files`."""
    return [Path(f) for f in json.loads(cell)] if str(cell).startswith("[") else [Path(cell)]


@dataclass
class SourceRow:
    """One volume of a source in ``OUT/sources.parquet``; the columns in this order.

    ``shape`` and ``voxel_size`` are the tuple's text, ``(z, y, x)`` (nm for the voxel size;
    empty when unknown); ``window_low``/``window_high`` are the intensity window in the
    source's native units (NaN: uint8 passed through); ``n_raw`` counts the patches cut and
    ``n_unique`` those left after deduplication; ``status`` is ``ok`` or ``failed`` (with
    ``error``); ``notes`` are warnings for a person, joined by ``"; "``.
    """

    source: str
    files: str
    reader: str = ""
    shape: str = ""
    dtype: str = ""
    voxel_size: str = ""
    voxel_size_from: str = ""
    planes: str = ""
    window_low: float = math.nan
    window_high: float = math.nan
    invert: bool = False
    stack: bool = False
    dataset: str = ""
    n_raw: int = 0
    n_unique: int = 0
    status: str = "ok"
    error: str = ""
    notes: str = ""

    @classmethod
    def for_spec(cls, spec: SourceSpec, name: str, **values) -> SourceRow:
        """The row of volume ``name`` of ``spec``; ``values`` set the other columns."""
        return cls(
            source=name, files=encode_files(spec.files), invert=spec.options.invert, stack=spec.options.stack, **values
        )

    @classmethod
    def failed(cls, spec: SourceSpec, error: str) -> SourceRow:
        """The one row of a source that could not be processed, ``error`` saying why."""
        return cls.for_spec(spec, spec.name, status="failed", error=error)

    @classmethod
    def from_table(cls, row: Mapping) -> SourceRow:
        """A row read back from ``OUT/sources.parquet`` (a mapping of its columns)."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in row.items() if k in names})

    def window(self) -> IntensityWindow:
        """The intensity window this volume was standardised with."""
        return IntensityWindow.from_bounds(self.window_low, self.window_high, self.invert)

    def spec(self) -> SourceSpec:
        """A :class:`SourceSpec` that opens this volume again (the sidecar's voxel size aside)."""
        options = SourceOptions(invert=bool(self.invert), stack=bool(self.stack), dataset=self.dataset or None)
        return SourceSpec(self.source, decode_files(self.files), options)


@dataclass
class Extends:
    """The earlier part a stack's part was extended from: its fingerprint and patch count."""

    fingerprint: str
    count: int


@dataclass
class PartRecord:
    """``OUT/parts/<key>.json``: a processed source.

    ``fingerprint`` identifies the source's files and the settings that shape its patches
    (:mod:`cemcurate.build.resume`), ``settings`` the settings alone; ``files`` holds
    ``[name, size, mtime_ns]`` per file. A part with ``status == "ok"`` has its manifest rows
    in ``OUT/parts/<key>.parquet``; a failed one has one row whose ``error`` says why.
    """

    key: str
    name: str
    fingerprint: str
    settings: str
    files: list[list]
    status: str = "ok"
    sources: list[SourceRow] = field(default_factory=list)
    extends: Extends | None = None
    # The manifest rows of the part as the worker wrote them, handed back with the record so
    # the merge need not read them from disk again; not part of the JSON (None when read).
    rows: pd.DataFrame | None = field(default=None, repr=False, compare=False)

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def to_json(self) -> str:
        data = {
            "format": PART_FORMAT,
            "key": self.key,
            "name": self.name,
            "fingerprint": self.fingerprint,
            "settings": self.settings,
            "files": self.files,
            "status": self.status,
            "sources": [dataclasses.asdict(row) for row in self.sources],
        }
        if self.extends is not None:
            data["extends"] = dataclasses.asdict(self.extends)
        return json.dumps(data, default=str)

    @classmethod
    def from_json(cls, text: str) -> PartRecord | None:
        """The record in ``text``, or None when it is not a readable part of this format."""
        try:
            data = json.loads(text)
            if data.get("format") != PART_FORMAT:
                return None
            extends = data.get("extends")
            return cls(
                key=data["key"],
                name=data["name"],
                fingerprint=data["fingerprint"],
                settings=data["settings"],
                files=data["files"],
                status=data["status"],
                sources=[SourceRow(**row) for row in data["sources"]],
                extends=Extends(**extends) if extends is not None else None,
            )
        except (ValueError, KeyError, TypeError, AttributeError):
            return None


@dataclass
class CutPatches:
    """The patches cut from one volume, in the order they were written to its shard.

    ``grid``: int64 (n, 4), the crop ``(y, x, h, w)`` in its plane; ``planes``: object (n,),
    ``xy``/``xz``/``yz``; ``slices``: int64 (n,), index along the plane's normal; ``hashes``:
    uint64 (n,) dHashes; ``stats``: float32 (n, 2), mean and std of each patch in [0, 1].
    """

    grid: np.ndarray
    planes: np.ndarray
    slices: np.ndarray
    hashes: np.ndarray
    stats: np.ndarray

    def __len__(self) -> int:
        return len(self.hashes)

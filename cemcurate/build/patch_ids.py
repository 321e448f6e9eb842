"""Stable ``patch_id`` values: the registry ``OUT/parts/patch_ids.json``.

The registry maps each part key to ``{"fingerprint": ..., "blocks": [[first local id,
first patch_id, count], ...]}``. A part keeps its ids while its fingerprint is unchanged; a
stack extended with new files keeps the ids of its old patches and gets a new block for the
added ones; any other change gives the part a new block. New blocks start after the highest
id ever handed out, so an id is never reused for other pixels.
"""

from __future__ import annotations

import json

import numpy as np

from cemcurate.build.records import PartRecord
from cemcurate.common.atomic import atomic_path
from cemcurate.layout import BuildLayout


def _updated_entry(entry: dict | None, record: PartRecord, n: int, next_id: int) -> tuple[dict, int]:
    """The registry entry of a part of ``n`` patches, given its previous entry (or None), and
    how many new ids it took from ``next_id`` on."""
    held = sum(b[2] for b in entry["blocks"]) if entry else -1
    if entry and entry["fingerprint"] == record.fingerprint and held == n:
        return entry, 0
    extends = record.extends
    if entry and extends and entry["fingerprint"] == extends.fingerprint and held == extends.count <= n:
        return {"fingerprint": record.fingerprint, "blocks": entry["blocks"] + [[held, next_id, n - held]]}, n - held
    return {"fingerprint": record.fingerprint, "blocks": [[0, next_id, n]]}, n


def assign_patch_ids(layout: BuildLayout, records: list[PartRecord], counts: dict[str, int]) -> dict[str, np.ndarray]:
    """``patch_id`` of every local id of each part (``{key: int64 array indexed by local id}``).

    ``counts`` gives the number of manifest rows of each part key (missing: 0). Updates the
    registry (see the module docstring) atomically.
    """
    registry = json.loads(layout.patch_ids.read_text()) if layout.patch_ids.is_file() else {}
    next_id = max((b[1] + b[2] for entry in registry.values() for b in entry["blocks"]), default=0)
    ids = {}
    for record in records:
        n = counts.get(record.key, 0)
        entry, taken = _updated_entry(registry.get(record.key), record, n, next_id)
        next_id += taken
        registry[record.key] = entry
        table = np.empty(n, np.int64)
        for local, first, count in entry["blocks"]:
            table[local : local + count] = first + np.arange(count)
        ids[record.key] = table
    with atomic_path(layout.patch_ids) as tmp:
        tmp.write_text(json.dumps(registry, indent=1))
    return ids

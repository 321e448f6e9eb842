"""Publishing a build's outputs together: the old set or the new set, never a mix.

The manifest, the source table, ``store.json``, the resolved config and the report belong
together: a manifest next to another build's ``store.json`` would normalise with the wrong
statistics. So a build writes the new files into ``OUT/.commit/`` (:func:`stage`), then
:func:`commit`:

1. flushes them to disk;
2. writes ``OUT/.commit/READY`` listing them, the point of no return;
3. renames each into ``OUT`` (one ``os.replace`` each);
4. removes ``READY`` and the staging folder.

A crash before step 2 leaves the old outputs untouched (the next build discards the staged
files); a crash after it leaves a ``READY`` list that :func:`finish_interrupted_commit`
completes, whoever comes next (the next build, ``open_patches``, ``cemcurate check``), so
readers only ever see a whole set. Shards are not part of this: a new build writes new shard
names and deletes the old ones only after its manifest is committed.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Callable

from cemcurate.layout import BuildLayout

READY = "READY"


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def stage(layout: BuildLayout) -> Path:
    """A fresh, empty staging folder (anything left there by an unfinished build is removed)."""
    shutil.rmtree(layout.commit_dir, ignore_errors=True)
    layout.commit_dir.mkdir(parents=True)
    return layout.commit_dir


def commit(layout: BuildLayout, names: list[str], rename: Callable[[Path, Path], None] = os.replace) -> None:
    """Publish the staged files ``names`` (file names in ``OUT/.commit``) into ``OUT``, in that order.

    ``rename`` is ``os.replace``; tests pass one that stops after a given number of renames
    to check every crash point.
    """
    staging = layout.commit_dir
    for name in names:
        if not (staging / name).is_file():
            raise FileNotFoundError(f"{staging / name}: staged output missing; nothing was published")
        _fsync(staging / name)
    ready = staging / READY
    tmp = staging / f".{READY}.tmp"
    tmp.write_text(json.dumps(names))
    _fsync(tmp)
    os.replace(tmp, ready)
    _fsync(staging)
    _publish(layout, names, rename)


def _publish(layout: BuildLayout, names: list[str], rename: Callable[[Path, Path], None]) -> None:
    staging = layout.commit_dir
    for name in names:
        if (staging / name).exists():  # absent: renamed already, before an interruption
            rename(staging / name, layout.root / name)
    _fsync(layout.root)
    (staging / READY).unlink(missing_ok=True)
    shutil.rmtree(staging, ignore_errors=True)


def finish_interrupted_commit(layout: BuildLayout) -> bool:
    """Complete a commit that was interrupted after its point of no return; True if there was one.

    Safe to call at any time and from a reader: without ``READY`` it changes nothing (a
    staging folder without it belongs to a running or crashed build, which discards it).
    """
    ready = layout.commit_dir / READY
    if not ready.is_file():
        return False
    try:
        names = json.loads(ready.read_text())
    except FileNotFoundError:  # another process finished it a moment ago
        return False
    try:
        _publish(layout, names, os.replace)
    except FileNotFoundError:  # raced with another process finishing the same commit
        pass
    return True


def discard_unfinished_stage(layout: BuildLayout) -> bool:
    """Remove a staging folder that never reached ``READY`` (only the build holding the lock may);
    True if there was one."""
    if layout.commit_dir.exists() and not (layout.commit_dir / READY).is_file():
        shutil.rmtree(layout.commit_dir, ignore_errors=True)
        return True
    return False

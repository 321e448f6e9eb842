"""File-level I/O helpers: atomic output and content digests.

Atomic output writes under a temporary name in the same folder, then renames, so a crash
or Ctrl-C while writing leaves the previous file (or nothing) in place, never a
half-written one.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import uuid
from pathlib import Path
from typing import Iterator


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling of ``path``; on success rename it over ``path``.

    Works for files and directories (e.g. a zarr store). On error the temporary is removed
    and ``path`` is untouched. An OS error that names no file (a full disk: ``[Errno 28] No
    space left on device``) is raised again naming ``path``, so the message says where.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        try:
            yield tmp
        except OSError as exc:
            if exc.filename is None and exc.errno is not None:
                raise OSError(exc.errno, exc.strerror, str(path)) from exc
            raise
        replace_path(tmp, path)
    finally:
        remove_path(tmp)


def replace_path(tmp: str | Path, path: str | Path) -> None:
    """Rename ``tmp`` (a file or a directory) over ``path``, whichever ``path`` is now."""
    tmp, path = Path(tmp), Path(path)
    if path.is_dir() and tmp.is_dir():
        # A directory cannot be replaced in one rename; move the old one aside first.
        old = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.old")
        os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, path)


def remove_path(path: str | Path) -> None:
    """Remove a file or a directory tree if it exists."""
    path = Path(path)
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists():
        path.unlink()


class PublishOnExit:
    """Base of outputs written in pieces, then published: used in a ``with`` block, a clean exit
    calls ``finalize()`` (publish) and an exception calls ``discard()`` (remove the temporary data)."""

    def finalize(self):
        raise NotImplementedError

    def discard(self) -> None:
        raise NotImplementedError

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.finalize()
        else:
            self.discard()


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes, read ``chunk`` bytes at a time."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()

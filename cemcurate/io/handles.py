"""A small per-process cache of open file handles for lazy readers.

Re-opening a file for every ``read_slices`` call is cheap for memory maps but not for
multi-page TIFFs (tifffile re-parses every page header) or videos (decoding restarts at
frame 0). Readers therefore keep their backend objects here, keyed by path and the
file's modification time and size (a rewritten file is reopened), and at most
``MAX_OPEN`` stay open; the least recently used is closed first. Entries made in another
process (inherited through ``fork``) are never used, closed or freed here: a forked child
starts with an empty cache and keeps the inherited objects referenced until it exits,
because freeing a PyAV decoder that another process opened deadlocks inside FFmpeg.
"""

from __future__ import annotations

import atexit
import os
import threading
from collections import OrderedDict
from typing import Any, Callable

MAX_OPEN = 8

_LOCK = threading.RLock()
_CACHE: OrderedDict[tuple, tuple[Any, Callable[[], None]]] = OrderedDict()


def _key(kind: str, path: str, extra: tuple) -> tuple:
    st = os.stat(path)
    return (kind, path, st.st_mtime_ns, st.st_size, extra)


def get(kind: str, path: str, opener: Callable[[], tuple[Any, Callable[[], None]]], *extra: Any) -> Any:
    """The cached object for ``(kind, path, extra)``, opening it with ``opener`` if needed.

    ``opener()`` returns ``(object, close_function)``.
    """
    key = _key(kind, path, extra)
    with _LOCK:
        if key in _CACHE:
            _CACHE.move_to_end(key)
            return _CACHE[key][0]
        obj, closer = opener()
        _CACHE[key] = (obj, closer)
        while len(_CACHE) > MAX_OPEN:
            _close(*_CACHE.popitem(last=False))
        return obj


def drop(kind: str, path: str, *extra: Any) -> None:
    """Close and forget one entry (e.g. a video decoder that must restart)."""
    with _LOCK:
        for key in [k for k in _CACHE if (k[0], k[1], k[4]) == (kind, path, extra)]:
            _close(key, _CACHE.pop(key))


def close_all() -> None:
    """Close every handle this process opened (safe to call at any time)."""
    with _LOCK:
        while _CACHE:
            _close(*_CACHE.popitem(last=False))


def _close(key: tuple, entry: tuple[Any, Callable[[], None]]) -> None:
    try:
        entry[1]()
    except Exception:  # a handle that fails to close must not break reading others
        pass


# Objects a parent process opened before forking this one: never freed (see the module docstring).
_INHERITED: list[list[tuple[Any, Callable[[], None]]]] = []


def _after_fork_in_child() -> None:
    global _LOCK
    _LOCK = threading.RLock()  # the parent's lock may have been held by one of its threads
    _INHERITED.append(list(_CACHE.values()))
    _CACHE.clear()


os.register_at_fork(after_in_child=_after_fork_in_child)
atexit.register(close_all)

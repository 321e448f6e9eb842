"""One build at a time per output folder: an exclusive lock on ``OUT/.lock``.

The lock is an ``fcntl.flock`` on the file, so the system releases it when the holder
dies, kill -9 included: a crashed build never leaves OUT locked. The file says who holds
it (pid, host, start time, command), for the message a second build gives.
"""

from __future__ import annotations

import fcntl
import os
import socket
import sys
import time
from typing import TextIO

from cemcurate.layout import BuildLayout


class BuildLockedError(OSError):
    """Another process holds the output folder's lock."""


class BuildLock:
    """``with BuildLock(layout, wait=False):`` hold OUT's lock for the block.

    Raises:
        BuildLockedError: on entry, when another build holds the lock and ``wait`` is False
            (the message names the holder and ``--wait``).
    """

    def __init__(self, layout: BuildLayout, wait: bool = False, on_wait=None):
        self.layout, self.wait, self.on_wait = layout, wait, on_wait
        self._file: TextIO | None = None

    def __enter__(self) -> BuildLock:
        self.layout.root.mkdir(parents=True, exist_ok=True)
        handle = open(self.layout.lock, "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            if not self.wait:
                handle.close()
                raise BuildLockedError(
                    f"{self.layout.root}: another build is writing this folder ({holder}); wait for it to "
                    "finish, or pass --wait to start when it has"
                ) from None
            if self.on_wait is not None:
                self.on_wait(holder)
            fcntl.flock(handle, fcntl.LOCK_EX)
        handle.seek(0)
        handle.truncate()
        started = time.strftime("%Y-%m-%d %H:%M:%S")
        handle.write(f"pid {os.getpid()} on {socket.gethostname()} since {started}: {' '.join(sys.argv)}\n")
        handle.flush()
        self._file = handle
        return self

    def __exit__(self, *exc) -> None:
        assert self._file is not None
        self._file.seek(0)
        self._file.truncate()
        fcntl.flock(self._file, fcntl.LOCK_UN)
        self._file.close()
        self._file = None

"""Video files (``.avi .mp4 .mov .mkv``) via imageio's PyAV plugin.

Frames form the z axis of an ``xy_only`` uint8 volume (time is not a spatial axis, and
a video carries no voxel size). Frames are decoded as gray (the luma plane, through
FFmpeg's ``gray`` conversion). Opening reads the container header (and counts packets
when the header has no frame count, as in Matroska); ``read_slices`` decodes
sequentially from a decoder kept in :mod:`cemcurate.io.handles`, so reading ranges in
increasing order decodes each frame once; going backwards restarts from frame 0.
Frames are counted by decoding order, not by seeking, so indices are exact.
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np

from cemcurate.common.lazy import lazy_import

from . import handles
from .base import ReadError, Slicer, Volume

iio = lazy_import("imageio.v3")
av = lazy_import("av")


def _open_plugin(path):
    try:
        return iio.imopen(str(path), "r", plugin="pyav")
    except Exception as exc:
        raise ReadError(
            path, f"PyAV could not open it as a video ({type(exc).__name__}: {exc}); the file is corrupt or not a video"
        ) from exc


def _count_packets(path) -> int:
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        return sum(1 for packet in container.demux(stream) if packet.size)


def read_video(path: Path, dataset: str | None = None) -> list[Volume]:
    """One ``(frames, y, x)`` uint8 volume, ``xy_only=True``."""
    plugin = _open_plugin(path)
    try:
        props = plugin.properties(format="gray")
    except Exception as exc:
        raise ReadError(path, f"no decodable video stream ({type(exc).__name__}: {exc})") from exc
    finally:
        plugin.close()
    n, height, width = (int(s) for s in props.shape[:3])
    notes = []
    if n <= 0:
        n = _count_packets(path)
        notes.append("frame count not in the header; counted packets")
    if n <= 0:
        raise ReadError(path, "the video has no frames")
    shape = (n, height, width)
    return [
        Volume(
            shape=shape,
            dtype=np.uint8,
            read_slices=_VideoSlicer(path, shape, np.uint8),
            reader="video",
            xy_only=True,
            notes=notes,
        )
    ]


class _Cursor:
    """A decoder positioned at frame ``next``."""

    def __init__(self, path):
        self.plugin = _open_plugin(path)
        self.frames = self.plugin.iter(format="gray")
        self.next = 0
        self.lock = threading.Lock()

    def close(self) -> None:
        self.plugin.close()


class _VideoSlicer(Slicer):
    def _cursor(self) -> _Cursor:
        return handles.get("video", self.path, lambda: (lambda c: (c, c.close))(_Cursor(self.path)))

    def _read(self, z0: int, z1: int) -> np.ndarray:
        cursor = self._cursor()
        if cursor.next > z0:
            handles.drop("video", self.path)
            cursor = self._cursor()
        with cursor.lock:
            out = np.empty((z1 - z0,) + self.shape[1:], dtype=np.uint8)
            while cursor.next < z1:
                frame = next(cursor.frames, None)
                if frame is None:
                    handles.drop("video", self.path)
                    raise ReadError(
                        self.path,
                        f"video ended after {cursor.next} frames, but {self.shape[0]} "
                        "were expected; the file is truncated",
                    )
                if cursor.next >= z0:
                    out[cursor.next - z0] = frame[..., 0] if frame.ndim == 3 else frame
                cursor.next += 1
        return out

"""The access trace of images the fscache daemon serves (``GET /api/v1/trace``): which files the kernel's READs
of blob cache objects fell in, first access first, per mounted image (``<volume>/<fsid>``).

A READ is a range of a blob's uncompressed layout; it is mapped back through the image's chunk indexes to the
files whose chunks it overlaps (a reverse index built from the bootstrap on the image's first READ).  Unlike the
file-level trace of fanotify mounts (:mod:`cachefilesd_py.mount.trace`), the kernel's readahead widens READs, so
files sharing a chunk or a readahead window with a read one are listed too; and only cache misses raise READs,
so record with a cold cache and without prefetch (``--no-prefetch``).  Each entry: ``path``, ``offset``
and ``length`` (the file bytes the first READ covered), ``t`` (seconds since the image's bootstrap was opened).
Bounded: at most :data:`~cachefilesd_py.mount.trace.TRACE_MAX_ENTRIES` files an image (then ``dropped``).
"""

from __future__ import annotations

import bisect
import threading
import time
from typing import Any

from .image_store import Image
from .mount.trace import TRACE_MAX_ENTRIES

__all__ = ["ReadTraces"]


class _ImageTrace:
    def __init__(self, image: Image, max_entries: int) -> None:
        self.image = image
        self.started = time.time()
        self.max_entries = max_entries
        self.files: list[dict[str, Any]] = []
        self.seen: set[str] = set()
        self.dropped = 0
        # blob id -> sorted (d_off, d_end, path, file_offset) of every file chunk in it, built on first use
        self._index: dict[str, list[tuple[int, int, str, int]]] | None = None
        self._starts: dict[str, list[int]] = {}

    def _build(self) -> dict[str, list[tuple[int, int, str, int]]]:
        bs = self.image.bootstrap
        ids = {b.blob_index: b.blob_id for b in bs.blobs}
        index: dict[str, list[tuple[int, int, str, int]]] = {}
        seen: set[int] = set()
        for path, _, ino in bs.walk(on_error=lambda _p, _e: None):
            if not ino.is_reg or ino.nid in seen:
                continue
            seen.add(ino.nid)
            for c in bs.file_chunks(ino):
                bid = ids.get(c.blob_index)
                if c.blob_offset is not None and bid is not None:
                    index.setdefault(bid, []).append((c.blob_offset, c.blob_offset + c.length, path, c.file_offset))
        for bid, entries in index.items():
            entries.sort()
            self._starts[bid] = [e[0] for e in entries]
        return index

    def record(self, blob_id: str, offset: int, length: int) -> None:
        if self._index is None:
            self._index = self._build()
        entries = self._index.get(blob_id)
        if not entries:
            return
        end = offset + length
        # chunks are at most 16 MiB: a chunk meeting the range starts at most that far before it
        i = bisect.bisect_left(self._starts[blob_id], offset - (16 << 20))
        now = round(time.time() - self.started, 6)
        for d_off, d_end, path, file_offset in entries[i:]:
            if d_off >= end:
                break
            if d_end <= offset or path in self.seen:
                continue
            if len(self.seen) >= self.max_entries:
                self.dropped += 1
                continue
            self.seen.add(path)
            start = max(d_off, offset)
            self.files.append({"path": path, "offset": file_offset + start - d_off,
                               "length": min(d_end, end) - start, "t": now})  # fmt: skip


class ReadTraces:
    """The traces of the images mounted through the daemon, keyed ``<volume>/<fsid>``."""

    def __init__(self, max_entries: int = TRACE_MAX_ENTRIES) -> None:
        self.max_entries = max_entries
        self._traces: dict[str, _ImageTrace] = {}
        self._lock = threading.Lock()

    def opened(self, volume: str, image: Image) -> None:
        """The bootstrap of ``image`` was opened in ``volume``: a fresh trace (a new mount)."""
        with self._lock:
            self._traces[f"{volume}/{image.fsid}"] = _ImageTrace(image, self.max_entries)

    def read(self, volume: str, blob_id: str, offset: int, length: int) -> None:
        """The kernel READ ``[offset, offset + length)`` of blob ``blob_id``'s object in ``volume``."""
        prefix = f"{volume}/"
        with self._lock:
            for key, trace in self._traces.items():
                if key.startswith(prefix) and blob_id in trace.image.blobs:
                    trace.record(blob_id, offset, length)

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {key: {"files": list(t.files), "dropped": t.dropped, "max_entries": t.max_entries}
                    for key, t in self._traces.items()}  # fmt: skip

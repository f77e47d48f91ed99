"""A slow link for benchmarks: :class:`ShapedFront`, the :class:`~tests.support.registry.Front` proxy with a
round-trip latency added to every request and every byte it sends paced through one shared :class:`Link`
(a bandwidth cap for all connections together, as one network path would be), counting what it sent.

The pacing is the point of these sleeps: they model the wire, they synchronise nothing.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from tests.support.registry import Front, _Handler

#: the most one paced write sends at once: connections sharing the link take turns at this grain
SLICE = 64 << 10


class Link:
    """``bandwidth`` bytes/s shared by every sender, first come first served in :data:`SLICE` pieces;
    ``sent`` counts the bytes that went through."""

    def __init__(self, bandwidth: int) -> None:
        assert bandwidth > 0
        self.bandwidth = bandwidth
        self.sent = 0
        self._free_at = 0.0  # when the link has sent everything reserved so far
        self._lock = threading.Lock()

    def send(self, write: Callable[[bytes], object], data: bytes) -> None:
        view = memoryview(data)
        for start in range(0, len(view), SLICE):
            piece = view[start : start + SLICE]
            with self._lock:
                self._free_at = max(self._free_at, time.monotonic()) + len(piece) / self.bandwidth
                done_at = self._free_at
                self.sent += len(piece)
            time.sleep(max(0.0, done_at - time.monotonic()))
            write(piece)

    def reset(self) -> None:
        with self._lock:
            self.sent = 0


class _PacedWriter:
    """A handler's ``wfile`` whose writes go through the link."""

    def __init__(self, raw: Any, link: Link) -> None:
        self.raw = raw
        self.link = link

    def write(self, data: bytes) -> int:
        self.link.send(self.raw.write, data)
        return len(data)

    def flush(self) -> None:
        self.raw.flush()

    @property
    def closed(self) -> bool:
        return bool(self.raw.closed)

    def close(self) -> None:
        self.raw.close()


class ShapedFront(Front):
    """A :class:`Front` (proxying ``upstream``, or serving a directory) that waits ``latency`` seconds before
    answering each request and sends every answer (headers and body) through a :class:`Link` of ``bandwidth``
    bytes/s; :attr:`bytes_sent` is what it sent since the last :meth:`reset`."""

    def __init__(self, *, latency: float, bandwidth: int, **options: Any) -> None:
        super().__init__(**options)
        self.latency = latency
        self.link = Link(bandwidth)

    @property
    def bytes_sent(self) -> int:
        return self.link.sent

    def reset(self) -> None:
        """Forget the requests and bytes counted so far."""
        self.clear()
        self.link.reset()

    def handle(self, h: _Handler) -> None:
        time.sleep(self.latency)
        raw = h.wfile
        h.wfile = _PacedWriter(raw, self.link)  # type: ignore[assignment]
        try:
            super().handle(h)
        finally:
            h.wfile = raw

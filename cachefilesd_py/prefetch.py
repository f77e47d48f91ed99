"""Prefetch on mount: the files of the bootstrap's prefetch table first, in table order, then (``prefetch_all``)
the rest of every blob; in the background, below on-demand reads, through the :class:`~.pipeline.Pipeline`
(so every chunk is fetched once, digest-verified and decompressed like any other).

Below on-demand reads: one thread of its own (never the front end's fill workers; not niced, since a niced thread
holding the GIL off the CPU stalls the fill workers), in pieces of at most ``merge`` bytes, with ``wait=False``
fills (a chunk an on-demand read is fetching is left to it, never waited for); an on-demand read that wants a chunk
the prefetch is fetching waits for that one fetch, not for the prefetch queue. ``bandwidth`` (bytes/s, 0: no cap)
limits the compressed bytes the prefetch fetches. :meth:`Prefetcher.stop` ends it after the piece in progress.

A file's data is its chunks, merged while they are contiguous in one blob and the piece stays within
``merge`` bytes; a directory of the table stands for every regular file under it
(:func:`erofs.reader.prefetch.prefetch_files`).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

from erofs.reader.bootstrap import Bootstrap
from erofs.reader.prefetch import prefetch_files

from .pipeline import BlobHandle, Pipeline, PresentFn, WriteFn

__all__ = ["DEFAULT_MERGE", "PrefetchItem", "PrefetchOptions", "PrefetchTarget", "Prefetcher", "plan_prefetch"]

log = logging.getLogger(__name__)

DEFAULT_MERGE = 1 << 20
_PAGE = 4096


@dataclass(frozen=True, slots=True)
class PrefetchOptions:
    """What a daemon prefetches on mount: the table's files (``table``), then every blob (``everything``); the cap
    in bytes/s fetched (``bandwidth``, 0: none) and the largest piece (``merge``)."""

    table: bool = True
    everything: bool = False
    bandwidth: int = 0
    merge: int = DEFAULT_MERGE

    @property
    def enabled(self) -> bool:
        return self.table or self.everything


@dataclass(frozen=True, slots=True)
class PrefetchItem:
    """One piece to fill: ``[offset, offset + length)`` of blob ``blob_id``'s uncompressed layout; ``file``: the
    table file it belongs to (its number, -1 for the rest of the blobs); ``last``: the file's last piece."""

    blob_id: str
    offset: int
    length: int
    file: int = -1
    last: bool = False


class PrefetchTarget(NamedTuple):
    """Where a blob's prefetched data goes: the pipeline's ``write`` and ``present``, and what to do after a piece
    (a fanotify mount unmarks a complete cache file)."""

    handle: BlobHandle
    write: WriteFn
    present: PresentFn
    after: Callable[[], object] | None = None


def _file_pieces(bs: Bootstrap, ino: Any, merge: int) -> list[tuple[int, int, int]]:
    """(blob_index, offset, length) pieces of a file's chunks."""
    out: list[tuple[int, int, int]] = []
    for c in bs.file_chunks(ino):
        if c.blob_offset is None or c.blob_index < 0:
            continue
        if out:
            bi, off, length = out[-1]
            end = -(-(off + length) // _PAGE) * _PAGE
            if bi == c.blob_index and off + length <= c.blob_offset <= end and \
                    c.blob_offset + c.length - off <= merge:  # fmt: skip
                out[-1] = (bi, off, c.blob_offset + c.length - off)
                continue
        out.append((c.blob_index, c.blob_offset, c.length))
    return out


def plan_prefetch(bs: Bootstrap, handles: Mapping[str, BlobHandle], pipeline: Pipeline, *, merge: int = DEFAULT_MERGE,
                  everything: bool = False) -> tuple[list[PrefetchItem], int]:  # fmt: skip
    """(pieces in order, number of table files): the table's files, then with ``everything`` every blob of
    ``handles`` whole.  Blobs not in ``handles`` (not served here) are left out."""
    items: list[PrefetchItem] = []
    nfiles = 0
    ids = {b.blob_index: b.blob_id for b in bs.blobs}
    for _, ino in prefetch_files(bs):
        pieces = [(ids.get(bi), off, n) for bi, off, n in _file_pieces(bs, ino, merge)]
        pieces = [p for p in pieces if p[0] in handles]
        if not pieces:
            continue
        for i, (bid, off, n) in enumerate(pieces):
            assert bid is not None
            items.append(PrefetchItem(bid, off, n, nfiles, i == len(pieces) - 1))
        nfiles += 1
    if everything:
        for bid, h in handles.items():
            for off, n in pipeline.pieces(h, 0, h.uncompressed_size, merge):
                items.append(PrefetchItem(bid, off, n))
    return items, nfiles


class Prefetcher:
    """Runs a plan on a thread of its own; :meth:`stats` is its progress (``state``: idle → running → done, or
    stopped; ``files_done``/``files``, ``bytes`` written, ``bytes_fetched`` (compressed), ``pieces_done``/
    ``pieces``, ``errors``).  ``on_progress(stats)`` is called after each table file, each 64 pieces and at
    the end."""

    def __init__(self, items: list[PrefetchItem], files: int, targets: Mapping[str, PrefetchTarget],
                 pipeline: Pipeline, *, bandwidth: int = 0, all_blobs: bool = False,
                 on_progress: Callable[[dict[str, Any]], object] | None = None) -> None:  # fmt: skip
        self.items = items
        self.targets = dict(targets)
        self.pipeline = pipeline
        self.bandwidth = bandwidth
        self.on_progress = on_progress
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._stats: dict[str, Any] = {
            "state": "idle", "files": files, "files_done": 0, "all_blobs": all_blobs, "pieces": len(items),
            "pieces_done": 0, "bytes": 0, "bytes_fetched": 0, "errors": 0, "bandwidth": bandwidth, "seconds": 0.0,
        }  # fmt: skip

    def start(self) -> None:
        if not self.items:
            self._set(state="done")
            self._progress()
            return
        self._set(state="running")
        self._thread = threading.Thread(target=self._run, name="prefetch", daemon=True)
        self._thread.start()

    def cancel(self) -> None:
        """Ask it to end after the piece in progress, without waiting."""
        self._stop.set()

    def stop(self) -> None:
        """End after the piece in progress and wait for that (a no-op once done)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until it ends by itself (or ``timeout``); whether it has."""
        thread = self._thread
        if thread is not None:
            thread.join(timeout)
            return not thread.is_alive()
        return True

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return dict(self._stats)

    def _set(self, **kv: Any) -> None:
        with self._lock:
            self._stats.update(kv)

    def _add(self, **kv: int) -> None:
        with self._lock:
            for k, v in kv.items():
                self._stats[k] += v

    def _progress(self) -> None:
        if self.on_progress is not None:
            try:
                self.on_progress(self.stats())
            except Exception as e:  # noqa: BLE001 - progress is informational
                log.warning("prefetch progress: %s", e)

    def _fetch_size(self, t: PrefetchTarget, item: PrefetchItem) -> int:
        meta = t.handle.meta
        total = 0
        for ci in meta.chunks_for_range(item.offset, item.length):
            _, c_size, d_off, d_size = meta.chunk(ci)
            if not t.present(d_off, d_size):
                total += c_size
        return total

    def _run(self) -> None:
        # Not niced: a low-priority thread that holds the GIL while the scheduler keeps it off the CPU stalls
        # every on-demand fill behind it (a priority inversion seen in benchmarks/bench_prefetch.py).
        started = time.monotonic()
        fetched = 0
        file_ok = True
        for n, item in enumerate(self.items, 1):
            if self._stop.is_set():
                break
            t = self.targets[item.blob_id]
            try:
                need = self._fetch_size(t, item)
                written = self.pipeline.fill(t.handle, item.offset, item.length, t.write, t.present, wait=False)
                if t.after is not None:
                    t.after()
                fetched += need
                self._add(bytes=written, bytes_fetched=need, pieces_done=1)
            except Exception as e:  # noqa: BLE001 - a failed piece is left to on-demand reads
                log.warning("prefetch of blob %s %d+%d: %s", item.blob_id[:16], item.offset, item.length, e)
                self._add(errors=1, pieces_done=1)
                file_ok = False
            if item.last:
                if file_ok:
                    self._add(files_done=1)
                file_ok = True
                self._progress()
            elif n % 64 == 0:
                self._progress()
            self._set(seconds=round(time.monotonic() - started, 3))
            if self.bandwidth > 0:  # the rate cap: wait until the bytes fetched so far fit in the time spent
                ahead = started + fetched / self.bandwidth - time.monotonic()
                if ahead > 0 and self._stop.wait(ahead):
                    break
        self._set(state="stopped" if self._stop.is_set() else "done", seconds=round(time.monotonic() - started, 3))
        log.info("prefetch %s", self.stats())
        self._progress()

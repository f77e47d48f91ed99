"""The fanotify event loop: answers the pre-content events of the marked cache files (:class:`FanotifyServer`).

The files are marked with ``FAN_PRE_ACCESS`` *before* the bootstrap is mounted with ``device=<cache files>``,
so every read of the mount reaches the server as an event with a byte range:

- data already there: allowed at once, on the event thread (presence comes from the cache file's page map:
  no syscall on this path);
- otherwise a worker thread fills the range through the shared :class:`~cachefilesd_py.pipeline.Pipeline`
  (whole chunks, amplified, verified, decompressed), writing through the event's fd, then allows it.  Any
  failure denies it with EIO: the reader sees EIO for that file, the daemon logs one line and keeps serving;
- a reader whose events follow each other (sequential) gets the next ``readahead`` bytes filled in the
  background (through the fd opened before the mark, which raises no event); a random reader gets none;
- a cache file with nothing left to fetch is unmarked (or not marked at all): its reads raise no event.  It is
  watched instead (inotify ``IN_MODIFY``): when it changes under the mount (root punching a hole, truncating it)
  it is marked again and the chunks whose pages are holes now are fetched again on their next read;
- with a cache size limit (:class:`~.evict.CacheLimit`) every chunk written is charged against it (the least
  recently used ones punched out to make room), reads of present data touch their chunks, a fill pins the range
  its event asked for until it is allowed, readahead stays within a quarter of the limit and is skipped when
  nothing can be evicted for it, and complete files stay marked (their reads must be seen to be counted).
"""

from __future__ import annotations

import errno
import logging
import os
import select
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from erofs.reader.backend import BackendStats, BlobBackend
from fscache.errors import FscacheError
from fscache.fanotify import FAN_NOFD, FAN_PRE_ACCESS, FanotifyGroup, PreAccessEvent
from fscache.fd import drain
from fscache.inotify import IN_MODIFY, Inotify, InotifyError

from ..pipeline import Pipeline, WriteFn
from .cachefile import CacheFile
from .evict import CacheLimit
from .watch import ImageWatch

__all__ = ["FanotifyServer"]

log = logging.getLogger(__name__)


class FanotifyServer:
    """Serves FAN_PRE_ACCESS events of the cache files of one or more mounted images through one pipeline.

    Build it (marks the files), mount, then :meth:`serve` until :meth:`stop` (from any thread or a signal
    handler) or the release of the image.  ``readahead``: bytes filled in the background after each fill
    (0 = off).  ``group``: serve this group (one the supervisor holds too) instead of a new one; ``adopted``: its
    marks exist already (a restarted worker): complete files are unmarked, the others marked again (harmless).
    ``limit``: the cache size limit of ``files`` (held as :attr:`limit`, its counters for the API).
    """

    def __init__(self, files: Sequence[CacheFile], pipeline: Pipeline, *, workers: int = 4,
                 readahead: int | None = None, readahead_workers: int = 3, group: FanotifyGroup | None = None,
                 adopted: bool = False, limit: CacheLimit | None = None) -> None:  # fmt: skip
        self.files = list(files)
        self.limit = limit
        if limit is not None:
            limit.rearm = self._rearm
            if readahead is None or readahead > limit.limit // 4:  # never a window that evicts what it reads
                readahead = min(8 * max(pipeline.amplify, 1 << 20), limit.limit // 4)
        self.pipeline = pipeline
        self.readahead = 8 * max(pipeline.amplify, 1 << 20) if readahead is None else readahead
        self.ra_piece = max(pipeline.amplify, 1 << 20)
        self.workers = workers
        self._by_inode: dict[tuple[int, int], CacheFile] = {}
        for cf in self.files:
            st = os.fstat(cf.fd)
            self._by_inode[(st.st_dev, st.st_ino)] = cf
        self._lock = threading.Lock()
        self._closing = False
        self.counters = {"events": 0, "allowed_present": 0, "filled": 0, "denied": 0, "readahead": 0,
                         "complete_unmarked": 0, "changed_under_us": 0}  # fmt: skip
        self._stop_r, self._stop_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._changes = Inotify()  # IN_MODIFY of the complete (unmarked) cache files
        self._complete: dict[int, CacheFile] = {}  # their watch descriptors
        self.group = FanotifyGroup(pre_content=True) if group is None else group
        try:
            for cf in self.files:
                # a full cache file needs no events: reads go at the kernel's own speed (unless there is a limit)
                if cf.complete() and limit is None:
                    self._watch_changes(cf)
                    cf.marked = False
                    self.counters["complete_unmarked"] += 1
                    if adopted:
                        try:
                            self.group.unmark(cf.path, FAN_PRE_ACCESS)
                        except (FscacheError, OSError):
                            pass  # was not marked
                else:
                    self.group.mark(cf.path, FAN_PRE_ACCESS)
                    cf.marked = True
        except BaseException:
            self.close(deny_queued=not adopted)
            raise
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="fanotify")
        self._ra_pool = ThreadPoolExecutor(readahead_workers, thread_name_prefix="readahead")

    # -- control --------------------------------------------------------------------------------------------
    def stop(self) -> None:
        """Make :meth:`serve` return (async-signal-safe: one write to a pipe)."""
        try:
            os.write(self._stop_w, b"x")
        except (BlockingIOError, OSError):
            pass

    def finish(self) -> None:
        """Hand over (after :meth:`stop`): drop the readahead not started, wait for every fill already taken
        (each answers its event) and for the readahead under way; the events not read stay queued."""
        self._ra_pool.shutdown(wait=True, cancel_futures=True)
        self._pool.shutdown(wait=True)

    def close(self, deny_queued: bool = True) -> None:
        """Deny every event still held or queued (EIO: when the group closes, the kernel would *allow* them,
        and holes would read as zeros), then close the group and the stop pipe."""
        self._closing = True
        ra_pool = getattr(self, "_ra_pool", None)
        if ra_pool is not None:
            ra_pool.shutdown(wait=True, cancel_futures=True)
        pool = getattr(self, "_pool", None)
        if pool is not None:
            pool.shutdown(wait=True)  # queued fills see _closing and deny
        if not self.group.closed and deny_queued:
            try:
                while events := self.group.read_events():
                    for ev in events:
                        if ev.fd >= 0:
                            self._deny(ev)
            except (FscacheError, OSError) as e:
                log.error("draining events: %s", e)
        self.group.close()
        self._changes.close()
        for fd in (self._stop_r, self._stop_w):
            try:
                os.close(fd)
            except OSError:
                pass
        self._stop_r = self._stop_w = -1

    def stats(self) -> dict[str, Any]:
        with self._lock:
            counters = dict(self.counters)
        backends: dict[int, BlobBackend] = {id(cf.handle.backend): cf.handle.backend for cf in self.files}
        backend = BackendStats.combined(b.stats for b in backends.values()).snapshot()
        out: dict[str, Any] = {} if self.limit is None else {"cache_limit": self.limit.stats()}
        return out | {
            "events": counters,
            "pipeline": self.pipeline.stats.snapshot(),
            "backend": backend,
            "blob_bytes": sum(cf.handle.compressed_size for cf in self.files),
            "blobs": {cf.handle.blob_id: {"size": cf.size, "missing": cf.missing()} for cf in self.files},
        }

    def _count(self, key: str) -> None:
        with self._lock:
            self.counters[key] += 1

    # -- serving --------------------------------------------------------------------------------------------
    def serve(self, watch: ImageWatch | None = None) -> bool:
        """Read and answer events until :meth:`stop` (False) or, with ``watch``, until the image's filesystem is
        released (True): a plain umount, or the close of the last file open on a detached mount.  A mount that
        only left the mount table (``umount -l``) is served on: its open files still read through the marks."""
        poller = select.poll()
        poller.register(self.group.fileno(), select.POLLIN)
        poller.register(self._stop_r, select.POLLIN)
        poller.register(self._changes.fileno(), select.POLLIN)
        if watch is not None:
            poller.register(watch.fileno(), select.POLLIN)
            if watch.released():  # (its events may have been read by a process sharing the watch)
                return True
        return self._serve(poller, watch, self._by_inode, self.counters)

    def _serve(self, poller: Any, watch: ImageWatch | None, by_inode: dict[tuple[int, int], CacheFile],
               counters: dict[str, int]) -> bool:  # fmt: skip
        wfd = watch.fileno() if watch is not None else -1
        while True:
            ready = poller.poll()
            if any(fd == self._stop_r for fd, _ in ready):
                drain(self._stop_r)
                return False
            if watch is not None and any(fd == wfd for fd, _ in ready) and watch.released():
                log.info("%s released", watch.mountpoint)
                return True
            if any(fd == self._changes.fileno() for fd, _ in ready):
                self._changed()
            for ev in self.group.read_events():
                if ev.fd == FAN_NOFD or ev.fd < 0:  # queue overflow: nothing to answer
                    continue
                counters["events"] += 1
                try:
                    st = os.fstat(ev.fd)
                    cf = by_inode.get((st.st_dev, st.st_ino))
                    if cf is None or ev.offset is None or ev.count is None or ev.count == 0:
                        self.group.allow(ev)  # not ours, or nothing to read
                        continue
                    if cf.watched:
                        cf.adopt_event_fd(ev.fd)
                        if self.limit is not None:
                            self.limit.adopted(cf)
                    offset, end = ev.offset, ev.offset + ev.count
                    if cf.known(offset, ev.count) if self.limit is None else \
                            self.limit.serve_present(cf, offset, ev.count):  # fmt: skip
                        counters["allowed_present"] += 1
                        self.group.allow(ev)
                    else:
                        self._pool.submit(self._fill_event, cf, ev)
                except Exception as e:  # noqa: BLE001 - never leave a reader blocked
                    log.error("event at %s+%s: %s", ev.offset, ev.count, e)
                    self._deny(ev)
                    continue
                # sequential access: keep `readahead` bytes ahead of the reader, filled in the background
                sequential = cf.last_start <= offset <= cf.last_end
                cf.last_start, cf.last_end = offset, end
                if sequential and self.readahead and end + self.readahead > cf.ra_end and end < cf.size \
                        and not cf.shared and not cf.watched \
                        and (self.limit is None or self.limit.has_room(self.readahead)):  # fmt: skip
                    start = max(end, cf.ra_end)
                    stop = min(end + 2 * self.readahead, cf.size)
                    counters["readahead"] += 1
                    cf.ra_end = stop
                    # in pieces of whole chunks (pieces sharing a chunk would wait for each other), so the
                    # readahead workers overlap fetch, verify and write
                    for pos, length in self.pipeline.pieces(cf.handle, start, stop - start, self.ra_piece):
                        self._ra_pool.submit(self._readahead, cf, pos, length)
                        cf.ra_end = max(cf.ra_end, pos + length)

    def _deny(self, ev: PreAccessEvent) -> None:
        self._count("denied")
        try:
            self.group.deny(ev, errno.EIO)
        except (FscacheError, OSError, ValueError) as e:
            log.error("deny failed: %s", e)

    def _fill_event(self, cf: CacheFile, ev: PreAccessEvent) -> None:
        assert ev.offset is not None and ev.count is not None
        if self._closing:
            self._deny(ev)
            return
        if self.limit is None:
            self._fill_and_allow(cf, ev, cf.event_writer(ev))
        else:
            with self.limit.pinned(cf, ev.offset, ev.count):  # until the kernel is told it may read
                self._fill_and_allow(cf, ev, self.limit.writer(cf, cf.event_writer(ev)))

    def _fill_and_allow(self, cf: CacheFile, ev: PreAccessEvent, write: WriteFn) -> None:
        assert ev.offset is not None and ev.count is not None
        try:
            self.pipeline.fill(cf.handle, ev.offset, ev.count, write, cf.present)
        except Exception as e:  # noqa: BLE001 - one line, EIO for this reader, keep serving
            log.error("blob %s: fill of %d+%d failed: %s", cf.handle.blob_id, ev.offset, ev.count, e)
            self._deny(ev)
            return
        try:
            self.group.allow(ev)
        except (FscacheError, OSError) as e:
            log.error("allow failed: %s", e)
        self._count("filled")
        self._unmark_if_complete(cf)

    def filled(self, cf: CacheFile) -> None:
        """Data was written into ``cf`` outside the event path (prefetch): unmark it if it is complete now."""
        self._unmark_if_complete(cf)

    def _watch_changes(self, cf: CacheFile) -> None:
        """Watch a cache file about to be unmarked for changes made under the mount (before the unmark: none is
        missed)."""
        try:
            wd = self._changes.add_watch(cf.path, IN_MODIFY)
        except InotifyError as e:
            log.warning("blob %s: cannot watch the complete cache file: %s", cf.handle.blob_id, e)
            return
        with self._lock:
            self._complete[wd] = cf

    def _changed(self) -> None:
        """Complete cache files changed: mark them again, forget the chunks punched out (event thread)."""
        changed: dict[int, CacheFile] = {}
        for ev in self._changes.read_events():
            cf = self._complete.get(ev.wd)
            if cf is not None and ev.mask & IN_MODIFY:
                changed[id(cf)] = cf
        for cf in changed.values():
            with self._lock:
                if cf.marked:  # being filled (our own readahead writes raise IN_MODIFY too)
                    continue
                cf.marked = True
                self.counters["complete_unmarked"] -= 1
            try:  # first: from now on its reads are events again, answered once the map below is right
                self.group.mark(cf.path, FAN_PRE_ACCESS)
            except (FscacheError, OSError) as e:
                log.error("blob %s: cannot mark the changed cache file again: %s", cf.handle.blob_id, e)
            lost = cf.revalidate()
            if lost:  # (none: another mount of the cache file wrote verified bytes into it)
                self._count("changed_under_us")
                log.warning("blob %s: cache file changed under the mount: %d chunks gone, fetching them again",
                            cf.handle.blob_id, lost)  # fmt: skip
            self._unmark_if_complete(cf)

    def _rearm(self, cf: CacheFile) -> None:
        """Mark ``cf`` again if it is not, before a chunk of it is evicted (as :meth:`_changed` does)."""
        with self._lock:
            if cf.marked:
                return
            cf.marked = True
            self.counters["complete_unmarked"] -= 1
        try:
            self.group.mark(cf.path, FAN_PRE_ACCESS)
        except (FscacheError, OSError) as e:
            log.error("blob %s: cannot mark the cache file again: %s", cf.handle.blob_id, e)

    def _unmark_if_complete(self, cf: CacheFile) -> None:
        """Once a cache file has no hole left, drop its mark: later reads raise no event at all (with a cache size
        limit it stays marked: its reads must touch their chunks, and an eviction must be seen)."""
        if not cf.marked or not cf.complete() or self.limit is not None:
            return
        with self._lock:
            if not cf.marked:
                return
            cf.marked = False
            self.counters["complete_unmarked"] += 1
        self._watch_changes(cf)
        try:  # durable and recorded before the kernel reads it directly
            cf.flush()
        except OSError as e:  # the chunks that failed are holes again: keep the mark
            log.error("blob %s: %s", cf.handle.blob_id, e)
            with self._lock:
                cf.marked = True
                self.counters["complete_unmarked"] -= 1
            return
        try:
            self.group.unmark(cf.path, FAN_PRE_ACCESS)
            log.info("blob %s: cache file complete, unmarked", cf.handle.blob_id)
        except (FscacheError, OSError) as e:
            log.warning("blob %s: cannot unmark the complete cache file: %s", cf.handle.blob_id, e)

    def _readahead(self, cf: CacheFile, start: int, length: int) -> None:
        """Fill ``[start, start + length)`` in the background, writing through the pre-mark fd (no events)."""
        write = cf.pwrite if self.limit is None else self.limit.writer(cf, cf.pwrite)
        try:
            if self.pipeline.fill(cf.handle, start, length, write, cf.present, wait=False):
                self._unmark_if_complete(cf)
        except Exception as e:  # noqa: BLE001 - best effort: a reader's own event will retry and report it
            log.info("blob %s: readahead of %d+%d: %s", cf.handle.blob_id, start, length, e)


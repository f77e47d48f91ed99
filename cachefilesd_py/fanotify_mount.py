"""The fanotify pre-content front end (Linux >= 6.14): lazy file-backed EROFS mounts of Nydus images.

Each data blob gets a sparse cache file ``CACHE/<blob_id>`` as big as the blob's uncompressed layout (an
existing file of the right size is reused: its holes say what is still missing, there is no other state).
The files are marked with ``FAN_PRE_ACCESS`` *before* the bootstrap is mounted file-backed with
``device=<cache files>``, so every read of the mount reaches the daemon as an event with a byte range:

- data already there: allowed at once, on the event thread (presence comes from a page map read from the
  file's extents at start and kept up to date with our own writes: no syscall on this path);
- otherwise a worker fills the range through the shared :class:`~cachefilesd_py.pipeline.Pipeline` (whole
  chunks, amplified, verified, decompressed), writing through the event's fd, then allows it.  Any failure
  denies it with EIO: the reader sees EIO for that file, the daemon logs one line and keeps serving;
- a reader whose events follow each other (sequential) gets the next ``readahead`` bytes filled in the
  background (through the fd opened before the mark, which raises no event), so it finds its next chunks
  present or in flight; a random reader gets no readahead;
- a cache file with nothing left to fetch is unmarked (or not marked at all): its reads raise no event.

The mount's readahead window (its bdi's ``read_ahead_kb``) is set to the amplification size, so each event
covers 1 MiB instead of 128 KiB: 8x fewer round trips through the daemon.

``python -m cachefilesd_py.fanotify_mount`` is the daemon process (:func:`main`): it loads the image, prepares
and marks the cache files, mounts, writes its runtime record, reports ``ok`` (or a one-line error) on
``--ready-fd`` and serves until SIGTERM/SIGINT or until its mount goes away; on the way out it unmounts (if
still mounted), denies what it still holds and writes its final stats into the record.
:mod:`cachefilesd_py.kmount` starts and stops it; ``kill -USR1`` dumps its threads' stacks into its log.
"""

from __future__ import annotations

import argparse
import errno
import faulthandler
import fcntl
import json
import logging
import os
import select
import signal
import stat
import sys
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from erofs.errors import NydusErofsError, UsageError
from fscache.errors import FscacheError, PreContentUnsupportedError, UnsupportedFilesystemError
from fscache.fanotify import FAN_NOFD, FAN_PRE_ACCESS, FanotifyGroup, PreAccessEvent

from .backends import BlobBackend, make_backend
from .image import open_image
from .pipeline import PAGE_SIZE, BlobHandle, Pipeline

__all__ = [
    "CacheFile",
    "FanotifyServer",
    "prepare_cache_files",
    "probe_pre_content",
    "main",
]

log = logging.getLogger(__name__)

SEEK_DATA = getattr(os, "SEEK_DATA", 3)
SEEK_HOLE = getattr(os, "SEEK_HOLE", 4)


# -- cache files --------------------------------------------------------------------------------------------------
@dataclass(eq=False)
class CacheFile:
    """A blob's sparse cache file, with an fd opened before any fanotify mark (so using it raises no event).

    What is present is what the file holds: at open, its data extents (SEEK_DATA/SEEK_HOLE) are read into a
    page map, which then follows our own writes (a write is recorded once it has succeeded).  Presence checks
    on the hot path use the map, not a syscall: ``lseek(SEEK_HOLE)`` waits for the inode lock that every
    concurrent 1 MiB write holds.  Pages no chunk covers count as present (there is nothing to fetch there).
    """

    handle: BlobHandle
    path: Path
    fd: int
    size: int
    reused: bool = False
    # sequential-access detection and readahead window, owned by the event thread
    last_start: int = -1
    last_end: int = -1
    ra_end: int = 0
    marked: bool = False
    # another daemon (another mount of the same blob) served this file when we opened it: our fd may then be
    # watched by our own group too, so we never write through it (no readahead; event fds only)
    shared: bool = False
    pages: bytearray = field(default_factory=bytearray, repr=False)

    def __post_init__(self) -> None:
        if not self.pages:
            self.pages = self._scan()

    def _scan(self) -> bytearray:
        npages = -(-self.size // PAGE_SIZE)
        pages = bytearray(b"\x01") * npages  # no chunk there: nothing to fetch
        meta = self.handle.meta
        for ci in range(meta.chunk_count):
            _, _, d_off, d_size = meta.chunk(ci)
            a, b = d_off // PAGE_SIZE, min(-(-(d_off + d_size) // PAGE_SIZE), npages)
            if a < b:
                pages[a:b] = bytes(b - a)
        for off, length in self.data_extents():
            a, b = -(-off // PAGE_SIZE), (off + length) // PAGE_SIZE
            if a < b:
                pages[a:b] = b"\x01" * (b - a)
        return pages

    def data_extents(self) -> list[tuple[int, int]]:
        """``(offset, length)`` of the file's data (non-hole) extents."""
        out: list[tuple[int, int]] = []
        pos = 0
        while pos < self.size:
            try:
                data = os.lseek(self.fd, pos, SEEK_DATA)
            except OSError as e:
                if e.errno != errno.ENXIO:  # no data after pos
                    raise
                break
            if data >= self.size:
                break
            hole = min(os.lseek(self.fd, data, SEEK_HOLE), self.size)
            if hole <= data:  # never loop on a filesystem that answers oddly
                hole = data + PAGE_SIZE
            out.append((data, hole - data))
            pos = hole
        return out

    def known(self, offset: int, length: int) -> bool:
        """Whether the page map has all of ``[offset, offset + length)`` (no syscall: the event thread's check)."""
        a = offset // PAGE_SIZE
        b = -(-min(offset + length, self.size) // PAGE_SIZE)
        return a >= b or self.pages.find(0, a, b) < 0

    def present(self, d_off: int, d_size: int) -> bool:
        """Whether ``[d_off, d_off + d_size)`` is in the file (the pipeline's ``present``): the page map, else
        the file itself (another daemon sharing the cache dir may have filled it), recorded if so."""
        if self.known(d_off, d_size):
            return True
        end = min(d_off + d_size, self.size)
        try:
            if os.lseek(self.fd, d_off, SEEK_HOLE) < end:
                return False
        except OSError as e:
            if e.errno != errno.ENXIO:
                raise
        self.record(d_off, end - d_off)
        return True

    def record(self, offset: int, length: int) -> None:
        """``[offset, offset + length)`` was written (whole pages)."""
        a, b = offset // PAGE_SIZE, -(-(offset + length) // PAGE_SIZE)
        self.pages[a:b] = b"\x01" * (b - a)

    def complete(self) -> bool:
        """Nothing left to fetch (the map says so, and the file agrees)."""
        if self.pages.find(0) >= 0:
            return False
        return not self.missing_pages()

    def missing_pages(self) -> list[int]:
        """Pages some chunk covers that are holes in the file."""
        have = bytearray(-(-self.size // PAGE_SIZE))
        for off, length in self.data_extents():
            a, b = off // PAGE_SIZE, -(-(off + length) // PAGE_SIZE)
            have[a:b] = b"\x01" * (b - a)
        out = []
        meta = self.handle.meta
        for ci in range(meta.chunk_count):
            _, _, d_off, d_size = meta.chunk(ci)
            a, b = d_off // PAGE_SIZE, -(-(d_off + d_size) // PAGE_SIZE)
            i = have.find(0, a, b)
            if i >= 0:
                out.append(i)
        return out

    def missing(self) -> int:
        """Bytes of the page map still to fetch."""
        return self.pages.count(0) * PAGE_SIZE

    def pwrite(self, offset: int, data: memoryview) -> None:
        """Write through the pre-mark fd (readahead, full mode: no events)."""
        done = 0
        while done < data.nbytes:
            done += os.pwrite(self.fd, data[done:], offset + done)
        self.record(offset, data.nbytes)

    def event_writer(self, ev: PreAccessEvent) -> Callable[[int, memoryview], None]:
        """A pipeline ``write`` through the event's fd that records what it wrote."""

        def write(offset: int, data: memoryview) -> None:
            ev.write(offset, data)
            self.record(offset, data.nbytes)

        return write

    def close(self) -> None:
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            os.close(fd)


def check_cache_path(cache_dir: Path) -> None:
    """Cache file paths go into mount options: no commas, no whitespace."""
    text = os.fspath(cache_dir)
    if any(c in text for c in ",\n\t ") or not text.isprintable():
        raise UsageError(f"cache dir {text!r}: path must not contain commas, whitespace or control characters")


def prepare_cache_files(cache_dir: Path, handles: Sequence[BlobHandle]) -> list[CacheFile]:
    """``CACHE/<blob_id>`` for each blob, sparse and sized to its uncompressed layout; a regular file of the
    right size is reused as it is, one of another size is emptied first."""
    cache_dir = cache_dir.resolve()
    check_cache_path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    out: list[CacheFile] = []
    try:
        for h in handles:
            path = cache_dir / h.blob_id
            size = h.uncompressed_size
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
            except OSError as e:
                raise UsageError(f"cache file {path}: {e.strerror}") from None
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                os.close(fd)
                raise UsageError(f"cache file {path} is not a regular file")
            try:  # the first daemon of a cache file holds this lock for as long as it serves it
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                shared = False
            except BlockingIOError:
                shared = True
            reused = st.st_size == size
            if not reused:
                if shared:
                    os.close(fd)
                    raise UsageError(f"cache file {path} is in use by another mount with another size ({st.st_size})")
                if st.st_size:
                    log.warning("cache file %s has size %d, expected %d: starting it afresh", path, st.st_size, size)
                    os.ftruncate(fd, 0)
                os.ftruncate(fd, size)
            out.append(CacheFile(h, path, fd, size, reused, shared=shared))
    except BaseException:
        for cf in out:
            cf.close()
        raise
    return out


def probe_pre_content(cache_dir: Path) -> None:
    """Raise PreContentUnsupportedError (kernel) or UnsupportedFilesystemError (cache dir's filesystem) unless
    a sparse file in ``cache_dir`` can be marked for pre-content events."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    probe = cache_dir / f".probe-{os.getpid()}-{threading.get_ident()}"
    fd = os.open(probe, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    os.close(fd)
    try:
        with FanotifyGroup(pre_content=True) as group:
            group.mark(probe)
    finally:
        probe.unlink()


# -- the event loop -----------------------------------------------------------------------------------------------
class FanotifyServer:
    """Serves FAN_PRE_ACCESS events of the cache files of one or more mounted images through one pipeline.

    Build it (marks the files), mount, then :meth:`serve` until :meth:`stop` (from any thread or a signal
    handler).  ``readahead``: bytes filled in the background after each fill (0 = off).
    """

    def __init__(self, files: Sequence[CacheFile], pipeline: Pipeline, *, workers: int = 4,
                 readahead: int | None = None, readahead_workers: int = 3) -> None:  # fmt: skip
        self.files = list(files)
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
                         "complete_unmarked": 0}  # fmt: skip
        self._stop_r, self._stop_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.group = FanotifyGroup(pre_content=True)
        try:
            for cf in self.files:
                if cf.complete():  # a full cache file needs no events: reads go at the kernel's own speed
                    cf.marked = False
                    self.counters["complete_unmarked"] += 1
                else:
                    self.group.mark(cf.path, FAN_PRE_ACCESS)
                    cf.marked = True
        except BaseException:
            self.close()
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

    def close(self) -> None:
        """Deny every event still held or queued (EIO: when the group closes, the kernel would *allow* them,
        and holes would read as zeros), then close the group and the stop pipe."""
        self._closing = True
        ra_pool = getattr(self, "_ra_pool", None)
        if ra_pool is not None:
            ra_pool.shutdown(wait=True, cancel_futures=True)
        pool = getattr(self, "_pool", None)
        if pool is not None:
            pool.shutdown(wait=True)  # queued fills see _closing and deny
        if not self.group.closed:
            try:
                while events := self.group.read_events():
                    for ev in events:
                        if ev.fd >= 0:
                            self._deny(ev)
            except (FscacheError, OSError) as e:
                log.error("draining events: %s", e)
        self.group.close()
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
        backend = {"requests": 0, "bytes": 0, "errors": 0, "retries": 0}
        for b in backends.values():
            for k, v in b.stats.snapshot().items():
                backend[k] = backend.get(k, 0) + v
        return {
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
    def serve(self, until_unmounted: Path | None = None) -> None:
        """Read and answer events until :meth:`stop` (or, with ``until_unmounted``, until nothing is mounted
        there any more: a plain ``umount`` then also ends the daemon)."""
        from .kmount import is_mounted

        poller = select.poll()
        gfd = self.group.fileno()
        poller.register(gfd, select.POLLIN)
        poller.register(self._stop_r, select.POLLIN)
        mounts = None
        if until_unmounted is not None:  # the mount table polls POLLPRI on every change
            mounts = open("/proc/self/mounts", "rb")  # noqa: SIM115 - closed below
            poller.register(mounts.fileno(), select.POLLPRI)
        by_inode = self._by_inode
        counters = self.counters
        try:
            self._serve(poller, mounts, until_unmounted, is_mounted, by_inode, counters)
        finally:
            if mounts is not None:
                mounts.close()

    def _serve(self, poller: Any, mounts: Any, mountpoint: Path | None, is_mounted: Any,
               by_inode: dict[tuple[int, int], CacheFile], counters: dict[str, int]) -> None:  # fmt: skip
        mfd = mounts.fileno() if mounts is not None else -1
        while True:
            ready = poller.poll()
            if any(fd == self._stop_r for fd, _ in ready):
                return
            if mfd >= 0 and any(fd == mfd for fd, _ in ready):
                mounts.seek(0)
                mounts.read()  # re-arms the notification
                if not is_mounted(mountpoint, None):
                    log.warning("%s was unmounted: stopping", mountpoint)
                    return
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
                    offset, end = ev.offset, ev.offset + ev.count
                    if cf.known(offset, ev.count):
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
                        and not cf.shared:  # fmt: skip
                    start = max(end, cf.ra_end) // PAGE_SIZE * PAGE_SIZE
                    stop = min(end + 2 * self.readahead, cf.size)
                    cf.ra_end = stop
                    counters["readahead"] += 1
                    piece = self.ra_piece  # in pieces, so the readahead workers overlap fetch, verify and write
                    for pos in range(start, stop, piece):
                        self._ra_pool.submit(self._readahead, cf, pos, min(piece, stop - pos))

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
        try:
            self.pipeline.fill(cf.handle, ev.offset, ev.count, cf.event_writer(ev), cf.present)
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

    def _unmark_if_complete(self, cf: CacheFile) -> None:
        """Once a cache file has no hole left, drop its mark: later reads raise no event at all."""
        if not cf.marked or not cf.complete():
            return
        with self._lock:
            if not cf.marked:
                return
            cf.marked = False
            self.counters["complete_unmarked"] += 1
        try:
            self.group.unmark(cf.path, FAN_PRE_ACCESS)
            log.info("blob %s: cache file complete, unmarked", cf.handle.blob_id)
        except (FscacheError, OSError) as e:
            log.warning("blob %s: cannot unmark the complete cache file: %s", cf.handle.blob_id, e)

    def _readahead(self, cf: CacheFile, start: int, length: int) -> None:
        """Fill ``[start, start + length)`` in the background, writing through the pre-mark fd (no events)."""
        try:
            if self.pipeline.fill(cf.handle, start, length, cf.pwrite, cf.present):
                self._unmark_if_complete(cf)
        except Exception as e:  # noqa: BLE001 - best effort: a reader's own event will retry and report it
            log.info("blob %s: readahead of %d+%d: %s", cf.handle.blob_id, start, length, e)


# -- full mode ----------------------------------------------------------------------------------------------------
def fill_all(files: Sequence[CacheFile], pipeline: Pipeline) -> int:
    """Fetch everything missing into the cache files (verified), writing through their fds, on the
    pipeline's workers; then fsync.  Returns the bytes written; raises the first failure."""
    step = max(pipeline.amplify, 8 << 20)
    futures = [
        pipeline.submit(cf.handle, off, min(step, cf.size - off), cf.pwrite, cf.present)
        for cf in files
        for off in range(0, cf.size, step)
        if not cf.present(off, min(step, cf.size - off))
    ]
    total = 0
    first: BaseException | None = None
    for fut in futures:
        try:
            total += fut.result()
        except Exception as e:  # noqa: BLE001 - wait for the others, then raise the first
            first = first or e
    if first is not None:
        raise first
    for cf in files:
        os.fsync(cf.fd)
    return total


# -- the daemon process -------------------------------------------------------------------------------------------
def backend_from_options(kind: str, options: dict[str, Any]) -> BlobBackend:
    return make_backend(kind, **options)


def _write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
    os.replace(tmp, path)


def _report(fd: int | None, message: str) -> None:
    if fd is None:
        return
    try:
        os.write(fd, message.encode(errors="replace") + b"\n")
    finally:
        os.close(fd)


def run_daemon(*, boot: Path, mountpoint: Path, cache_dir: Path, backend: BlobBackend, amplify: int,
               workers: int, readahead: int | None, record: Path, record_data: dict[str, Any],
               ready_fd: int | None) -> int:  # fmt: skip
    """Prepare, mark, mount, report readiness on ``ready_fd`` and serve until SIGTERM/SIGINT.

    Every startup failure is reported as one line on ``ready_fd`` (and raised).  On exit the final stats go
    into the runtime record, for ``umount``.
    """
    from .kmount import is_mounted, mount_erofs_file_backed, process_start_time, set_mount_readahead, umount

    files: list[CacheFile] = []
    server: FanotifyServer | None = None
    pipeline = Pipeline(amplify=amplify, workers=workers)
    try:
        try:
            handles = open_image(boot, backend)
            if not handles:
                raise UsageError(f"{boot}: the image has no data blobs: mount it directly")
            files = prepare_cache_files(cache_dir, handles)
            server = FanotifyServer(files, pipeline, workers=workers, readahead=readahead)
            mount_erofs_file_backed(boot, mountpoint, [cf.path for cf in files])
            # events as big as a fetch: one round trip per amplification window rather than per 128 KiB
            set_mount_readahead(mountpoint, min(max(amplify >> 10, 128), 1024))
        except UnsupportedFilesystemError as e:
            raise UsageError(f"cache dir {cache_dir}: {e}") from None
        except PreContentUnsupportedError as e:
            raise UsageError(f"{e} (use --mode full)") from None
        data = dict(record_data, pid=os.getpid(), start_time=process_start_time(os.getpid()),
                    blobs=[cf.handle.blob_id for cf in files])  # fmt: skip
        _write_json(record, data)
    except BaseException as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        _report(ready_fd, f"error {msg}")
        if server is not None:
            server.close()
        for cf in files:
            cf.close()
        pipeline.close()
        raise

    def on_signal(signum: int, frame: object) -> None:
        server.stop()

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    _report(ready_fd, "ok")
    log.info("serving %s on %s (%d blobs)", boot, mountpoint, len(files))
    try:
        server.serve(until_unmounted=mountpoint)
    finally:
        # stopped with the image still mounted (not through umount): never leave a mount without its daemon,
        # whose holes would read as zeros
        try:
            if is_mounted(mountpoint):
                try:
                    umount(mountpoint)
                except OSError:
                    umount(mountpoint, lazy=True)
                log.warning("unmounted %s on exit", mountpoint)
        except OSError as e:
            log.error("cannot unmount %s on exit: %s", mountpoint, e)
        stats = server.stats()
        server.close()
        pipeline.close()
        for cf in files:
            cf.close()
        backend.close()
        try:
            _write_json(record, dict(data, stats=stats, stopped=True))
        except OSError as e:
            log.error("cannot write final stats to %s: %s", record, e)
        log.info("stopped: %s", json.dumps(stats["pipeline"]))
        for s, h in old.items():  # only now: a late SIGTERM must not cut the final record short
            signal.signal(s, h)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m cachefilesd_py.fanotify_mount", description=__doc__.splitlines()[0])
    ap.add_argument("--boot", required=True, type=Path)
    ap.add_argument("--mountpoint", required=True, type=Path)
    ap.add_argument("--cache-dir", required=True, type=Path)
    ap.add_argument("--backend", default="localfs")
    ap.add_argument("--backend-config", default="{}", help="JSON object of backend options")
    ap.add_argument("--amplify", type=int, default=1 << 20)
    ap.add_argument("--readahead", type=int, default=None)
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--record", required=True, type=Path)
    ap.add_argument("--record-data", default="{}", help="JSON object merged into the runtime record")
    ap.add_argument("--ready-fd", type=int, default=None)
    ap.add_argument("--log-level", default="INFO")
    args = ap.parse_args(argv)
    faulthandler.register(signal.SIGUSR1, file=sys.stderr, all_threads=True)  # `kill -USR1`: thread stacks to the log
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(name)s %(levelname)s: %(message)s",
                        stream=sys.stderr)  # fmt: skip
    try:
        backend = backend_from_options(args.backend, json.loads(args.backend_config))
    except (NydusErofsError, ValueError) as e:
        _report(args.ready_fd, f"error backend {args.backend}: {e}")
        return 1
    try:
        run_daemon(
            boot=args.boot, mountpoint=args.mountpoint, cache_dir=args.cache_dir, backend=backend,
            amplify=args.amplify, workers=args.workers, readahead=args.readahead, record=args.record,
            record_data=json.loads(args.record_data), ready_fd=args.ready_fd,
        )  # fmt: skip
    except (NydusErofsError, FscacheError, OSError, ValueError) as e:  # reported on --ready-fd already
        log.error("%s", e)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

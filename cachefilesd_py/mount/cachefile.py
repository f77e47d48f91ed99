"""The blobs' sparse cache files: what the kernel reads as ``device=`` of a file-backed EROFS mount.

Each data blob gets a sparse cache file ``CACHE/<blob_id>.<key>`` as big as the blob's uncompressed layout, and
beside it its chunk map ``CACHE/<blob_id>.<key>.map`` (:mod:`.chunkmap`): ``key`` digests the blob's chunk table
as this image describes it, and only the chunks the map records (verified, written, made durable) count as
present; the file's size and extents are trusted for nothing.  A failed write punches its range back to a hole.
:func:`prepare_cache_files` makes them, :func:`fill_all` fills them whole (full mode), :func:`probe_pre_content`
says whether the cache dir can carry fanotify pre-content marks (fanotify mode).
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import stat
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from erofs.errors import UsageError
from erofs.progress import ProgressCallback
from fscache.fanotify import FanotifyGroup, PreAccessEvent
from fscache.fd import punch_hole

from ..blob_handles import chunk_table_key
from ..pipeline import PAGE_SIZE, BlobHandle, Pipeline
from .chunkmap import KEY_HEX, ChunkMap, map_path

__all__ = ["CacheFile", "cache_file_path", "check_cache_path", "fill_all", "prepare_cache_files", "probe_pre_content"]

log = logging.getLogger(__name__)

SEEK_DATA = getattr(os, "SEEK_DATA", 3)
SEEK_HOLE = getattr(os, "SEEK_HOLE", 4)


@dataclass(eq=False)
class CacheFile:
    """A blob's sparse cache file, with an fd opened before any fanotify mark (so using it raises no event).

    What is present is what its :class:`~.chunkmap.ChunkMap` records: at open, the chunks the map file records
    whose pages hold data (a recorded chunk found punched out is forgotten) are read into a page map, which
    then follows our own verified writes.  Presence checks on the hot path use the page map, not a syscall:
    ``lseek(SEEK_HOLE)`` waits for the inode lock that every concurrent 1 MiB write holds.  Pages no chunk
    covers count as present (there is nothing to fetch there).
    """

    handle: BlobHandle
    path: Path
    fd: int
    size: int
    chunks: ChunkMap
    reused: bool = False
    # sequential-access detection and readahead window, owned by the event thread
    last_start: int = -1
    last_end: int = -1
    ra_end: int = 0
    marked: bool = False
    # another daemon (another mount of the same blob) served this file when we opened it: our fd may then be
    # watched by our own group too, so we never write through it (no readahead; event fds only)
    shared: bool = False
    # opened by a restarted worker, after the marks were made: our fd is watched by our own group, so until an
    # event hands us a fd opened without notification (adopt_event_fd) nothing is written through it
    watched: bool = False
    lock_fd: int = -1  # the fd holding the flock, once `fd` is a dup of an event fd
    pages: bytearray = field(default_factory=bytearray, repr=False)
    _flusher: threading.Thread | None = field(default=None, repr=False)
    _flush_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def __post_init__(self) -> None:
        if not self.pages:
            self.pages = self._scan()

    def _chunk_pages(self, ci: int) -> tuple[int, int]:
        _, _, d_off, d_size = self.handle.meta.chunk(ci)
        return d_off // PAGE_SIZE, min(-(-(d_off + d_size) // PAGE_SIZE), -(-self.size // PAGE_SIZE))

    def _data_pages(self) -> bytearray:
        """1 for each page holding data (not a hole), from the file's extents."""
        have = bytearray(-(-self.size // PAGE_SIZE))
        for off, length in self.data_extents():
            a, b = off // PAGE_SIZE, -(-(off + length) // PAGE_SIZE)
            have[a:b] = b"\x01" * (b - a)
        return have

    def _scan(self) -> bytearray:
        npages = -(-self.size // PAGE_SIZE)
        pages = bytearray(b"\x01") * npages  # no chunk there: nothing to fetch
        have = self._data_pages()  # a recorded chunk must not have been punched out since
        meta = self.handle.meta
        recorded = [ci for ci in range(meta.chunk_count) if self.chunks.has(ci)]
        for ci in range(meta.chunk_count):
            a, b = self._chunk_pages(ci)
            if a < b:
                pages[a:b] = bytes(b - a)
        for ci in recorded:
            a, b = self._chunk_pages(ci)
            if have.find(0, a, b) >= 0:
                log.warning("cache file %s: chunk %d was recorded but is gone (punched out?): fetching it again",
                            self.path, ci)  # fmt: skip
                self.chunks.unmark(ci)
            elif a < b:
                pages[a:b] = b"\x01" * (b - a)
        return pages

    def revalidate(self) -> int:
        """The file changed under us (root punched a hole, truncated it): forget every present chunk whose pages
        are holes now; returns how many.  (Bytes written over a chunk are not detected: see the README.)"""
        have = self._data_pages()
        lost = 0
        for ci in range(self.handle.meta.chunk_count):
            a, b = self._chunk_pages(ci)
            if a < b and self.pages.find(0, a, b) < 0 and have.find(0, a, b) >= 0:
                self.pages[a:b] = bytes(b - a)
                self.chunks.unmark(ci)
                lost += 1
        return lost

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
        """Whether ``[d_off, d_off + d_size)`` is in the file (the pipeline's ``present``): the page map; for a
        ``shared`` file also the map file (the other daemon may have filled and recorded it), adopted if so.  A
        file we hold the lock of has no other writer: its page map is exact."""
        if self.known(d_off, d_size):
            return True
        if not self.shared:
            return False
        cis = self.handle.meta.chunks_for_range(d_off, d_size)
        if not cis or not all(self.chunks.has(ci) or self.chunks.persisted(ci) for ci in cis):
            return False
        for ci in cis:
            self.chunks.mark(ci, 0, durable=True)
            a, b = self._chunk_pages(ci)
            self.pages[a:b] = b"\x01" * (b - a)
        return True

    def record(self, offset: int, length: int) -> None:
        """The verified chunk starting at ``offset`` was written (``length`` bytes, whole pages); flushes the
        chunk map when one is due."""
        ci = self.handle.meta.find(offset)
        if ci is None:  # not a chunk's start: nothing to record (the pipeline writes whole chunks only)
            return
        a, b = offset // PAGE_SIZE, -(-(offset + length) // PAGE_SIZE)
        self.pages[a:b] = b"\x01" * (b - a)
        if self.chunks.mark(ci, length):  # a flush is due: in the background, once the burst of writes pauses
            with self._flush_lock:
                if self._flusher is None or not self._flusher.is_alive():
                    self._flusher = threading.Thread(target=self._background_flush, name="chunk-map", daemon=True)
                    self._flusher.start()

    def _background_flush(self) -> None:
        self.chunks.await_flush()
        try:
            self.flush()
        except OSError as e:  # those chunks are holes again and not present: fetched again when read
            log.error("%s", e)

    def flush(self) -> None:
        """Make the chunks written so far durable and record them (:meth:`ChunkMap.flush`); a chunk that could
        not be made durable is forgotten and punched out (OSError, naming the file, if any was)."""
        failed = self.chunks.flush(self.fd)
        for ci in failed:
            self._forget(ci)
        if failed:
            raise OSError(errno.EIO, f"{len(failed)} chunks could not be made durable", str(self.path))

    def _forget(self, ci: int, fd: int | None = None) -> None:
        a, b = self._chunk_pages(ci)
        self.pages[a:b] = bytes(b - a)
        self.chunks.unmark(ci)
        self._punch(a * PAGE_SIZE, (b - a) * PAGE_SIZE, fd)

    def _punch(self, offset: int, length: int, fd: int | None = None) -> None:
        try:
            punch_hole(self.fd if fd is None else fd, offset, length)
        except OSError as e:  # not marked: never served as data; a restart finds it unrecorded too
            log.error("cache file %s: %s", self.path, e.strerror)

    def failed_write(self, offset: int, length: int, fd: int | None = None) -> None:
        """A write of ``[offset, offset + length)`` failed: whatever it left there (allocated zeros after ENOSPC,
        a part of the chunk) goes back to a hole, and the chunk is not present."""
        a, b = offset // PAGE_SIZE, -(-(offset + length) // PAGE_SIZE)
        self.pages[a:b] = bytes(b - a)
        ci = self.handle.meta.find(offset)
        if ci is not None and self.chunks.has(ci):
            self.chunks.unmark(ci)
        self._punch(a * PAGE_SIZE, (b - a) * PAGE_SIZE, fd)

    def complete(self) -> bool:
        """Nothing left to fetch."""
        return self.pages.find(0) < 0

    def missing(self) -> int:
        """Bytes of the page map still to fetch."""
        return self.pages.count(0) * PAGE_SIZE

    def pwrite(self, offset: int, data: memoryview) -> None:
        """Write through the pre-mark fd (readahead, full mode: no events)."""
        done = 0
        try:
            while done < data.nbytes:
                done += os.pwrite(self.fd, data[done:], offset + done)
        except OSError as e:  # (ENOSPC...) the error names the file
            self.failed_write(offset, data.nbytes)
            raise OSError(e.errno, e.strerror, str(self.path)) from None
        self.record(offset, data.nbytes)

    def event_writer(self, ev: PreAccessEvent) -> Callable[[int, memoryview], None]:
        """A pipeline ``write`` through the event's fd that records what it wrote."""

        def write(offset: int, data: memoryview) -> None:
            try:
                ev.write(offset, data)
            except OSError:
                self.failed_write(offset, data.nbytes, ev.fd)  # (the event fd raises no event)
                raise
            self.record(offset, data.nbytes)

        return write

    # -- eviction (:mod:`.evict`) ----------------------------------------------------------------------------
    def resident_chunks(self) -> list[tuple[int, int]]:
        """``(chunk index, bytes)`` of every chunk the page map holds (page-rounded: what it takes on disk)."""
        out = []
        for ci in range(self.handle.meta.chunk_count):
            a, b = self._chunk_pages(ci)
            if a < b and self.pages.find(0, a, b) < 0:
                out.append((ci, (b - a) * PAGE_SIZE))
        return out

    def trim_unrecorded(self) -> int:
        """Punch out the data no recorded chunk covers (what a killed daemon wrote but never recorded: it would
        take room while counting for nothing); returns the bytes punched.  Only through an fd that raises no
        event (not ``watched``), with no fill of this file running."""
        have = self._data_pages()
        punched, i, n = 0, 0, len(have)
        while i < n:
            if not have[i] or self.pages[i]:
                i += 1
                continue
            j = i
            while j < n and have[j] and not self.pages[j]:
                j += 1
            self._punch(i * PAGE_SIZE, (j - i) * PAGE_SIZE)
            punched += (j - i) * PAGE_SIZE
            i = j
        return punched

    def drop_chunk(self, ci: int) -> None:
        """Eviction's first step: chunk ``ci`` is absent from now on, in the page map (its next read is a fill)
        and in the chunk map (before a single byte of it is punched out)."""
        a, b = self._chunk_pages(ci)
        self.pages[a:b] = bytes(b - a)
        self.chunks.unmark(ci)

    def sync_chunk_map(self) -> None:
        """Make the chunks dropped so far absent on disk too (a failure is logged: a restart finds their holes)."""
        try:
            self.chunks.sync()
        except OSError as e:
            log.error("chunk map %s: %s", self.chunks.path, e.strerror)

    def punch_chunk(self, ci: int) -> bool:
        """Eviction's last step: punch out the pages of chunk ``ci`` (dropped before); False if that failed."""
        a, b = self._chunk_pages(ci)
        try:
            punch_hole(self.fd, a * PAGE_SIZE, (b - a) * PAGE_SIZE)
        except OSError as e:
            log.error("cache file %s: evicting chunk %d: %s", self.path, ci, e.strerror)
            return False
        return True

    def adopt_event_fd(self, event_fd: int) -> None:
        """From now on use a dup of ``event_fd`` (the kernel opened it without notification: writing through
        it raises no event); the fd we opened stays open for its flock."""
        self.lock_fd, self.fd = self.fd, os.dup(event_fd)
        self.watched = False

    def close(self) -> None:
        """Flush the chunk map (a failure is logged: those chunks are fetched again next time) and close."""
        self.chunks.hurry()
        with self._flush_lock:
            flusher = self._flusher
        if flusher is not None:
            flusher.join()
        if self.fd >= 0 and not self.watched:
            try:
                self.flush()
            except OSError as e:
                log.error("%s", e)
        self.chunks.close()
        for name in ("fd", "lock_fd"):
            fd = getattr(self, name)
            if fd >= 0:
                setattr(self, name, -1)
                os.close(fd)


def check_cache_path(cache_dir: Path) -> None:
    """Cache file paths go into mount options: no commas, no whitespace."""
    text = os.fspath(cache_dir)
    if any(c in text for c in ",\n\t ") or not text.isprintable():
        raise UsageError(f"cache dir {text!r}: path must not contain commas, whitespace or control characters")


def cache_file_path(cache_dir: Path, handle: BlobHandle) -> Path:
    """``CACHE/<blob_id>.<key>``: the blob's id and the digest of its chunk table (:func:`chunk_table_key`), so
    images that disagree about a blob's chunks never share its cache file."""
    return cache_dir / f"{handle.blob_id}.{chunk_table_key(handle.meta).hex()[:KEY_HEX]}"


def prepare_cache_files(cache_dir: Path, handles: Sequence[BlobHandle], *, marked: bool = False) -> list[CacheFile]:
    """:func:`cache_file_path` for each blob, sparse and sized to its uncompressed layout, with its chunk map;
    a regular file of the right size with a valid map is reused (the chunks the map records are present), any
    other is emptied first.

    ``marked``: the files are already marked and mounted (a restarted worker): they must have the right size,
    and the fds opened now are ``watched``."""
    cache_dir = cache_dir.resolve()
    check_cache_path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    out: list[CacheFile] = []
    try:
        for h in handles:
            out.append(_open_cache_file(cache_file_path(cache_dir, h), h, marked))
    except BaseException:
        for cf in out:
            cf.close()
        raise
    return out


def _open_cache_file(path: Path, h: BlobHandle, marked: bool) -> CacheFile:
    size = h.uncompressed_size
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    except OSError as e:
        raise UsageError(f"cache file {path}: {e.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise UsageError(f"cache file {path} is not a regular file")
        try:  # the first daemon of a cache file holds this lock for as long as it serves it
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            shared = False
        except BlockingIOError:
            shared = True
        reused = st.st_size == size
        if not reused and marked:
            raise UsageError(f"cache file {path} has size {st.st_size}, expected {size}, while mounted")
        if not reused and shared:
            raise UsageError(f"cache file {path} is in use by another mount with another size ({st.st_size})")
        try:
            chunks = ChunkMap(map_path(path), chunk_table_key(h.meta), h.meta.chunk_count,
                              reset=not (shared or marked))  # fmt: skip
        except ValueError as e:
            raise UsageError(f"cache file {path}: {e}") from None
        if chunks.fresh:  # nothing recorded: whatever bytes the file holds are trusted for nothing
            reused = False
        try:
            if not reused and not (shared or marked):
                if st.st_size:
                    log.info("cache file %s: nothing recorded in its chunk map: starting it afresh", path)
                    os.ftruncate(fd, 0)
                os.ftruncate(fd, size)
        except OSError as e:  # (EFBIG...) the error names the file
            chunks.close()
            raise OSError(e.errno, e.strerror, str(path)) from None
    except BaseException:
        os.close(fd)
        raise
    return CacheFile(h, path, fd, size, chunks, reused, shared=shared, watched=marked)


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


def fill_all(files: Sequence[CacheFile], pipeline: Pipeline, progress: ProgressCallback | None = None) -> int:
    """Fetch everything missing into the cache files (verified), writing through their fds, on the
    pipeline's workers; then make them durable and record them in the chunk maps.  Returns the bytes written;
    raises the first failure.  ``progress`` is told the length of each range as it is filled or found present:
    the files' sizes add up to the total."""
    step = max(pipeline.amplify, 8 << 20)
    futures = []
    for cf in files:
        for off in range(0, cf.size, step):
            length = min(step, cf.size - off)
            if not cf.present(off, length):
                futures.append((pipeline.submit(cf.handle, off, length, cf.pwrite, cf.present), length))
            elif progress is not None:
                progress(length)
    total = 0
    first: BaseException | None = None
    for fut, length in futures:
        try:
            total += fut.result()
            if progress is not None:
                progress(length)
        except Exception as e:  # noqa: BLE001 - wait for the others, then raise the first
            first = first or e
    if first is not None:
        raise first
    for cf in files:
        cf.flush()  # fdatasync, then the chunk map
    return total


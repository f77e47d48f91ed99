"""The blobs' sparse cache files: what the kernel reads as ``device=`` of a file-backed EROFS mount.

Each data blob gets a sparse cache file ``CACHE/<blob_id>`` as big as the blob's uncompressed layout (an existing
file of the right size is reused: its holes say what is still missing, there is no other state).
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

from ..pipeline import PAGE_SIZE, BlobHandle, Pipeline

__all__ = ["CacheFile", "check_cache_path", "fill_all", "prepare_cache_files", "probe_pre_content"]

log = logging.getLogger(__name__)

SEEK_DATA = getattr(os, "SEEK_DATA", 3)
SEEK_HOLE = getattr(os, "SEEK_HOLE", 4)


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
    # opened by a restarted worker, after the marks were made: our fd is watched by our own group, so until an
    # event hands us a fd opened without notification (adopt_event_fd) nothing is written through it
    watched: bool = False
    lock_fd: int = -1  # the fd holding the flock, once `fd` is a dup of an event fd
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
        """Whether ``[d_off, d_off + d_size)`` is in the file (the pipeline's ``present``): the page map; for a
        ``shared`` file also the file itself (the other daemon may have filled it), recorded if so.  A file we
        hold the lock of has no other writer: its map is exact, and ``lseek`` (which waits for the inode lock of
        every concurrent write, and for the fd's position lock) is never needed."""
        if self.known(d_off, d_size):
            return True
        if not self.shared:
            return False
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
        try:
            while done < data.nbytes:
                done += os.pwrite(self.fd, data[done:], offset + done)
        except OSError as e:  # (ENOSPC...) the error names the file
            raise OSError(e.errno, e.strerror, str(self.path)) from None
        self.record(offset, data.nbytes)

    def event_writer(self, ev: PreAccessEvent) -> Callable[[int, memoryview], None]:
        """A pipeline ``write`` through the event's fd that records what it wrote."""

        def write(offset: int, data: memoryview) -> None:
            ev.write(offset, data)
            self.record(offset, data.nbytes)

        return write

    def adopt_event_fd(self, event_fd: int) -> None:
        """From now on use a dup of ``event_fd`` (the kernel opened it without notification: writing through
        it raises no event); the fd we opened stays open for its flock."""
        self.lock_fd, self.fd = self.fd, os.dup(event_fd)
        self.watched = False

    def close(self) -> None:
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


def prepare_cache_files(cache_dir: Path, handles: Sequence[BlobHandle], *, marked: bool = False) -> list[CacheFile]:
    """``CACHE/<blob_id>`` for each blob, sparse and sized to its uncompressed layout; a regular file of the
    right size is reused as it is, one of another size is emptied first.

    ``marked``: the files are already marked and mounted (a restarted worker): they must have the right size,
    and the fds opened now are ``watched``."""
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
            if not reused and marked:
                os.close(fd)
                raise UsageError(f"cache file {path} has size {st.st_size}, expected {size}, while mounted")
            if not reused:
                if shared:
                    os.close(fd)
                    raise UsageError(f"cache file {path} is in use by another mount with another size ({st.st_size})")
                try:
                    if st.st_size:
                        log.warning("cache file %s has size %d, expected %d: starting it afresh", path, st.st_size,
                                    size)  # fmt: skip
                        os.ftruncate(fd, 0)
                    os.ftruncate(fd, size)
                except OSError as e:  # (EFBIG...) the error names the file
                    os.close(fd)
                    raise OSError(e.errno, e.strerror, str(path)) from None
            out.append(CacheFile(h, path, fd, size, reused, shared=shared, watched=marked))
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


def fill_all(files: Sequence[CacheFile], pipeline: Pipeline, progress: ProgressCallback | None = None) -> int:
    """Fetch everything missing into the cache files (verified), writing through their fds, on the
    pipeline's workers; then fsync.  Returns the bytes written; raises the first failure.  ``progress`` is told
    the length of each range as it is filled or found present: the files' sizes add up to the total."""
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
        os.fsync(cf.fd)
    return total


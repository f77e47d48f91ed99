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

The daemon is two processes (:func:`main`), so that a crash of the one doing the work never lets a hole
read as zeros: when the last fd of a fanotify group closes, the kernel drops its marks and *allows* every
pending event, and an unmarked sparse file reads zeros where data is missing.  For the same reason the group
is held until the image's EROFS superblock is released, not until the mount leaves the mount table: a mount
detached lazily (``umount -l``, or a stop with files open there) is gone from the table but its open files
still read through the cache files.  An inotify watch on the mount's root (:class:`ImageWatch`, added right
after mounting; it does not make the mount busy) gets ``IN_UNMOUNT`` when the superblock is shut down: at once
after a plain umount, at the close of the last open file after a detach.  The inotify instance is the
supervisor's, inherited by every worker with the group, so a restarted worker has the watch even when the
mountpoint no longer leads to the image.

- ``python -m cachefilesd_py.fanotify_mount --supervise``, the :class:`Supervisor`, creates the fanotify group
  and the inotify instance and holds them, and does nothing else (no image machinery imported).  It starts the
  worker, relays its readiness line (``ok`` or ``error CODE MESSAGE``, see :func:`error_line`) to ``--ready-fd``
  and waits for it.  While it holds the group, the marks stay: a read of a hole with no worker running blocks
  until a worker answers it.
  When the worker dies (SIGKILL, a crash: anything but exit status 0) with the image not released, the kernel
  still holds the permission events the worker had read; it matches a response by the event fd *number* only
  (``process_access_response``: ENOENT when no pending event has it), so the supervisor answers every number
  below the worker's RLIMIT_NOFILE with ``FAN_DENY`` + EIO: those readers get EIO (the kernel may also retry a
  failed readahead page by page, which the next worker then serves), never zeros.  Events queued but not read
  yet stay in the group's queue.  Then it starts a new worker on the same group, after a backoff: the n-th
  worker death in a row waits 0.1 s * 2**(n-1), at most 5 s, before the restart (0.1, 0.2, 0.4, ... 3.2, 5, 5 s:
  a backend briefly down gets time to come back), and the 11th in a row (about half a minute of failing workers)
  makes it give up.  A worker that lived a minute ends the row: its death is the first of a new one.  It logs
  one line per restart with its delay.  While it waits no worker runs: reads of holes block, their events stay
  queued for the next worker; a stop signal or the release of the image ends the wait at once (a detach does
  not: its open files need the next worker).
  It closes the group only once the image is released: a worker exiting (status 0) means it was; when no worker
  will run again (it gave up, a stop signal came after a worker's death, or an error) it unmounts the image if
  the mountpoint still shows it (plainly, or detached when files are open there) and, until the release,
  answers every event itself: ranges the cache file holds are allowed, holes denied with EIO (EIO, never
  zeros).  SIGTERM/SIGINT are passed on to the worker, and the supervisor waits for it; a second one changes
  nothing.  SIGUSR1 is passed on to the worker.
- The worker (the same command with ``--group-fd`` and ``--inotify-fd``, exec'd by the supervisor) loads the
  image, prepares and marks the cache files on the inherited group, mounts, adds the watch, writes the runtime
  record (``pid``: the supervisor, ``worker_pid``: itself), reports ``ok`` (or a one-line error) on
  ``--ready-fd`` and serves until the image is released; then it exits with status 0 after writing its final
  stats into the record (unless the record is not its own any more).  A plain umount thus ends it at once, a
  ``umount -l`` when the last file open there closes.  SIGTERM/SIGINT: it unmounts if the mountpoint still
  shows the image: plainly when nothing is open there (the release follows at once), else detached, logging
  one line (``stopping: MP is detached, serving it until its N open files close``) and serving on until the
  release; a second signal changes nothing.  A restarted worker (``--restart N``) finds the files marked and
  the image mounted (perhaps detached) and watched: it only reopens the cache files (those fds, opened after
  the marks, are watched by the group: it writes through a dup of an event fd instead, opened by the kernel
  without notification).  ``kill -USR1`` dumps its threads' stacks into the log.

``nydus-erofs umount`` never detaches: a mount with files open there fails with EBUSY and stays served.

If the supervisor itself is SIGKILLed nothing restarts the worker: the worker still holds the group and serves
until the image is released, but if it dies too, the kernel drops the group and its marks, and the holes of the
cache files read as zeros through the mount.  Likewise a SIGKILL of the supervisor while it answers events
itself (no worker) drops the group.  Nothing can be done about that from user space: keep the supervisor alive
(it is small, single-threaded and only waits), and give a stop (systemd's ``TimeoutStopSec``) time for the
files open on the image to close.  ``nydus-erofs mount --foreground`` runs the worker alone, in the calling
process, with no supervisor.

:mod:`cachefilesd_py.kmount` starts the supervisor and stops it (``umount``).
"""

from __future__ import annotations

import argparse
import errno
import faulthandler
import fcntl
import json
import logging
import os
import resource
import select
import signal
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

from erofs.errors import NydusErofsError, UsageError
from fscache.errors import FscacheError, PreContentUnsupportedError, UnsupportedFilesystemError
from fscache.fanotify import FAN_DENY, FAN_DENY_ERRNO, FAN_NOFD, FAN_PRE_ACCESS, FanotifyGroup, PreAccessEvent

from .inotify import IN_IGNORED, IN_ONLYDIR, IN_UNMOUNT, Inotify, InotifyError, Watch

if TYPE_CHECKING:  # imported where used: the supervisor process never loads the image machinery
    from .backends import BlobBackend
    from .pipeline import BlobHandle, Pipeline

__all__ = [
    "CacheFile",
    "FanotifyServer",
    "Supervisor",
    "prepare_cache_files",
    "probe_pre_content",
    "main",
]

log = logging.getLogger(__name__)

PAGE_SIZE = 4096  # = pipeline.PAGE_SIZE (checked in run_daemon; not imported, see above)
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


# -- the image's lifetime -----------------------------------------------------------------------------------------
class ImageWatch:
    """The inotify watch on the root of the mounted image: says when its EROFS superblock is released.

    The filesystem outlives its place in the mount table: a mount detached lazily (``umount -l``, or our own stop
    with files open there) still reads through the cache files for as long as a file is open on it, and its holes
    must never read as zeros, so the marks, and the group holding them, must stay until the superblock is shut
    down.  Then the watch gets ``IN_UNMOUNT`` (then ``IN_IGNORED``) and leaves the instance's watch list; a watch
    does not make the mount busy.  The instance is shared by the supervisor and its workers (inherited): whoever
    reads takes the events, so the watch list (``/proc/self/fdinfo``) is what says a release already happened.
    """

    def __init__(self, inotify: Inotify, watch: Watch, mountpoint: Path) -> None:
        self.inotify = inotify
        self.wd = watch.wd
        self.dev = watch.dev  # st_dev of the image's filesystem
        self.mountpoint = mountpoint
        self.mnt_id = self.mount_id()  # of our mount, while the mount table shows it (to count its open files)
        self._released = False
        self._lingering = False

    @classmethod
    def add(cls, inotify: Inotify, mountpoint: Path) -> ImageWatch:
        """Watch the image just mounted at ``mountpoint``."""
        wd = inotify.add_watch(mountpoint, IN_UNMOUNT | IN_ONLYDIR)
        for w in inotify.watches():
            if w.wd == wd:
                return cls(inotify, w, mountpoint)
        raise InotifyError(errno.ENOENT, f"{mountpoint} was unmounted at once")

    @classmethod
    def inherited(cls, inotify: Inotify, mountpoint: Path) -> ImageWatch | None:
        """The watch of an inherited instance (a restarted worker, the supervisor); None once the image is
        released (or before it was mounted)."""
        watches = inotify.watches()
        return cls(inotify, watches[0], mountpoint) if watches else None

    def fileno(self) -> int:
        return self.inotify.fileno()

    def released(self) -> bool:
        """Whether the superblock is gone (reads the events queued, then the watch list)."""
        if not self._released:
            for ev in self.inotify.read_events():
                if ev.wd == self.wd and ev.mask & (IN_UNMOUNT | IN_IGNORED):
                    self._released = True
            if not self._released and all(w.wd != self.wd for w in self.inotify.watches()):
                self._released = True
        return self._released

    def mount_id(self) -> int | None:
        """The id of our mount if it is the one on top at the mountpoint (``/proc/self/mountinfo``), else None."""
        from .kmount import _unescape

        target = os.path.realpath(self.mountpoint)
        found = None
        with open("/proc/self/mountinfo") as f:
            for line in f:
                fields = line.split(" - ", 1)[0].split()
                if len(fields) >= 5 and _unescape(fields[4]) == target:  # the last one is on top
                    major, minor = fields[2].split(":")
                    found = int(fields[0]) if os.makedev(int(major), int(minor)) == self.dev else None
        if found is not None:
            self.mnt_id = found
        return found

    def unmount(self) -> None:
        """Unmount the image if the mountpoint still shows it: plainly, else (files are open there) detached,
        the filesystem living on until they close (:meth:`released` says when).  Never by path alone: after a
        detach another mount may sit there."""
        from .kmount import umount

        if self.mount_id() is None:
            return
        try:
            umount(self.mountpoint)
            log.warning("unmounted %s", self.mountpoint)
            return
        except OSError as e:
            if e.errno != errno.EBUSY:
                log.error("cannot unmount %s: %s", self.mountpoint, e)
                return
        try:
            umount(self.mountpoint, lazy=True)
            log.warning("detached %s (files are open there)", self.mountpoint)
        except OSError as e:
            log.error("cannot detach %s: %s", self.mountpoint, e)

    def log_linger(self, why: str, what: str) -> None:
        """Say (once) that ``what`` goes on until the detached image is released: until how many open files close."""
        if self._lingering:
            return
        self._lingering = True
        n = open_files(self.mnt_id) if self.mnt_id is not None else 0
        until = f"its {n} open file{'s' * (n != 1)} close" if n else "the files open there close"
        log.warning("%s: %s is detached, %s until %s", why, self.mountpoint, what, until)


def open_files(mnt_id: int) -> int:
    """How many fds of all processes are open on mount ``mnt_id`` (their ``fdinfo`` says; best effort, for a log
    line: files mapped or used as a cwd hold a mount too)."""
    n = 0
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            fds = os.listdir(f"/proc/{pid}/fdinfo")
        except OSError:
            continue
        for fd in fds:
            try:
                with open(f"/proc/{pid}/fdinfo/{fd}", "rb") as f:
                    info = f.read()
            except OSError:
                continue
            for line in info.splitlines():
                if line.startswith(b"mnt_id:"):
                    n += int(line.split()[1]) == mnt_id
                    break
    return n


# -- the event loop -----------------------------------------------------------------------------------------------
class FanotifyServer:
    """Serves FAN_PRE_ACCESS events of the cache files of one or more mounted images through one pipeline.

    Build it (marks the files), mount, then :meth:`serve` until :meth:`stop` (from any thread or a signal
    handler) or the release of the image.  ``readahead``: bytes filled in the background after each fill
    (0 = off).  ``group``: serve this group (one the supervisor holds too) instead of a new one; ``adopted``: its
    marks exist already (a restarted worker): complete files are unmarked, the others marked again (harmless).
    """

    def __init__(self, files: Sequence[CacheFile], pipeline: Pipeline, *, workers: int = 4,
                 readahead: int | None = None, readahead_workers: int = 3, group: FanotifyGroup | None = None,
                 adopted: bool = False) -> None:  # fmt: skip
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
        self.group = FanotifyGroup(pre_content=True) if group is None else group
        try:
            for cf in self.files:
                if cf.complete():  # a full cache file needs no events: reads go at the kernel's own speed
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
    def serve(self, watch: ImageWatch | None = None) -> bool:
        """Read and answer events until :meth:`stop` (False) or, with ``watch``, until the image's filesystem is
        released (True): a plain umount, or the close of the last file open on a detached mount.  A mount that
        only left the mount table (``umount -l``) is served on: its open files still read through the marks."""
        poller = select.poll()
        poller.register(self.group.fileno(), select.POLLIN)
        poller.register(self._stop_r, select.POLLIN)
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
                _drain(self._stop_r)
                return False
            if watch is not None and any(fd == wfd for fd, _ in ready) and watch.released():
                log.info("%s released", watch.mountpoint)
                return True
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
                        and not cf.shared and not cf.watched:  # fmt: skip
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
            if self.pipeline.fill(cf.handle, start, length, cf.pwrite, cf.present, wait=False):
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
    from .backends import make_backend

    return make_backend(kind, **options)


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None


def _report(fd: int | None, message: str) -> None:
    if fd is None:
        return
    try:
        os.write(fd, message.encode(errors="replace") + b"\n")
    finally:
        os.close(fd)


MOUNT_FAILURE = 5  # kmount.MountError.exit_code (kmount is not imported by the supervisor)


def error_line(e: BaseException, code: int | None = None) -> str:
    """The readiness line of a startup failure: ``error CODE MESSAGE``.

    CODE is the exit status ``nydus-erofs mount`` has for the same failure in full mode (the error's
    ``exit_code``: 2 usage, 3 a damaged image, 4 a backend; 1 a plain OSError; 5 anything else, a failure of the
    daemon's own), :func:`cachefilesd_py.kmount.daemon_error` raises it again from it.  MESSAGE is one line; an
    OSError's names its file (``No space left on device: PATH``, not ``[Errno 28] ...``).
    """
    if code is None:
        if isinstance(e, NydusErofsError):
            code = e.exit_code
        elif isinstance(e, OSError) and not isinstance(e, FscacheError):
            code = 1
        else:
            code = MOUNT_FAILURE
    if isinstance(e, OSError) and not isinstance(e, NydusErofsError | FscacheError) and e.strerror:
        msg = e.strerror if e.filename is None else f"{e.strerror}: {os.fsdecode(e.filename)}"
    else:
        msg = str(e)
    msg = (msg.splitlines() or [""])[0] or type(e).__name__
    return f"error {code} {msg}"


def run_daemon(*, boot: Path, mountpoint: Path, cache_dir: Path, backend: BlobBackend, amplify: int,
               workers: int, readahead: int | None, record: Path, record_data: dict[str, Any],
               ready_fd: int | None, group_fd: int | None = None, inotify_fd: int | None = None,
               restart: int = 0, supervisor_pid: int | None = None) -> int:  # fmt: skip
    """Prepare, mark, mount, watch the mount (:class:`ImageWatch`), report readiness on ``ready_fd`` and serve
    until the image's filesystem is released.

    SIGTERM/SIGINT unmount: plainly if nothing is open there (the filesystem is released at once), else the
    mount is detached and served until its last open file closes; a second signal changes nothing.

    ``group_fd``, ``inotify_fd``: the fanotify group and the inotify instance, inherited from the
    :class:`Supervisor` (the record then names the supervisor as ``pid`` and this process as ``worker_pid``);
    ``restart`` > 0: the files are marked and the image mounted (perhaps detached) and watched already, by a
    worker that died: serve them as they are.  ``supervisor_pid``: the supervisor's pid, for the record (never
    ``getppid()``: a worker whose supervisor died is re-parented, to init or a subreaper); a worker whose
    supervisor is gone before the record is written fails its start.

    Every startup failure is reported as one line on ``ready_fd`` (:func:`error_line`) and raised.  On exit the
    final stats go into the runtime record, for ``umount`` (unless the record is another daemon's by then).
    """
    from . import pipeline as pipeline_mod
    from .blob_handles import open_image
    from .kmount import MountError, mount_erofs_file_backed, process_start_time, set_mount_readahead, write_record

    assert pipeline_mod.PAGE_SIZE == PAGE_SIZE
    files: list[CacheFile] = []
    server: FanotifyServer | None = None
    watch: ImageWatch | None = None
    group = None if group_fd is None else FanotifyGroup.from_fd(group_fd)
    inotify = None if inotify_fd is None else Inotify.from_fd(inotify_fd)
    adopted = restart > 0
    pipeline = pipeline_mod.Pipeline(amplify=amplify, workers=workers)
    try:
        try:
            if inotify is None:
                inotify = Inotify()
            if adopted:
                watch = ImageWatch.inherited(inotify, mountpoint)
                if watch is None:
                    raise UsageError(f"{mountpoint} was unmounted and released")
            handles = open_image(boot, backend)
            if not handles:
                raise UsageError(f"{boot}: the image has no data blobs: mount it directly")
            files = prepare_cache_files(cache_dir, handles, marked=adopted)
            server = FanotifyServer(files, pipeline, workers=workers, readahead=readahead, group=group,
                                    adopted=adopted)  # fmt: skip
            if not adopted:
                mount_erofs_file_backed(boot, mountpoint, [cf.path for cf in files])
                watch = ImageWatch.add(inotify, mountpoint)
                # events as big as a fetch: one round trip per amplification window rather than per 128 KiB
                set_mount_readahead(mountpoint, min(max(amplify >> 10, 128), 1024))
        except UnsupportedFilesystemError as e:
            raise UsageError(f"cache dir {cache_dir}: {e}") from None
        except PreContentUnsupportedError as e:
            raise UsageError(f"{e} (use --mode full)") from None
        me = os.getpid()
        owner = me  # umount stops the process named here: the supervisor, if there is one
        if group_fd is not None:
            if supervisor_pid is None or os.getppid() != supervisor_pid:
                raise MountError(errno.ESRCH, f"the supervisor (pid {supervisor_pid}) is gone")  # a daemon failure
            owner = supervisor_pid
        data = dict(record_data, pid=owner, start_time=process_start_time(owner),
                    blobs=[cf.handle.blob_id for cf in files])  # fmt: skip
        if group_fd is not None:
            data.update(worker_pid=me, worker_start_time=process_start_time(me), restarts=restart)
        write_record(record, data)
    except BaseException as e:
        _report(ready_fd, error_line(e))
        if watch is not None and not adopted:  # mounted by us: nobody has used it yet
            watch.unmount()  # (a supervisor serves what a detach leaves until it is released)
        if server is not None:
            server.close(deny_queued=not adopted)  # a restarted worker leaves the queue to the next one
        elif group is not None:
            group.close()
        for cf in files:
            cf.close()
        pipeline.close()
        if inotify is not None:
            inotify.close()
        raise
    assert watch is not None and inotify is not None

    def on_signal(signum: int, frame: object) -> None:
        server.stop()

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    _report(ready_fd, "ok")
    log.info("serving %s on %s (%d blobs)", boot, mountpoint, len(files))
    try:
        while not server.serve(watch):  # a stop signal: unmount; if files are open there, serve until they close
            watch.unmount()
            if not watch.released():
                watch.log_linger("stopping", "serving it")
    finally:
        # a failure: a supervisor starts the next worker on the mount as it is; alone, unmount (detached if busy)
        if group_fd is None and not watch.released():
            watch.unmount()
        stats = server.stats()
        server.close()
        pipeline.close()
        for cf in files:
            cf.close()
        backend.close()
        inotify.close()
        who = "worker_pid" if group_fd is not None else "pid"
        try:
            if (_read_json(record) or {}).get(who) == me:  # not removed, nor a new mount's by now
                write_record(record, dict(data, stats=stats, stopped=True))
        except (OSError, ValueError) as e:
            log.error("cannot write final stats to %s: %s", record, e)
        log.info("stopped: %s", json.dumps(stats["pipeline"]))
        for s, h in old.items():  # only now: a late SIGTERM must not cut the final record short
            signal.signal(s, h)
    return 0


# -- the supervisor -----------------------------------------------------------------------------------------------
_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
# a test hook, not a setting: "DELAY,MAX_DELAY,MAX_RESTARTS" replaces the restart backoff's defaults, so that a
# test of it takes seconds rather than half a minute
TEST_BACKOFF_ENV = "NYDUS_EROFS_TEST_RESTART_BACKOFF"


def _describe(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit status {code}"


class Supervisor:
    """Holds the fanotify group and the inotify instance watching the image (:class:`ImageWatch`); runs the worker
    (``worker_cmd``, a fresh interpreter given both fds) and starts a new one when it dies.

    While the supervisor holds the group, its marks stay: a read of a hole blocks until some worker answers,
    it never reads zeros.  When a worker dies (killed, crashed: not an exit with status 0), the permission
    events it had read are still pending, matched by their event fd numbers, which died with it: the
    supervisor answers each number below the worker's RLIMIT_NOFILE with a deny (EIO), the unknown ones
    failing with ENOENT (a few tens of ms for 20000).  Events queued but not read yet stay queued for the next
    worker.

    Restarts back off (:meth:`next_delay`): the n-th worker death in a row waits ``delay * 2**(n-1)`` seconds, at most
    ``max_delay``, and the ``max_restarts + 1``-th makes the supervisor give up.  A worker that lived ``stable``
    seconds ends the row (its death is the first of a new one).  The wait polls a pipe that the signals write to
    (``set_wakeup_fd``) and the inotify instance: a stop signal or the release of the image ends it at once.

    The group is closed only once the image is released (:meth:`run`); with no worker left, :meth:`_linger`
    unmounts and answers the events until then.
    """

    def __init__(self, worker_cmd: Sequence[str], mountpoint: Path, *, delay: float = 0.1, max_delay: float = 5.0,
                 max_restarts: int = 10, stable: float = 60.0) -> None:  # fmt: skip
        self.worker_cmd = list(worker_cmd)
        self.mountpoint = mountpoint
        self.delay = delay
        self.max_delay = max_delay
        self.max_restarts = max_restarts
        self.stable = stable
        self.restarts = 0
        self.streak = 0  # worker deaths in a row
        self.group: FanotifyGroup | None = None
        self.inotify: Inotify | None = None  # shared with the workers: the first one adds the watch of the image
        self.watch: ImageWatch | None = None
        self.proc: subprocess.Popen[bytes] | None = None
        self.stopping = False
        self._started = 0.0  # monotonic time of the last spawn
        self._wake_r = -1  # the signals' wakeup fd (read end)

    @staticmethod
    def backoff_from_env() -> dict[str, Any]:
        """The backoff parameters of :data:`TEST_BACKOFF_ENV`, if set (a test hook)."""
        text = os.environ.get(TEST_BACKOFF_ENV)
        if not text:
            return {}
        try:
            delay, max_delay, max_restarts = text.split(",")
            return {"delay": float(delay), "max_delay": float(max_delay), "max_restarts": int(max_restarts)}
        except ValueError:
            raise UsageError(f"{TEST_BACKOFF_ENV}={text!r}: expected DELAY,MAX_DELAY,MAX_RESTARTS") from None

    def next_delay(self, lived: float) -> float | None:
        """The wait before restarting a worker that died ``lived`` seconds after its start; None: give up."""
        if lived >= self.stable:
            self.streak = 0
        self.streak += 1
        if self.streak > self.max_restarts:
            return None
        return min(self.delay * 2 ** (self.streak - 1), self.max_delay)

    def _pause(self, seconds: float) -> bool:
        """Wait ``seconds`` before a restart; False when a stop signal or the release of the image ended it."""
        assert self.inotify is not None
        deadline = time.monotonic() + seconds
        poller = select.poll()
        poller.register(self._wake_r, select.POLLIN)
        poller.register(self.inotify.fileno(), select.POLLIN)
        while not self.stopping:  # (set by the handler, which has run once the wakeup fd is readable)
            left = deadline - time.monotonic()
            if left <= 0:
                return True
            for fd, _ in poller.poll(int(left * 1000) + 1):
                if fd == self._wake_r:  # a SIGUSR1 wakes us too: drain, go on waiting
                    _drain(fd)
                elif self._released():
                    log.warning("%s was unmounted and released: stopping", self.mountpoint)
                    return False
        log.warning("stopped while waiting to restart the worker")
        return False

    def _released(self) -> bool:
        """Whether the image's filesystem is gone (or was never mounted): nothing reads through the marks."""
        if self.watch is None:
            assert self.inotify is not None
            self.watch = ImageWatch.inherited(self.inotify, self.mountpoint)
            if self.watch is None:
                return True
        return self.watch.released()

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        if signum in _STOP_SIGNALS:
            self.stopping = True
        proc = self.proc
        if proc is not None:
            try:
                proc.send_signal(signal.SIGTERM if signum in _STOP_SIGNALS else signum)
            except (ProcessLookupError, OSError):
                pass

    def _spawn(self) -> str:
        """Start a worker; its readiness line (``ok``, ``error ...``, or empty if it died without one)."""
        assert self.group is not None and self.inotify is not None
        gfd, ifd = self.group.fileno(), self.inotify.fileno()
        r, w = os.pipe2(os.O_CLOEXEC)
        cmd = [*self.worker_cmd, "--group-fd", str(gfd), "--inotify-fd", str(ifd), "--restart", str(self.restarts),
               "--supervisor-pid", str(os.getpid()), "--ready-fd", str(w)]  # fmt: skip
        self._started = time.monotonic()
        try:
            self.proc = proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, pass_fds=(gfd, ifd, w))
        except BaseException:
            os.close(r)
            raise
        finally:
            os.close(w)
        if self.stopping:  # a stop signal came while there was no worker to pass it on to
            self._on_signal(signal.SIGTERM, None)
        with os.fdopen(r, "rb") as rf:
            line = rf.read().decode(errors="replace").strip()
        log.info("worker %d started%s: %s", proc.pid, f" (restart {self.restarts})" if self.restarts else "",
                 line or "no answer")  # fmt: skip
        return line

    def _wait(self) -> int:
        assert self.proc is not None
        code = self.proc.wait()
        self.proc = None
        return code

    def deny_in_flight(self) -> int:
        """Deny (EIO) every permission event a dead worker had read and not answered; returns how many."""
        assert self.group is not None
        limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]  # the worker's too (inherited, never raised)
        if limit == resource.RLIM_INFINITY:
            limit = int(Path("/proc/sys/fs/nr_open").read_text())
        denied = 0
        for fd in range(limit):
            try:
                if self.group.respond_fd(fd, FAN_DENY_ERRNO(errno.EIO), fallback=FAN_DENY):
                    denied += 1
            except FscacheError as e:
                log.error("deny of event fd %d: %s", fd, e)
        return denied

    def _deny_queued(self) -> None:
        assert self.group is not None
        denied = 0
        try:
            while events := self.group.read_events():
                for ev in events:
                    if ev.fd >= 0:
                        self.group.deny(ev, errno.EIO)
                        denied += 1
        except (FscacheError, OSError) as e:
            log.error("denying queued events: %s", e)
        if denied:
            log.warning("denied %d queued events (EIO)", denied)

    def _linger(self) -> None:
        """No worker will run again: if the image's filesystem is still alive, unmount it (detached when files
        are open there) and answer its reads until it is released (ranges the cache file holds are allowed, the
        others denied with EIO: never zeros); then the group may close.  Stop signals change nothing here."""
        assert self.group is not None and self.watch is not None
        watch = self.watch
        watch.unmount()
        if watch.released():
            return
        watch.log_linger("no worker left", "denying reads of missing data (EIO)")
        poller = select.poll()
        for fd in (self.group.fileno(), watch.fileno(), self._wake_r):
            poller.register(fd, select.POLLIN)
        allowed = denied = 0
        while True:
            ready = {fd for fd, _ in poller.poll()}
            if self._wake_r in ready:
                _drain(self._wake_r)
            if watch.fileno() in ready and watch.released():
                break
            if self.group.fileno() in ready:
                for ev in self.group.read_events():
                    if ev.fd < 0:
                        continue
                    if self._answer_present(ev):
                        allowed += 1
                    else:
                        denied += 1
        log.warning("%s released: %d reads allowed, %d denied (EIO) meanwhile", self.mountpoint, allowed, denied)

    def _answer_present(self, ev: PreAccessEvent) -> bool:
        """Allow a read of data the cache file holds (verified when it was written), deny (EIO) one of a hole."""
        group = self.group
        assert group is not None
        try:
            if ev.offset is not None and ev.count and ev.holes():
                group.deny(ev, errno.EIO)
                return False
            group.allow(ev)
            return True
        except (FscacheError, OSError, ValueError) as e:
            log.error("answering an event: %s", e)
            if ev.fd >= 0:
                try:
                    group.deny(ev, errno.EIO)
                except (FscacheError, OSError) as e2:
                    log.error("deny failed: %s", e2)
            return False

    def run(self, ready_fd: int | None) -> int:
        """Start the first worker, relay its readiness line to ``ready_fd``, supervise; the exit status.

        The group is closed only once the image's filesystem is released (see :class:`ImageWatch`): while a
        worker runs, by waiting for it (it serves until then); when none will run again (a stop signal after
        its death, giving up, an error), by :meth:`_linger`.
        """
        self._wake_r, wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        previous_wakeup = signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)  # wakes _pause on a signal
        previous = {s: signal.signal(s, self._on_signal) for s in (*_STOP_SIGNALS, signal.SIGUSR1)}
        died = False  # the last worker died without answering what it had read
        try:
            try:
                self.group = FanotifyGroup(pre_content=True)
                self.inotify = Inotify()
            except PreContentUnsupportedError as e:  # as `--mode fanotify` says when it probes for them
                _report(ready_fd, error_line(UsageError(f"{e} (use --mode full)")))
                return 1
            except (NydusErofsError, FscacheError, OSError) as e:
                _report(ready_fd, error_line(e))
                return 1
            line = self._spawn()
            if line:
                _report(ready_fd, line)
            elif ready_fd is not None:
                os.close(ready_fd)  # the mount command reports the exit status and the log
            if line != "ok":
                died = self._wait() != 0
                return 1
            while True:
                assert self.proc is not None
                pid = self.proc.pid
                code = self._wait()
                lived = time.monotonic() - self._started
                clean = code == 0 or (self.stopping and code == -signal.SIGTERM)
                if code == 0 or self._released():  # a worker exits 0 once the image is released
                    log.info("worker %d stopped", pid)
                    return 0 if clean else 1
                died = True
                log.error("worker %d died (%s): denying its pending events", pid, _describe(code))
                log.error("denied %d events of worker %d (EIO)", self.deny_in_flight(), pid)
                died = False
                if self.stopping:
                    return 1
                delay = self.next_delay(lived)
                if delay is None:
                    log.error("worker died %d times in a row (no restarted one lived %.0f s): giving up",
                              self.streak, self.stable)  # fmt: skip
                    return 1
                self.restarts += 1
                log.warning("restarting the worker in %.2f s (restart %d, death %d in a row)", delay,
                            self.restarts, self.streak)  # fmt: skip
                if not self._pause(delay):
                    return 1
                line = self._spawn()
                if line != "ok":
                    log.error("restarted worker failed: %s", line or "no answer")
        finally:
            if self.proc is not None:  # an error above: stop the worker (it serves until the image is released)
                try:
                    self.proc.send_signal(signal.SIGTERM)
                except OSError:
                    pass
                died = self._wait() != 0 or died
            if self.group is not None:
                if died:
                    self.deny_in_flight()
                try:
                    if not self._released():
                        self._linger()
                except (NydusErofsError, OSError) as e:  # cannot tell any more: close, as before
                    log.error("waiting for %s to be released: %s", self.mountpoint, e)
                self._deny_queued()
                self.group.close()
            if self.inotify is not None:
                self.inotify.close()
            for s, h in previous.items():  # only now: a second SIGTERM must not end the wait above
                signal.signal(s, h)
            signal.set_wakeup_fd(previous_wakeup)
            for fd in (self._wake_r, wake_w):
                os.close(fd)
            self._wake_r = -1


def _drain(fd: int) -> None:
    """Read a non-blocking pipe empty."""
    try:
        while os.read(fd, 256):
            pass
    except BlockingIOError:
        pass


def _worker_argv(argv: Sequence[str]) -> list[str]:
    """The supervisor's arguments minus its own (``--supervise``, ``--ready-fd N``)."""
    out: list[str] = []
    skip = False
    for a in argv:
        if skip:
            skip = False
        elif a == "--supervise" or a.startswith("--ready-fd="):
            pass
        elif a == "--ready-fd":
            skip = True
        else:
            out.append(a)
    return out


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
    ap.add_argument("--supervise", action="store_true", help="Run as the supervisor of worker processes")
    ap.add_argument("--group-fd", type=int, default=None, help="Inherited fanotify group (a worker)")
    ap.add_argument("--inotify-fd", type=int, default=None, help="Inherited inotify instance (a worker)")
    ap.add_argument("--restart", type=int, default=0, help="Restart number of this worker (0: the first)")
    ap.add_argument("--supervisor-pid", type=int, default=None, help="The supervisor's pid (a worker)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(name)s %(levelname)s: %(message)s",
                        stream=sys.stderr)  # fmt: skip
    if args.supervise:
        worker = [sys.executable, "-m", "cachefilesd_py.fanotify_mount",
                  *_worker_argv(sys.argv[1:] if argv is None else argv)]  # fmt: skip
        try:
            backoff = Supervisor.backoff_from_env()
        except UsageError as e:
            _report(args.ready_fd, error_line(e))
            return 1
        return Supervisor(worker, args.mountpoint, **backoff).run(args.ready_fd)
    faulthandler.register(signal.SIGUSR1, file=sys.stderr, all_threads=True)  # `kill -USR1`: thread stacks to the log
    try:
        backend = backend_from_options(args.backend, json.loads(args.backend_config))
    except (NydusErofsError, ValueError) as e:  # bad options: a usage error, as kmount says before starting us
        _report(args.ready_fd, error_line(UsageError(f"backend {args.backend}: {e}")))
        return 1
    try:
        run_daemon(
            boot=args.boot, mountpoint=args.mountpoint, cache_dir=args.cache_dir, backend=backend,
            amplify=args.amplify, workers=args.workers, readahead=args.readahead, record=args.record,
            record_data=json.loads(args.record_data), ready_fd=args.ready_fd, group_fd=args.group_fd,
            inotify_fd=args.inotify_fd, restart=args.restart, supervisor_pid=args.supervisor_pid,
        )  # fmt: skip
    except (NydusErofsError, FscacheError, OSError, ValueError) as e:  # reported on --ready-fd already
        log.error("%s", e)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

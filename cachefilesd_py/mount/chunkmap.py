"""What a blob cache file may be trusted for: its chunk map (``CACHE/<blob_id>.<key>.map``) and its key.

A cache file holds a blob's uncompressed chunks at their ``d_off``; a chunk's bytes count as present only once
they were verified against the chunk's digest, written, made durable (``fdatasync`` of the cache file) and then
recorded here.  Neither a file's size nor its data extents say anything: a failed write (ENOSPC) leaves
allocated zero blocks behind, and another image may name the same blob id with other content.

The **key** (:func:`~cachefilesd_py.blob_handles.chunk_table_key`) is a sha256 over what the bootstrap and the
blob's verified metadata say the uncompressed layout is: the digester and, per chunk, ``(d_off, d_size,
digest)``.  Cache files are named ``<blob_id>.<key[:32 hex]>``: two images that disagree about any chunk of a
blob (an image naming another's blob id with its own content) never share a cache file; images that agree share
it, and whatever either verified holds for both.

The **map file** (:class:`ChunkMap`), beside its cache file::

    offset 0   8s  magic  b"NYEROMAP"
           8   u32 version (1)
          12   u32 chunk_count
          16   32s the full key
          48   16s reserved (zero)
          64   chunk_count bytes, one per chunk index: 1 = verified and durable, 0 = not

One byte per chunk (not a bit) so that several daemons serving one cache file only ever write their own
chunks' bytes (a set is a 1-byte pwrite, never a read-modify-write of a neighbour's bit).  A map whose header is
not exactly this (another key, another count, damage) is started afresh, and its cache file with it.

Persistence (:meth:`ChunkMap.flush`): a chunk is marked in memory as soon as its verified bytes are written (the
mount may read it at once: the bytes are in the page cache); its byte goes to the map file only after an
``fdatasync`` of the cache file, so a chunk the map records is never zeros (or a part of the chunk) after a
crash.  A flush is due once :data:`FLUSH_BYTES` of written chunks wait for it, and then runs (on a thread of its
own) when the writes pause (:meth:`ChunkMap.await_flush`: :data:`FLUSH_QUIET` seconds without a new chunk), or
at the latest once :data:`FLUSH_MAX_BYTES` wait or the oldest has waited :data:`FLUSH_MAX_DELAY` seconds; also
when the file is complete and on close.  Batching is what the delay buys: the writeback of a burst of fills
(a cold sequential read) does not compete for the disk with the blob reads of that same burst, and there are
fewer ``fdatasync`` calls.  (``sync_file_range`` would not do instead: it neither commits the file's block
allocation nor flushes the disk's cache, so it makes nothing durable.)  What the delay costs: more chunks
fetched again after a crash, at most :data:`FLUSH_MAX_BYTES`.  A chunk marked in memory but not yet flushed
when the daemon dies counts as absent at the next start (it is fetched again).  A failed ``fdatasync`` un-marks
every chunk written since the last flush.
"""

from __future__ import annotations

import logging
import os
import struct
import threading
import time
from pathlib import Path

__all__ = ["FLUSH_BYTES", "FLUSH_MAX_BYTES", "FLUSH_MAX_DELAY", "FLUSH_QUIET", "KEY_HEX", "ChunkMap", "map_path"]

log = logging.getLogger(__name__)

MAGIC = b"NYEROMAP"
VERSION = 1
_HEADER = struct.Struct("<8sII32s16x")
HEADER_SIZE = _HEADER.size  # 64
KEY_HEX = 32  # hex digits of the key in a cache file's name (128 bits)
FLUSH_BYTES = 64 << 20  # written chunk bytes that make an fdatasync + map update due
FLUSH_QUIET = 0.25  # seconds without a new chunk before a due flush runs (the burst of writes is over)...
FLUSH_MAX_BYTES = 1 << 30  # ...or once this many bytes wait for it...
FLUSH_MAX_DELAY = 5.0  # ...or once the oldest has waited this long (seconds)
_ONE = bytes([0] + [1] * 255)  # translate table: any non-zero byte is a recorded chunk


def map_path(cache_path: Path) -> Path:
    """The chunk map of cache file ``cache_path``."""
    return cache_path.with_name(cache_path.name + ".map")


class ChunkMap:
    """The verified-chunk map of one cache file (thread-safe).

    ``has(ci)``: verified and written (in memory, flushed or not); ``mark(ci, nbytes)`` after a verified write,
    True when a flush is due; ``await_flush()`` waits until a due flush should run (``hurry()``: at once from now
    on); ``unmark(ci)`` forgets a chunk (in memory and on disk); ``flush(data_fd)`` makes the marked chunks durable
    and records them; ``persisted(ci)`` re-reads the map file (what another daemon of the
    same cache file recorded).  A map file that is not this blob's is started afresh (``fresh``), or, with
    ``reset`` false (another daemon serves the cache file), refused with ValueError.
    """

    def __init__(self, path: Path, key: bytes, chunk_count: int, *, reset: bool = True) -> None:
        self.path = path
        self.key = key
        self.chunk_count = chunk_count
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)  # a due flush waiting (await_flush) for a pause
        self._hurry = False  # closing: a due flush runs at once
        self._dirty: set[int] = set()
        self._dirty_bytes = 0
        self._dirty_since = self._last_mark = 0.0  # time.monotonic() of the oldest unflushed mark, of the latest
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        try:
            header = _HEADER.pack(MAGIC, VERSION, chunk_count, key)
            size = HEADER_SIZE + chunk_count
            st = os.fstat(fd)
            if st.st_size == size and os.pread(fd, HEADER_SIZE, 0) == header:
                raw = os.pread(fd, chunk_count, HEADER_SIZE)
                self.fresh = False
            else:
                raw = b""
                self.fresh = True
            if len(raw) != chunk_count:
                if not reset:
                    raise ValueError(f"chunk map {path} is in use and not this blob's")
                if st.st_size:
                    log.warning("chunk map %s is not this blob's: starting it afresh", path)
                os.ftruncate(fd, 0)
                _pwrite_all(fd, header + bytes(chunk_count), 0)
                os.fsync(fd)  # allocated now: later 1-byte writes never need space
                raw = bytes(chunk_count)
                self.fresh = True
        except BaseException:
            os.close(fd)
            raise
        self.fd = fd
        self.marks = bytearray(raw.translate(_ONE))

    # -- queries --------------------------------------------------------------------------------------------
    def has(self, ci: int) -> bool:
        return self.marks[ci] != 0

    def count(self) -> int:
        """Chunks marked."""
        return self.chunk_count - self.marks.count(0)

    def persisted(self, ci: int) -> bool:
        """Whether the map file records chunk ``ci`` (perhaps written by another daemon of the cache file)."""
        return os.pread(self.fd, 1, HEADER_SIZE + ci) == b"\x01"

    # -- updates --------------------------------------------------------------------------------------------
    def mark(self, ci: int, nbytes: int, *, durable: bool = False) -> bool:
        """Chunk ``ci`` was verified and written (``nbytes``); True when :meth:`flush` is due.  ``durable``: it
        is recorded on disk already (read back from the map file)."""
        with self._lock:
            if self.marks[ci]:
                return False
            self.marks[ci] = 1
            if durable:
                return False
            self._last_mark = time.monotonic()
            if not self._dirty:
                self._dirty_since = self._last_mark
            self._dirty.add(ci)
            self._dirty_bytes += nbytes
            if self._dirty_bytes >= FLUSH_MAX_BYTES:
                self._cond.notify_all()
            return self._dirty_bytes >= FLUSH_BYTES

    def await_flush(self) -> None:
        """Return when a due flush should run: no chunk marked for :data:`FLUSH_QUIET` seconds, or
        :data:`FLUSH_MAX_BYTES` waiting, or the oldest waiting for :data:`FLUSH_MAX_DELAY` seconds; or at once
        after :meth:`hurry`."""
        with self._cond:
            while not self._hurry:
                left = min(self._last_mark + FLUSH_QUIET, self._dirty_since + FLUSH_MAX_DELAY) - time.monotonic()
                if left <= 0 or self._dirty_bytes >= FLUSH_MAX_BYTES:
                    return
                self._cond.wait(left)

    def hurry(self) -> None:
        """From now on a due flush waits for nothing (the cache file is being closed)."""
        with self._cond:
            self._hurry = True
            self._cond.notify_all()

    def unmark(self, ci: int) -> None:
        """Forget chunk ``ci``: in memory and in the map file (before its bytes are punched out)."""
        with self._lock:
            self.marks[ci] = 0
            self._dirty.discard(ci)
            os.pwrite(self.fd, b"\x00", HEADER_SIZE + ci)

    def flush(self, data_fd: int) -> list[int]:
        """``fdatasync(data_fd)``, then record every chunk marked since the last flush.  Returns the chunks
        that could not be made durable (un-marked again: their bytes must not be trusted)."""
        with self._lock:
            dirty, self._dirty, self._dirty_bytes = sorted(self._dirty), set(), 0
        if not dirty:
            return []
        try:
            os.fdatasync(data_fd)
        except OSError as e:
            log.error("chunk map %s: fdatasync of the cache file failed (%s): %d chunks not trusted", self.path,
                      e.strerror, len(dirty))  # fmt: skip
            with self._lock:
                for ci in dirty:
                    self.marks[ci] = 0
            return dirty
        try:
            with self._lock:  # a chunk un-marked meanwhile (evicted) stays so; written again: the next flush's
                for run_start, run_len in _runs([ci for ci in dirty if self.marks[ci] and ci not in self._dirty]):
                    _pwrite_all(self.fd, b"\x01" * run_len, HEADER_SIZE + run_start)
        except OSError as e:  # the bytes are durable, only not recorded: fetched again after a restart
            log.error("chunk map %s: cannot record %d chunks: %s", self.path, len(dirty), e.strerror)
        return []

    def sync(self) -> None:
        """``fdatasync`` of the map file: the chunks un-marked so far are absent on disk too."""
        os.fdatasync(self.fd)

    def close(self, data_fd: int | None = None) -> list[int]:
        """Flush (when ``data_fd`` is given) and close."""
        failed = self.flush(data_fd) if data_fd is not None and data_fd >= 0 else []
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            os.close(fd)
        return failed


def _runs(sorted_indexes: list[int]) -> list[tuple[int, int]]:
    """``[(start, length)]`` of consecutive indexes."""
    out: list[tuple[int, int]] = []
    for i in sorted_indexes:
        if out and out[-1][0] + out[-1][1] == i:
            out[-1] = (out[-1][0], out[-1][1] + 1)
        else:
            out.append((i, 1))
    return out


def _pwrite_all(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    done = 0
    while done < len(view):
        done += os.pwrite(fd, view[done:], offset + done)

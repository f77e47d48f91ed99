"""Blobs as files ``DIR/<blob_id>`` (then each of ``alt_dirs``), read with ``os.pread`` through a bounded
cache of open fds."""

from __future__ import annotations

import os
import stat
import threading
from collections import OrderedDict
from pathlib import Path

from erofs.errors import BackendError

from .stats import BackendStats
from .util import check_blob_id, check_range


class _Fd:
    __slots__ = ("fd", "refs", "evicted")

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.refs = 0
        self.evicted = False


class LocalFsBackend:
    """``read``/``size`` of blob files by id; ids must be 64 lowercase hex digits, so a path never leaves
    the directories.  At most ``max_open`` fds stay cached (least recently used closed first; an fd in use
    by a concurrent read is closed when that read ends)."""

    def __init__(
        self, dir: str | os.PathLike[str], *, alt_dirs: list[str | os.PathLike[str]] | tuple = (), max_open: int = 64
    ) -> None:
        self.dirs = [Path(dir), *(Path(d) for d in alt_dirs)]
        self.max_open = max(1, max_open)
        self.stats = BackendStats()
        self._fds: OrderedDict[str, _Fd] = OrderedDict()
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"LocalFsBackend({', '.join(str(d) for d in self.dirs)})"

    def _open(self, blob_id: str) -> int:
        check_blob_id(blob_id)
        for d in self.dirs:
            path = d / blob_id
            try:
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                continue
            except OSError as e:
                raise BackendError(f"blob {blob_id}: cannot open {path}: {e.strerror}") from None
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                os.close(fd)
                raise BackendError(f"blob {blob_id}: {path} is not a regular file")
            return fd
        where = " or ".join(str(d) for d in self.dirs)
        raise BackendError(f"blob {blob_id}: not found in {where}")

    def _acquire(self, blob_id: str) -> _Fd:
        with self._lock:
            entry = self._fds.get(blob_id)
            if entry is not None:
                self._fds.move_to_end(blob_id)
                entry.refs += 1
                return entry
        fd = self._open(blob_id)  # outside the lock: opening may be slow (NFS)
        to_close: list[int] = []
        with self._lock:
            entry = self._fds.get(blob_id)
            if entry is not None:  # another thread won the race
                to_close.append(fd)
                self._fds.move_to_end(blob_id)
            else:
                entry = self._fds[blob_id] = _Fd(fd)
                while len(self._fds) > self.max_open:
                    _, old = self._fds.popitem(last=False)
                    old.evicted = True
                    if old.refs == 0:
                        to_close.append(old.fd)
            entry.refs += 1
        for f in to_close:
            os.close(f)
        return entry

    def _acquire_counted(self, blob_id: str) -> _Fd:
        try:
            return self._acquire(blob_id)
        except BackendError:
            self.stats.add(errors=1)
            raise

    def _release(self, entry: _Fd) -> None:
        with self._lock:
            entry.refs -= 1
            close = entry.evicted and entry.refs == 0
        if close:
            os.close(entry.fd)

    def read(self, blob_id: str, offset: int, length: int) -> bytes:
        """Exactly ``length`` bytes at ``offset``, or BackendError (a range past the end included)."""
        try:
            check_range(blob_id, offset, length)
        except BackendError:
            self.stats.add(errors=1)
            raise
        if length == 0:
            return b""
        entry = self._acquire_counted(blob_id)
        try:
            parts: list[bytes] = []
            got = 0
            while got < length:
                try:
                    data = os.pread(entry.fd, length - got, offset + got)
                except OSError as e:
                    self.stats.add(requests=1, errors=1)
                    raise BackendError(f"blob {blob_id}: read at {offset + got} failed: {e.strerror}") from None
                self.stats.add(requests=1, bytes=len(data))
                if not data:
                    self.stats.add(errors=1)
                    size = os.fstat(entry.fd).st_size
                    raise BackendError(
                        f"blob {blob_id}: range {offset}+{length} is past the end of the blob (size {size})"
                    )
                parts.append(data)
                got += len(data)
            return parts[0] if len(parts) == 1 else b"".join(parts)
        finally:
            self._release(entry)

    def size(self, blob_id: str) -> int:
        entry = self._acquire_counted(blob_id)
        try:
            return os.fstat(entry.fd).st_size
        finally:
            self._release(entry)

    def close(self) -> None:
        with self._lock:
            entries, self._fds = list(self._fds.values()), OrderedDict()
            to_close = []
            for e in entries:
                e.evicted = True
                if e.refs == 0:
                    to_close.append(e.fd)
        for fd in to_close:
            os.close(fd)

    def __enter__(self) -> LocalFsBackend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

"""The one kernel file descriptor a session object owns (``/dev/cachefiles``, a fanotify group, inotify), the
draining of a wakeup pipe, and :func:`punch_hole` (a cache file's range back to a hole)."""

from __future__ import annotations

import ctypes
import errno
import os
from types import TracebackType
from typing import Self

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02

_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]


class FdOwner:
    """Owns ``self._fd``: ``fileno`` for poll/select, ``close`` once, and use as a context manager."""

    _fd: int

    def fileno(self) -> int:
        """The fd, for ``poll``/``select``."""
        if self._fd < 0:
            raise ValueError(f"{type(self).__name__} is closed")
        return self._fd

    @property
    def closed(self) -> bool:
        return self._fd < 0

    def close(self) -> None:
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            os.close(fd)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def drain(fd: int) -> None:
    """Read a non-blocking pipe empty (a wakeup or stop pipe)."""
    try:
        while os.read(fd, 256):
            pass
    except BlockingIOError:
        pass


def punch_hole(fd: int, offset: int, length: int) -> None:
    """Deallocate ``[offset, offset + length)`` of ``fd`` (``fallocate(PUNCH_HOLE | KEEP_SIZE)``): it reads as
    zeros and ``SEEK_DATA`` skips it; the file keeps its size.  OSError on failure."""
    if length <= 0:
        return
    if _libc.fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length) != 0:
        err = ctypes.get_errno() or errno.EIO
        raise OSError(err, f"punching a hole at {offset}+{length}: {os.strerror(err)}")

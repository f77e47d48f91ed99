"""The one kernel file descriptor a session object owns (``/dev/cachefiles``, a fanotify group, inotify), and
the draining of a wakeup pipe."""

from __future__ import annotations

import os
from types import TracebackType
from typing import Self


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

"""Log lines counted, not repeated: the one filter every daemon's log handler carries (:class:`RepeatFilter`).

A reader re-reading a corrupt page raises the same failure line on every read; without a limit, any user who
may read the mount grows the daemon's log (in ``/run``) without bound.
"""

from __future__ import annotations

import logging
import threading
import time

__all__ = ["REPEAT_WINDOW", "RepeatFilter", "daemon_logging"]

REPEAT_WINDOW = 30.0  # seconds an identical line is counted instead of logged


class RepeatFilter(logging.Filter):
    """Drops a line identical (logger, level, text) to one logged less than ``window`` seconds ago, counting it;
    the first such line after the window is logged with ``(repeated N times)``: how many were dropped meanwhile.
    At most ``max_lines`` distinct lines are remembered (the oldest are forgotten first)."""

    def __init__(self, window: float = REPEAT_WINDOW, max_lines: int = 4096) -> None:
        super().__init__()
        self.window = window
        self.max_lines = max_lines
        self._seen: dict[tuple[str, int, str], list[float]] = {}  # line → [when logged, times dropped since]
        self._lock = threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        key = (record.name, record.levelno, text)
        now = time.monotonic()
        with self._lock:
            entry = self._seen.get(key)
            if entry is not None and now - entry[0] < self.window:
                entry[1] += 1
                return False
            dropped = int(entry[1]) if entry is not None else 0
            self._seen.pop(key, None)
            self._seen[key] = [now, 0]
            while len(self._seen) > self.max_lines:
                del self._seen[next(iter(self._seen))]
        if dropped:
            record.msg, record.args = f"{text} (repeated {dropped} times)", None
        return True


def daemon_logging(level: str | int, fmt: str) -> None:
    """A daemon's log: ``fmt`` lines on stderr at ``level``, identical lines counted (:class:`RepeatFilter`)."""
    logging.basicConfig(level=level, format=fmt, force=True)
    for handler in logging.getLogger().handlers:
        handler.addFilter(RepeatFilter())

"""Progress lines for long commands: the libraries report work through a callback (``Callable[[int], None]``,
called with how much was just done), the commands draw it with :func:`progress` — on stderr, only when stderr is
a terminal, never with ``--json``, redrawn at most ten times a second and erased when the work ends.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TextIO

from erofs.units import format_size

ProgressCallback = Callable[[int], None]  # what a library is given: called with each increment of work done
REDRAW_INTERVAL = 0.1  # seconds between two redraws of the line


class Progress:
    """One status line: ``LABEL: 42% 1.2 GiB of 2.9 GiB, 310 MiB/s`` (``unit`` "bytes"), or ``LABEL: 42% 1200 of
    2866 entries`` (another unit); without a total, no percentage.  Call it with each increment of work."""

    def __init__(self, label: str, total: int | None = None, *, unit: str = "bytes", stream: TextIO) -> None:
        self.label = label
        self.total = total
        self.unit = unit
        self.done = 0
        self._stream = stream
        self._start = time.monotonic()
        self._last = self._start - REDRAW_INTERVAL  # the first increment draws at once
        self._width = 0  # of the line drawn last (0: nothing on screen)
        try:
            self._columns = os.get_terminal_size(stream.fileno()).columns or 80
        except (OSError, ValueError):
            self._columns = 80

    def __call__(self, n: int) -> None:
        self.done += n
        now = time.monotonic()
        if now - self._last >= REDRAW_INTERVAL:
            self._last = now
            self._draw(self._line(now))

    def _amount(self, n: int) -> str:
        return format_size(n) if self.unit == "bytes" else str(n)

    def _line(self, now: float) -> str:
        text = ""
        if self.total:
            percent = min(100, self.done * 100 // self.total)
            text += f"{percent:3d}% {self._amount(self.done)} of {self._amount(self.total)}"
        else:
            text += self._amount(self.done)
        if self.unit != "bytes":
            text += f" {self.unit}"
        elif now > self._start:
            text += f", {format_size(int(self.done / (now - self._start)))}/s"
        room = self._columns - 1 - len(text) - 2  # one line of the terminal: a longer one would wrap
        label = self.label if len(self.label) <= room else "..." + self.label[len(self.label) - room + 3 :]
        return f"{label}: {text}"

    def _draw(self, line: str) -> None:
        self._stream.write("\r" + line.ljust(self._width))
        self._stream.flush()
        self._width = len(line)

    def close(self) -> None:
        """Erase the line (what the command prints next starts at the left margin)."""
        if self._width:
            self._stream.write("\r" + " " * self._width + "\r")
            self._stream.flush()
            self._width = 0


@contextmanager
def progress(label: str, total: int | None = None, *, unit: str = "bytes", quiet: bool = False,
             stream: TextIO | None = None) -> Iterator[Progress | None]:  # fmt: skip
    """A :class:`Progress` on ``stream`` (stderr) when it is a terminal and not ``quiet`` (``--json``), else None;
    erased on the way out, failures included."""
    out = stream if stream is not None else sys.stderr
    if quiet or not out.isatty():
        yield None
        return
    bar = Progress(label, total, unit=unit, stream=out)
    try:
        yield bar
    finally:
        bar.close()

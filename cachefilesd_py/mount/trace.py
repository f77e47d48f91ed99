"""The access trace of a fanotify mount: which files were read, first access first.

A notification-class fanotify group (:class:`fscache.fanotify.NotifyGroup`) marks the EROFS mount itself for
``FAN_ACCESS`` (a ``read``) and ``FAN_OPEN_EXEC`` (an ``exec``, whose pages are mapped rather than read).  These
are file-level events: a file that only shares a blob readahead window with a read one raises none, so it is not
counted.  Each event's fd names the file (``/proc/self/fd`` readlink, made relative to the mountpoint); once a
file is recorded an ignore mark silences its further events.  Directories raise none (no ``FAN_ONDIR``).

Offsets and lengths: notification events carry no range (only pre-content events do, and the kernel refuses
``FAN_PRE_ACCESS`` marks on EROFS with EOPNOTSUPP), so every entry is recorded as offset 0 and the file's size:
"this file was read", which is what a prefetch list names anyway.

The trace is a JSON-lines file beside the mount's runtime record (``<key>.trace``, see :mod:`.record`): a
header ``{"mountpoint", "mount_time", "max_entries"}``, then one ``{"path", "offset", "length", "t"}`` a file
(``t``: seconds since the mount), appended as files are first read, so it is always current.  Bounded: at
most :data:`TRACE_MAX_ENTRIES` files (and as many paths in memory); later first accesses are counted as
``dropped``.  A restarted worker resumes the file (the paths already there are not recorded again).
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any, TextIO

from fscache.fanotify import FAN_ACCESS, FAN_OPEN_EXEC, FAN_Q_OVERFLOW, NotifyGroup

from .record import record_path

__all__ = ["TRACE_MAX_ENTRIES", "AccessTrace", "read_trace", "start_trace", "trace_path"]

log = logging.getLogger(__name__)

TRACE_MAX_ENTRIES = 65536
TRACE_MASK = FAN_ACCESS | FAN_OPEN_EXEC
_POLL_INTERVAL = 0.2  # how soon the thread notices stop()


def trace_path(mountpoint: str | os.PathLike[str]) -> Path:
    return record_path(mountpoint).with_suffix(".trace")


def _load(path: Path) -> tuple[dict[str, Any] | None, list[dict[str, Any]]]:
    """(header, entries) of a trace file, each path once (its first line); (None, []) if there is none."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None, []
    header: dict[str, Any] | None = None
    entries: list[dict[str, Any]] = []
    seen: set[str] = set()
    for line in text.splitlines():
        try:
            item = json.loads(line)
        except ValueError:
            continue  # a line cut short by a crash
        if not isinstance(item, dict):
            continue
        if header is None and "mount_time" in item:
            header = item
        elif isinstance(item.get("path"), str) and item["path"] not in seen:
            seen.add(item["path"])
            entries.append(item)
    return header, entries


def read_trace(mountpoint: str | os.PathLike[str]) -> tuple[dict[str, Any] | None, list[dict[str, Any]]]:
    """The trace of the mount at ``mountpoint``: (header, entries in first-access order)."""
    return _load(trace_path(mountpoint))


class AccessTrace:
    """Records first accesses of the mount at ``mountpoint`` into its trace file, on a thread of its own."""

    def __init__(self, mountpoint: str | os.PathLike[str], *, resume: bool = False,
                 max_entries: int = TRACE_MAX_ENTRIES) -> None:  # fmt: skip
        self.mountpoint = os.path.realpath(mountpoint)
        self.path = trace_path(self.mountpoint)
        self.max_entries = max_entries
        self.dropped = 0
        self.overflows = 0
        header, entries = _load(self.path) if resume else (None, [])
        self.mount_time: float = header["mount_time"] if header else time.time()
        self._seen = {e["path"] for e in entries}
        self._group = NotifyGroup()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        try:
            self._group.mark_mount(self.mountpoint, TRACE_MASK)
            self._file: TextIO = open(self.path, "a" if header else "w", encoding="utf-8")  # noqa: SIM115
        except BaseException:
            self._group.close()
            raise
        if not header:
            self._write({"mountpoint": self.mountpoint, "mount_time": self.mount_time, "max_entries": max_entries})

    @property
    def entries(self) -> int:
        return len(self._seen)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="access-trace", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Record what is queued, then end the thread and close the group and the file."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        else:
            self.drain()
        self._group.close()
        self._file.close()

    def stats(self) -> dict[str, Any]:
        return {"entries": self.entries, "dropped": self.dropped, "overflows": self.overflows,
                "max_entries": self.max_entries, "file": str(self.path)}  # fmt: skip

    def _write(self, item: dict[str, Any]) -> None:
        self._file.write(json.dumps(item) + "\n")
        self._file.flush()

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                if self._group.poll(_POLL_INTERVAL):
                    self.drain()
            self.drain()
        except Exception:  # the trace is an aid: losing it must not take the mount down
            log.exception("access trace stopped")

    def drain(self) -> None:
        """Record the queued events."""
        while True:
            events = self._group.read_events()
            if not events:
                return
            for ev in events:
                if ev.mask & FAN_Q_OVERFLOW:
                    self.overflows += 1
                if ev.fd < 0:
                    continue
                try:
                    self._record(ev.fd)
                finally:
                    os.close(ev.fd)

    def _record(self, fd: int) -> None:
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
            size = os.fstat(fd).st_size
        except OSError:
            return
        prefix = self.mountpoint.rstrip("/") + "/"
        path = "/" + target[len(prefix) :] if target.startswith(prefix) else target  # detached: already relative
        if path in self._seen:
            self._group.ignore(fd, TRACE_MASK)
            return
        if len(self._seen) >= self.max_entries:
            self.dropped += 1
            self._group.ignore(fd, TRACE_MASK)  # counted once a file
            return
        self._seen.add(path)
        self._group.ignore(fd, TRACE_MASK)
        self._write({"path": path, "offset": 0, "length": size, "t": round(time.time() - self.mount_time, 6)})


def start_trace(mountpoint: str | os.PathLike[str], *, resume: bool) -> AccessTrace | None:
    """The running trace of a mount the worker serves, or None (logged) when it cannot be set up."""
    try:
        trace = AccessTrace(mountpoint, resume=resume)
    except OSError as e:
        log.warning("no access trace for %s: %s", mountpoint, e)
        return None
    trace.start()
    return trace

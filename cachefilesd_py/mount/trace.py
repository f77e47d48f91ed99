"""The access trace of a fanotify mount: which files were read, first access first.

Every directory of the image (from its bootstrap) gets an inotify watch for ``IN_ACCESS`` through the mount: a
``read`` of a file there (an ``exec`` too: the kernel reads the binary's headers with ``kernel_read``) reports the
file's name to its directory's watch.  These are file-level events: a file that only shares a fetched chunk with
a read one raises none, so it is not counted.  Pages mapped and faulted in without a ``read`` raise none either.

Why inotify and not a fanotify notification group on the mount: a queued fanotify event with an fd holds a
reference to the mount until it is read, so an ``umount`` right after a read fails with EBUSY; and the kernel
refuses ``FAN_REPORT_FID`` on a file-backed EROFS mount (ENODEV: no fsid).  An inotify watch or event pins no
mount.  Offsets and lengths: neither kind of notification event carries a range (only fanotify pre-content
events do, and the kernel refuses ``FAN_PRE_ACCESS`` marks on EROFS with EOPNOTSUPP), so every entry is offset 0
and the file's size: "this file was read", which is what a prefetch list names.

The trace is a JSON-lines file beside the mount's runtime record (``<key>.trace``, see :mod:`.record`): a
header ``{"mountpoint", "mount_time", "max_entries"}``, then one ``{"path", "offset", "length", "t"}`` a file
(``t``: seconds since the mount), appended as files are first read, so it is always current; it goes with the
record (``nydus-erofs umount`` removes both: take the trace before).  Bounded: at most
:data:`TRACE_MAX_ENTRIES` files (and as many paths in memory; reads of other files after that are counted as
``dropped``, once an event) and :data:`TRACE_MAX_WATCHES` directories watched (also capped by
``fs.inotify.max_user_watches``; files of the others are not traced, counted as ``unwatched_dirs``).  A
restarted worker resumes the file.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import select
import threading
import time
from pathlib import Path
from typing import Any, TextIO

from erofs.errors import ImageError
from erofs.reader.bootstrap import Bootstrap
from fscache.inotify import IN_ACCESS, IN_DONT_FOLLOW, IN_ISDIR, IN_ONLYDIR, IN_Q_OVERFLOW, Inotify, InotifyError

from .record import trace_path

__all__ = ["TRACE_MAX_ENTRIES", "AccessTrace", "read_trace", "start_trace"]

log = logging.getLogger(__name__)

TRACE_MAX_ENTRIES = 65536
TRACE_MAX_WATCHES = 65536
_WATCH_MASK = IN_ACCESS | IN_ONLYDIR | IN_DONT_FOLLOW
_POLL_INTERVAL = 0.2  # how soon the thread notices stop()


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
    """Records first reads of files of the mount at ``mountpoint`` (the image ``boot``) into its trace file, on a
    thread of its own."""

    def __init__(self, mountpoint: str | os.PathLike[str], boot: str | os.PathLike[str], *, resume: bool = False,
                 max_entries: int = TRACE_MAX_ENTRIES, max_watches: int = TRACE_MAX_WATCHES) -> None:  # fmt: skip
        self.mountpoint = os.path.realpath(mountpoint)
        self.path = trace_path(self.mountpoint)
        self.max_entries = max_entries
        self.dropped = 0
        self.overflows = 0
        self.unwatched_dirs = 0
        header, entries = _load(self.path) if resume else (None, [])
        self.mount_time: float = header["mount_time"] if header else time.time()
        self._seen = {e["path"] for e in entries}
        self._dirs: dict[int, str] = {}
        self._sizes: dict[str, int] = {}  # the image's regular files
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._inotify = Inotify()
        try:
            with Bootstrap(boot) as bs:
                self._watch(bs, max_watches)
            self._file: TextIO = open(self.path, "a" if header else "w", encoding="utf-8")  # noqa: SIM115
        except BaseException:
            self._inotify.close()
            raise
        if not header:
            self._write({"mountpoint": self.mountpoint, "mount_time": self.mount_time, "max_entries": max_entries})

    def _watch(self, bs: Bootstrap, max_watches: int) -> None:
        dirs: list[str] = []
        for p, _, ino in bs.walk(on_error=lambda _p, _e: None):
            if ino.is_dir:
                dirs.append(p)
            elif ino.is_reg:
                self._sizes[p] = ino.size
        for i, d in enumerate(dirs):
            if i >= max_watches:
                self.unwatched_dirs = len(dirs) - i
                break
            try:
                wd = self._inotify.add_watch(self.mountpoint + (d if d != "/" else ""), _WATCH_MASK)
            except InotifyError as e:
                if e.errno == errno.ENOSPC:  # fs.inotify.max_user_watches
                    self.unwatched_dirs = len(dirs) - i
                    log.warning("access trace: %d directories not watched (inotify watch limit)", len(dirs) - i)
                    break
                continue
            self._dirs[wd] = d

    @property
    def entries(self) -> int:
        return len(self._seen)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="access-trace", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Record what is queued, then end the thread and close the watches and the file."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        else:
            self.drain()
        self._inotify.close()
        self._file.close()

    def stats(self) -> dict[str, Any]:
        return {"entries": self.entries, "dropped": self.dropped, "overflows": self.overflows,
                "max_entries": self.max_entries, "watched_dirs": len(self._dirs),
                "unwatched_dirs": self.unwatched_dirs, "file": str(self.path)}  # fmt: skip

    def _write(self, item: dict[str, Any]) -> None:
        self._file.write(json.dumps(item) + "\n")
        self._file.flush()

    def _run(self) -> None:
        poller = select.poll()
        poller.register(self._inotify.fileno(), select.POLLIN)
        try:
            while not self._stop.is_set():
                if poller.poll(_POLL_INTERVAL * 1000):
                    self.drain()
            self.drain()
        except Exception:  # the trace is an aid: losing it must not take the mount down
            log.exception("access trace stopped")

    def drain(self) -> None:
        """Record the queued events."""
        while events := self._inotify.read_events():
            for ev in events:
                if ev.mask & IN_Q_OVERFLOW:
                    self.overflows += 1
                    continue
                if ev.mask & IN_ISDIR or not ev.mask & IN_ACCESS or not ev.name:
                    continue
                parent = self._dirs.get(ev.wd)
                if parent is not None:
                    self._record(parent.rstrip("/") + "/" + os.fsdecode(ev.name))

    def _record(self, path: str) -> None:
        if path in self._seen:
            return
        if len(self._seen) >= self.max_entries:
            self.dropped += 1
            return
        size = self._sizes.get(path)
        if size is None:  # not a regular file of the image
            return
        self._seen.add(path)
        self._write({"path": path, "offset": 0, "length": size, "t": round(time.time() - self.mount_time, 6)})


def start_trace(mountpoint: str | os.PathLike[str], boot: str | os.PathLike[str], *,
                resume: bool) -> AccessTrace | None:  # fmt: skip
    """The running trace of a mount the worker serves, or None (logged) when it cannot be set up."""
    try:
        trace = AccessTrace(mountpoint, boot, resume=resume)
    except (OSError, ImageError) as e:
        log.warning("no access trace for %s: %s", mountpoint, e)
        return None
    trace.start()
    return trace

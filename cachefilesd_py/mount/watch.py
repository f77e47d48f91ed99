"""When a mounted image is released: an inotify watch on its root (:class:`ImageWatch`).

A file-backed EROFS mount outlives its place in the mount table: detached lazily (``umount -l``, or a stop with
files open there) it still reads through the cache files until its last open file closes.  The fanotify group
(and its marks) must live until then, so the daemon waits for the superblock's release, not for the umount.
"""

from __future__ import annotations

import errno
import logging
import os
from pathlib import Path

from fscache.inotify import IN_IGNORED, IN_ONLYDIR, IN_UNMOUNT, Inotify, InotifyError, Watch
from fscache.mount import top_mount, umount

__all__ = ["ImageWatch", "open_files"]

log = logging.getLogger(__name__)


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
        top = top_mount(self.mountpoint)
        found = top.mount_id if top is not None and top.dev == self.dev else None
        if found is not None:
            self.mnt_id = found
        return found

    def unmount(self) -> None:
        """Unmount the image if the mountpoint still shows it: plainly, else (files are open there) detached,
        the filesystem living on until they close (:meth:`released` says when).  Never by path alone: after a
        detach another mount may sit there."""
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

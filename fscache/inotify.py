"""inotify(7) through ctypes, just enough to learn when a mounted filesystem is torn down (and when a file
changes: ``IN_MODIFY``).

A watch on a filesystem's root directory gets ``IN_UNMOUNT`` then ``IN_IGNORED`` when its superblock is
shut down (``generic_shutdown_super``): at once for a plain umount, and for a lazily detached mount
(``umount -l``) only when the last file open on it closes.  A watch does not make the mount busy.

What a watch is on, and whether it still exists, is read from ``/proc/self/fdinfo/<fd>`` (:meth:`Inotify.watches`):
an inotify fd shared by several processes (inherited) gives its events to whichever reads first, while its
watches are the same for all.
"""

from __future__ import annotations

import ctypes
import errno
import os
import struct
from dataclasses import dataclass

from erofs.errors import NydusErofsError
from fscache.fd import FdOwner

__all__ = ["IN_ACCESS", "IN_DONT_FOLLOW", "IN_IGNORED", "IN_ISDIR", "IN_MODIFY", "IN_ONLYDIR", "IN_Q_OVERFLOW",
           "IN_UNMOUNT", "Inotify", "InotifyError", "InotifyEvent", "Watch"]

IN_ACCESS = 0x00000001
IN_MODIFY = 0x00000002
IN_UNMOUNT = 0x00002000
IN_Q_OVERFLOW = 0x00004000
IN_IGNORED = 0x00008000
IN_ONLYDIR = 0x01000000
IN_DONT_FOLLOW = 0x02000000
IN_ISDIR = 0x40000000
IN_NONBLOCK = os.O_NONBLOCK
IN_CLOEXEC = os.O_CLOEXEC

_EVENT = struct.Struct("iIII")  # struct inotify_event: wd, mask, cookie, len (then len bytes of name)
_READ_BUF = 4096

_libc = ctypes.CDLL(None, use_errno=True)
_libc.inotify_init1.argtypes = [ctypes.c_int]
_libc.inotify_add_watch.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]


class InotifyError(NydusErofsError, OSError):
    """An inotify call failed."""

    def __str__(self) -> str:  # the message alone, without OSError's "[Errno N] "
        return self.strerror or super().__str__()


@dataclass(frozen=True)
class InotifyEvent:
    wd: int
    mask: int
    cookie: int
    name: bytes


@dataclass(frozen=True)
class Watch:
    """A watch of an inotify instance, as ``/proc/self/fdinfo`` shows it: ``dev`` is in ``st_dev`` form."""

    wd: int
    ino: int
    dev: int


def parse_events(buf: bytes) -> list[InotifyEvent]:
    """The events of one ``read(2)`` of an inotify fd."""
    out: list[InotifyEvent] = []
    pos = 0
    while len(buf) - pos >= _EVENT.size:
        wd, mask, cookie, length = _EVENT.unpack_from(buf, pos)
        pos += _EVENT.size
        if length > len(buf) - pos:
            raise InotifyError(errno.EPROTO, f"inotify event name of {length} bytes runs past the read")
        out.append(InotifyEvent(wd, mask, cookie, bytes(buf[pos : pos + length]).rstrip(b"\0")))
        pos += length
    if pos != len(buf):
        raise InotifyError(errno.EPROTO, f"{len(buf) - pos} trailing bytes after inotify events")
    return out


class Inotify(FdOwner):
    """An inotify instance (``IN_NONBLOCK | IN_CLOEXEC``)."""

    def __init__(self) -> None:
        fd = _libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
        if fd < 0:
            err = ctypes.get_errno()
            raise InotifyError(err, f"inotify_init1: {os.strerror(err)}")
        self._fd: int = fd

    @classmethod
    def from_fd(cls, fd: int) -> Inotify:
        """Own ``fd``, an inotify fd inherited from another process (the same instance: its watches and queue)."""
        if fd < 0:
            raise ValueError(f"invalid inotify fd {fd}")
        self = cls.__new__(cls)
        self._fd = fd
        os.set_inheritable(fd, False)
        os.set_blocking(fd, False)
        return self

    def add_watch(self, path: str | os.PathLike[str], mask: int) -> int:
        """Watch ``path`` for ``mask``; the watch descriptor."""
        wd = _libc.inotify_add_watch(self.fileno(), os.fsencode(path), mask)
        if wd < 0:
            err = ctypes.get_errno()
            raise InotifyError(err, f"inotify watch on {os.fsdecode(path)}: {os.strerror(err)}")
        return int(wd)

    def read_events(self) -> list[InotifyEvent]:
        """The events queued now; an empty list when there is none."""
        try:
            buf = os.read(self.fileno(), _READ_BUF)
        except BlockingIOError:
            return []
        except OSError as e:
            raise InotifyError(e.errno or errno.EIO, f"read of inotify fd: {e.strerror}") from None
        return parse_events(buf)

    def watches(self) -> list[Watch]:
        """The instance's watches now (``/proc/self/fdinfo``): a watch the kernel dropped is no longer there."""
        path = f"/proc/self/fdinfo/{self.fileno()}"
        try:
            with open(path) as f:
                lines = f.read().splitlines()
        except OSError as e:
            raise InotifyError(e.errno or errno.EIO, f"{path}: {e.strerror}") from None
        out = []
        for line in lines:
            if not line.startswith("inotify "):
                continue
            fields = dict(item.split(":", 1) for item in line.split()[1:] if ":" in item)
            sdev = int(fields["sdev"], 16)  # the kernel's dev_t: major << 20 | minor
            out.append(Watch(int(fields["wd"], 16), int(fields["ino"], 16), os.makedev(sdev >> 20, sdev & 0xFFFFF)))
        return out

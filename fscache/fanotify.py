"""Binding of fanotify pre-content events (``include/uapi/linux/fanotify.h``, Linux >= 6.14).

A :class:`FanotifyGroup` marks sparse blob cache files with ``FAN_PRE_ACCESS``. Every read (or write) of a
marked file by another opener blocks until the group answers: fill the reported range through the event's
fd (:meth:`PreAccessEvent.write`), then :meth:`FanotifyGroup.allow`, or :meth:`FanotifyGroup.deny` with an
errno the reader will see. The event fd is opened by the kernel with FMODE_NONOTIFY, so writes through it
raise no event; so do fds opened before the file was marked. A fd the daemon opens after marking is watched
like any other and would block on the daemon's own answer.
"""

from __future__ import annotations

import ctypes
import errno
import os
import select
import struct
from dataclasses import dataclass

from fscache.errors import (
    CommandError,
    KernelInterfaceError,
    PreContentUnsupportedError,
    ProtocolError,
    UnsupportedFilesystemError,
    from_errno,
)
from fscache.fd import FdOwner

__all__ = [
    "FAN_ALLOW",
    "FAN_CLASS_PRE_CONTENT",
    "FAN_CLOEXEC",
    "FAN_DENY",
    "FAN_EVENT_INFO_TYPE_RANGE",
    "FAN_MARK_ADD",
    "FAN_MARK_REMOVE",
    "FAN_NOFD",
    "FAN_NONBLOCK",
    "FAN_PRE_ACCESS",
    "FAN_Q_OVERFLOW",
    "FANOTIFY_METADATA_VERSION",
    "FAN_DENY_ERRNO",
    "FanotifyGroup",
    "PreAccessEvent",
    "find_holes",
    "parse_events",
]

# The structures, native-endian, as ``struct`` formats, and the two calls through ctypes (rather than a C parser,
# which costs every process importing this one its start-up).
_METADATA = struct.Struct("=IBBHQii")  # struct fanotify_event_metadata: event_len, vers, reserved, metadata_len,
#                                        mask, fd, pid
_INFO_HDR = struct.Struct("=BBH")  # struct fanotify_event_info_header: info_type, pad, len
_RANGE = struct.Struct("=BBHIQQ")  # struct fanotify_event_info_range: the header, pad, offset, count
_RESPONSE = struct.Struct("=iI")  # struct fanotify_response: fd, response

_libc = ctypes.CDLL(None, use_errno=True)
_libc.fanotify_init.argtypes = [ctypes.c_uint, ctypes.c_uint]
_libc.fanotify_init.restype = ctypes.c_int
_libc.fanotify_mark.argtypes = [ctypes.c_int, ctypes.c_uint, ctypes.c_uint64, ctypes.c_int, ctypes.c_char_p]
_libc.fanotify_mark.restype = ctypes.c_int

# fanotify_init() flags
FAN_CLOEXEC = 0x00000001
FAN_NONBLOCK = 0x00000002
FAN_CLASS_NOTIF = 0x00000000
FAN_CLASS_CONTENT = 0x00000004
FAN_CLASS_PRE_CONTENT = 0x00000008
FAN_UNLIMITED_QUEUE = 0x00000010
FAN_REPORT_TID = 0x00000100
FAN_REPORT_FID = 0x00000200

# fanotify_mark() flags
FAN_MARK_ADD = 0x00000001
FAN_MARK_REMOVE = 0x00000002
FAN_MARK_DONT_FOLLOW = 0x00000004
FAN_MARK_FLUSH = 0x00000080
FAN_MARK_INODE = 0x00000000

# event mask bits
FAN_ACCESS_PERM = 0x00020000
FAN_OPEN_PERM = 0x00010000
FAN_Q_OVERFLOW = 0x00004000
FAN_PRE_ACCESS = 0x00100000

FANOTIFY_METADATA_VERSION = 3
FAN_EVENT_INFO_TYPE_RANGE = 6
FAN_NOFD = -1

# responses
FAN_ALLOW = 0x01
FAN_DENY = 0x02
FAN_ERRNO_BITS = 8
FAN_ERRNO_SHIFT = 32 - FAN_ERRNO_BITS
FAN_ERRNO_MASK = (1 << FAN_ERRNO_BITS) - 1

AT_FDCWD = -100

_META_SIZE = _METADATA.size  # 24
_INFO_HDR_SIZE = _INFO_HDR.size  # 4
_RANGE_SIZE = _RANGE.size  # 24
_RESPONSE_SIZE = _RESPONSE.size  # 8
_READ_BUF = 64 * 1024


def FAN_DENY_ERRNO(err: int) -> int:  # noqa: N802 - kernel macro name
    """``FAN_DENY`` carrying ``err`` for the reader (kernels >= 6.14 accept EIO, EPERM, EBUSY, ETXTBSY,
    EAGAIN, ENOSPC, EDQUOT)."""
    return FAN_DENY | ((err & FAN_ERRNO_MASK) << FAN_ERRNO_SHIFT)


@dataclass(slots=True)
class PreAccessEvent:
    """One permission event. ``offset``/``count`` are None when the kernel sent no range record.

    ``fd`` refers to the accessed file (opened read-write, without notification); it is closed once the
    group answers the event.
    """

    fd: int
    pid: int
    mask: int
    offset: int | None = None
    count: int | None = None

    @property
    def end(self) -> int | None:
        """End of the reported range (exclusive), or None."""
        return None if self.offset is None or self.count is None else self.offset + self.count

    def holes(self) -> list[tuple[int, int]]:
        """The ``(offset, length)`` holes of the file inside the reported range (SEEK_HOLE/SEEK_DATA).

        The kernel raises an event for every access of a marked file, filled or not: only holes need data.
        """
        if self.fd < 0:
            raise ValueError("event already answered (fd closed)")
        if self.offset is None or self.count is None:
            return []
        return find_holes(self.fd, self.offset, self.count)

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> int:
        """Write ``data`` at ``offset`` through the event fd (raises no new event). Returns bytes written."""
        if self.fd < 0:
            raise ValueError("event already answered (fd closed)")
        view = memoryview(data).cast("B")
        done = 0
        while done < view.nbytes:
            try:
                n = os.pwrite(self.fd, view[done:], offset + done)
            except OSError as e:
                err = e.errno or errno.EIO
                raise KernelInterfaceError(
                    err, f"pwrite of {view.nbytes - done} bytes at {offset + done} via event fd: {os.strerror(err)}"
                ) from None
            if n <= 0:
                raise KernelInterfaceError(errno.EIO, "pwrite via event fd wrote nothing")
            done += n
        return done


def find_holes(fd: int, offset: int, count: int) -> list[tuple[int, int]]:
    """The ``(offset, length)`` holes of ``fd`` within ``[offset, offset + count)``, clipped to its size."""
    end = min(offset + count, os.fstat(fd).st_size)
    holes: list[tuple[int, int]] = []
    pos = offset
    while pos < end:
        try:
            data = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as e:
            if e.errno != errno.ENXIO:  # ENXIO: no data after pos
                raise
            data = end
        if data > pos:
            holes.append((pos, min(data, end) - pos))
        if data >= end:
            break
        pos = os.lseek(fd, data, os.SEEK_HOLE)
    return holes


def parse_events(buf: bytes | bytearray | memoryview) -> list[PreAccessEvent]:
    """Parse the events of one ``read(2)`` on a fanotify fd."""
    events: list[PreAccessEvent] = []
    data = bytes(buf)
    pos, end = 0, len(data)
    while end - pos >= _META_SIZE:
        ev_len, vers, _reserved, metadata_len, mask, fd, pid = _METADATA.unpack_from(data, pos)
        if ev_len < _META_SIZE or ev_len > end - pos:
            raise ProtocolError(f"fanotify event_len {ev_len} invalid at offset {pos} of {end}")
        if vers != FANOTIFY_METADATA_VERSION:
            raise ProtocolError(f"fanotify metadata version {vers}, expected {FANOTIFY_METADATA_VERSION}")
        if metadata_len < _META_SIZE or metadata_len > ev_len:
            raise ProtocolError(f"fanotify metadata_len {metadata_len} invalid")
        event = PreAccessEvent(fd=fd, pid=pid, mask=mask)
        info, info_end = pos + metadata_len, pos + ev_len
        while info_end - info >= _INFO_HDR_SIZE:
            info_type, _pad, info_len = _INFO_HDR.unpack_from(data, info)
            if info_len < _INFO_HDR_SIZE or info_len > info_end - info:
                raise ProtocolError(f"fanotify info record length {info_len} invalid")
            if info_type == FAN_EVENT_INFO_TYPE_RANGE and info_len >= _RANGE_SIZE:
                *_hdr, event.offset, event.count = _RANGE.unpack_from(data, info)
            info += info_len
        events.append(event)
        pos += ev_len
    if pos != end:
        raise ProtocolError(f"{end - pos} trailing bytes after fanotify events")
    return events


class FanotifyGroup(FdOwner):
    """A fanotify group (by default pre-content class, non-blocking, event fds opened read-write)."""

    def __init__(self, pre_content: bool = True, nonblocking: bool = True) -> None:
        flags = FAN_CLOEXEC | (FAN_CLASS_PRE_CONTENT if pre_content else FAN_CLASS_CONTENT)
        if nonblocking:
            flags |= FAN_NONBLOCK
        event_f_flags = os.O_RDWR | os.O_LARGEFILE | os.O_CLOEXEC
        fd = _libc.fanotify_init(flags, event_f_flags)
        if fd < 0:
            err = ctypes.get_errno()
            if err == errno.EINVAL:
                raise PreContentUnsupportedError(
                    err, "kernel refuses fanotify_init(FAN_CLASS_PRE_CONTENT): fanotify permission events missing"
                )
            if err == errno.ENOSYS:
                raise PreContentUnsupportedError(err, "kernel without fanotify (CONFIG_FANOTIFY)")
            raise from_errno(err, "fanotify_init failed")
        self._fd: int = fd
        self.pre_content = pre_content

    @classmethod
    def from_fd(cls, fd: int, pre_content: bool = True) -> FanotifyGroup:
        """Own ``fd``, a group fd inherited from another process (the same group: marks, queue, pending events)."""
        if fd < 0:
            raise ValueError(f"invalid fanotify group fd {fd}")
        group = cls.__new__(cls)
        group._fd = fd
        group.pre_content = pre_content
        os.set_inheritable(fd, False)
        return group

    def close(self) -> None:
        """Close this fd of the group. When the last one closes, the kernel allows every event still pending
        and drops the marks."""
        super().close()

    def _mark(self, flags: int, mask: int, path: str | os.PathLike[str]) -> None:
        p = os.fsencode(path)
        if _libc.fanotify_mark(self.fileno(), flags, mask, AT_FDCWD, p) == 0:
            return
        err = ctypes.get_errno()
        name = os.fsdecode(p)
        if err == errno.EINVAL and mask & FAN_PRE_ACCESS and os.path.exists(p) and not os.path.isfile(p):
            raise CommandError(err, f"cannot mark {name} for FAN_PRE_ACCESS: not a regular file", name)
        if err == errno.EINVAL and mask & FAN_PRE_ACCESS:
            raise PreContentUnsupportedError(
                err,
                f"cannot mark {name} for FAN_PRE_ACCESS: kernel without fanotify pre-content events "
                "(needs Linux >= 6.14)",
                name,
            )
        if err == errno.EOPNOTSUPP:
            raise UnsupportedFilesystemError(
                err,
                f"{name} is on a filesystem without pre-content event support (tmpfs?): use ext4/xfs/btrfs",
                name,
            )
        raise from_errno(err, f"fanotify_mark on {name} failed", name)

    def mark(self, path: str | os.PathLike[str], mask: int = FAN_PRE_ACCESS) -> None:
        """Watch the regular file ``path`` for ``mask`` (default ``FAN_PRE_ACCESS``).

        Only opens made after the mark raise events, so mark before mounting the file.
        """
        self._mark(FAN_MARK_ADD, mask, path)

    def unmark(self, path: str | os.PathLike[str], mask: int = FAN_PRE_ACCESS) -> None:
        """Stop watching ``path`` for ``mask``."""
        self._mark(FAN_MARK_REMOVE, mask, path)

    def poll(self, timeout: float | None = None) -> bool:
        """Wait up to ``timeout`` seconds (None: forever) until an event is pending."""
        p = select.poll()
        p.register(self.fileno(), select.POLLIN)
        return bool(p.poll(None if timeout is None else int(timeout * 1000)))

    def read_events(self) -> list[PreAccessEvent]:
        """Read the pending events; an empty list when none is pending (non-blocking group)."""
        try:
            buf = os.read(self.fileno(), _READ_BUF)
        except BlockingIOError:
            return []
        except OSError as e:
            raise from_errno(e.errno or errno.EIO, "read from fanotify group failed") from None
        return parse_events(buf)

    def _write_response(self, fd: int, response: int) -> None:
        os.write(self.fileno(), _RESPONSE.pack(fd, response))

    def respond_fd(self, fd: int, response: int, fallback: int | None = None) -> bool:
        """Answer the pending permission event that was read with event fd number ``fd``; False if there is none.

        The kernel matches a response by the fd number recorded in the event when it was read, in whichever
        process read it: a process holding the group can answer the events of another reader of the group
        that died (its event fds are gone, its events still pending). Writing a number no pending event has
        fails with ENOENT, cheaply. ``fallback`` as in :meth:`respond`.
        """
        try:
            try:
                self._write_response(fd, response)
            except OSError as e:
                if e.errno != errno.EINVAL or fallback is None:
                    raise
                self._write_response(fd, fallback)
        except OSError as e:
            if e.errno == errno.ENOENT:
                return False
            raise from_errno(e.errno or errno.EIO, f"fanotify response {response:#x} for fd {fd} failed") from None
        return True

    def respond(self, event: PreAccessEvent, response: int, fallback: int | None = None) -> None:
        """Write ``struct fanotify_response`` for ``event`` and close its fd (even if the write fails).

        If the kernel refuses ``response`` with EINVAL and ``fallback`` is given, answer ``fallback`` instead,
        so the accessing process is never left blocked.
        """
        if event.fd < 0:
            return
        try:
            try:
                self._write_response(event.fd, response)
            except OSError as e:
                if e.errno != errno.EINVAL or fallback is None:
                    raise
                self._write_response(event.fd, fallback)
        except OSError as e:
            raise from_errno(e.errno or errno.EIO, f"fanotify response {response:#x} failed") from None
        finally:
            fd, event.fd = event.fd, FAN_NOFD
            os.close(fd)

    def allow(self, event: PreAccessEvent) -> None:
        """Let the access proceed (the range must be filled by now)."""
        self.respond(event, FAN_ALLOW)

    def deny(self, event: PreAccessEvent, err: int = errno.EIO) -> None:
        """Fail the access; the reader gets ``err`` (0, or an errno the kernel refuses: plain ``FAN_DENY``, EPERM)."""
        self.respond(event, FAN_DENY_ERRNO(err) if err else FAN_DENY, fallback=FAN_DENY)

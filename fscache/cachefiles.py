"""Binding of the cachefiles on-demand protocol (``include/uapi/linux/cachefiles.h``).

The daemon opens ``/dev/cachefiles``, binds a cache directory in on-demand mode, then reads one message per
``read(2)``: OPEN (answer with :meth:`CachefilesDevice.copen`), READ (fill the range with :func:`write_range`,
then :func:`read_complete`) and CLOSE (close the anonymous fd, no reply). Messages are native-endian.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import mmap
import os
import platform
import select
import stat
import struct
import threading
from collections.abc import Iterable
from dataclasses import dataclass

from fscache.errors import (
    DeviceBusyError,
    DeviceNotFoundError,
    KernelInterfaceError,
    NotPrivilegedError,
    OnDemandUnsupportedError,
    ProtocolError,
    UnsupportedFilesystemError,
    from_errno,
)
from fscache.fd import FdOwner

__all__ = [
    "CACHEFILES_MSG_MAX_SIZE",
    "CACHEFILES_OP_OPEN",
    "CACHEFILES_OP_CLOSE",
    "CACHEFILES_OP_READ",
    "CACHEFILES_IOC_READ_COMPLETE",
    "DEVICE_PATH",
    "PAGE_SIZE",
    "CachefilesDevice",
    "CloseRequest",
    "Message",
    "OpenRequest",
    "ReadRequest",
    "parse_message",
    "read_complete",
    "write_range",
]

# The structures, native-endian (``struct cachefiles_msg`` is followed by its ``data[]``, the OPEN or READ
# payload): ``struct`` formats rather than a C parser, which costs every process importing this one its start-up.
_MSG = struct.Struct("=IIII")  # struct cachefiles_msg: msg_id, opcode, len, object_id
_OPEN = struct.Struct("=IIII")  # struct cachefiles_open: volume_key_size, cookie_key_size, fd, flags
_READ = struct.Struct("=QQ")  # struct cachefiles_read: off, len

CACHEFILES_MSG_MAX_SIZE = 1024
CACHEFILES_OP_OPEN = 0
CACHEFILES_OP_CLOSE = 1
CACHEFILES_OP_READ = 2

DEVICE_PATH = "/dev/cachefiles"
PAGE_SIZE = mmap.PAGESIZE

_MSG_SIZE = _MSG.size  # 16
_OPEN_SIZE = _OPEN.size  # 16
_READ_SIZE = _READ.size  # 16


def _iow(type_: int, nr: int, size: int) -> int:
    """The kernel's ``_IOW(type, nr, size)`` for the running architecture."""
    machine = platform.machine()
    if machine.startswith(("ppc", "powerpc", "mips", "sparc")):
        write_dir, size_bits = 4, 13
    else:
        write_dir, size_bits = 1, 14
    dir_shift = 16 + size_bits
    assert size < (1 << size_bits)
    return (write_dir << dir_shift) | (size << 16) | (type_ << 8) | nr


#: ``_IOW(0x98, 1, int)``: 0x40049801 on x86, arm64 and asm-generic.
CACHEFILES_IOC_READ_COMPLETE = _iow(0x98, 1, ctypes.sizeof(ctypes.c_int))


@dataclass(frozen=True, slots=True)
class OpenRequest:
    """OPEN: the kernel opened cache object ``object_id``; answer with ``copen(msg_id, size)``.

    ``fd`` is an anonymous fd already installed in this process (pwrite/ioctl only); keep it until CLOSE.
    """

    msg_id: int
    object_id: int
    volume_key: str
    cookie_key: str
    fd: int
    flags: int

    @property
    def volume(self) -> str:
        """The volume key without EROFS's ``"erofs,"`` prefix: the fsid, or domain_id when one is set."""
        return self.volume_key.removeprefix("erofs,")


@dataclass(frozen=True, slots=True)
class CloseRequest:
    """CLOSE: the kernel dropped ``object_id``; close its fd. No reply."""

    msg_id: int
    object_id: int


@dataclass(frozen=True, slots=True)
class ReadRequest:
    """READ: fill ``[offset, offset + length)`` of ``object_id``'s file, then :func:`read_complete`."""

    msg_id: int
    object_id: int
    offset: int
    length: int


Message = OpenRequest | CloseRequest | ReadRequest


def _decode(raw: bytes) -> str:
    return raw.decode("utf-8", "surrogateescape")


def parse_message(buf: bytes) -> Message:
    """Parse one message exactly as ``read(2)`` on ``/dev/cachefiles`` returned it."""
    if len(buf) < _MSG_SIZE:
        raise ProtocolError(f"cachefiles message of {len(buf)} bytes is shorter than its header")
    msg_id, opcode, length, object_id = _MSG.unpack_from(buf)
    if length != len(buf):
        raise ProtocolError(f"cachefiles message says len={length} but read returned {len(buf)} bytes")
    payload = len(buf) - _MSG_SIZE
    if opcode == CACHEFILES_OP_OPEN:
        if payload < _OPEN_SIZE:
            raise ProtocolError(f"cachefiles OPEN payload of {payload} bytes is too short")
        vsize, csize, fd, flags = _OPEN.unpack_from(buf, _MSG_SIZE)
        if _OPEN_SIZE + vsize + csize > payload:
            raise ProtocolError(f"cachefiles OPEN keys ({vsize}+{csize} bytes) overrun the message")
        start = _MSG_SIZE + _OPEN_SIZE
        volume = bytes(buf[start : start + vsize]).split(b"\0", 1)[0]
        cookie = bytes(buf[start + vsize : start + vsize + csize])
        return OpenRequest(msg_id, object_id, _decode(volume), _decode(cookie), fd, flags)
    if opcode == CACHEFILES_OP_CLOSE:
        return CloseRequest(msg_id, object_id)
    if opcode == CACHEFILES_OP_READ:
        if payload < _READ_SIZE:
            raise ProtocolError(f"cachefiles READ payload of {payload} bytes is too short")
        off, size = _READ.unpack_from(buf, _MSG_SIZE)
        return ReadRequest(msg_id, object_id, off, size)
    raise ProtocolError(f"unknown cachefiles opcode {opcode}")


class CachefilesDevice(FdOwner):
    """A session on ``/dev/cachefiles``: one per system, open it with :meth:`open`."""

    def __init__(self, fd: int, path: str = DEVICE_PATH) -> None:
        self._fd = fd
        self.path = path

    @classmethod
    def open(cls, path: str = DEVICE_PATH) -> CachefilesDevice:
        """Open the device read-write; raises a one-line error if it is missing or held by another daemon."""
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            raise DeviceNotFoundError(
                errno.ENOENT, f"no {path}: kernel lacks CONFIG_CACHEFILES (modprobe cachefiles?)", path
            ) from None
        except OSError as e:
            if e.errno == errno.EBUSY:
                raise DeviceBusyError(errno.EBUSY, f"another cache daemon (cachefilesd?) holds {path}", path) from None
            if e.errno in (errno.EPERM, errno.EACCES):
                raise NotPrivilegedError(e.errno, f"cannot open {path}: needs root (CAP_SYS_ADMIN)", path) from None
            raise from_errno(e.errno or errno.EIO, f"cannot open {path}", path) from None
        if not stat.S_ISCHR(os.fstat(fd).st_mode):  # commands written to a regular file would land in it
            os.close(fd)
            raise DeviceNotFoundError(errno.ENODEV, f"{path} is not the cachefiles device (not a character device)",
                                      path)  # fmt: skip
        return cls(fd, path)

    def close(self) -> None:
        """Close the device; the kernel then fails pending and future requests with EIO."""
        super().close()

    def command(self, cmd: str) -> None:
        """Write one raw command (``dir``, ``tag``, ``bind``, ``copen``, ``restore``...)."""
        data = cmd.encode()
        if b"\0" in data or b"\n" in data:
            raise ValueError(f"cachefiles command must not contain NUL or newline: {cmd!r}")
        if len(data) >= PAGE_SIZE:
            raise ValueError(f"cachefiles command longer than {PAGE_SIZE - 1} bytes")
        try:
            os.write(self.fileno(), data)
        except OSError as e:
            raise from_errno(e.errno or errno.EIO, f"cachefiles command {cmd!r} failed") from None

    def bind(self, cache_dir: str | os.PathLike[str], tag: str | None = None) -> None:
        """Write ``dir <abs cache_dir>``, ``tag <tag>`` (if given) and ``bind ondemand``."""
        path = os.path.abspath(os.fspath(cache_dir))
        self.command(f"dir {path}")
        if tag is not None:
            self.command(f"tag {tag}")
        try:
            os.write(self.fileno(), b"bind ondemand")
        except OSError as e:
            if e.errno == errno.EINVAL:
                raise OnDemandUnsupportedError(
                    e.errno, "kernel without CONFIG_CACHEFILES_ONDEMAND: 'bind ondemand' refused"
                ) from None
            if e.errno == errno.EOPNOTSUPP:
                raise UnsupportedFilesystemError(
                    e.errno, f"cache dir {path} on an unsupported filesystem (tmpfs?): use ext4/xfs/btrfs", path
                ) from None
            raise from_errno(e.errno or errno.EIO, f"cachefiles 'bind ondemand' on {path} failed", path) from None

    def restore(self) -> None:
        """Write ``restore``: re-queue requests in flight (failover after a worker died)."""
        self.command("restore")

    def copen(self, msg_id: int, size: int) -> None:
        """Answer OPEN ``msg_id`` with the object's size in bytes, or a negative ``-errno`` to fail the mount."""
        self.command(f"copen {int(msg_id)},{int(size)}")

    def poll(self, timeout: float | None = None) -> bool:
        """Wait up to ``timeout`` seconds (None: forever) until a message is pending."""
        p = select.poll()
        p.register(self.fileno(), select.POLLIN)
        return bool(p.poll(None if timeout is None else int(timeout * 1000)))

    def read_message(self) -> Message | None:
        """Read and parse one pending message, or return None when none is pending (drained)."""
        try:
            buf = os.read(self.fileno(), CACHEFILES_MSG_MAX_SIZE)
        except BlockingIOError:
            return None
        except OSError as e:
            raise from_errno(e.errno or errno.EIO, f"read from {self.path} failed") from None
        if not buf:
            return None
        return parse_message(buf)


_staging = threading.local()  # per thread: a page-aligned buffer reused by every copying write_range


def _staging_buffer(size: int) -> memoryview:
    """A page-aligned buffer of ``size`` bytes, this thread's own, reused across writes (fresh anonymous pages
    cost a fault and a zeroing each on first touch)."""
    buf: mmap.mmap | None = getattr(_staging, "buf", None)
    if buf is None or len(buf) < size:
        if buf is not None:
            buf.close()
        buf = _staging.buf = mmap.mmap(-1, max(size, 1 << 20))
    return memoryview(buf)[:size]


def _page_aligned(view: memoryview) -> bool:
    """Whether ``view`` starts on a page boundary in memory and is whole pages long (direct I/O takes it as is)."""
    if not view.nbytes or view.nbytes % PAGE_SIZE or not view.c_contiguous or view.readonly:  # (read-only: copied)
        return False
    return ctypes.addressof(ctypes.c_char.from_buffer(view)) % PAGE_SIZE == 0


def write_range(anon_fd: int, offset: int, data: bytes | memoryview | Iterable[bytes | memoryview]) -> int:
    """Write ``data`` (bytes-like or chunks of it) at ``offset`` into a cache file, zero-padded to whole pages.

    The cache file is written with direct I/O, so the offset must be page-aligned and the write comes from a
    page-aligned buffer: ``data`` itself when it is one buffer, page-aligned and whole pages long (the
    pipeline's pooled buffers), else a copy in a buffer of the calling thread's, reused.  Returns the number of
    bytes written (a multiple of :data:`PAGE_SIZE`).
    """
    if offset % PAGE_SIZE:
        raise ValueError(f"cachefiles write offset {offset} is not aligned to {PAGE_SIZE}")
    chunks: list[bytes | memoryview] = [data] if isinstance(data, (bytes, bytearray, memoryview)) else list(data)
    views = [memoryview(c).cast("B") for c in chunks]
    total = sum(v.nbytes for v in views)
    if total == 0:
        return 0
    padded = -(-total // PAGE_SIZE) * PAGE_SIZE
    if len(views) == 1 and _page_aligned(views[0]):
        view = views[0]
    else:
        view = _staging_buffer(padded)
        pos = 0
        for v in views:
            view[pos : pos + v.nbytes] = v
            pos += v.nbytes
        view[pos:] = bytes(padded - pos)
    try:
        done = 0
        while done < padded:
            try:
                n = os.pwrite(anon_fd, view[done:], offset + done)
            except OSError as e:
                raise KernelInterfaceError(
                    e.errno or errno.EIO,
                    f"pwrite of {padded - done} bytes at {offset + done} to cache fd {anon_fd} failed: "
                    f"{os.strerror(e.errno or errno.EIO)}",
                ) from None
            if n <= 0:
                raise KernelInterfaceError(errno.EIO, f"pwrite to cache fd {anon_fd} wrote nothing")
            done += n
    finally:
        view.release()
    return padded


def read_complete(anon_fd: int, msg_id: int) -> None:
    """Tell the kernel READ ``msg_id`` is done (``CACHEFILES_IOC_READ_COMPLETE``, msg_id passed by value).

    A range still holding a hole gives the reader EIO, so completing without writing fails the read.
    """
    try:
        fcntl.ioctl(anon_fd, CACHEFILES_IOC_READ_COMPLETE, int(msg_id))
    except OSError as e:
        raise from_errno(e.errno or errno.EIO, f"CACHEFILES_IOC_READ_COMPLETE for msg {msg_id} failed") from None

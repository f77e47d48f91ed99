"""NBD block devices served from user space: the kernel's generic-netlink ``nbd`` family, its ioctl interface
(the fallback) and the wire protocol.

:class:`NbdNetlink` connects a device to sockets the caller serves (``NBD_CMD_CONNECT``: the kernel picks a free
``/dev/nbdN``, starts it and answers with its index — the device is usable when :meth:`NbdNetlink.connect`
returns), gives a device whose connections died new sockets (``NBD_CMD_RECONFIGURE``: each replaces a dead
connection; requests held meanwhile, up to the ``dead_conn_timeout`` given at connect, go to the new ones), and
disconnects it (``NBD_CMD_DISCONNECT``: the kernel sends ``NBD_CMD_DISC`` on each socket and shuts them down).
The device stays configured when all its connections die: a process other than the one that connected it
reconfigures or disconnects it by index.

:class:`NbdIoctl` does the same with the older ioctls on ``/dev/nbdN`` (``NBD_SET_SOCK`` per connection, then
``NBD_DO_IT``, which blocks in a thread of ours for as long as the device runs; ``NBD_DISCONNECT`` ends it), for
kernels without the netlink family.  It cannot reconfigure: the device lives and dies with the thread in
``NBD_DO_IT``, so with the process.  :func:`open_nbd` picks one (:data:`TEST_IOCTL_ENV` forces the ioctls).

The server side reads :class:`NbdRequest` (28 bytes) from its socket and answers each with :func:`reply_header`
(16 bytes), followed by the data for a read; an error reply carries an errno and no data.
"""

from __future__ import annotations

import errno
import fcntl
import os
import signal
import socket
import struct
import threading
from dataclasses import dataclass
from pathlib import Path

from .errors import KernelInterfaceError

__all__ = [
    "NBD_CMD_DISC",
    "NBD_CMD_FLUSH",
    "NBD_CMD_READ",
    "NBD_CMD_TRIM",
    "NBD_CMD_WRITE",
    "TEST_IOCTL_ENV",
    "NbdIoctl",
    "NbdNetlink",
    "NbdRequest",
    "discard",
    "open_nbd",
    "why_no_nbd",
    "read_request",
    "reply_header",
]

# the wire protocol (include/uapi/linux/nbd.h)
NBD_REQUEST_MAGIC = 0x25609513
NBD_REPLY_MAGIC = 0x67446698
NBD_CMD_READ = 0
NBD_CMD_WRITE = 1
NBD_CMD_DISC = 2
NBD_CMD_FLUSH = 3
NBD_CMD_TRIM = 4
NBD_CMD_MASK = 0xFFFF  # the high 16 bits of the type carry command flags (FUA...)
NBD_FLAG_HAS_FLAGS = 1 << 0
NBD_FLAG_READ_ONLY = 1 << 1
NBD_FLAG_CAN_MULTI_CONN = 1 << 8
_REQUEST = struct.Struct(">IIQQI")  # magic, type, handle (cookie), from, len
_REPLY = struct.Struct(">IIQ")  # magic, error, handle

# generic netlink (include/uapi/linux/netlink.h, genetlink.h, nbd-netlink.h)
NETLINK_GENERIC = 16
GENL_ID_CTRL = 0x10
CTRL_CMD_GETFAMILY = 3
CTRL_ATTR_FAMILY_ID = 1
CTRL_ATTR_FAMILY_NAME = 2
NLM_F_REQUEST = 0x1
NLM_F_ACK = 0x4
NLMSG_ERROR = 0x2
NLMSG_DONE = 0x3
NLA_F_NESTED = 0x8000
NBD_GENL_FAMILY_NAME = "nbd"
NBD_GENL_VERSION = 1
NBD_CMD_CONNECT = 1
NBD_CMD_DISCONNECT = 2
NBD_CMD_RECONFIGURE = 3
NBD_ATTR_INDEX = 1
NBD_ATTR_SIZE_BYTES = 2
NBD_ATTR_BLOCK_SIZE_BYTES = 3
NBD_ATTR_TIMEOUT = 4
NBD_ATTR_SERVER_FLAGS = 5
NBD_ATTR_CLIENT_FLAGS = 6
NBD_ATTR_SOCKETS = 7
NBD_ATTR_DEAD_CONN_TIMEOUT = 8
NBD_SOCK_ITEM = 1
NBD_SOCK_FD = 1
# the ioctls on /dev/nbdN (include/uapi/linux/nbd.h: _IO(0xab, n))
NBD_SET_SOCK = 0xAB00
NBD_SET_BLKSIZE = 0xAB01
NBD_SET_SIZE = 0xAB02
NBD_DO_IT = 0xAB03
NBD_CLEAR_SOCK = 0xAB04
NBD_DISCONNECT = 0xAB08
NBD_SET_TIMEOUT = 0xAB09
NBD_SET_FLAGS = 0xAB0A
# a test hook, not a setting: "1" makes open_nbd() use the ioctls even where the netlink family exists
TEST_IOCTL_ENV = "NYDUS_EROFS_TEST_NBD_IOCTL"
_NLMSGHDR = struct.Struct("=IHHII")
_GENLMSGHDR = struct.Struct("=BBH")
_NLATTR = struct.Struct("=HH")


@dataclass(frozen=True)
class NbdRequest:
    command: int  # NBD_CMD_*
    handle: int
    offset: int
    length: int


def _recv_exact(sock: socket.socket, n: int) -> bytes | None:
    buf = bytearray()
    while len(buf) < n:
        piece = sock.recv(n - len(buf))
        if not piece:
            return None
        buf += piece
    return bytes(buf)


def read_request(sock: socket.socket) -> NbdRequest | None:
    """The next request on the server's socket; None when the kernel closed it."""
    raw = _recv_exact(sock, _REQUEST.size)
    if raw is None:
        return None
    magic, kind, handle, offset, length = _REQUEST.unpack(raw)
    if magic != NBD_REQUEST_MAGIC:
        raise KernelInterfaceError(errno.EPROTO, f"NBD request with bad magic {magic:#x}")
    return NbdRequest(kind & NBD_CMD_MASK, handle, offset, length)


def discard(sock: socket.socket, n: int) -> None:
    """Read and drop the ``n`` payload bytes of a request we refuse (a write)."""
    while n > 0:
        piece = sock.recv(min(n, 1 << 16))
        if not piece:
            return
        n -= len(piece)


def reply_header(handle: int, error: int = 0) -> bytes:
    """The reply to request ``handle``: ``error`` 0 (then the read's data follows) or an errno."""
    return _REPLY.pack(NBD_REPLY_MAGIC, error, handle)


# -- netlink ------------------------------------------------------------------------------------------------------
def _attr(kind: int, payload: bytes) -> bytes:
    raw = _NLATTR.pack(_NLATTR.size + len(payload), kind) + payload
    return raw + b"\0" * (-len(raw) % 4)


def _u32(kind: int, value: int) -> bytes:
    return _attr(kind, struct.pack("=I", value))


def _u64(kind: int, value: int) -> bytes:
    return _attr(kind, struct.pack("=Q", value))


def _attrs(data: bytes) -> dict[int, bytes]:
    out: dict[int, bytes] = {}
    pos = 0
    while pos + _NLATTR.size <= len(data):
        length, kind = _NLATTR.unpack_from(data, pos)
        if length < _NLATTR.size:
            break
        out[kind & ~NLA_F_NESTED] = data[pos + _NLATTR.size : pos + length]
        pos += (length + 3) & ~3
    return out


class NbdNetlink:
    """A generic-netlink socket talking to the kernel's ``nbd`` family (one request at a time)."""

    reconfigurable = True

    def __init__(self) -> None:
        self._sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_GENERIC)
        self._lock = threading.Lock()
        self._seq = 0
        try:
            self._sock.bind((0, 0))
            self.family = self._resolve(NBD_GENL_FAMILY_NAME)
        except BaseException:
            self._sock.close()
            raise

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> NbdNetlink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _request(self, family: int, cmd: int, version: int, attrs: bytes) -> list[dict[int, bytes]]:
        """Send one request (with ACK); the attributes of each reply message before the ACK."""
        with self._lock:
            self._seq += 1
            seq = self._seq
            body = _GENLMSGHDR.pack(cmd, version, 0) + attrs
            self._sock.send(_NLMSGHDR.pack(_NLMSGHDR.size + len(body), family, NLM_F_REQUEST | NLM_F_ACK, seq, 0)
                            + body)  # fmt: skip
            replies: list[dict[int, bytes]] = []
            while True:
                data = self._sock.recv(65536)
                pos = 0
                while pos + _NLMSGHDR.size <= len(data):
                    length, kind, _flags, rseq, _pid = _NLMSGHDR.unpack_from(data, pos)
                    msg = data[pos + _NLMSGHDR.size : pos + length]
                    pos += (length + 3) & ~3
                    if rseq != seq:
                        continue
                    if kind == NLMSG_ERROR:
                        (err,) = struct.unpack_from("=i", msg)
                        if err:
                            raise OSError(-err, os.strerror(-err))
                        return replies
                    if kind == NLMSG_DONE:
                        return replies
                    replies.append(_attrs(msg[_GENLMSGHDR.size :]))

    def _resolve(self, name: str) -> int:
        try:
            replies = self._request(GENL_ID_CTRL, CTRL_CMD_GETFAMILY, 1,
                                    _attr(CTRL_ATTR_FAMILY_NAME, name.encode() + b"\0"))  # fmt: skip
        except OSError as e:
            raise KernelInterfaceError(e.errno or errno.ENOENT,
                                       f"no NBD in this kernel (generic netlink family {name!r}: {e.strerror}; "
                                       "modprobe nbd)") from None  # fmt: skip
        for attrs in replies:
            if CTRL_ATTR_FAMILY_ID in attrs:
                return struct.unpack_from("=H", attrs[CTRL_ATTR_FAMILY_ID])[0]
        raise KernelInterfaceError(errno.ENOENT, f"generic netlink family {name!r} has no id")

    def connect(self, socks: list[socket.socket], size: int, *, block_size: int = 4096, read_only: bool = True,
                timeout: int = 0, dead_conn_timeout: int = 0) -> int:  # fmt: skip
        """Start a free NBD device served through ``socks`` (one connection each; the kernel keeps its own
        reference to each); returns its index (``/dev/nbd<index>``), usable at once.  ``timeout`` 0: requests
        never time out (a slow fetch is not an error)."""
        flags = NBD_FLAG_HAS_FLAGS | NBD_FLAG_CAN_MULTI_CONN | (NBD_FLAG_READ_ONLY if read_only else 0)
        items = b"".join(_attr(NBD_SOCK_ITEM | NLA_F_NESTED, _u32(NBD_SOCK_FD, s.fileno())) for s in socks)
        attrs = (_u64(NBD_ATTR_SIZE_BYTES, size) + _u64(NBD_ATTR_BLOCK_SIZE_BYTES, block_size)
                 + _u64(NBD_ATTR_SERVER_FLAGS, flags) + _attr(NBD_ATTR_SOCKETS | NLA_F_NESTED, items))  # fmt: skip
        if timeout:
            attrs += _u64(NBD_ATTR_TIMEOUT, timeout)
        if dead_conn_timeout:
            attrs += _u64(NBD_ATTR_DEAD_CONN_TIMEOUT, dead_conn_timeout)
        try:
            replies = self._request(self.family, NBD_CMD_CONNECT, NBD_GENL_VERSION, attrs)
        except OSError as e:
            raise KernelInterfaceError(e.errno or errno.EIO, f"NBD connect: {e.strerror}") from None
        for attrs_ in replies:
            if NBD_ATTR_INDEX in attrs_:
                return struct.unpack_from("=I", attrs_[NBD_ATTR_INDEX])[0]
        raise KernelInterfaceError(errno.EPROTO, "NBD connect: the kernel did not say which device")

    def reconfigure(self, index: int, socks: list[socket.socket]) -> None:
        """Give ``/dev/nbd<index>``, whose connections died, ``socks`` in their place (one each)."""
        items = b"".join(_attr(NBD_SOCK_ITEM | NLA_F_NESTED, _u32(NBD_SOCK_FD, s.fileno())) for s in socks)
        attrs = _u32(NBD_ATTR_INDEX, index) + _attr(NBD_ATTR_SOCKETS | NLA_F_NESTED, items)
        try:
            self._request(self.family, NBD_CMD_RECONFIGURE, NBD_GENL_VERSION, attrs)
        except OSError as e:
            raise KernelInterfaceError(e.errno or errno.EIO, f"NBD reconfigure /dev/nbd{index}: {e.strerror}") from None

    def disconnect(self, index: int) -> None:
        """Disconnect ``/dev/nbd<index>`` (its sockets get NBD_CMD_DISC and are shut down)."""
        try:
            self._request(self.family, NBD_CMD_DISCONNECT, NBD_GENL_VERSION, _u32(NBD_ATTR_INDEX, index))
        except OSError as e:
            raise KernelInterfaceError(e.errno or errno.EIO, f"NBD disconnect /dev/nbd{index}: {e.strerror}") from None


class NbdIoctl:
    """NBD devices set up through the ioctls of ``/dev/nbdN`` (the fallback where the netlink family is missing):
    each connected device has an open fd and a thread of ours blocked in ``NBD_DO_IT`` until it is disconnected
    (or the process dies: then the kernel shuts the device down and fails its requests)."""

    reconfigurable = False

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._running: dict[int, tuple[int, threading.Thread]] = {}  # index -> (fd, the NBD_DO_IT thread)

    def close(self) -> None:
        """(The devices stay connected until :meth:`disconnect`.)"""

    def __enter__(self) -> NbdIoctl:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _claim(self) -> tuple[int, int]:
        """(index, fd) of a free ``/dev/nbdN`` (no server: no ``pid`` attribute), opened."""
        names = sorted(Path("/sys/block").glob("nbd*"), key=lambda p: int(p.name.removeprefix("nbd") or 0))
        for sysdir in names:
            index = int(sysdir.name.removeprefix("nbd"))
            if (sysdir / "pid").exists() or index in self._running:
                continue
            try:
                fd = os.open(f"/dev/nbd{index}", os.O_RDWR | os.O_CLOEXEC)
            except OSError:
                continue
            try:
                fcntl.ioctl(fd, NBD_CLEAR_SOCK)  # a half set up device of a dead process: start afresh
            except OSError:
                os.close(fd)
                continue
            return index, fd
        raise KernelInterfaceError(errno.ENODEV, "no free NBD device (/dev/nbdN; modprobe nbd nbds_max=...)")

    def connect(self, socks: list[socket.socket], size: int, *, block_size: int = 4096, read_only: bool = True,
                timeout: int = 0, dead_conn_timeout: int = 0) -> int:  # fmt: skip
        """As :meth:`NbdNetlink.connect` (``dead_conn_timeout`` has no ioctl: ignored)."""
        flags = NBD_FLAG_HAS_FLAGS | NBD_FLAG_CAN_MULTI_CONN | (NBD_FLAG_READ_ONLY if read_only else 0)
        with self._lock:
            index, fd = self._claim()
            try:
                fcntl.ioctl(fd, NBD_SET_BLKSIZE, block_size)
                fcntl.ioctl(fd, NBD_SET_SIZE, size)
                fcntl.ioctl(fd, NBD_SET_FLAGS, flags)
                fcntl.ioctl(fd, NBD_SET_TIMEOUT, timeout)
                for s in socks:
                    fcntl.ioctl(fd, NBD_SET_SOCK, s.fileno())
            except OSError as e:
                try:
                    fcntl.ioctl(fd, NBD_CLEAR_SOCK)
                finally:
                    os.close(fd)
                raise KernelInterfaceError(e.errno or errno.EIO,
                                           f"NBD setup of /dev/nbd{index}: {e.strerror}") from None  # fmt: skip
            thread = threading.Thread(target=self._run, args=(fd,), name=f"nbd{index}-do-it", daemon=True)
            self._running[index] = (fd, thread)
            thread.start()
        # NBD_DO_IT starts the device (its pid attribute appears, then its size) and blocks: no event says when
        pid = Path(f"/sys/block/nbd{index}/pid")
        size_attr = Path(f"/sys/block/nbd{index}/size")
        while not (pid.exists() and int(size_attr.read_text() or 0) > 0):
            thread.join(0.01)
            if not thread.is_alive():
                with self._lock:
                    self._running.pop(index, None)
                raise KernelInterfaceError(errno.EIO, f"NBD_DO_IT on /dev/nbd{index} failed at once")
        return index

    def _run(self, fd: int) -> None:
        """The thread of a device: ``NBD_DO_IT`` until the device is disconnected (no signal of the process may
        interrupt it: that would shut the device down), then clear it and close the fd."""
        signal.pthread_sigmask(signal.SIG_BLOCK, signal.valid_signals())
        try:
            fcntl.ioctl(fd, NBD_DO_IT)
        except OSError:
            pass  # the device stopped (disconnected, or all its connections died)
        finally:
            try:
                fcntl.ioctl(fd, NBD_CLEAR_SOCK)
            except OSError:
                pass
            os.close(fd)

    def reconfigure(self, index: int, socks: list[socket.socket]) -> None:
        raise KernelInterfaceError(errno.EOPNOTSUPP, f"/dev/nbd{index}: the NBD ioctls cannot reconnect a device")

    def disconnect(self, index: int) -> None:
        """Disconnect ``/dev/nbd<index>`` (``NBD_DISCONNECT``: NBD_CMD_DISC on each socket) and wait for its
        ``NBD_DO_IT`` to return; a device of another process (dead, its sockets gone) is cleared too."""
        with self._lock:
            fd, thread = self._running.pop(index, (-1, None))
        try:
            if thread is None:
                fd = os.open(f"/dev/nbd{index}", os.O_RDWR | os.O_CLOEXEC)
                try:
                    fcntl.ioctl(fd, NBD_DISCONNECT)
                    fcntl.ioctl(fd, NBD_CLEAR_SOCK)
                finally:
                    os.close(fd)
            else:
                try:
                    fcntl.ioctl(fd, NBD_DISCONNECT)
                finally:
                    thread.join()
        except OSError as e:
            raise KernelInterfaceError(e.errno or errno.EIO, f"NBD disconnect /dev/nbd{index}: {e.strerror}") from None


Nbd = NbdNetlink | NbdIoctl


def open_nbd() -> Nbd:
    """The netlink interface, or the ioctls where the kernel has no netlink family (or :data:`TEST_IOCTL_ENV`)."""
    if os.environ.get(TEST_IOCTL_ENV) != "1":
        try:
            return NbdNetlink()
        except KernelInterfaceError:
            if not Path("/dev/nbd0").exists():
                raise
    return NbdIoctl()


def why_no_nbd() -> str | None:
    """None when the kernel serves NBD devices (through netlink, or the ioctls of ``/dev/nbdN``), else why not."""
    if not Path("/sys/module/nbd").exists():
        return "the kernel has no NBD (no nbd module loaded: modprobe nbd)"
    try:
        NbdNetlink().close()
    except OSError as e:
        if not Path("/dev/nbd0").exists():
            return str(e)
    return None

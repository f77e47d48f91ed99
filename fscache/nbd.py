"""NBD block devices served from user space: the kernel's generic-netlink ``nbd`` family and the wire protocol.

:class:`NbdNetlink` connects a device to sockets the caller serves (``NBD_CMD_CONNECT``: the kernel picks a free
``/dev/nbdN``, starts it and answers with its index — the device is usable when :meth:`NbdNetlink.connect`
returns), and disconnects it (``NBD_CMD_DISCONNECT``: the kernel sends ``NBD_CMD_DISC`` on each socket and shuts
them down).  The server side reads :class:`NbdRequest` (28 bytes) from its socket and answers each with
:func:`reply_header` (16 bytes), followed by the data for a read; an error reply carries an errno and no data.
"""

from __future__ import annotations

import errno
import os
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
    "NbdNetlink",
    "NbdRequest",
    "discard",
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

    def disconnect(self, index: int) -> None:
        """Disconnect ``/dev/nbd<index>`` (its sockets get NBD_CMD_DISC and are shut down)."""
        try:
            self._request(self.family, NBD_CMD_DISCONNECT, NBD_GENL_VERSION, _u32(NBD_ATTR_INDEX, index))
        except OSError as e:
            raise KernelInterfaceError(e.errno or errno.EIO, f"NBD disconnect /dev/nbd{index}: {e.strerror}") from None


def why_no_nbd() -> str | None:
    """None when the kernel serves NBD devices through netlink, else why not."""
    if not Path("/sys/module/nbd").exists():
        return "the kernel has no NBD (no nbd module loaded: modprobe nbd)"
    try:
        NbdNetlink().close()
    except OSError as e:
        return str(e)
    return None

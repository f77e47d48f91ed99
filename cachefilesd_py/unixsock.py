"""The API's Unix sockets: :func:`listen` makes the listening socket (mode 0600) that a daemon serves the API on
(:mod:`cachefilesd_py.api`) and that the mount supervisor keeps across worker restarts; :func:`unix_address`
reaches a socket whose path is longer than an address holds; :func:`peer_uid` says who connected.  Sockets only:
no HTTP, so a process that just holds the socket imports no HTTP server.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import stat
import struct
from collections.abc import Iterator

__all__ = ["listen", "peer_uid", "unix_address"]

_PEERCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid
_SUN_PATH_MAX = 107  # sizeof(struct sockaddr_un.sun_path) less its NUL


@contextlib.contextmanager
def unix_address(path: str) -> Iterator[str]:
    """``path`` as a socket address: itself, or — longer than an address holds (a deep run dir) — the same file
    reached through ``/proc/self/fd`` of its directory, opened while the address is in use."""
    if len(os.fsencode(path)) <= _SUN_PATH_MAX:
        yield path
        return
    head, name = os.path.split(path)
    fd = os.open(head or ".", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        yield f"/proc/self/fd/{fd}/{name}"
    finally:
        os.close(fd)


def listen(path: str | os.PathLike[str]) -> socket.socket:
    """A listening AF_UNIX stream socket at ``path`` (a stale socket file there is replaced, nothing else: not
    the socket of a daemon that still answers on it)."""
    p = os.fspath(path)
    try:
        if stat.S_ISSOCK(os.lstat(p).st_mode):
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as probe, \
                    unix_address(p) as address:
                if probe.connect_ex(address) == 0:
                    raise OSError(errno.EADDRINUSE, "in use by a running daemon", p)
            os.unlink(p)
    except FileNotFoundError:
        pass
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        os.fchmod(sock.fileno(), 0o600)  # the socket file gets this mode when bound (never a moment more open)
        with unix_address(p) as address:
            sock.bind(address)
        os.chmod(p, 0o600)
        sock.listen(16)
    except OSError:
        sock.close()
        raise
    return sock


def peer_uid(conn: socket.socket) -> int:
    """The uid of the process at the other end of a connected Unix socket (as it was when it connected)."""
    _, uid, _ = _PEERCRED.unpack(conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size))
    return uid

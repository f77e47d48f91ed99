"""Serving blobs as NBD block devices (the ``nbd`` mount mode): each blob's uncompressed layout is one
``/dev/nbdN``, read by EROFS as a ``device=``.

A :class:`BlobDevice` connects one device (:func:`fscache.nbd.open_nbd`) to ``connections`` socket pairs (at
least two: the kernel moves a request that was in flight on a connection that died to another connection, or
holds it for a reconnect, only when the device has more than one), each served by its own thread; a restarted
daemon gives the device it finds (``index``) new sockets instead, in place of the dead ones (:mod:`.nbdsupervisor`).
A READ request is answered from the blob's sparse cache file (:mod:`.cachefile`)
after the pipeline filled what the file lacks (fetch → verify → decompress → pwrite), so a remount finds what an
earlier one fetched.  A fill that fails (backend error, digest mismatch) is an EIO reply for that request: the
reader gets an I/O error, never zeros.  WRITE and TRIM are refused (EPERM; the device is read-only anyway).
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import threading
from typing import Any

from erofs.errors import NydusErofsError
from fscache.nbd import (
    NBD_CMD_DISC,
    NBD_CMD_FLUSH,
    NBD_CMD_READ,
    NBD_CMD_TRIM,
    NBD_CMD_WRITE,
    Nbd,
    NbdRequest,
    discard,
    read_request,
    reply_header,
)

from ..pipeline import Pipeline
from .cachefile import CacheFile

__all__ = ["BlobDevice"]

log = logging.getLogger(__name__)

MAX_REQUEST = 32 << 20  # a read request longer than this is refused (the kernel sends at most max_sectors)
# How long the kernel holds the requests of a device whose connections all died (its daemon was killed) for a
# restarted daemon to reconnect, before failing them with EIO: the restart backoff (at most 5 s) plus a daemon's
# start, with room for a slow machine.  A supervisor that gives up disconnects the devices, failing them at once.
DEAD_CONN_TIMEOUT = 120


class BlobDevice:
    """One blob served as ``/dev/nbd<index>`` through ``connections`` sockets."""

    def __init__(self, cf: CacheFile, pipeline: Pipeline, netlink: Nbd, *, connections: int = 2,
                 index: int | None = None) -> None:  # fmt: skip
        """Connect a free device (``index`` None) or give ``/dev/nbd<index>``, left by a daemon that died, our
        sockets in place of its dead ones."""
        self.cf = cf
        self.pipeline = pipeline
        self.netlink = netlink
        self.index = -1
        self._lock = threading.Lock()
        self._stats = {"requests": 0, "reads": 0, "bytes_read": 0, "read_errors": 0, "refused": 0}
        self._threads: list[threading.Thread] = []
        self._socks: list[socket.socket] = []
        ours = self._socks
        theirs: list[socket.socket] = []
        try:
            for _ in range(max(connections, 2)):
                a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
                ours.append(a)
                theirs.append(b)
            for n, sock in enumerate(ours):  # serving before the kernel can ask (it may read at connect)
                t = threading.Thread(target=self._serve, args=(sock,), name=f"nbd-{cf.handle.blob_id[:12]}-{n}",
                                     daemon=True)  # fmt: skip
                t.start()
                self._threads.append(t)
            if index is None:
                self.index = netlink.connect(theirs, cf.size, dead_conn_timeout=DEAD_CONN_TIMEOUT)
            else:
                netlink.reconfigure(index, theirs)
                self.index = index
        except BaseException:
            self.hang_up()
            raise
        finally:
            for s in theirs:  # the kernel holds its own reference now
                s.close()
        log.info("blob %s served as %s (%d bytes, %d connections%s)", cf.handle.blob_id, self.path, cf.size,
                 len(ours), "" if index is None else ", reconnected")  # fmt: skip

    @property
    def path(self) -> str:
        return f"/dev/nbd{self.index}"

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return dict(self._stats, device=self.path, blob=self.cf.handle.blob_id)

    def _count(self, **counts: int) -> None:
        with self._lock:
            for k, v in counts.items():
                self._stats[k] += v

    def _serve(self, sock: socket.socket) -> None:
        try:
            while True:
                try:
                    req = read_request(sock)
                except OSError as e:
                    log.error("%s: %s", self.path, e)
                    return
                if req is None or req.command == NBD_CMD_DISC:
                    return
                self._count(requests=1)
                sock.sendall(self._answer(sock, req))
        except OSError as e:  # the kernel went away mid-reply
            log.info("%s: connection closed: %s", self.path, e)
        finally:
            sock.close()

    def _answer(self, sock: socket.socket, req: NbdRequest) -> bytes:
        if req.command == NBD_CMD_READ:
            try:
                data = self.read(req.offset, req.length)
            except (NydusErofsError, OSError, ValueError) as e:
                log.error("%s: read %d+%d: %s", self.path, req.offset, req.length, e)
                self._count(read_errors=1)
                return reply_header(req.handle, errno.EIO)
            self._count(reads=1, bytes_read=len(data))
            return reply_header(req.handle) + data
        if req.command == NBD_CMD_FLUSH:
            return reply_header(req.handle)
        if req.command == NBD_CMD_WRITE:
            discard(sock, req.length)
        self._count(refused=1)
        return reply_header(req.handle, errno.EPERM if req.command in (NBD_CMD_WRITE, NBD_CMD_TRIM) else errno.EINVAL)

    def read(self, offset: int, length: int) -> bytes:
        """``[offset, offset + length)`` of the blob's uncompressed layout, fetched first where missing."""
        cf = self.cf
        if length > MAX_REQUEST or offset + length > cf.size:
            raise ValueError(f"request {offset}+{length} beyond the device ({cf.size} bytes)")
        if not cf.known(offset, length):
            self.pipeline.fill(cf.handle, offset, length, cf.pwrite, cf.present)
        out = bytearray()
        while len(out) < length:
            piece = os.pread(cf.fd, length - len(out), offset + len(out))
            if not piece:
                raise OSError(errno.EIO, f"{cf.path}: short read at {offset + len(out)}")
            out += piece
        return bytes(out)

    def disconnect(self) -> None:
        """Disconnect the device (the kernel sends NBD_CMD_DISC and shuts its ends down: a request still pending
        fails with EIO) and wait for the serving threads."""
        if self.index >= 0:
            try:
                self.netlink.disconnect(self.index)
            except OSError as e:
                log.error("%s", e)
        self.hang_up()

    def hang_up(self) -> None:
        """Shut our ends down (a thread blocked in recv returns) and wait for the serving threads."""
        for s in self._socks:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass  # closed by its thread already
        for t in self._threads:
            t.join()

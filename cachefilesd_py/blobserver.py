"""A read-only HTTP server for a directory of blobs and bootstraps (what upstream's ``nydus-backend-proxy``
does): ``nydus-erofs serve DIR --listen ADDR:PORT``.

- ``GET``/``HEAD /<path>``: the regular file ``DIR/<path>``; the http backend reads ``<url>/<blob id>``.
- ``GET``/``HEAD /v2/<repo>/blobs/sha256:<id>``: ``DIR/<id>`` or ``DIR/blobs/<id>`` whatever the repository, and
  ``/v2/`` answers 200, so the registry backend (``plain_http``) reads from it; manifests are not served (404).
- One ``Range: bytes=`` range (``a-b``, ``a-``, ``-n``) → 206 with ``Content-Range``; past the end → 416 with
  ``Content-Range: bytes */<size>``; several ranges or a malformed header → the whole file (200), as RFC 9110
  allows.  A strong ``ETag``: ``"sha256:<id>"`` for a file named by a blob id, else size and mtime; a matching
  ``If-None-Match`` → 304.
- Never anything outside DIR: ``..`` and ``.`` segments (encoded or not), NUL, backslashes, empty segments and
  absolute-form targets are refused (400 or 404), and a path whose real path (symlinks resolved) leaves DIR is
  404, like one that does not exist; directories are not listed.
- Only ``GET`` and ``HEAD`` (405 otherwise); a thread per connection; one log line per request, every request
  being answered when a stop comes is answered (and logged) before "stopped".
"""

from __future__ import annotations

import email.utils
import http.server
import logging
import os
import re
import select
import socket
import stat
import threading
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlsplit

log = logging.getLogger(__name__)

_BLOB_ID = re.compile(r"[0-9a-f]{64}")
_RANGE = re.compile(r"bytes=(\d*)-(\d*)")


@dataclass(frozen=True)
class Found:
    """An open regular file to serve."""

    fd: int
    size: int
    etag: str
    mtime: float
    digest: str | None


def parse_listen(text: str) -> tuple[str, int]:
    """``ADDR:PORT`` (``[v6]:PORT`` for IPv6; ``:PORT`` for every address) → (host, port); ValueError if not."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"--listen {text!r}: expected ADDR:PORT")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, int(port)


def single_range(header: str | None, size: int) -> tuple[int, int] | None | bool:
    """The (first, last) byte of a ``Range`` header; None: serve the whole file (no header, several ranges, or
    one not understood); False: unsatisfiable (416)."""
    if header is None:
        return None
    m = _RANGE.fullmatch(header.strip())
    if not m or (not m.group(1) and not m.group(2)):
        return None
    if not m.group(1):  # suffix: the last n bytes
        n = int(m.group(2))
        if n == 0 or size == 0:
            return False
        return max(0, size - n), size - 1
    first = int(m.group(1))
    if m.group(2) and int(m.group(2)) < first:
        return None  # invalid: ignored
    if first >= size:
        return False
    last = int(m.group(2)) if m.group(2) else size - 1
    return first, min(last, size - 1)


DRAIN_SECONDS = 10  # how long a stop waits for the requests being answered (so each one's log line is written)


class BlobServer(http.server.ThreadingHTTPServer):
    """Serves ``root`` read-only on ``address``; :meth:`serve_forever` in a thread, :meth:`shutdown` to stop."""

    daemon_threads = True
    block_on_close = False

    def __init__(self, root: str | os.PathLike[str], address: tuple[str, int]) -> None:
        self.root = os.path.realpath(root)
        if not os.path.isdir(self.root):
            raise NotADirectoryError(f"{root}: not a directory")
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        self._in_flight = 0  # requests read and not yet answered (not idle keep-alive connections)
        self._quiet = threading.Condition()
        super().__init__(address, _Handler)

    def request_began(self) -> None:
        with self._quiet:
            self._in_flight += 1

    def request_ended(self) -> None:
        with self._quiet:
            self._in_flight -= 1
            if not self._in_flight:
                self._quiet.notify_all()

    def drain(self, timeout: float) -> bool:
        """Wait until no request is being answered (its log line written), at most ``timeout`` seconds."""
        with self._quiet:
            return self._quiet.wait_for(lambda: not self._in_flight, timeout)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        host = f"[{host}]" if ":" in str(host) else str(host)
        return f"http://{host}:{port}"

    def resolve(self, rel: str) -> str | None:
        """The real path of ``rel`` (relative, already checked) if it stays inside the root, else None."""
        path = os.path.realpath(os.path.join(self.root, rel))
        if path != self.root and os.path.commonpath([self.root, path]) == self.root:
            return path
        return None

    def open(self, rels: list[str], blob_id: str | None) -> Found | None:
        """The first of ``rels`` that is a regular file inside the root, opened."""
        for rel in rels:
            path = self.resolve(rel)
            if path is None:
                continue
            try:
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK)
            except OSError:
                continue
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                os.close(fd)
                continue
            name = os.path.basename(rel)
            digest = blob_id or (name if _BLOB_ID.fullmatch(name) else None)
            etag = f'"sha256:{digest}"' if digest else f'"{st.st_size:x}-{st.st_mtime_ns:x}"'
            return Found(fd, st.st_size, etag, st.st_mtime, digest)
        return None


class _Refused(Exception):
    def __init__(self, status: int, why: str) -> None:
        super().__init__(why)
        self.status = status


def _segments(target: str) -> list[str]:
    """The decoded segments of a request target's path; _Refused for anything that could leave the root."""
    if not target.startswith("/"):
        raise _Refused(400, "not an origin-form target")
    path = unquote(urlsplit(target).path, errors="strict")
    if "\0" in path:
        raise _Refused(400, "NUL in path")
    segments = path.split("/")[1:]
    if segments and segments[-1] == "":
        segments.pop()  # a trailing slash
    for s in segments:
        if s in ("", ".", "..") or "\0" in s or "\\" in s:
            raise _Refused(404, "path not allowed")
    return segments


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "nydus-erofs-serve"
    timeout = 60
    server: BlobServer

    def version_string(self) -> str:
        return self.server_version

    def handle_one_request(self) -> None:
        self._counted = False
        try:
            super().handle_one_request()
        finally:
            if self._counted:
                self.server.request_ended()

    def parse_request(self) -> bool:  # a request line has been read: it is answered before a stop returns
        self.server.request_began()
        self._counted = True
        return super().parse_request()

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        pass  # one line per request, with the bytes sent, when it ends (_done)

    def log_error(self, format: str, *args: Any) -> None:  # noqa: A002 - BaseHTTPRequestHandler's signature
        log.info("%s %s", self.address_string(), (format % args).replace("\n", " "))

    def _done(self, status: int, sent: int) -> None:
        log.info('%s "%s" %d %d', self.address_string(), self.requestline.replace("\n", " "), status, sent)

    def _reply(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        if body and "Content-Type" not in (headers or {}):
            self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        sent = 0
        if self.command != "HEAD" and body:
            self.wfile.write(body)
            sent = len(body)
        self._done(status, sent)

    def _not_allowed(self) -> None:
        self.close_connection = True  # a request body, if any, is not read
        self._reply(405, b"only GET and HEAD\n", {"Allow": "GET, HEAD"})

    do_POST = do_PUT = do_PATCH = do_DELETE = do_OPTIONS = do_TRACE = do_CONNECT = _not_allowed

    def do_HEAD(self) -> None:
        self._serve()

    def do_GET(self) -> None:
        self._serve()

    def _serve(self) -> None:
        try:
            segments = _segments(self.path)
        except (_Refused, UnicodeDecodeError) as e:
            status = e.status if isinstance(e, _Refused) else 400
            self._reply(status, b"not found\n" if status == 404 else b"bad path\n")
            return
        blob_id = None
        if segments == ["v2"]:  # the registry API's ping
            self._reply(200, b"{}", {"Docker-Distribution-API-Version": "registry/2.0",
                                     "Content-Type": "application/json"})  # fmt: skip
            return
        if segments[:1] == ["v2"]:  # /v2/<repo>/blobs/sha256:<id>, any repository; nothing else of the API
            digest = segments[-1] if len(segments) >= 4 and segments[-2] == "blobs" else ""
            if digest.startswith("sha256:") and _BLOB_ID.fullmatch(digest[7:]):
                blob_id = digest[7:]
            rels = [blob_id, f"blobs/{blob_id}"] if blob_id else []
        else:
            rels = ["/".join(segments)] if segments else []
        found = self.server.open(rels, blob_id)
        if found is None:
            self._reply(404, b"not found\n")
            return
        try:
            self._send_file(found)
        finally:
            os.close(found.fd)

    def _send_file(self, f: Found) -> None:
        modified = email.utils.formatdate(f.mtime, usegmt=True)
        headers = {"ETag": f.etag, "Accept-Ranges": "bytes", "Last-Modified": modified}
        if f.digest:
            headers["Docker-Content-Digest"] = f"sha256:{f.digest}"
        inm = self.headers.get("If-None-Match")
        if inm is not None and (inm.strip() == "*" or f.etag in (t.strip() for t in inm.split(","))):
            self._reply(304, b"", headers)
            return
        rng = single_range(self.headers.get("Range"), f.size)
        if rng is False:
            self._reply(416, b"", {**headers, "Content-Range": f"bytes */{f.size}"})
            return
        first, last = (0, f.size - 1) if rng is None else rng
        count = last - first + 1
        status = 200 if rng is None else 206
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        if rng is not None:
            self.send_header("Content-Range", f"bytes {first}-{last}/{f.size}")
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(count))
        self.end_headers()
        sent = 0
        if self.command != "HEAD" and count > 0:
            self.wfile.flush()
            with os.fdopen(os.dup(f.fd), "rb") as src:
                try:
                    sent = self.connection.sendfile(src, first, count)
                except OSError:
                    self.close_connection = True
                    self._done(status, sent)
                    raise
            if sent < count:  # the file shrank under us: the client must not take it for the whole range
                self.close_connection = True
        self._done(status, sent)


def serve_directory(root: str | os.PathLike[str], address: tuple[str, int], stop_fd: int,
          ready: Any = None) -> None:  # fmt: skip
    """Serve ``root`` on ``address`` until ``stop_fd`` (a pipe's read end) is readable; ``ready(url)`` is called
    once listening.  A pipe, not an Event: a signal handler may write to it, where setting an Event from a handler
    deadlocks if the signal lands while this thread is inside the Event's lock (a stopped ``serve`` hung so)."""
    server = BlobServer(root, address)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.2}, name="blobserver")
    thread.start()
    try:
        if ready is not None:
            ready(server.url)
        select.select([stop_fd], [], [])
    finally:
        server.shutdown()
        server.drain(DRAIN_SECONDS)
        thread.join()
        server.server_close()


__all__ = ["BlobServer", "parse_listen", "serve_directory", "single_range"]

"""``--api-sock PATH``: a small HTTP API on a Unix socket (stdlib ``http.server``), nydusd-style paths.

- ``GET /api/v1/daemon``: state, pid of the serving process, supervisor pid, restarts, images.
- ``GET /api/v1/metrics/backend``: backend traffic (requests, bytes, errors, retries; per backend too).
- ``GET /api/v1/metrics/blobcache``: daemon counters (opens, reads, failures, bytes written) and pipeline stats.
- ``GET /api/v1/trace``: the access trace of each mounted image (:mod:`cachefilesd_py.object_trace`).

The listening socket is made by :func:`listen` (the supervisor keeps it across worker restarts);
:class:`ApiServer` serves it on a thread.  :func:`get` is a client for tests and tools.
"""

from __future__ import annotations

import errno
import http.client
import json
import os
import socket
import stat
import threading
from collections.abc import Callable, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

__all__ = ["ApiServer", "get", "listen"]

Route = Callable[[], Mapping[str, Any]]


def listen(path: str | os.PathLike[str]) -> socket.socket:
    """A listening AF_UNIX stream socket at ``path`` (a stale socket file there is replaced, nothing else: not
    the socket of a daemon that still answers on it)."""
    p = os.fspath(path)
    try:
        if stat.S_ISSOCK(os.lstat(p).st_mode):
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as probe:
                if probe.connect_ex(p) == 0:
                    raise OSError(errno.EADDRINUSE, "in use by a running daemon", p)
            os.unlink(p)
    except FileNotFoundError:
        pass
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.bind(p)
        os.chmod(p, 0o600)
        sock.listen(16)
    except OSError:
        sock.close()
        raise
    return sock


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    routes: Mapping[str, Route]

    def server_bind(self) -> None:  # the socket is bound already (listen())
        self.server_name = "cachefilesd-py"
        self.server_port = 0


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    server_version = "cachefilesd-py"
    protocol_version = "HTTP/1.1"

    def address_string(self) -> str:
        return "unix"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - signature of the base class
        pass

    def _send(self, status: int, body: Mapping[str, Any]) -> None:
        data = json.dumps(body, indent=None, sort_keys=True).encode() + b"\n"
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        route = self.server.routes.get(self.path.split("?", 1)[0].rstrip("/"))
        if route is None:
            self._send(404, {"code": "NotFound", "message": f"no such endpoint: {self.path}"})
            return
        try:
            body = route()
        except Exception as e:  # noqa: BLE001 - reported to the client, the server goes on
            self._send(500, {"code": "InternalError", "message": str(e)})
            return
        self._send(200, body)


class ApiServer:
    """Serve ``routes`` (path → callable returning a JSON-able mapping) on ``sock`` from a thread."""

    def __init__(self, sock: socket.socket, routes: Mapping[str, Route]) -> None:
        self._server = _Server(sock.getsockname() or "", _Handler, bind_and_activate=False)
        self._server.socket.close()
        self._server.socket = sock
        self._server.routes = dict(routes)
        self._thread = threading.Thread(target=self._server.serve_forever, name="cachefilesd-api", daemon=True)

    def start(self) -> ApiServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving (the socket stays open: it belongs to whoever called :func:`listen`)."""
        if self._thread.is_alive():
            self._server.shutdown()
            self._thread.join()


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(self.timeout)
        try:
            s.connect(self._path)
        except OSError:
            s.close()
            raise
        self.sock = s


def get(sock_path: str | os.PathLike[str], path: str, timeout: float = 10.0) -> dict[str, Any]:
    """GET ``path`` from the API at ``sock_path``; the decoded JSON body (OSError when the status is not 200)."""
    conn = _UnixConnection(os.fspath(sock_path), timeout)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        body = json.loads(resp.read() or b"{}")
    finally:
        conn.close()
    if resp.status != 200:
        raise OSError(f"GET {path}: HTTP {resp.status}: {body.get('message', '')}")
    return body

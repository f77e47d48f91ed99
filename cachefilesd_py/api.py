"""``--api-sock PATH``: a small HTTP API on a Unix socket (stdlib ``http.server``), nydusd-style paths.

- ``GET /api/v1/daemon``: state, pid of the serving process, supervisor pid, restarts, images.
- ``GET /api/v1/metrics/backend``: backend traffic (requests, bytes, errors, retries; per backend too).
- ``GET /api/v1/metrics/blobcache``: daemon counters (opens, reads, failures, bytes written) and pipeline stats.
- ``GET /api/v1/images``: the images the daemon serves, with their bindings.
- ``PUT /api/v1/images/{fsid}`` (JSON body, :mod:`cachefilesd_py.bindings`): bind an image; ``DELETE``: unbind.
- ``GET /api/v1/trace``: the access trace of each mounted image (:mod:`cachefilesd_py.object_trace`).

The listening socket is made by :func:`listen` (the supervisor keeps it across worker restarts);
:class:`ApiServer` serves it on a thread.  Request bodies are at most :data:`MAX_BODY` bytes; errors are JSON
``{"code": …, "message": …}`` with a 4xx/5xx status.  :func:`get` and :func:`request` are clients for the CLI,
tests and tools.
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

__all__ = ["MAX_BODY", "ApiError", "ApiServer", "get", "listen", "request"]

Route = Callable[[], Mapping[str, Any]]
#: ``(method, path prefix)`` → handler of the rest of the path and the request body (None for DELETE)
ItemRoute = Callable[[str, bytes | None], Mapping[str, Any]]
MAX_BODY = 64 << 10


class ApiError(Exception):
    """An answer other than 200: ``status`` (4xx/5xx), a ``code`` word and the message."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code


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
    item_routes: Mapping[tuple[str, str], ItemRoute]

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
        path = self.path.split("?", 1)[0].rstrip("/")
        route = self.server.routes.get(path)
        if route is None:
            self._item("GET", path, None)
            return
        try:
            body = route()
        except Exception as e:  # noqa: BLE001 - reported to the client, the server goes on
            self._send(500, {"code": "InternalError", "message": str(e)})
            return
        self._send(200, body)

    def do_PUT(self) -> None:  # noqa: N802
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            self.close_connection = True
            self._send(411, {"code": "LengthRequired", "message": "a request body with Content-Length is required"})
            return
        if int(length) > MAX_BODY:
            self.close_connection = True  # the body is not read
            self._send(413, {"code": "TooLarge", "message": f"request body over {MAX_BODY} bytes"})
            return
        body = self.rfile.read(int(length))
        self._item("PUT", self.path.split("?", 1)[0], body)

    def do_DELETE(self) -> None:  # noqa: N802
        if self.headers.get("Content-Length", "0") not in ("", "0"):
            self.close_connection = True
        self._item("DELETE", self.path.split("?", 1)[0], None)

    def do_POST(self) -> None:  # noqa: N802
        self.close_connection = True
        self._send(405, {"code": "MethodNotAllowed", "message": f"POST {self.path}: not supported"})

    def _item(self, method: str, path: str, body: bytes | None) -> None:
        for (m, prefix), handler in self.server.item_routes.items():
            if path.startswith(prefix) and len(path) > len(prefix) and "/" not in path[len(prefix) :]:
                if m != method:
                    continue
                try:
                    self._send(200, handler(path[len(prefix) :], body))
                except ApiError as e:
                    self._send(e.status, {"code": e.code, "message": str(e)})
                except Exception as e:  # noqa: BLE001 - reported to the client, the server goes on
                    self._send(500, {"code": "InternalError", "message": str(e)})
                return
        known = path in self.server.routes or any(
            path.startswith(p) and "/" not in path[len(p) :] for _, p in self.server.item_routes
        )
        if known:
            self._send(405, {"code": "MethodNotAllowed", "message": f"{method} {path}: not supported"})
        else:
            self._send(404, {"code": "NotFound", "message": f"no such endpoint: {path}"})


class ApiServer:
    """Serve ``routes`` (GET path → callable returning a JSON-able mapping) and ``item_routes`` (``(method, path
    prefix)`` → callable of the rest of the path, e.g. an fsid, and the body; it raises :class:`ApiError` for
    anything but 200) on ``sock`` from a thread."""

    def __init__(self, sock: socket.socket, routes: Mapping[str, Route],
                 item_routes: Mapping[tuple[str, str], ItemRoute] | None = None) -> None:  # fmt: skip
        self._server = _Server(sock.getsockname() or "", _Handler, bind_and_activate=False)
        self._server.socket.close()
        self._server.socket = sock
        self._server.routes = dict(routes)
        self._server.item_routes = dict(item_routes or {})
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


def request(sock_path: str | os.PathLike[str], method: str, path: str, body: Mapping[str, Any] | None = None,
            timeout: float = 60.0) -> tuple[int, dict[str, Any]]:
    """One request to the API at ``sock_path``: (status, decoded JSON body)."""
    conn = _UnixConnection(os.fspath(sock_path), timeout)
    try:
        data = json.dumps(body).encode() if body is not None else None
        headers = {"Content-Type": "application/json"} if data is not None else {}
        conn.request(method, path, body=data, headers=headers)
        resp = conn.getresponse()
        raw = resp.read()
    finally:
        conn.close()
    try:
        answer = json.loads(raw or b"{}")
    except ValueError:
        answer = {"message": raw[:200].decode("utf-8", "replace")}
    return resp.status, answer if isinstance(answer, dict) else {"value": answer}


def get(sock_path: str | os.PathLike[str], path: str, timeout: float = 10.0) -> dict[str, Any]:
    """GET ``path`` from the API at ``sock_path``; the decoded JSON body (OSError when the status is not 200)."""
    status, body = request(sock_path, "GET", path, timeout=timeout)
    if status != 200:
        raise OSError(f"GET {path}: HTTP {status}: {body.get('message', '')}")
    return body

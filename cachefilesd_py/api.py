"""The daemons' HTTP API on a Unix socket (stdlib ``http.server``), nydusd-style paths; both daemons serve it
(cachefilesd-py with ``--api-sock``, a fanotify mount on the socket its record names); the routes every daemon
serves (:mod:`cachefilesd_py.api_routes`):

- ``GET /api/v1/daemon``: ``version``, ``pid``, ``state``, ``uptime``, ``mode`` and what the daemon adds.
- ``GET /api/v1/images``: the images (mounts) it serves: their backend's type, never its options.
- ``GET /api/v1/metrics``: the metrics snapshot (:mod:`cachefilesd_py.metrics`); ``GET /metrics``: the same in the
  Prometheus text format.
- ``POST /api/v1/gc``: drop the cache of blobs no image references; answers what was removed.

cachefilesd-py adds ``/api/v1/metrics/backend``, ``/api/v1/metrics/blobcache``, ``/api/v1/trace`` and ``PUT`` /
``DELETE`` / ``GET /api/v1/images/{fsid}`` (bind, unbind, describe: :mod:`cachefilesd_py.bindings`).

The listening socket is made by :func:`~cachefilesd_py.unixsock.listen` (mode 0600; the supervisor keeps it
across worker restarts); :class:`ApiServer` serves it on a thread.  Only root and the daemon's own user are
answered (the peer's credentials, ``SO_PEERCRED``; others get 403); request bodies are at most :data:`MAX_BODY`
bytes (413); a malformed request gets a 4xx; errors are JSON ``{"code": …, "message": …}``.  :func:`get` and
:func:`request` are clients for the CLI, tests and tools.
"""

from __future__ import annotations

import contextlib
import functools
import http.client
import json
import logging
import os
import socket
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from .unixsock import listen, peer_uid, unix_address

__all__ = ["MAX_BODY", "Action", "ApiError", "ApiServer", "Route", "Text", "get", "listen", "peer_uid", "request"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Text:
    """A GET route's answer that is not JSON (``/metrics``)."""

    content_type: str
    data: bytes


Route = Callable[[], "Mapping[str, Any] | Text"]
#: ``(method, path prefix)`` → handler of the rest of the path and the request body (None for DELETE)
ItemRoute = Callable[[str, bytes | None], Mapping[str, Any]]
#: ``POST path`` → handler of the request body
Action = Callable[[bytes], Mapping[str, Any]]
MAX_BODY = 64 << 10
LINGER_MAX = 1 << 20  # what an over-long body is drained up to, after its 413
LINGER_SECONDS = 1.0
REQUEST_TIMEOUT = 30.0  # seconds a connection may take to send a request (a client that stalls is dropped)


class ApiError(Exception):
    """An answer other than 200: ``status`` (4xx/5xx), a ``code`` word and the message."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    routes: Mapping[str, Route]
    item_routes: Mapping[tuple[str, str], ItemRoute]
    actions: Mapping[str, Action]

    def server_bind(self) -> None:  # the socket is bound already (listen())
        self.server_name = "cachefilesd-py"
        self.server_port = 0

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A connection that failed (the client went away...): one line, never a traceback; serving goes on."""
        log.debug("API connection failed", exc_info=True)


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    server_version = "cachefilesd-py"
    protocol_version = "HTTP/1.1"
    timeout = REQUEST_TIMEOUT

    def address_string(self) -> str:
        return "unix"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - signature of the base class
        pass

    def handle(self) -> None:
        """Answer only root and the daemon's own user: anyone else gets 403, and the connection is closed."""
        try:
            uid = peer_uid(self.connection)
        except OSError:
            return
        if uid not in (0, os.geteuid()):
            data = json.dumps({"code": "Forbidden", "message": f"uid {uid} may not use this API"}).encode() + b"\n"
            self.wfile.write(b"HTTP/1.1 403 Forbidden\r\nContent-Type: application/json\r\nConnection: close\r\n"
                             b"Content-Length: %d\r\n\r\n%s" % (len(data), data))  # fmt: skip
            return
        super().handle()

    def parse_request(self) -> bool:
        if not super().parse_request():
            return False
        if self.request_version == "HTTP/0.9":  # a bare "GET /path": answered with a status line, refused
            self.send_error(400, "HTTP/0.9 requests are not accepted")
            return False
        return True

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """http.server's own errors (malformed requests) as 4xx JSON: an unknown method is 405, not 501."""
        status = {HTTPStatus.NOT_IMPLEMENTED: 405, HTTPStatus.HTTP_VERSION_NOT_SUPPORTED: 400}.get(code, code)
        self.close_connection = True
        try:
            phrase = HTTPStatus(status).phrase
        except ValueError:
            phrase = "Error"
        if not getattr(self, "request_version", None) or self.request_version == "HTTP/0.9":
            self.request_version = "HTTP/1.1"  # always answer with a status line and headers
        self._send(status, {"code": phrase.replace(" ", ""), "message": message or phrase})

    def _send(self, status: int, body: Mapping[str, Any] | Text) -> None:
        if isinstance(body, Text):
            ctype, data = body.content_type, body.data
        else:
            ctype, data = "application/json", json.dumps(body, indent=None, sort_keys=True).encode() + b"\n"
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def _path(self) -> str:
        return self.path.split("?", 1)[0]

    def _body(self) -> bytes | None:
        """The request body (at most MAX_BODY bytes), or None after answering 411/413/400."""
        length = self.headers.get("Content-Length")
        if self.headers.get("Transfer-Encoding") is not None:
            self.close_connection = True
            self._send(411, {"code": "LengthRequired", "message": "chunked bodies are not accepted"})
            return None
        if length is None:
            return b""
        if not length.isdigit():
            self.close_connection = True
            self._send(400, {"code": "BadRequest", "message": "bad Content-Length"})
            return None
        if int(length) > MAX_BODY:
            self.close_connection = True  # the body is not kept
            self._send(413, {"code": "TooLarge", "message": f"request body over {MAX_BODY} bytes"})
            self._linger(int(length))
            return None
        body = self.rfile.read(int(length))
        if len(body) != int(length):
            self.close_connection = True
            self._send(400, {"code": "BadRequest", "message": "request body shorter than its Content-Length"})
            return None
        return body

    def _linger(self, length: int) -> None:
        """After answering a request whose body is not read: end the answer (EOF to the client), then discard
        what the client still sends, up to LINGER_MAX bytes for LINGER_SECONDS at most, so a client writing its
        body reads the answer instead of EPIPE (the daemon closing on unread data resets the connection)."""
        with contextlib.suppress(OSError):
            self.connection.shutdown(socket.SHUT_WR)
            self.connection.settimeout(LINGER_SECONDS)
            left = min(length, LINGER_MAX)
            while left > 0 and (chunk := self.rfile.read1(min(left, 65536))):
                left -= len(chunk)

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        if self.headers.get("Content-Length", "0") not in ("", "0") or self.headers.get("Transfer-Encoding"):
            self.close_connection = True  # a body is not read: the connection cannot carry another request
        path = self._path().rstrip("/")
        route = self.server.routes.get(path)
        if route is None:
            self._item("GET", path, None)
            return
        self._answer(route)

    def _answer(self, handler: Callable[[], Mapping[str, Any] | Text]) -> None:
        """200 and what ``handler`` returns; its ApiError as its status; anything else 500 (serving goes on)."""
        try:
            body = handler()
        except ApiError as e:
            self._send(e.status, {"code": e.code, "message": str(e)})
            return
        except Exception as e:  # noqa: BLE001 - reported to the client, the server goes on
            self._send(500, {"code": "InternalError", "message": str(e)})
            return
        self._send(200, body)

    def do_HEAD(self) -> None:  # noqa: N802
        self.close_connection = True
        self._send(405, {"code": "MethodNotAllowed", "message": f"HEAD {self._path()}: not supported"})

    def do_PUT(self) -> None:  # noqa: N802
        if self.headers.get("Content-Length") is None:
            self.close_connection = True
            self._send(411, {"code": "LengthRequired", "message": "a request body with Content-Length is required"})
            return
        body = self._body()
        if body is not None:
            self._item("PUT", self._path(), body)

    def do_DELETE(self) -> None:  # noqa: N802
        if self.headers.get("Content-Length", "0") not in ("", "0") or self.headers.get("Transfer-Encoding"):
            self.close_connection = True
        self._item("DELETE", self._path(), None)

    def do_POST(self) -> None:  # noqa: N802
        body = self._body()
        if body is None:
            return
        path = self._path().rstrip("/")
        action = self.server.actions.get(path)
        if action is None:
            self._item("POST", path, body)
            return
        self._answer(lambda: action(body))

    def _item(self, method: str, path: str, body: bytes | None) -> None:
        for (m, prefix), handler in self.server.item_routes.items():
            if path.startswith(prefix) and len(path) > len(prefix) and "/" not in path[len(prefix) :]:
                if m != method:
                    continue
                self._answer(functools.partial(handler, path[len(prefix) :], body))
                return
        known = path in self.server.routes or path in self.server.actions or any(
            path.startswith(p) and "/" not in path[len(p) :] for _, p in self.server.item_routes
        )
        if known:
            self._send(405, {"code": "MethodNotAllowed", "message": f"{method} {path}: not supported"})
        else:
            self._send(404, {"code": "NotFound", "message": f"no such endpoint: {path}"})


class ApiServer:
    """Serve ``routes`` (GET path → callable returning a JSON-able mapping or :class:`Text`), ``item_routes``
    (``(method, path prefix)`` → callable of the rest of the path, e.g. an fsid, and the body) and ``actions``
    (POST path → callable of the body) on ``sock`` from a thread; a handler raises :class:`ApiError` for
    anything but 200."""

    def __init__(self, sock: socket.socket, routes: Mapping[str, Route],
                 item_routes: Mapping[tuple[str, str], ItemRoute] | None = None,
                 actions: Mapping[str, Action] | None = None) -> None:  # fmt: skip
        self._server = _Server(sock.getsockname() or "", _Handler, bind_and_activate=False)
        self._server.socket.close()
        self._server.socket = sock
        self._server.routes = dict(routes)
        self._server.item_routes = dict(item_routes or {})
        self._server.actions = dict(actions or {})
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
            with unix_address(self._path) as address:
                s.connect(address)
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
    if not resp.getheader("Content-Type", "").startswith("application/json"):
        return resp.status, {"text": raw.decode("utf-8", "replace")}
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

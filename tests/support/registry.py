"""Test helpers: a real registry (Debian's ``docker-registry``) on 127.0.0.1, and :class:`Front`, a small HTTP
server in a thread that stands in front of it (or serves a directory) to demand Basic/Bearer auth, redirect,
and inject faults (dropped connections, 503 + Retry-After, truncated or corrupted bodies, ignored Range).

The fixtures ``registry_server`` and ``auth_registry_server`` are in tests/conftest.py.
"""

from __future__ import annotations

import base64
import collections
import hashlib
import http.client
import http.server
import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from cachefilesd_py.backends.registry import push_blob

REGISTRY_BIN = "docker-registry"
#: htpasswd credentials known to the test registry (bcrypt cost 4, so checks are fast)
TEST_USER = "alice"
TEST_PASSWORD = "s3cret"
TEST_HTPASSWD = f"{TEST_USER}:$2b$04$mHxZveQGqA6ES.sn04RzFuyzMzY11oJBIbxDeARBvbgMV9P5N3pzy\n"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def registry_binary() -> str | None:
    return shutil.which(REGISTRY_BIN) or (
        f"/usr/bin/{REGISTRY_BIN}" if os.path.exists(f"/usr/bin/{REGISTRY_BIN}") else None
    )


def _status(host: str, port: int, path: str = "/v2/", timeout: float = 1.0) -> int | None:
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        resp.read()
        return resp.status
    except OSError:
        return None
    finally:
        conn.close()


class RegistryServer:
    """``docker-registry serve`` on 127.0.0.1:<free port> with its storage under ``root``; anonymous, or with
    htpasswd Basic auth (:data:`TEST_USER`/:data:`TEST_PASSWORD`) when ``htpasswd=True``.

    With ``netns``, it runs inside that network namespace (``ip netns exec``) on ``addr``:5000 instead; with
    ``accesslog``, it logs every request with its response's size (combined log format) to ``registry.log``."""

    def __init__(self, root: str | os.PathLike[str], *, htpasswd: bool = False, netns: str | None = None,
                 addr: str = "127.0.0.1", accesslog: bool = False) -> None:  # fmt: skip
        self.root = Path(root)
        self.htpasswd = htpasswd
        self.netns, self.addr, self.accesslog = netns, addr, accesslog
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def log(self) -> Path:
        return self.root / "registry.log"

    @property
    def host(self) -> str:
        return f"{self.addr}:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    def _config(self) -> Path:
        auth = ""
        if self.htpasswd:
            pw = self.root / "htpasswd"
            pw.write_text(TEST_HTPASSWD)
            auth = f"auth:\n  htpasswd:\n    realm: test\n    path: {pw}\n"
        cfg = self.root / "config.yml"
        cfg.write_text(
            "version: 0.1\n"
            f"log:\n  level: error\n  accesslog:\n    disabled: {'false' if self.accesslog else 'true'}\n"
            f"storage:\n  filesystem:\n    rootdirectory: {self.root / 'data'}\n  delete:\n    enabled: true\n"
            f"{auth}"
            f"http:\n  addr: {self.host}\n"
        )
        return cfg

    def start(self, timeout: float = 20.0) -> RegistryServer:
        exe = registry_binary()
        if exe is None:
            raise RuntimeError("docker-registry is not installed (apt-get install docker-registry)")
        self.root.mkdir(parents=True, exist_ok=True)
        prefix = ["ip", "netns", "exec", self.netns] if self.netns else []
        for _ in range(3):  # another process may grab the free port between our probe and the bind
            self.port = 5000 if self.netns else free_port()  # a namespace of its own: nobody else binds there
            log = open(self.log, "wb")  # noqa: SIM115 - kept for the process' life
            self.proc = subprocess.Popen(
                [*prefix, exe, "serve", str(self._config())], stdout=log, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )  # fmt: skip
            log.close()
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline and self.proc.poll() is None:
                if _status(self.addr, self.port, timeout=0.5) in (200, 401):
                    return self
                time.sleep(0.02)  # polling interval, not synchronisation
            self.stop()
        tail = self.log.read_text(errors="replace")[-2000:]
        raise RuntimeError(f"docker-registry did not become ready on {self.host}: {tail}")

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def __enter__(self) -> RegistryServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def push_test_blob(registry: RegistryServer, repo: str, data: bytes, tmp: Path, **options: Any) -> str:
    """Push ``data`` as a blob; returns its id (sha256 hex)."""
    path = tmp / f"blob-{hashlib.sha256(data).hexdigest()}"
    path.write_bytes(data)
    digest = push_blob(registry.host, repo, path, plain_http=True, docker_config=False, **options)
    path.unlink()
    return digest.removeprefix("sha256:")


# --- Front: auth, redirects and fault injection in front of a registry, or a plain file server ---------------

FAULTS = (
    "drop",
    "truncate",
    "corrupt",
    "ignore_range",
    "bad_range",
    "stall",
    "403",
    "404",
    "429",
    "500",
    "502",
    "503",
    "504",
)
_HOP = {
    "connection",
    "keep-alive",
    "transfer-encoding",
    "te",
    "upgrade",
    "proxy-authorization",
    "host",
    "content-length",
}


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    timeout = 10
    # headers and body go out as separate small writes: with Nagle's algorithm the second waits for the client's
    # delayed ACK (40 ms on Linux), a delay of the test front's making, not of the link it stands for
    disable_nagle_algorithm = True
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - quiet
        pass

    def _any(self) -> None:
        self.server.front.handle(self)

    do_GET = do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = _any


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    front: Front

    def handle_error(self, request: Any, client_address: Any) -> None:
        if isinstance(sys.exc_info()[1], ConnectionError | TimeoutError):
            return  # the client gave up (timeouts under test): not worth a traceback
        super().handle_error(request, client_address)


class Front:
    """An HTTP server on 127.0.0.1 in a thread: proxies to ``upstream`` (a registry URL) or serves the files of
    ``directory`` at ``/<name>`` (with Range support), and on the way

    - ``auth="basic"|"bearer"``: demands Basic (``credentials``) or Bearer tokens issued by its ``/token``
      endpoint (which takes Basic ``credentials`` if set, else anyone), lasting ``token_lifetime`` seconds;
    - ``redirect_to``: answers blob GET/HEAD with 307 to ``redirect_to + path``;
    - :meth:`inject` queues faults, each spent on one blob request (``match`` filters them): see :data:`FAULTS`.

    ``requests`` records (method, path) of every request, ``with_authorization`` the paths of those that carried
    an Authorization header; ``tokens_issued`` counts tokens.
    """

    def __init__(
        self,
        *,
        upstream: str | None = None,
        directory: str | os.PathLike[str] | None = None,
        auth: str | None = None,
        credentials: tuple[str, str] | None = None,
        token_lifetime: float = 300.0,
        redirect_to: str | None = None,
        retry_after: str = "0",
        stall: float = 1.0,
        match: str = "/blobs/sha256:",
    ) -> None:
        self.upstream = upstream.rstrip("/") if upstream else None
        self.directory = Path(directory) if directory is not None else None
        self.auth = auth
        self.credentials = credentials
        self.token_lifetime = token_lifetime
        self.redirect_to = redirect_to
        self.retry_after = retry_after
        self.stall = stall
        self.match = match if upstream else "/"
        self.faults: collections.deque[str] = collections.deque()
        self.requests: list[tuple[str, str]] = []
        self.with_authorization: list[str] = []
        self.tokens: dict[str, float] = {}
        self.tokens_issued = 0
        self.token_scopes: list[str] = []
        self._lock = threading.Lock()
        self._server = _Server(("127.0.0.1", 0), _Handler)
        self._server.front = self
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self._server.server_address[1]}"

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    def start(self) -> Front:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def __enter__(self) -> Front:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def inject(self, *faults: str) -> None:
        for f in faults:
            assert f in FAULTS, f
        with self._lock:
            self.faults.extend(faults)

    def clear(self) -> None:
        with self._lock:
            self.faults.clear()
            self.requests.clear()
            self.with_authorization.clear()

    def revoke_tokens(self) -> None:
        with self._lock:
            self.tokens.clear()

    def blob_requests(self) -> int:
        with self._lock:
            return sum(1 for _, p in self.requests if self.match in p)

    # -- request handling (in the server's threads) --

    def _reply(self, h: _Handler, status: int, headers: dict[str, str] | None = None, body: bytes = b"") -> None:
        h.send_response(status)
        for k, v in (headers or {}).items():
            h.send_header(k, v)
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        if h.command != "HEAD":
            h.wfile.write(body)

    def _unauthorized(self, h: _Handler, scheme: str) -> None:
        if scheme == "basic":
            challenge = 'Basic realm="front"'
        else:
            m = re.match(r"/v2/(.+?)/(blobs|manifests)/", h.path)
            repo = m.group(1) if m else "x"
            action = "pull" if h.command in ("GET", "HEAD") else "pull,push"
            challenge = f'Bearer realm="{self.url}/token",service="front",scope="repository:{repo}:{action}"'
        body = b'{"errors":[{"code":"UNAUTHORIZED","message":"authentication required"}]}'
        self._reply(h, 401, {"WWW-Authenticate": challenge, "Content-Type": "application/json"}, body)

    def _basic_ok(self, h: _Handler) -> bool:
        if self.credentials is None:
            return True
        want = "Basic " + base64.b64encode(":".join(self.credentials).encode()).decode()
        return h.headers.get("Authorization") == want

    def _token(self, h: _Handler) -> None:
        if not self._basic_ok(h):
            self._reply(h, 401, {"WWW-Authenticate": 'Basic realm="token"'})
            return
        query = parse_qs(urlsplit(h.path).query)
        token = secrets.token_hex(16)
        with self._lock:
            self.tokens[token] = time.monotonic() + self.token_lifetime
            self.tokens_issued += 1
            self.token_scopes.extend(query.get("scope", []))
        body = json.dumps({"token": token, "expires_in": self.token_lifetime}).encode()
        self._reply(h, 200, {"Content-Type": "application/json"}, body)

    def _authorized(self, h: _Handler) -> bool:
        if self.auth == "basic":
            return self._basic_ok(h) and "Authorization" in h.headers
        if self.auth == "bearer":
            value = h.headers.get("Authorization", "")
            if not value.startswith("Bearer "):
                return False
            with self._lock:
                expiry = self.tokens.get(value[7:])
            return expiry is not None and expiry > time.monotonic()
        return True

    def handle(self, h: _Handler) -> None:
        body_in = b""
        if h.headers.get("Content-Length"):
            body_in = h.rfile.read(int(h.headers["Content-Length"]))
        with self._lock:
            self.requests.append((h.command, h.path))
            if "Authorization" in h.headers:
                self.with_authorization.append(h.path)
        if h.path.startswith("/token"):
            self._token(h)
            return
        if not self._authorized(h):
            self._unauthorized(h, self.auth or "basic")
            return
        fault = None
        if self.match in h.path and h.command in ("GET", "HEAD"):
            with self._lock:
                fault = self.faults.popleft() if self.faults else None
        if fault == "drop":
            h.close_connection = True
            return
        if fault is not None and fault.isdigit():
            headers = {"Retry-After": self.retry_after} if fault in ("429", "503") else {}
            self._reply(h, int(fault), headers, b"fault\n")
            return
        if fault == "stall":
            time.sleep(self.stall)
        if self.redirect_to and self.match in h.path and h.command in ("GET", "HEAD"):
            self._reply(h, 307, {"Location": self.redirect_to + h.path})
            return
        headers = {k: v for k, v in h.headers.items() if k.lower() not in _HOP and k.lower() != "authorization"}
        if fault == "ignore_range":
            headers = {k: v for k, v in headers.items() if k.lower() != "range"}
        if self.upstream:
            status, out_headers, body = self._proxy(h.command, h.path, headers, body_in)
        else:
            status, out_headers, body = self._static(h.command, h.path, headers)
        if fault == "corrupt" and body:
            i = len(body) // 2
            body = body[:i] + bytes([body[i] ^ 0xFF]) + body[i + 1 :]
        if fault == "bad_range" and "Content-Range" in out_headers:
            m = re.match(r"bytes (\d+)-(\d+)/(\d+)", out_headers["Content-Range"])
            if m:
                a, b, t = (int(x) for x in m.groups())
                out_headers["Content-Range"] = f"bytes {a + 1}-{b + 1}/{t}"
        length = int(out_headers.pop("Content-Length", len(body))) if h.command == "HEAD" else len(body)
        h.send_response(status)
        for k, v in out_headers.items():
            h.send_header(k, v)
        h.send_header("Content-Length", str(length))
        h.end_headers()
        if h.command == "HEAD":
            return
        if fault == "truncate":
            h.wfile.write(body[: len(body) // 2])
            h.wfile.flush()
            h.close_connection = True
            return
        h.wfile.write(body)

    def _proxy(self, method: str, path: str, headers: dict[str, str], body: bytes) -> tuple[int, dict, bytes]:
        assert self.upstream is not None
        up = urlsplit(self.upstream)
        conn = http.client.HTTPConnection(up.hostname, up.port, timeout=10)
        try:
            conn.request(
                method, path, body=body if body or method in ("POST", "PUT", "PATCH") else None, headers=headers
            )
            resp = conn.getresponse()
            data = resp.read()
            out = {k: v for k, v in resp.getheaders() if k.lower() not in _HOP or k.lower() == "content-length"}
        finally:
            conn.close()
        if "Location" in out:
            out["Location"] = out["Location"].replace(self.upstream, self.url)
        if method != "HEAD":
            out.pop("Content-Length", None)
        return resp.status, out, data

    def _static(self, method: str, path: str, headers: dict[str, str]) -> tuple[int, dict, bytes]:
        assert self.directory is not None
        name = urlsplit(path).path.lstrip("/")
        file = self.directory / name
        if "/" in name or not name or not file.is_file():
            return 404, {}, b"not found\n"
        data = file.read_bytes()
        size = len(data)
        rng = next((v for k, v in headers.items() if k.lower() == "range"), None)
        if method == "HEAD":
            return 200, {"Content-Length": str(size), "Accept-Ranges": "bytes"}, b""
        if rng:
            m = re.fullmatch(r"bytes=(\d+)-(\d*)", rng.strip())
            if m:
                first = int(m.group(1))
                last = min(int(m.group(2)) if m.group(2) else size - 1, size - 1)
                if first >= size:
                    return 416, {"Content-Range": f"bytes */{size}"}, b""
                return 206, {"Content-Range": f"bytes {first}-{last}/{size}"}, data[first : last + 1]
        return 200, {}, data

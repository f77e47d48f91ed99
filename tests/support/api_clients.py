"""Clients of a daemon's API for tests: malformed requests, a client running as another user, the Prometheus
text parsed."""

from __future__ import annotations

import os
import random
import socket
import subprocess
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from cachefilesd_py.api import unix_address

NOBODY = 65534


def malformed_requests(n: int, seed: int = 15) -> list[bytes]:
    """``n`` requests that are wrong in every way a client can get one wrong."""
    rnd = random.Random(seed)
    kinds = [
        lambda: rnd.randbytes(rnd.randrange(1, 4096)),  # garbage
        lambda: b"\x00\xff\r\n\r\n",
        lambda: f"{rnd.choice(['FOO', 'PATCH', 'OPTIONS', 'TRACE', 'CONNECT', 'G ET'])} /api/v1/daemon HTTP/1.1\r\n\r\n"
        .encode(),
        lambda: b"GET /api/v1/daemon HTTP/9.9\r\n\r\n",
        lambda: b"GET /api/v1/daemon\r\n\r\n",  # HTTP/0.9
        lambda: b"GET " + b"/a" * 40000 + b" HTTP/1.1\r\n\r\n",  # a huge request line
        lambda: b"GET /api/v1/daemon HTTP/1.1\r\nX-Big: " + b"x" * 70000 + b"\r\n\r\n",  # a huge header
        lambda: b"GET /api/v1/daemon HTTP/1.1\r\n" + b"X-H: 1\r\n" * 200 + b"\r\n",  # too many headers
        lambda: b"POST /api/v1/gc HTTP/1.1\r\nContent-Length: 99999999\r\n\r\n" + b"x" * 1000,  # a huge body
        lambda: b"PUT /api/v1/images/x HTTP/1.1\r\nContent-Length: 9999999999999\r\n\r\n",
        lambda: b"POST /api/v1/gc HTTP/1.1\r\nContent-Length: -5\r\n\r\n",
        lambda: b"POST /api/v1/gc HTTP/1.1\r\nContent-Length: abc\r\n\r\n",
        lambda: b"POST /api/v1/gc HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nffff\r\n",
        lambda: b"POST /api/v1/gc HTTP/1.1\r\nContent-Length: 100\r\n\r\nshort",  # truncated body
        lambda: b"GET /api/v1/daem",  # truncated request line
        lambda: b"PUT /api/v1/images/x HTTP/1.1\r\nContent-Length: 7\r\n\r\n{\"a\":[}",  # bad JSON
        lambda: b"PUT /api/v1/images/../../etc HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}",
        lambda: b"DELETE /api/v1/images/%00 HTTP/1.1\r\n\r\n",
        lambda: b"GET /\xff\xfe HTTP/1.1\r\n\r\n",
        lambda: b"HEAD /metrics HTTP/1.1\r\n\r\n",
    ]
    return [kinds[i % len(kinds)]() for i in range(n)]


def send_raw(sock_path: str | os.PathLike[str], data: bytes, timeout: float = 60.0) -> int | None:
    """Send ``data``, half-close, read the answer until the daemon closes: its status (None: no answer)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        with unix_address(os.fspath(sock_path)) as address:
            s.connect(address)
        try:
            s.sendall(data)
            s.shutdown(socket.SHUT_WR)
        except (BrokenPipeError, ConnectionResetError):  # it answered (413, 431) and closed before reading it all
            pass
        answer = b""
        try:
            while chunk := s.recv(65536):
                answer += chunk
        except ConnectionResetError:
            pass
    if not answer:
        return None
    assert answer.startswith(b"HTTP/1."), answer[:200]
    return int(answer.split(b" ", 2)[1])


def as_nobody(sock_dir: Path, sock_name: str, *args: str) -> subprocess.CompletedProcess[str]:
    """Run ``args`` as uid/gid 65534 in ``sock_dir`` (so the socket is reached by its name: nothing but the
    socket's own mode stands in the way)."""

    def drop() -> None:
        os.chdir(sock_dir)
        os.setgroups([])
        os.setgid(NOBODY)
        os.setuid(NOBODY)

    return subprocess.run([*args], capture_output=True, text=True, preexec_fn=drop, timeout=120, check=False,
                          env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})  # fmt: skip


#: a stdlib-only client (the system's python: the venv's interpreter may sit where nobody can reach): connects to
#: the socket named by argv[1], GETs /api/v1/daemon, prints the status (a failed connect: a traceback, status 1)
NOBODY_CLIENT = ["/usr/bin/python3", "-c", """
import socket, sys
s = socket.socket(socket.AF_UNIX)
s.connect(sys.argv[1])
try:
    s.sendall(b"GET /api/v1/daemon HTTP/1.1\\r\\nHost: x\\r\\n\\r\\n")
except BrokenPipeError:  # answered (403) and closed before reading the request
    pass
print(s.recv(4096).split()[1].decode())
"""]


def prometheus_samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of the Prometheus text: (name, sorted labels) → value (the parser raises on bad text)."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out

"""The ``proxy`` network option: blob requests through a real HTTP forward proxy (Debian's ``tinyproxy``) in
front of a real registry (``docker-registry``), around it when it fails or is slow, and through it again once it
is back; a mount keeps reading right across a SIGKILL of the proxy in the middle of a 64 MiB file."""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import signal
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from cachefilesd_py.backends import make_backend
from cachefilesd_py.backends.proxy import ProxyRoute
from cachefilesd_py.backends.registry import push_blob
from cachefilesd_py.blobserver import BlobServer
from erofs.errors import BackendError
from erofs.reader.backend import LATENCY_BUCKETS_MS, BackendStats
from tests.support.cli import CLI, run
from tests.support.poll import wait_for
from tests.support.registry import (
    RegistryServer,
    free_port,
)

pytestmark = [pytest.mark.network, pytest.mark.tools("tinyproxy", "docker-registry")]

TINYPROXY = shutil.which("tinyproxy") or "/usr/bin/tinyproxy"
REPO = "proxy/test"
_REQUEST = re.compile(r"Request \(file descriptor \d+\): (\w+) (\S+) HTTP/")


class Tinyproxy:
    """``tinyproxy -d -c CONF`` on 127.0.0.1:``port`` (the same port across restarts), logging requests."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.port = free_port()
        self.log = root / "tinyproxy.log"
        self.conf = root / "tinyproxy.conf"
        self.conf.write_text(f'Port {self.port}\nListen 127.0.0.1\nAllow 127.0.0.1\nLogFile "{self.log}"\n'
                             "LogLevel Info\nTimeout 30\nMaxClients 100\n")  # fmt: skip
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> Tinyproxy:
        with open(self.root / "tinyproxy.out", "ab") as out:
            self.proc = subprocess.Popen([TINYPROXY, "-d", "-c", str(self.conf)], stdout=out, stderr=out,
                                         stdin=subprocess.DEVNULL)  # fmt: skip
        wait_for(lambda: self.proc is None or self.proc.poll() is not None or self._listening(),
                 "tinyproxy did not start", 30)  # fmt: skip
        assert self.proc.poll() is None, (self.root / "tinyproxy.out").read_text()
        return self

    def _listening(self) -> bool:
        try:
            socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
            return True
        except OSError:
            return False

    def kill(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None:
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=10)

    def requests(self) -> list[str]:
        """``METHOD URL`` of each request in its log, oldest first (across restarts)."""
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return [f"{m.group(1)} {m.group(2)}" for m in _REQUEST.finditer(text)]


@pytest.fixture
def tinyproxy(tmp_path: Path) -> Iterator[Tinyproxy]:
    tp = Tinyproxy(tmp_path).start()
    try:
        yield tp
    finally:
        tp.kill()


def _push(registry: RegistryServer, data: bytes, tmp: Path) -> str:
    path = tmp / "blob"
    path.write_bytes(data)
    digest = push_blob(registry.host, REPO, path, plain_http=True, docker_config=False)
    path.unlink()
    return digest.removeprefix("sha256:")


@pytest.fixture(scope="module")
def blob(registry_server: RegistryServer, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, bytes]:
    data = random.Random(2).randbytes(1 << 20)
    return _push(registry_server, data, tmp_path_factory.mktemp("push")), data


def _blob_gets(tp: Tinyproxy, blob_id: str) -> int:
    return sum(1 for r in tp.requests() if r.startswith("GET ") and r.endswith(f"/blobs/sha256:{blob_id}"))


def test_through_the_proxy_around_it_and_back(registry_server: RegistryServer, blob: tuple[str, bytes],
                                              tinyproxy: Tinyproxy) -> None:  # fmt: skip
    blob_id, data = blob
    with make_backend("registry", host=registry_server.host, repo=REPO, plain_http=True, docker_config=False,
                      proxy=tinyproxy.url, proxy_check_interval=0.2) as b:  # fmt: skip
        assert b.read(blob_id, 1000, 5000) == data[1000:6000]
        assert f"GET {registry_server.url}/v2/{REPO}/blobs/sha256:{blob_id}" in tinyproxy.requests()
        snap = b.stats.snapshot()
        assert snap["proxied"] >= 1 and snap["fallbacks"] == 0 and snap["errors"] == 0
        tinyproxy.kill()
        seen = _blob_gets(tinyproxy, blob_id)
        for off in range(0, len(data) - 50_000, 100_000):
            assert b.read(blob_id, off, 50_000) == data[off : off + 50_000]
        snap = b.stats.snapshot()
        assert snap["fallbacks"] >= 1 and snap["errors"] == 0 and _blob_gets(tinyproxy, blob_id) == seen
        tinyproxy.start()  # back: used again once proxy_check_interval has passed since its last failure
        wait_for(lambda: b.read(blob_id, 7, 7) == data[7:14] and _blob_gets(tinyproxy, blob_id) > seen,
                 "the proxy was not used again after it came back", 30)  # fmt: skip
        assert b.stats.errors == 0


@pytest.mark.tools("openssl")
def test_https_origin_through_a_connect_tunnel(tinyproxy: Tinyproxy, tmp_path: Path) -> None:
    """An https origin (``nydus-erofs serve``'s server with a self-signed certificate) is reached through the proxy
    with CONNECT; the certificate is still the origin's, checked against ``ca_file``."""
    openssl = shutil.which("openssl")
    assert openssl is not None
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run([openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
                    "-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, capture_output=True)  # fmt: skip
    blobs = tmp_path / "blobs"
    blobs.mkdir()
    data = random.Random(6).randbytes(300_000)
    blob_id = hashlib.sha256(data).hexdigest()
    (blobs / blob_id).write_bytes(data)
    server = BlobServer(blobs, ("127.0.0.1", 0))
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert, key)
    server.socket = ctx.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        url = f"https://127.0.0.1:{server.server_address[1]}"
        with make_backend("http", url=url, ca_file=str(cert), proxy=tinyproxy.url) as b:
            assert b.read(blob_id, 1000, 2000) == data[1000:3000]
            assert b.read(blob_id, 0, len(data)) == data
            assert b.stats.proxied == 2 and b.stats.fallbacks == 0
        assert f"CONNECT 127.0.0.1:{server.server_address[1]}" in tinyproxy.requests()
        with make_backend("http", url=url, proxy=tinyproxy.url, retry_limit=0) as b:  # not the system's CAs
            with pytest.raises(BackendError, match="CERTIFICATE_VERIFY_FAILED"):
                b.read(blob_id, 0, 10)
    finally:
        server.shutdown()
        thread.join()
        server.server_close()


def test_a_hung_proxy_is_left_after_proxy_timeout(registry_server: RegistryServer, blob: tuple[str, bytes]) -> None:
    """A proxy that takes connections and never answers (a listening socket nobody accepts on)."""
    blob_id, data = blob
    with socket.socket() as hung:
        hung.bind(("127.0.0.1", 0))
        hung.listen(64)
        proxy = f"http://127.0.0.1:{hung.getsockname()[1]}"
        with make_backend("registry", host=registry_server.host, repo=REPO, plain_http=True, docker_config=False,
                          proxy=proxy, proxy_timeout=0.3, proxy_check_interval=600) as b:  # fmt: skip
            start = time.monotonic()
            assert b.read(blob_id, 0, 4096) == data[:4096]
            assert 0.3 <= time.monotonic() - start < 10
            assert b.stats.fallbacks == 1
            for off in (5000, 9000, 700_000):  # within proxy_check_interval: straight to the origin
                assert b.read(blob_id, off, 100) == data[off : off + 100]
            assert b.stats.fallbacks == 1 and b.stats.proxied == 0 and b.stats.errors == 0


def test_without_fallback_a_dead_proxy_is_an_error(registry_server: RegistryServer, blob: tuple[str, bytes]) -> None:
    blob_id, _ = blob
    sleeps: list[float] = []
    with make_backend("registry", host=registry_server.host, repo=REPO, plain_http=True, docker_config=False,
                      proxy=f"http://127.0.0.1:{free_port()}", proxy_fallback="false", retry_limit=2,
                      sleep=sleeps.append) as b:  # fmt: skip
        with pytest.raises(BackendError, match=r"Connection refused.*\(after 3 attempts\)") as e:
            b.read(blob_id, 0, 10)
        assert "\n" not in str(e.value) and len(sleeps) == 2 and b.stats.fallbacks == 0


def test_proxy_route_retries_after_the_check_interval() -> None:
    now = [100.0]
    route = ProxyRoute("http://127.0.0.1:1", check_interval=5, clock=lambda: now[0])
    assert route.usable() and not route.down
    route.failed("refused")
    assert not route.usable() and route.down
    now[0] += 4.9
    assert not route.usable()
    now[0] += 0.1
    assert route.usable()  # tried again; still down until it answers
    route.failed("refused")
    assert not route.usable()
    now[0] += 5
    route.succeeded()
    assert route.usable() and not route.down
    never = ProxyRoute("http://127.0.0.1:1", fallback=False)
    never.failed("refused")
    assert never.usable()
    for bad in ("https://127.0.0.1:1", "127.0.0.1:1"):
        with pytest.raises(BackendError, match="expected http://HOST:PORT"):
            make_backend("http", url="http://127.0.0.1:2", proxy=bad)


# --- a mount through the proxy, which is killed mid-read and restarted ------------------------------------------


def _sha(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


@pytest.mark.kernel("erofs", "fanotify")
@pytest.mark.root
def test_mount_reads_right_across_a_proxy_crash(registry_server: RegistryServer, tinyproxy: Tinyproxy,
                                                tmp_path: Path) -> None:  # fmt: skip
    src = tmp_path / "src"
    src.mkdir()
    rnd = random.Random(64)
    (src / "big.bin").write_bytes(rnd.randbytes(64 << 20))
    (src / "0-later.bin").write_bytes(rnd.randbytes(4 << 20))  # before big.bin in the blob: not read ahead
    out = tmp_path / "out"
    r = run("build", src, "--output-dir", out, "--compressor", "none")
    assert r.returncode == 0, r.stderr
    blob_ids = [p.name for p in (out / "blobs").iterdir()]
    for p in (out / "blobs").iterdir():
        assert push_blob(registry_server.host, REPO, p, plain_http=True, docker_config=False) == f"sha256:{p.name}"
    mp = tmp_path / "mnt"
    mp.mkdir()
    env = {**os.environ, "NYDUS_EROFS_RUN_DIR": str(tmp_path / "run")}
    config = {"host": registry_server.host, "repo": REPO, "plain_http": "true", "docker_config": "false",
              "proxy": tinyproxy.url, "proxy_check_interval": "0"}  # fmt: skip
    try:
        r = run("mount", out / "image.boot", mp, "--cache-dir", tmp_path / "cache", "--mode", "fanotify",
                "--backend", "registry", "--backend-config", ",".join(f"{k}={v}" for k, v in config.items()),
                env=env, timeout=120)  # fmt: skip
        assert r.returncode == 0, r.stderr
        assert any(_blob_gets(tinyproxy, i) for i in blob_ids), tinyproxy.requests()  # metadata through it

        progress = [0]
        result: dict[str, object] = {}

        def reader() -> None:
            h = hashlib.sha256()
            try:
                with open(mp / "big.bin", "rb", buffering=0) as f:
                    while chunk := f.read(1 << 20):
                        h.update(chunk)
                        progress[0] += len(chunk)
                result["sha"] = h.hexdigest()
            except OSError as e:
                result["error"] = e

        t = threading.Thread(target=reader, daemon=True)
        t.start()
        wait_for(lambda: progress[0] >= 16 << 20 or not t.is_alive(), "the reader made no progress", 60)
        tinyproxy.kill()  # in the middle of the 64 MiB file
        assert progress[0] < 64 << 20, "the file was read before the proxy could be killed"
        before = len(tinyproxy.requests())
        t.join(120)
        assert not t.is_alive(), "reader blocked"
        assert "error" not in result, result
        assert result["sha"] == _sha(src / "big.bin")
        assert len(tinyproxy.requests()) == before

        tinyproxy.start()  # restarted: later reads go through it again
        assert (mp / "0-later.bin").read_bytes() == (src / "0-later.bin").read_bytes()
        assert len(tinyproxy.requests()) > before and any(
            r.startswith("GET ") and "/blobs/sha256:" in r for r in tinyproxy.requests()[before:]
        )
        r = run("umount", mp, "--json", env=env, timeout=60)
        assert r.returncode == 0, r.stderr
        backend = json.loads(r.stdout)["stats"]["backend"]
        print(f"backend stats: {backend}")
        assert backend["proxied"] > 0 and backend["fallbacks"] > 0 and backend["errors"] == 0, backend
    finally:
        if os.path.ismount(mp):
            subprocess.run([CLI, "umount", str(mp)], capture_output=True, env=env, timeout=60)
            if os.path.ismount(mp):
                subprocess.run(["umount", "-l", str(mp)], check=False)


def test_backend_stats_latency_histogram_and_combined(tmp_path: Path) -> None:
    """Every backend's stats: counters, then latency as count/sum/max and a cumulative histogram; several
    backends' together sum, except the largest max."""
    a, b = BackendStats(), BackendStats()
    a.add(requests=2, bytes=100)
    a.observe(0.0005)
    a.observe(0.05)
    b.add(requests=1, retries=1, fallbacks=1)
    b.observe(3.0)
    snap = BackendStats.combined([a, b]).snapshot()
    assert snap["requests"] == 3 and snap["bytes"] == 100 and snap["retries"] == 1 and snap["fallbacks"] == 1
    assert snap["latency_count"] == 3 and snap["latency_max_ms"] == 3000 and snap["latency_sum_ms"] == 3050.5
    assert [snap[k] for k in ("latency_le_1ms", "latency_le_10ms", "latency_le_100ms", "latency_le_1s",
                              "latency_le_10s")] == [1, 1, 2, 2, 3]  # fmt: skip
    assert len(LATENCY_BUCKETS_MS) == 5
    a.reset()
    assert set(a.snapshot().values()) == {0}
    blob = tmp_path / ("0" * 64)
    blob.write_bytes(b"x" * 100)
    with make_backend("localfs", dir=tmp_path) as local:
        assert local.read("0" * 64, 10, 5) == b"xxxxx"
        assert local.stats.snapshot().items() >= {"requests": 1, "bytes": 5, "latency_count": 1}.items()

"""Blob backends without a registry: localfs on real files, http against a real local HTTP server (with fault
injection), the retry policy and the factory."""

from __future__ import annotations

import ast
import hashlib
import inspect
import os
import random
import re
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import fields
from pathlib import Path

import pytest

from cachefilesd_py.backends import BackendStats, BlobBackend, make_backend
from cachefilesd_py.backends.auth import Credentials
from cachefilesd_py.backends.http import HttpBackend
from cachefilesd_py.backends.registry import RegistryBackend, RegistryOptions
from cachefilesd_py.backends.retry import RetryPolicy, is_temp_failure, parse_retry_after
from cachefilesd_py.backends.transport import TransportOptions
from erofs.errors import BackendError
from erofs.reader.backend import LocalBlobDir
from tests.support.registry import Front


def _blob(directory: Path, size: int, seed: int = 0) -> tuple[str, bytes]:
    data = random.Random(seed).randbytes(size)
    blob_id = hashlib.sha256(data).hexdigest()
    (directory / blob_id).write_bytes(data)
    return blob_id, data


def _ranges(size: int, n: int = 40, seed: int = 1) -> list[tuple[int, int]]:
    rnd = random.Random(seed)
    out = [(0, 1), (size - 1, 1), (0, size), (size // 2, size - size // 2)]
    for _ in range(n):
        off = rnd.randrange(size)
        out.append((off, rnd.randrange(1, size - off + 1)))
    return out


def _one_line(e: BackendError, blob_id: str | None = None) -> str:
    text = str(e)
    assert "\n" not in text
    if blob_id:
        assert blob_id in text
    return text


# --- localfs ----------------------------------------------------------------------------------------------


@pytest.fixture
def blob_dir(tmp_path: Path) -> Path:
    d = tmp_path / "blobs"
    d.mkdir()
    return d


def test_localfs_ranges_exact(blob_dir: Path) -> None:
    blob_id, data = _blob(blob_dir, 300_000)
    with LocalBlobDir(blob_dir, strict_ids=True) as b:
        assert isinstance(b, BlobBackend)
        assert b.size(blob_id) == len(data)
        for off, n in _ranges(len(data)):
            assert b.read(blob_id, off, n) == data[off : off + n]
        assert b.read(blob_id, 5, 0) == b""
        b.stats.reset()
        b.read(blob_id, 1000, 4096)
        expected = {"requests": 1, "bytes": 4096, "errors": 0, "retries": 0, "latency_count": 1}
        assert b.stats.snapshot().items() >= expected.items()


def test_localfs_is_a_reader_blob_backend(blob_dir: Path) -> None:
    reader_backend = pytest.importorskip("erofs.reader.backend")
    assert reader_backend.BlobBackend is BlobBackend  # one interface for the reader and the daemon
    with LocalBlobDir(blob_dir, strict_ids=True) as b:
        assert isinstance(b, reader_backend.BlobBackend)


def test_localfs_past_end_and_missing(blob_dir: Path) -> None:
    blob_id, data = _blob(blob_dir, 1000)
    with LocalBlobDir(blob_dir, strict_ids=True) as b:
        with pytest.raises(BackendError, match=r"past the end of the blob \(size 1000\)") as e:
            b.read(blob_id, 990, 11)
        _one_line(e.value, blob_id)
        missing = "ab" * 32
        with pytest.raises(BackendError, match="not found") as e:
            b.read(missing, 0, 1)
        _one_line(e.value, missing)
        with pytest.raises(BackendError, match="invalid range"):
            b.read(blob_id, -1, 1)
        assert b.stats.errors == 3


@pytest.mark.parametrize("bad", ["../../etc/passwd", "AB" * 32, "ab" * 31, "ab" * 32 + "/", "", "ab" * 32 + "\0"])
def test_localfs_rejects_ids_that_are_not_sha256(blob_dir: Path, bad: str) -> None:
    with LocalBlobDir(blob_dir, strict_ids=True) as b, pytest.raises(BackendError, match="not 64 lowercase hex"):
        b.read(bad, 0, 1)


def test_localfs_alt_dirs_and_not_a_file(tmp_path: Path, blob_dir: Path) -> None:
    alt = tmp_path / "alt"
    alt.mkdir()
    blob_id, data = _blob(alt, 5000)
    (blob_dir / ("cd" * 32)).mkdir()
    b = make_backend("localfs", blob_dir=blob_dir, alt_dirs=[alt])
    try:
        assert b.read(blob_id, 10, 10) == data[10:20]
        with pytest.raises(BackendError, match="not a regular file"):
            b.size("cd" * 32)
    finally:
        b.close()


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_localfs_fd_cache_bounded_and_concurrent(blob_dir: Path) -> None:
    blobs = [_blob(blob_dir, 50_000 + i, seed=i) for i in range(6)]
    before = _open_fds()
    b = LocalBlobDir(blob_dir, strict_ids=True, max_open=2)
    errors: list[BaseException] = []

    def worker(seed: int) -> None:
        rnd = random.Random(seed)
        for _ in range(300):
            blob_id, data = blobs[rnd.randrange(len(blobs))]
            off = rnd.randrange(len(data))
            n = rnd.randrange(1, len(data) - off + 1)
            try:
                assert b.read(blob_id, off, n) == data[off : off + n]
            except BaseException as e:  # noqa: BLE001 - reported below
                errors.append(e)

    threads = [threading.Thread(target=worker, args=(s,)) for s in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[:3]
    assert _open_fds() <= before + 2
    b.close()
    assert _open_fds() == before


# --- factory and retry policy --------------------------------------------------------------------------------


def test_make_backend_errors(tmp_path: Path) -> None:
    with pytest.raises(BackendError, match="unknown backend kind 'ftp'"):
        make_backend("ftp")
    with pytest.raises(BackendError, match="backend localfs: bad options"):
        make_backend("localfs", dir=tmp_path, colour="blue")
    with pytest.raises(BackendError, match="registry repository name"):
        make_backend("registry", host="127.0.0.1:1", repo="../x", docker_config=False)


@pytest.mark.parametrize("url", ["notaurl", "example.com/blobs", "ftp://example.com", "http:///blobs",
                                 "http://:8080/blobs", "http://example.com:http/", "https://[::1/"])  # fmt: skip
def test_http_url_is_checked_when_made(url: str) -> None:
    # accepted, it failed only at the first read (a mount daemon serving nothing)
    with pytest.raises(BackendError) as e:
        make_backend("http", url=url)
    assert _one_line(e.value) == f"url {url!r}: expected http://HOST[:PORT][/PATH] or https://..."


def test_make_backend_registry_options_are_one_list(monkeypatch: pytest.MonkeyPatch) -> None:
    """The registry options make_backend documents are RegistryOptions' fields, and each one reaches the client."""
    doc = make_backend.__doc__ or ""
    start = doc.index("- ``registry``:") + len("- ``registry``:")
    documented = set(re.findall(r"``(\w+)(?:=[^`]*)?``", doc[start : doc.index("common network options", start)]))
    assert documented == {f.name for f in fields(RegistryOptions)}
    monkeypatch.delenv("IMAGE_PULL_AUTH", raising=False)
    given = {"host": "http://127.0.0.1:1/", "repo": "a/b/", "scheme": "http", "plain_http": False, "auth": "x:y",
             "username": "u", "password": "p", "token": "t", "docker_config": False}  # fmt: skip
    assert set(given) == documented  # each one not its default
    b = make_backend("registry", **given, retry_limit=0)
    try:
        assert isinstance(b, RegistryBackend) and b.client.options == RegistryOptions(**given)
        assert (b.client.host, b.client.repo, b.url) == ("127.0.0.1:1", "a/b", "http://127.0.0.1:1/v2/a/b/blobs")
        assert b.client.auth.credentials == Credentials("u", "p") and b.client.auth.static_token == "t"
        assert b.retry_policy.attempts == 1  # the rest went to the transport side
    finally:
        b.close()


def test_make_backend_network_options_are_one_list(monkeypatch: pytest.MonkeyPatch) -> None:
    """The common network options make_backend documents are TransportOptions' fields (each reaching the
    transport, given as values or as text) and HttpBackend's own keywords, with the defaults they have."""
    doc = make_backend.__doc__ or ""
    documented = dict(re.findall(r"``(\w+)(?:=([^`]*))?``", doc[doc.index("Common network options:") :]))
    transport = {f.name: f.default for f in fields(TransportOptions)}
    own = {k: p.default for k, p in inspect.signature(HttpBackend).parameters.items() if p.kind == p.KEYWORD_ONLY}
    del own["headers"]  # an http option of its own, documented with ``url``
    assert set(documented) == set(transport) | set(own) and not set(transport) & set(own)
    for name, default in {**transport, **own}.items():
        text = documented[name]  # ``name=default``: the default the code has
        if text:
            assert (int(text[:-4]) << 20 if text.endswith(" MiB") else ast.literal_eval(text)) == default, name
    given = {"timeout": 2.5, "connect_timeout": 1.5, "pool_size": 3, "insecure": True, "ca_file": "/x/ca.pem",
             "proxy": "http://127.0.0.1:2", "proxy_fallback": False, "proxy_timeout": 0.5, "proxy_check_interval": 9}
    assert set(given) == set(transport) and all(given[k] != v for k, v in transport.items())  # not the defaults
    monkeypatch.delenv("IMAGE_PULL_AUTH", raising=False)
    for kind, base in [("http", {"url": "http://127.0.0.1:1/blobs"}),
                       ("registry", {"host": "127.0.0.1:1", "repo": "a", "docker_config": False})]:  # fmt: skip
        for options in (given, {k: str(v) for k, v in given.items()}):
            b = make_backend(kind, **base, **options)
            try:
                assert isinstance(b, HttpBackend) and b.transport.options == TransportOptions(**given)
            finally:
                b.close()
    with pytest.raises(BackendError, match=r"bad options: HttpBackend.__init__\(\) got an unexpected keyword .*'tls'"):
        make_backend("http", url="http://127.0.0.1:1", tls=True)


def test_make_backend_options_given_as_text_are_typed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``--backend-config key=value`` hands every value over as text: each becomes what its option takes."""
    monkeypatch.delenv("IMAGE_PULL_AUTH", raising=False)
    b = make_backend("registry", host="127.0.0.1:1", repo="a", plain_http="false", scheme="http", password="123",
                     username="u", docker_config="false", timeout="2.5", retry_limit="0", insecure="yes")  # fmt: skip
    try:
        assert isinstance(b, RegistryBackend)
        opts = b.client.options
        assert opts.plain_http is False and opts.docker_config is False and opts.password == "123"
        assert b.retry_policy.attempts == 1
    finally:
        b.close()
    b = make_backend("registry", host="127.0.0.1:1", repo="a", plain_http="true", docker_config="false")
    try:
        assert b.url.startswith("http://")
    finally:
        b.close()
    local = make_backend("localfs", dir=str(tmp_path), max_open="3")
    assert isinstance(local, LocalBlobDir) and local.max_open == 3
    for kind, bad, msg in [
        ("registry", {"plain_http": "maybe"}, "option plain_http: expected true or false, got 'maybe'"),
        ("registry", {"retry_limit": "many"}, "option retry_limit: expected an integer, got 'many'"),
        ("registry", {"timeout": "soon"}, "option timeout: expected a number, got 'soon'"),
        ("localfs", {"max_open": "lots"}, "option max_open: expected an integer, got 'lots'"),
    ]:
        base = {"host": "h", "repo": "r"} if kind == "registry" else {"dir": str(tmp_path)}
        with pytest.raises(BackendError, match=re.escape(f"backend {kind}: {msg}")):
            make_backend(kind, **base, **bad)


def test_retry_after_and_backoff() -> None:
    assert parse_retry_after("3") == 3.0
    assert parse_retry_after("Fri, 27 Nov 2026 20:00:10 GMT", now=1795809600.0) == 10.0
    assert parse_retry_after("soon") is None and parse_retry_after(None) is None
    p = RetryPolicy(backoff=0.1, max_backoff=5)
    assert 0.1 <= p.delay(0, None) <= 0.11
    assert 0.4 <= p.delay(2, None) <= 0.44
    assert p.delay(0, 2.5) == 2.5
    assert p.delay(0, 60) == 5
    assert is_temp_failure(ConnectionResetError()) and is_temp_failure(TimeoutError())
    assert not is_temp_failure(BackendError("x")) and not is_temp_failure(ValueError())


def test_stats_are_thread_safe() -> None:
    s = BackendStats()

    def bump() -> None:
        for _ in range(10_000):
            s.add(requests=1, bytes=2)

    with ThreadPoolExecutor(4) as ex:
        for f in [ex.submit(bump) for _ in range(4)]:
            f.result()
    assert s.snapshot()["requests"] == 40_000 and s.bytes == 80_000


# --- http ----------------------------------------------------------------------------------------------------


class Sleeps(list[float]):
    """Records backoff sleeps instead of sleeping."""

    def __call__(self, seconds: float) -> None:
        self.append(seconds)


@pytest.fixture
def served(blob_dir: Path):
    blob_id, data = _blob(blob_dir, 1 << 20, seed=7)
    with Front(directory=blob_dir) as front:
        yield front, blob_id, data


def _http(front: Front, **options) -> HttpBackend:
    options.setdefault("sleep", Sleeps())
    return make_backend("http", url=front.url, **options)  # type: ignore[return-value]


@pytest.mark.network
def test_http_ranges_exact(served) -> None:
    front, blob_id, data = served
    with _http(front) as b:
        assert b.size(blob_id) == len(data)
        for off, n in _ranges(len(data), n=30):
            assert b.read(blob_id, off, n) == data[off : off + n]
        b.stats.reset()
        assert b.read(blob_id, 4096, 8192) == data[4096 : 4096 + 8192]
        expected = {"requests": 1, "bytes": 8192, "errors": 0, "retries": 0, "latency_count": 1}
        assert b.stats.snapshot().items() >= expected.items()


@pytest.mark.network
def test_http_errors_are_one_line(served) -> None:
    front, blob_id, data = served
    with _http(front) as b:
        missing = "ef" * 32
        with pytest.raises(BackendError, match="HTTP 404") as e:
            b.read(missing, 0, 10)
        _one_line(e.value, missing)
        with pytest.raises(BackendError, match="past the end of the blob"):
            b.read(blob_id, len(data) - 1, 2)  # size unknown yet: the server answers 206 with less
        with pytest.raises(BackendError, match="past the end of the blob"):
            b.read(blob_id, len(data), 1)  # size known now: refused before asking
        assert b.stats.retries == 0


@pytest.mark.network
def test_http_server_ignoring_range(served) -> None:
    front, blob_id, data = served
    with _http(front, max_discard=600_000) as b:
        front.inject("ignore_range")
        assert b.read(blob_id, 500_000, 1000) == data[500_000:501_000]
        assert b.stats.bytes == 501_000  # streamed and dropped up to the offset
        front.inject("ignore_range")
        with pytest.raises(BackendError, match="ignores Range"):
            b.read(blob_id, 700_000, 10)


@pytest.mark.network
@pytest.mark.parametrize("fault", ["drop", "truncate", "bad_range", "502", "503", "504", "429"])
def test_http_temporary_faults_are_retried(served, fault: str) -> None:
    front, blob_id, data = served
    with _http(front, retry_limit=2) as b:
        front.inject(fault, fault)
        assert b.read(blob_id, 1000, 200_000) == data[1000:201_000]
        assert 1 <= b.stats.retries <= 2
        assert not front.faults


@pytest.mark.network
def test_http_retry_exhaustion_and_terminal_status(served) -> None:
    front, blob_id, data = served
    sleeps = Sleeps()
    with _http(front, retry_limit=2, backoff=0.01, sleep=sleeps) as b:
        front.inject(*["503"] * 5)
        with pytest.raises(BackendError, match=r"HTTP 503 .*\(after 3 attempts\)") as e:
            b.read(blob_id, 0, 10)
        _one_line(e.value, blob_id)
        assert b.stats.retries == 2 and b.stats.errors == 1 and len(sleeps) == 2
        front.clear()
        front.inject("500")
        with pytest.raises(BackendError, match="HTTP 500"):
            b.read(blob_id, 0, 10)
        assert b.stats.retries == 2  # 500 is terminal (distribution spec)


@pytest.mark.network
def test_http_retry_after_is_honoured(blob_dir: Path) -> None:
    blob_id, data = _blob(blob_dir, 10_000)
    sleeps = Sleeps()
    with Front(directory=blob_dir, retry_after="3") as front, _http(front, sleep=sleeps, backoff=0.01) as b:
        front.inject("503", "429")
        assert b.read(blob_id, 0, 100) == data[:100]
        assert sleeps == [3.0, 3.0]


@pytest.mark.network
def test_http_timeout_is_retried(blob_dir: Path) -> None:
    blob_id, data = _blob(blob_dir, 10_000)
    with Front(directory=blob_dir, stall=5.0) as front, _http(front, timeout=0.5) as b:
        front.inject("stall")
        assert b.read(blob_id, 10, 100) == data[10:110]
        assert b.stats.retries >= 1  # a loaded machine may time out a healthy request too


@pytest.mark.network
def test_http_whole_blob_digest_checked(served) -> None:
    front, blob_id, data = served
    with _http(front, retry_limit=1) as b:
        front.inject("corrupt")
        assert b.read(blob_id, 0, len(data)) == data  # corrupted once, retried
        front.inject("corrupt", "corrupt")
        with pytest.raises(BackendError, match="sha256 mismatch"):
            b.read(blob_id, 0, len(data))


@pytest.mark.network
def test_http_concurrent_reads_share_the_pool(served) -> None:
    front, blob_id, data = served
    with _http(front, pool_size=4) as b:
        ranges = _ranges(len(data), n=200, seed=3)
        with ThreadPoolExecutor(8) as ex:
            results = list(ex.map(lambda r: b.read(blob_id, *r), ranges))
        assert all(got == data[o : o + n] for got, (o, n) in zip(results, ranges, strict=True))
        assert b.stats.errors == 0 and b.stats.bytes == sum(n for _, n in ranges)


@pytest.mark.network
def test_http_connection_refused(blob_dir: Path) -> None:
    from tests.support.registry import free_port

    sleeps = Sleeps()
    with HttpBackend(f"http://127.0.0.1:{free_port()}", retry_limit=2, sleep=sleeps) as b:
        with pytest.raises(BackendError, match=r"Connection refused.*\(after 3 attempts\)") as e:
            b.read("ab" * 32, 0, 10)
        _one_line(e.value)
        assert len(sleeps) == 2

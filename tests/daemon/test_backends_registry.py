"""The registry backend and push helpers against a real ``docker-registry`` on 127.0.0.1; auth, redirects and
faults come from :class:`registry.Front` standing in front of it."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import random
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from cachefilesd_py.backends import BlobBackend, make_backend
from cachefilesd_py.backends.registry import (
    RegistryBackend,
    RegistryClient,
    RegistryOptions,
    image_manifest,
    push_blob,
    push_manifest,
)
from erofs.errors import BackendError
from tests.support.registry import (
    TEST_PASSWORD,
    TEST_USER,
    Front,
    RegistryServer,
    push_test_blob,
)

pytestmark = [pytest.mark.network, pytest.mark.tools("docker-registry")]

REPO = "test/blobs"
SIZE = 3 << 20


class Sleeps(list[float]):
    def __call__(self, seconds: float) -> None:
        self.append(seconds)


@pytest.fixture(scope="module")
def pushed(registry_server: RegistryServer, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, bytes]:
    data = random.Random(42).randbytes(SIZE)
    blob_id = push_test_blob(registry_server, REPO, data, tmp_path_factory.mktemp("push"), chunk_size=1 << 20)
    assert blob_id == hashlib.sha256(data).hexdigest()
    return blob_id, data


def _backend(host: str, **options) -> RegistryBackend:
    options.setdefault("sleep", Sleeps())
    options.setdefault("docker_config", False)
    options.setdefault("repo", REPO)
    return make_backend("registry", host=host, plain_http=True, **options)  # type: ignore[return-value]


def _ranges(size: int, n: int, seed: int) -> list[tuple[int, int]]:
    rnd = random.Random(seed)
    out = [(0, 1), (size - 1, 1), (0, size), (size - 4096, 4096)]
    for _ in range(n):
        off = rnd.randrange(size)
        out.append((off, rnd.randrange(1, min(size - off, 1 << 20) + 1)))
    return out


# --- reads from the real registry -------------------------------------------------------------------------


def test_ranged_reads_exact(registry_server: RegistryServer, pushed: tuple[str, bytes]) -> None:
    blob_id, data = pushed
    with _backend(registry_server.host) as b:
        assert isinstance(b, BlobBackend)
        assert b.size(blob_id) == SIZE
        for off, n in _ranges(SIZE, 40, seed=1):
            assert b.read(blob_id, off, n) == data[off : off + n]


def test_partial_read_fetches_only_the_range(registry_server: RegistryServer, pushed: tuple[str, bytes]) -> None:
    blob_id, data = pushed
    with _backend(registry_server.host) as b:
        assert b.read(blob_id, 123_456, 65_536) == data[123_456 : 123_456 + 65_536]
        expected = {"requests": 1, "bytes": 65_536, "errors": 0, "retries": 0, "latency_count": 1}
        assert b.stats.snapshot().items() >= expected.items()


def test_url_host_form_and_scheme(registry_server: RegistryServer, pushed: tuple[str, bytes]) -> None:
    blob_id, data = pushed
    with RegistryBackend(registry_server.url, REPO, docker_config=False) as b:  # scheme from the URL
        assert b.read(blob_id, 7, 7) == data[7:14]


def test_missing_blob_wrong_repo_past_end(registry_server: RegistryServer, pushed: tuple[str, bytes]) -> None:
    blob_id, data = pushed
    with _backend(registry_server.host) as b:
        missing = "12" * 32
        for call in (lambda: b.read(missing, 0, 10), lambda: b.size(missing)):
            with pytest.raises(BackendError, match="404") as e:
                call()
            assert "\n" not in str(e.value) and missing in str(e.value)
        with pytest.raises(BackendError, match="past the end of the blob"):
            b.read(blob_id, SIZE - 10, 11)
        with pytest.raises(BackendError, match="past the end of the blob"):
            b.read(blob_id, SIZE, 1)
        with pytest.raises(BackendError, match="not 64 lowercase hex"):
            b.read("sha256:" + blob_id, 0, 1)
        assert b.stats.retries == 0
    with _backend(registry_server.host, repo="other/repo") as b:
        with pytest.raises(BackendError, match="BLOB_UNKNOWN") as e:
            b.read(blob_id, 0, 10)
        assert str(e.value).startswith(f"blob {blob_id}: ")


def test_concurrent_reads(registry_server: RegistryServer, pushed: tuple[str, bytes]) -> None:
    blob_id, data = pushed
    ranges = _ranges(SIZE, 100, seed=2)
    with _backend(registry_server.host, pool_size=4) as b:
        with ThreadPoolExecutor(8) as ex:
            results = list(ex.map(lambda r: b.read(blob_id, *r), ranges))
        for got, (off, n) in zip(results, ranges, strict=True):
            assert got == data[off : off + n]
        assert b.stats.errors == 0 and b.stats.retries == 0


def test_push_small_chunks_empty_and_manifest(registry_server: RegistryServer, tmp_path: Path) -> None:
    data = random.Random(5).randbytes(200_001)
    path = tmp_path / "b"
    path.write_bytes(data)
    digest = push_blob(registry_server.host, "test/push", path, chunk_size=65_536, plain_http=True, docker_config=False)
    assert digest == "sha256:" + hashlib.sha256(data).hexdigest()
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    empty_digest = push_blob(registry_server.host, "test/push", empty, plain_http=True, docker_config=False)
    assert empty_digest == "sha256:" + hashlib.sha256(b"").hexdigest()
    with _backend(registry_server.host, repo="test/push") as b:
        assert b.size(digest[7:]) == len(data)
        assert b.read(digest[7:], 0, len(data)) == data
        assert b.size(empty_digest[7:]) == 0
        assert b.read(empty_digest[7:], 0, 0) == b""
    config = tmp_path / "config.json"
    config.write_bytes(b"{}")
    config_digest = push_blob(registry_server.host, "test/push", config, plain_http=True, docker_config=False)
    manifest = image_manifest((config_digest, 2), [(digest, len(data), "application/vnd.oci.image.layer.v1.tar")])
    mdigest = push_manifest(registry_server.host, "test/push", "v1", manifest, plain_http=True, docker_config=False)
    client = RegistryClient(RegistryOptions(registry_server.host, "test/push", plain_http=True, docker_config=False))
    resp = client.request("GET", client.url("manifests/v1"), {"Accept": manifest["mediaType"]})
    assert resp.status == 200 and resp.header("Docker-Content-Digest") == mdigest
    assert json.loads(resp.text(1 << 16))["layers"][0]["digest"] == digest
    client.transport.close()


def test_push_missing_file(registry_server: RegistryServer, tmp_path: Path) -> None:
    with pytest.raises(BackendError, match="nope: No such file"):
        push_blob(registry_server.host, "test/push", tmp_path / "nope", plain_http=True, docker_config=False)


def test_registry_process_is_gone_after_stop(tmp_path: Path) -> None:
    reg = RegistryServer(tmp_path).start()
    proc = reg.proc
    assert proc is not None and proc.poll() is None
    reg.stop()
    assert proc.poll() is not None


# --- Basic auth: the real registry's htpasswd -----------------------------------------------------------


@pytest.fixture(scope="module")
def auth_pushed(auth_registry_server: RegistryServer, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, bytes]:
    data = random.Random(9).randbytes(100_000)
    blob_id = push_test_blob(
        auth_registry_server, REPO, data, tmp_path_factory.mktemp("push-auth"), auth=f"{TEST_USER}:{TEST_PASSWORD}"
    )
    return blob_id, data


def test_basic_auth_forms(auth_registry_server: RegistryServer, auth_pushed, tmp_path: Path, monkeypatch) -> None:
    blob_id, data = auth_pushed
    host = auth_registry_server.host
    b64 = base64.b64encode(f"{TEST_USER}:{TEST_PASSWORD}".encode()).decode()
    for options in (
        {"auth": f"{TEST_USER}:{TEST_PASSWORD}"},
        {"auth": b64},
        {"username": TEST_USER, "password": TEST_PASSWORD},
    ):
        with _backend(host, **options) as b:
            assert b.read(blob_id, 10, 100) == data[10:110]
            assert b.read(blob_id, 0, 10) == data[:10]
            assert b.stats.requests == 3  # one 401 challenge, then Basic straight away
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps({"auths": {f"http://{host}": {"auth": b64}, "other.example:5000": {"auth": "eDp5"}}}))
    with _backend(host, docker_config=cfg) as b:
        assert b.size(blob_id) == len(data)
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path))
    with _backend(host, docker_config=None) as b:
        assert b.read(blob_id, 0, 5) == data[:5]
    monkeypatch.delenv("DOCKER_CONFIG")
    monkeypatch.setenv("IMAGE_PULL_AUTH", b64)
    with _backend(host, auth="wrong:creds") as b:
        assert b.read(blob_id, 0, 5) == data[:5]


def test_basic_auth_failures(auth_registry_server: RegistryServer, auth_pushed) -> None:
    blob_id, _ = auth_pushed
    with _backend(auth_registry_server.host) as b:
        with pytest.raises(BackendError, match="needs credentials") as e:
            b.read(blob_id, 0, 1)
        assert "\n" not in str(e.value)
    with _backend(auth_registry_server.host, auth=f"{TEST_USER}:wrong") as b:
        with pytest.raises(BackendError, match="refused"):
            b.read(blob_id, 0, 1)
        assert b.stats.retries == 0
    with pytest.raises(BackendError, match="neither user:password nor base64"):
        _backend(auth_registry_server.host, auth="!!!")


# --- Bearer: a token front on the real registry -----------------------------------------------------------


def test_bearer_token_flow(registry_server: RegistryServer, pushed) -> None:
    blob_id, data = pushed
    creds = (TEST_USER, TEST_PASSWORD)
    with Front(upstream=registry_server.url, auth="bearer", credentials=creds) as front:
        with _backend(front.host, auth=":".join(creds)) as b:
            for off, n in _ranges(SIZE, 10, seed=4):
                assert b.read(blob_id, off, n) == data[off : off + n]
            assert b.size(blob_id) == SIZE
            assert front.tokens_issued == 1  # cached for the scope
            assert front.token_scopes == [f"repository:{REPO}:pull"]
            front.revoke_tokens()  # the registry forgets it: 401, fetch a new one, retry
            assert b.read(blob_id, 5, 5) == data[5:10]
            assert front.tokens_issued == 2 and b.stats.errors == 0
        with _backend(front.host, auth=f"{TEST_USER}:wrong") as b:
            with pytest.raises(BackendError, match="token service .* refused"):
                b.read(blob_id, 0, 1)
        with _backend(front.host, token="not-a-valid-token") as b:
            with pytest.raises(BackendError, match="refused"):
                b.read(blob_id, 0, 1)


def test_bearer_anonymous_token_and_push(registry_server: RegistryServer, tmp_path: Path) -> None:
    with Front(upstream=registry_server.url, auth="bearer") as front:
        path = tmp_path / "blob"
        data = random.Random(11).randbytes(70_000)
        path.write_bytes(data)
        digest = push_blob(front.host, "test/bearer", path, chunk_size=32_768, plain_http=True, docker_config=False)
        assert "repository:test/bearer:pull,push" in front.token_scopes
        with _backend(front.host, repo="test/bearer") as b:
            assert b.read(digest[7:], 0, len(data)) == data


# --- redirects --------------------------------------------------------------------------------------------


def test_redirect_followed_cached_and_evicted(registry_server: RegistryServer, pushed) -> None:
    blob_id, data = pushed
    with (
        Front(upstream=registry_server.url) as store,
        Front(upstream=registry_server.url, auth="bearer", redirect_to=store.url) as front,
    ):
        with _backend(front.host) as b:
            assert b.read(blob_id, 0, 100) == data[:100]
            assert b.read(blob_id, 100, 100) == data[100:200]
            assert front.blob_requests() == 2  # anonymous try (401), then with the token: 307
            assert store.blob_requests() == 2  # the second read went straight to the cached URL
            assert store.with_authorization == []  # registry credentials never reach another host
            store.inject("403")  # the "pre-signed URL" expired: evict, ask the registry again
            assert b.read(blob_id, 200, 100) == data[200:300]
            assert front.blob_requests() == 3 and store.blob_requests() == 4
            assert b.stats.retries == 0


# --- faults between the backend and the real registry ---------------------------------------------------


@pytest.fixture(scope="module")
def faulty(registry_server: RegistryServer):
    with Front(upstream=registry_server.url, retry_after="2") as front:
        yield front


@pytest.mark.parametrize("fault", ["drop", "truncate", "bad_range", "502", "503", "504", "429", "ignore_range"])
def test_faults_recovered(faulty: Front, pushed, fault: str) -> None:
    blob_id, data = pushed
    faulty.clear()
    sleeps = Sleeps()
    with _backend(faulty.host, retry_limit=3, sleep=sleeps) as b:
        faulty.inject(*([fault] if fault == "ignore_range" else [fault, fault]))  # a 200 is not a failure
        assert b.read(blob_id, 1_000_000, 1 << 20) == data[1_000_000 : 1_000_000 + (1 << 20)]
        assert not faulty.faults
        if fault in ("503", "429"):
            assert sleeps and all(s >= 2 for s in sleeps)  # Retry-After: 2
        if fault == "ignore_range":
            assert b.stats.retries == 0 and b.stats.bytes == 1_000_000 + (1 << 20)  # skipped + wanted


def test_faults_exhausted(faulty: Front, pushed) -> None:
    blob_id, _ = pushed
    faulty.clear()
    with _backend(faulty.host, retry_limit=2, max_backoff=0.5) as b:
        faulty.inject(*["503"] * 3)
        with pytest.raises(BackendError, match=r"HTTP 503.*after 3 attempts") as e:
            b.read(blob_id, 0, 10)
        assert str(e.value).startswith(f"blob {blob_id}: ") and "\n" not in str(e.value)
        faulty.inject(*["truncate"] * 3)
        with pytest.raises(BackendError, match="truncated"):
            b.read(blob_id, 0, 1 << 20)
        faulty.inject("500")
        with pytest.raises(BackendError, match="HTTP 500"):
            b.read(blob_id, 0, 10)
        assert b.stats.retries == 4 and b.stats.errors == 3


def test_corruption(faulty: Front, pushed) -> None:
    blob_id, data = pushed
    faulty.clear()
    with _backend(faulty.host, retry_limit=1) as b:
        faulty.inject("corrupt")
        assert b.read(blob_id, 0, 1000) != data[:1000]  # a part: only chunk digests can tell (the reader's job)
        faulty.inject("corrupt")
        assert b.read(blob_id, 0, SIZE) == data  # the whole blob is checked against its id, and re-fetched
        faulty.inject("corrupt", "corrupt")
        with pytest.raises(BackendError, match="sha256 mismatch"):
            b.read(blob_id, 0, SIZE)


def test_timeout(registry_server: RegistryServer, pushed) -> None:
    blob_id, data = pushed
    with Front(upstream=registry_server.url, stall=5.0) as front, _backend(front.host, timeout=0.5) as b:
        front.inject("stall")
        assert b.read(blob_id, 0, 10) == data[:10]
        assert b.stats.retries >= 1
        front.inject("stall", "stall")
        with _backend(front.host, timeout=0.5, retry_limit=1) as b2, pytest.raises(BackendError, match="timed out"):
            b2.read(blob_id, 0, 10)


def test_docker_credential_helper(
    auth_registry_server: RegistryServer, auth_pushed, tmp_path: Path, monkeypatch
) -> None:
    blob_id, data = auth_pushed
    host = auth_registry_server.host
    helper = tmp_path / "bin" / "docker-credential-testhelper"
    helper.parent.mkdir()
    helper.write_text(
        "#!/bin/sh\nread host\n"
        f'[ "$host" = "{host}" ] || {{ echo "credentials not found" >&2; exit 1; }}\n'
        f'echo \'{{"ServerURL": "{host}", "Username": "{TEST_USER}", "Secret": "{TEST_PASSWORD}"}}\'\n'
    )
    helper.chmod(0o755)
    monkeypatch.setenv("PATH", f"{helper.parent}:{os.environ['PATH']}")
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps({"auths": {}, "credHelpers": {host: "testhelper"}}))
    with _backend(host, docker_config=cfg) as b:
        assert b.read(blob_id, 3, 4) == data[3:7]
    cfg.write_text(json.dumps({"credsStore": "testhelper"}))
    with _backend(host, docker_config=cfg) as b:
        assert b.size(blob_id) == len(data)


def test_bearer_concurrent_first_reads_fetch_one_token(registry_server: RegistryServer, pushed) -> None:
    blob_id, data = pushed
    with Front(upstream=registry_server.url, auth="bearer") as front, _backend(front.host) as b:
        ranges = _ranges(SIZE, 16, seed=8)
        with ThreadPoolExecutor(8) as ex:
            results = list(ex.map(lambda r: b.read(blob_id, *r), ranges))
        assert all(got == data[o : o + n] for got, (o, n) in zip(results, ranges, strict=True))
        assert front.tokens_issued == 1


def test_bearer_token_refreshed_before_expiry(registry_server: RegistryServer, pushed) -> None:
    blob_id, data = pushed
    scope = f"repository:{REPO}:pull"
    with Front(upstream=registry_server.url, auth="bearer", token_lifetime=30) as front, _backend(front.host) as b:
        assert b.read(blob_id, 0, 10) == data[:10]
        tokens = b.client.auth._tokens
        token, expiry = tokens[scope]
        assert 14 < expiry - time.monotonic() <= 15  # 30 s lifetime, refreshed half of it (at most 20 s) early
        tokens[scope] = (token, time.monotonic() - 1)  # as if 20 s had passed
        front.clear()
        assert b.read(blob_id, 10, 10) == data[10:20]
        assert front.tokens_issued == 2
        assert [p for _, p in front.requests if "/token" not in p] == [f"/v2/{REPO}/blobs/sha256:{blob_id}"]

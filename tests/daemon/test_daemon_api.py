"""cachefilesd-py's API on the host (the daemon against a fake device, as in test_daemon_service): every field
present and moving as READs are served, the Prometheus text, peer credentials, malformed requests, no
credentials in answers.  (GC culls through /dev/cachefiles: tests/vm/test_ops_api.py.)"""

from __future__ import annotations

import json
import os
import stat
import subprocess
from pathlib import Path

from cachefilesd_py.api import ApiServer, get, listen, request
from fscache.cachefiles import CloseRequest, OpenRequest, ReadRequest
from tests.daemon.conftest import ApiServed
from tests.daemon.test_daemon_service import TIMEOUT, _anon_fd
from tests.support.api_clients import NOBODY_CLIENT, as_nobody, malformed_requests, prometheus_samples, send_raw
from tests.support.cli import run

SECRET = "s3cret-token-do-not-echo"


def ctl(*args: str) -> subprocess.CompletedProcess[str]:
    return run("ctl", *args, timeout=120)


def _read(s: ApiServed, msg: int, offset: int) -> None:
    reads = s.daemon.counters.snapshot()["reads"]
    s.dev.push(ReadRequest(msg, 11, offset, 4096))
    assert s.daemon.counters.wait_for(lambda c: c["reads"] == reads + 1, TIMEOUT)


def test_every_field_present_and_moving(api_served: ApiServed) -> None:
    s = api_served
    blob = s.out["blobs"][0]["id"]
    info = get(s.sock, "/api/v1/daemon")
    assert info["version"] and info["pid"] == os.getpid() and info["state"] == "RUNNING" and info["mode"] == "fscache"
    assert info["uptime"] >= 0
    s.dev.push(OpenRequest(1, 10, "erofs,img", "img", _anon_fd(s.tmp / "boot.cache"), 0))
    s.dev.push(OpenRequest(2, 11, "erofs,img", blob, _anon_fd(s.tmp / "blob.cache"), 0))
    _read(s, 3, 0)
    before = get(s.sock, "/api/v1/metrics")
    assert set(before) == {"daemon", "backend", "pipeline", "cache", "inflight", "images", "blobs"}
    assert before["blobs"][blob]["image"] == "img" and before["blobs"][blob]["size"] == s.out["blobs"][0][
        "uncompressed_size"]  # fmt: skip
    assert before["images"]["img"]["blobs"] == [blob] and before["inflight"] == 0
    _read(s, 4, 65536)  # the next chunk: fetched
    after = get(s.sock, "/api/v1/metrics")
    for key in ("requests", "bytes", "latency_count", "latency_le_10s"):
        assert after["backend"][key] > before["backend"][key], key
        assert after["images"]["img"]["backend"][key] > before["images"]["img"]["backend"][key], key
    assert after["backend"]["errors"] == after["backend"]["retries"] == 0
    for key in ("fills", "chunks_fetched", "bytes_fetched", "chunks_written"):
        assert after["pipeline"][key] > before["pipeline"][key], key
        assert after["blobs"][blob]["pipeline"][key] > before["blobs"][blob]["pipeline"][key], key  # per blob
    assert after["pipeline"]["digest_failures"] == after["blobs"][blob]["pipeline"]["digest_failures"] == 0
    assert after["cache"]["misses"] == before["cache"]["misses"] + 1
    _read(s, 5, 65536)  # the same chunk again: written already (a hit)
    again = get(s.sock, "/api/v1/metrics")
    assert again["cache"]["hits"] == after["cache"]["hits"] + 1
    assert again["daemon"]["uptime"] >= after["daemon"]["uptime"] >= before["daemon"]["uptime"]
    s.dev.push(CloseRequest(6, 10))
    s.dev.push(CloseRequest(7, 11))


def test_prometheus_text_parses_and_matches_the_json(api_served: ApiServed) -> None:
    s = api_served
    blob = s.out["blobs"][0]["id"]
    s.dev.push(OpenRequest(1, 11, "erofs,img", blob, _anon_fd(s.tmp / "blob.cache"), 0))
    _read(s, 2, 0)
    status, answer = request(s.sock, "GET", "/metrics")
    assert status == 200
    samples = prometheus_samples(answer["text"])
    snap = get(s.sock, "/api/v1/metrics")
    assert all(name.startswith("nydus_erofs_") for name, _ in samples)
    image = (("image", "img"),)
    assert samples[("nydus_erofs_backend_bytes_total", image)] == snap["backend"]["bytes"]
    assert samples[("nydus_erofs_backend_latency_seconds_count", image)] == snap["backend"]["latency_count"]
    assert samples[("nydus_erofs_fills_total", ())] == snap["pipeline"]["fills"] >= 1
    assert samples[("nydus_erofs_cache_misses_total", ())] == 1
    assert samples[("nydus_erofs_blob_size_bytes", (("blob", blob), ("image", "img")))] > 0
    assert samples[("nydus_erofs_daemon_info", (("mode", "fscache"), ("version", snap["daemon"]["version"])))] == 1
    s.dev.push(CloseRequest(3, 11))


def test_the_socket_is_root_s_and_other_users_are_refused(api_served: ApiServed) -> None:
    s = api_served
    st = os.stat(s.sock)
    assert stat.S_IMODE(st.st_mode) == 0o600 and st.st_uid == 0
    denied = as_nobody(s.sock.parent, s.sock.name, *NOBODY_CLIENT, s.sock.name)
    assert denied.returncode != 0 and "PermissionError" in denied.stderr  # the socket's mode
    os.chmod(s.sock, 0o666)  # were it open to all, the peer's credentials still keep others out
    refused = as_nobody(s.sock.parent, s.sock.name, *NOBODY_CLIENT, s.sock.name)
    assert refused.returncode == 0 and refused.stdout.strip() == "403", refused.stderr
    assert get(s.sock, "/api/v1/daemon")["state"] == "RUNNING"


def test_a_thousand_malformed_requests_leave_it_serving(api_served: ApiServed) -> None:
    statuses = [send_raw(api_served.sock, data) for data in malformed_requests(1000)]
    assert all(st is None or 400 <= st < 500 for st in statuses), sorted({st for st in statuses if st})
    assert sum(st is not None for st in statuses) > 900  # answered, not just dropped
    assert get(api_served.sock, "/api/v1/daemon")["state"] == "RUNNING"
    assert request(api_served.sock, "PUT", "/api/v1/images/x", {"bootstrap": "x" * (70 << 10)})[0] == 413


def test_no_credentials_in_answers(api_served: ApiServed) -> None:
    s = api_served
    boot = str(s.tmp / "images" / "img" / "image.boot")
    backend = {"type": "registry", "config": {"host": "127.0.0.1:9", "repo": "x/y", "auth": f"user:{SECRET}",
                                              "plain_http": True}}  # fmt: skip
    status, answer = request(s.sock, "PUT", "/api/v1/images/two", {"bootstrap": boot, "backend": backend})
    assert status == 200, answer
    assert SECRET in (s.tmp / "images" / "two" / "binding.json").read_text()  # kept, to fetch with
    for path in ("/api/v1/daemon", "/api/v1/images", "/api/v1/images/two", "/api/v1/metrics", "/metrics",
                 "/api/v1/metrics/backend", "/api/v1/metrics/blobcache"):  # fmt: skip
        st, body = request(s.sock, "GET", path)
        assert st == 200 and SECRET not in json.dumps(body) and "user:" not in json.dumps(body), path


def test_ctl_tables_and_json(api_served: ApiServed) -> None:
    sock = str(api_served.sock)
    info = ctl("--sock", sock, "info")
    rows = dict(line.split(None, 1) for line in info.stdout.splitlines())
    assert info.returncode == 0 and rows["mode"] == "fscache" and rows["state"] == "RUNNING" and rows["version"]
    assert json.loads(ctl("--sock", sock, "--json", "info").stdout)["mode"] == "fscache"
    assert json.loads(ctl("--sock", sock, "info", "--json").stdout)["state"] == "RUNNING"
    images = ctl("--sock", sock, "images").stdout.splitlines()
    assert images[0].split() == ["IMAGE", "BACKEND", "BLOBS"] and images[1].split() == ["img", "-", "-"]
    metrics = ctl("--sock", sock, "metrics")
    assert metrics.returncode == 0 and metrics.stdout.startswith("backend ") and "BLOB" not in metrics.stdout
    assert set(json.loads(ctl("--sock", sock, "metrics", "--json").stdout)) >= {"backend", "cache", "pipeline"}
    prom = ctl("--sock", sock, "metrics", "--prometheus")
    assert prom.returncode == 0 and "nydus_erofs_daemon_info{" in prom.stdout
    gc = ctl("--sock", sock, "gc")  # nothing in the cache dir: nothing culled
    assert gc.returncode == 0 and gc.stdout == "0 files removed, 0 B freed\n", gc.stderr


def test_a_socket_path_longer_than_a_socket_address_is_served(tmp_path: Path) -> None:
    """A deep run dir (a socket path over sun_path's 107 bytes) still gets its API, and clients reach it."""
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    deep.mkdir(parents=True)
    path = deep / "api.sock"
    assert len(str(path)) > 108
    sock = listen(path)
    server = ApiServer(sock, {"/api/v1/daemon": lambda: {"state": "RUNNING"}}).start()
    try:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert get(path, "/api/v1/daemon") == {"state": "RUNNING"}
    finally:
        server.stop()
        sock.close()

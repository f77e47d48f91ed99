"""cachefilesd-py's API with /dev/cachefiles: every field present and moving as mounts read, the Prometheus
text, malformed requests, and ``nydus-erofs ctl gc``: an unbound image's blob objects are culled (gone from the
cache, the graveyard emptied), the other image's stay and it still reads right, and a new daemon gets ready
afterwards.  (Other users refused: tests/daemon/test_daemon_api.py.)"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from cachefilesd_py.api import request
from tests.support.api_clients import malformed_requests, prometheus_samples, send_raw
from tests.vm.test_daemon import NYDUS_EROFS, DaemonProc, build, mounted, scratch, sha256_file

pytestmark = pytest.mark.kernel("cachefiles")


def ctl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(NYDUS_EROFS), "ctl", *args], capture_output=True, text=True, timeout=300, check=False)


def _objects(cache: Path) -> set[str]:
    """The blob ids of the kernel's cache objects (``cache/I<volume>/@<fan>/D<blob id>``)."""
    return {p.name[1:] for p in cache.glob("cache/I*/@*/D*") if len(p.name) == 65}


def test_api_and_gc_with_the_kernel_cache() -> None:
    base = scratch() / "ops"
    d = DaemonProc(base).start()
    try:
        blobs, sums = {}, {}
        for fsid in ("one", "two"):
            src = base / "src" / fsid
            src.mkdir(parents=True, exist_ok=True)
            (src / "f").write_bytes(os.urandom(3 << 20))
            sums[fsid] = sha256_file(src / "f")
            blobs[fsid] = build(d.images / fsid, src, compressor="lz4_block", chunk_size="64KiB")["blobs"][0]["id"]
        sock = str(d.api_sock)
        info = d.api("/api/v1/daemon")
        assert info["mode"] == "fscache" and info["state"] == "RUNNING" and info["version"] and info["uptime"] >= 0
        before = d.api("/api/v1/metrics")
        for fsid in ("one", "two"):
            with mounted(fsid) as mnt:
                assert sha256_file(mnt / "f") == sums[fsid]
        after = d.api("/api/v1/metrics")
        for key in ("requests", "bytes", "latency_count"):
            assert after["backend"][key] > before["backend"][key], key
        for key in ("fills", "chunks_fetched", "chunks_written"):
            assert after["pipeline"][key] > before["pipeline"][key], key
        assert after["cache"]["misses"] > before["cache"]["misses"] and after["inflight"] == 0
        assert after["pipeline"]["digest_failures"] == 0
        assert {b: after["blobs"][b]["image"] for b in after["blobs"]} == {blobs["one"]: "one", blobs["two"]: "two"}
        status, text = request(sock, "GET", "/metrics")
        samples = prometheus_samples(text["text"])
        assert status == 200 and samples[("nydus_erofs_backend_bytes_total", (("image", "one"),))] > 0
        statuses = [send_raw(sock, data) for data in malformed_requests(1000)]
        assert all(st is None or 400 <= st < 500 for st in statuses), sorted({st for st in statuses if st})
        assert _objects(d.cache) == set(blobs.values())
        # unbind one: gc culls its blob's object, nothing of two's, and empties the graveyard
        assert request(sock, "DELETE", "/api/v1/images/one")[0] == 200
        got = ctl("--sock", sock, "gc", "--json")
        assert got.returncode == 0, got.stderr
        answer = json.loads(got.stdout)
        assert answer["removed"] == [blobs["one"]] and answer["skipped"] == [], answer
        assert answer["freed_bytes"] > 0, answer
        assert _objects(d.cache) == {blobs["two"]}
        assert list((d.cache / "graveyard").iterdir()) == []
        with mounted("two") as mnt:
            assert sha256_file(mnt / "f") == sums["two"]
        again = json.loads(ctl("--sock", sock, "gc", "--json").stdout)
        assert again["removed"] == [] and again["freed_bytes"] == 0, again
        assert _objects(d.cache) == {blobs["two"]}
    finally:
        rc = d.stop()
    assert rc == 0, d.log_text()
    # a new daemon after a gc that culled gets ready and serves
    d = DaemonProc(base).start()
    try:
        with mounted("two") as mnt:
            assert sha256_file(mnt / "f") == sums["two"]
    finally:
        rc = d.stop()
    assert rc == 0, d.log_text()

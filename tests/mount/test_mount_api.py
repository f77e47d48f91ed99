"""The API of a fanotify mount's daemon and ``nydus-erofs ctl`` on it: every field present and moving as reads
happen, the Prometheus text, the socket across a worker's death, other users refused, malformed requests, and
``ctl gc --cache-dir`` after an umount."""

from __future__ import annotations

import json
import os
import random
import stat
import subprocess
from pathlib import Path
from typing import Any

import pytest

from cachefilesd_py.api import get, request
from cachefilesd_py.mount.record import api_path, read_record
from tests.mount.test_fanotify_mount import Mounts, _in_thread, _kill_worker, build
from tests.support.api_clients import NOBODY_CLIENT, as_nobody, malformed_requests, prometheus_samples, send_raw
from tests.support.cli import run

pytestmark = pytest.mark.kernel("erofs", "fanotify")

QUIET = {"prefetch": False, "readahead": 0, "amplify": 0}  # every chunk read is one fill, nothing ahead


@pytest.fixture(scope="module")
def two_images(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Two images with different blobs: files a and b of 512 KiB each (64 KiB chunks, lz4)."""
    out = []
    for n, name in enumerate(("one", "two")):
        base = tmp_path_factory.mktemp(name)
        src = base / "src"
        src.mkdir()
        rnd = random.Random(n)
        for f in ("a", "b"):
            (src / f).write_bytes(rnd.randbytes(512 << 10))
        build([src], base / "out", "lz4_block", "64KiB")
        out.append(base / "out")
    return out[0], out[1]


def ctl(*args: str) -> subprocess.CompletedProcess[str]:
    return run("ctl", *args, timeout=120)


def _first_page(path: Path, offset: int) -> bytes:
    with path.open("rb") as f:
        f.seek(offset)
        return f.read(4096)


def test_every_field_present_and_moving(mounts: Mounts, two_images: tuple[Path, Path]) -> None:
    out = two_images[0]
    mp, rec = mounts.mount(out, "f", **QUIET)
    sock = rec["api_sock"]
    assert sock == str(api_path(mp)) == read_record(mp)["api_sock"]
    st = os.stat(sock)
    assert stat.S_IMODE(st.st_mode) == 0o600 and st.st_uid == 0
    info = get(sock, "/api/v1/daemon")
    assert info["version"] and info["mode"] == "fanotify" and info["state"] == "RUNNING" and info["uptime"] >= 0
    assert info["pid"] == rec["worker_pid"] and info["supervisor_pid"] == rec["pid"] and info["restarts"] == 0
    blobs = read_record(mp)["blobs"]
    images = get(sock, "/api/v1/images")["images"]
    assert images == [{"id": str(mp), "mountpoint": str(mp), "boot": str(out / "image.boot"), "mode": "fanotify",
                       "backend": "localfs", "blobs": blobs}]  # fmt: skip
    before = get(sock, "/api/v1/metrics")
    assert set(before) == {"daemon", "backend", "pipeline", "cache", "inflight", "images", "blobs"}
    # nothing fetched: only the blob's zero prefix, which no chunk covers, counts as there
    assert before["blobs"][blobs[0]]["cached"] == 4096 and before["inflight"] == 0
    _in_thread(lambda: _first_page(mp / "a", 0))
    after = get(sock, "/api/v1/metrics")
    for key in ("requests", "bytes", "latency_count"):
        assert after["backend"][key] > before["backend"][key], key
        assert after["images"][str(mp)]["backend"][key] > before["images"][str(mp)]["backend"][key], key
    for key in ("fills", "chunks_fetched", "bytes_fetched", "chunks_written"):
        assert after["pipeline"][key] > before["pipeline"][key], key
    assert after["cache"]["misses"] > before["cache"]["misses"]
    assert after["blobs"][blobs[0]]["cached"] >= 64 << 10
    for key in ("fills", "chunks_fetched", "bytes_fetched", "chunks_written"):  # per blob too
        assert after["blobs"][blobs[0]]["pipeline"][key] > before["blobs"][blobs[0]]["pipeline"][key], key
    assert after["blobs"][blobs[0]]["pipeline"]["digest_failures"] == 0
    assert after["pipeline"]["digest_failures"] == after["backend"]["errors"] == 0
    # the page cache forgets the file: its pages are read again, from the cache file (a hit)
    fd = os.open(mp / "a", os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    _in_thread(lambda: _first_page(mp / "a", 0))
    again = get(sock, "/api/v1/metrics")
    assert again["cache"]["hits"] > after["cache"]["hits"]
    assert again["pipeline"]["chunks_fetched"] == after["pipeline"]["chunks_fetched"]
    assert again["daemon"]["uptime"] >= after["daemon"]["uptime"]
    # the Prometheus text: parses, and says what the JSON says
    status, text = request(sock, "GET", "/metrics")
    assert status == 200
    samples = prometheus_samples(text["text"])
    snap = get(sock, "/api/v1/metrics")
    image = (("image", str(mp)),)
    assert samples[("nydus_erofs_backend_bytes_total", image)] == snap["backend"]["bytes"]
    assert samples[("nydus_erofs_backend_requests_total", image)] == snap["backend"]["requests"]
    assert samples[("nydus_erofs_cache_hits_total", ())] == snap["cache"]["hits"]
    assert samples[("nydus_erofs_chunks_fetched_total", ())] == snap["pipeline"]["chunks_fetched"]
    assert samples[("nydus_erofs_blob_cached_bytes", (("blob", blobs[0]), *image))] == snap["blobs"][blobs[0]]["cached"]
    blob_fills = samples[("nydus_erofs_blob_fills_total", (("blob", blobs[0]), *image))]
    assert blob_fills == snap["blobs"][blobs[0]]["pipeline"]["fills"] > 0
    assert samples[("nydus_erofs_daemon_info", (("mode", "fanotify"), ("version", info["version"])))] == 1
    # the backend's options (here the blob dir) are in no answer
    for path in ("/api/v1/daemon", "/api/v1/images", "/api/v1/metrics", "/metrics"):
        assert str(out / "blobs") not in json.dumps(request(sock, "GET", path)[1]), path
    # ctl: the same through --mount, as JSON and as tables
    got = ctl("--mount", str(mp), "info", "--json")
    assert got.returncode == 0 and json.loads(got.stdout)["pid"] == info["pid"], got.stderr
    table = ctl("--mount", str(mp), "metrics")
    assert table.returncode == 0 and "digest failures" in table.stdout and blobs[0][:16] in table.stdout
    assert ctl("--sock", sock, "images").stdout.splitlines()[1].split() == [str(mp), "localfs", "1"]
    assert ctl("--mount", str(mp), "metrics", "--prometheus").stdout.startswith("# HELP nydus_erofs_")
    gc = ctl("--mount", str(mp), "gc", "--json")
    assert gc.returncode == 0 and json.loads(gc.stdout)["removed"] == []
    mounts.umount(mp)
    assert not os.path.exists(sock)
    gone = ctl("--sock", sock, "info")
    assert gone.returncode == 1 and gone.stderr.count("\n") == 1 and "no such socket" in gone.stderr


def test_the_socket_outlives_a_worker(mounts: Mounts, two_images: tuple[Path, Path]) -> None:
    """A request made while no worker runs waits for the next one, on the same socket."""
    mp, rec = mounts.mount(two_images[0], "r", **QUIET)
    old = _kill_worker(rec)
    info = get(rec["api_sock"], "/api/v1/daemon", timeout=60)
    assert info["restarts"] == 1 and info["pid"] != old and info["supervisor_pid"] == rec["pid"]
    assert _in_thread(lambda: _first_page(mp / "b", 0)) == (two_images[0].parent / "src" / "b").read_bytes()[:4096]


def test_other_users_are_refused_and_malformed_requests_answered(mounts: Mounts, two_images: tuple[Path, Path],
                                                                  tmp_path: Path) -> None:  # fmt: skip
    mp, rec = mounts.mount(two_images[0], "h", **QUIET)
    sock = Path(rec["api_sock"])
    os.chmod(sock.parent, 0o755)
    denied = as_nobody(sock.parent, sock.name, *NOBODY_CLIENT, sock.name)
    assert denied.returncode != 0 and "PermissionError" in denied.stderr  # the socket's mode
    os.chmod(sock, 0o666)  # were it open to all, the peer's credentials still keep others out
    refused = as_nobody(sock.parent, sock.name, *NOBODY_CLIENT, sock.name)
    assert refused.returncode == 0 and refused.stdout.strip() == "403", refused.stderr
    statuses = [send_raw(sock, data) for data in malformed_requests(1000)]
    assert all(st is None or 400 <= st < 500 for st in statuses), sorted({st for st in statuses if st})
    assert sum(st is not None for st in statuses) > 900
    assert get(sock, "/api/v1/daemon")["state"] == "RUNNING"
    data = _in_thread(lambda: (mp / "a").read_bytes())
    assert data == (two_images[0].parent / "src" / "a").read_bytes()


def _cache_files(cache: Path) -> set[str]:
    return {p.name for p in cache.iterdir()}


def _names(rec: dict[str, Any], cache: Path) -> set[str]:
    return {n for n in _cache_files(cache) if n.split(".")[0] in rec["blobs"]}


def test_gc_after_an_umount_removes_its_blobs_only(mounts: Mounts, two_images: tuple[Path, Path],
                                                   tmp_path: Path) -> None:  # fmt: skip
    cache = tmp_path / "shared-cache"
    one, _ = mounts.mount(two_images[0], "one", cache=cache, **QUIET)
    two, _ = mounts.mount(two_images[1], "two", cache=cache, **QUIET)
    rec1, rec2 = read_record(one), read_record(two)
    for mp in (one, two):
        _in_thread(lambda mp=mp: _first_page(mp / "a", 0))
    files1, files2 = _names(rec1, cache), _names(rec2, cache)
    assert len(files1) == len(files2) == 2  # each blob's cache file and chunk map
    kept = json.loads(ctl("gc", "--cache-dir", str(cache), "--json").stdout)
    assert kept["removed"] == [] and _cache_files(cache) >= files1 | files2  # both mounted: nothing goes
    mounts.umount(one)
    got = ctl("gc", "--cache-dir", str(cache))
    assert got.returncode == 0, got.stderr
    assert f"{len(files1)} files removed" in got.stdout
    assert not files1 & _cache_files(cache) and files2 <= _cache_files(cache)
    data = _in_thread(lambda: (two / "b").read_bytes())  # the other mount reads on
    assert data == (two_images[1].parent / "src" / "b").read_bytes()
    assert ctl("--mount", str(two), "gc", "--cache-dir", str(cache)).returncode == 2

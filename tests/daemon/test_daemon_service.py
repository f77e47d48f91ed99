"""cachefilesd-py on the host, without /dev/cachefiles: the message handling against a fake device (anonymous
fds are plain files), the API, sd_notify, the supervisor's restart logic and the CLI's startup errors."""

from __future__ import annotations

import errno
import json
import os
import signal
import socket
import subprocess
import threading
from collections import deque
from collections.abc import Iterator
from pathlib import Path

import pytest

from cachefilesd_py.api import ApiServer, get, listen
from cachefilesd_py.daemon import Daemon
from cachefilesd_py.daemon_supervisor import CachefilesSupervisor
from cachefilesd_py.image_store import ImageStore
from cachefilesd_py.notify import notify
from cachefilesd_py.supervisor import RestartPolicy
from fscache.cachefiles import CloseRequest, Message, OpenRequest, ReadRequest
from tests.support.cli import CACHEFILESD, run

TIMEOUT = 30.0


class FakeDevice:
    """Stands in for CachefilesDevice: messages pushed by the test, copen and restore recorded."""

    def __init__(self) -> None:
        self._r, self._w = os.pipe()
        self._queue: deque[Message] = deque()
        self.copens: dict[int, int] = {}
        self.restores = 0

    def fileno(self) -> int:
        return self._r

    def push(self, msg: Message) -> None:
        self._queue.append(msg)
        os.write(self._w, b"m")

    def read_message(self) -> Message | None:
        if not self._queue:
            return None
        os.read(self._r, 1)
        return self._queue.popleft()

    def copen(self, msg_id: int, size: int) -> None:
        self.copens[msg_id] = size

    def restore(self) -> None:
        self.restores += 1

    def close(self) -> None:
        os.close(self._r)
        os.close(self._w)


def _build(out: Path, src: Path, *args: str) -> dict:
    proc = run("build", src, "-o", out, "--json", *args)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[Daemon, FakeDevice, Path, dict, dict[str, bytes]]]:
    src = tmp_path / "src"
    src.mkdir()
    files = {"a": os.urandom(150_000), "b": os.urandom(150_000)}
    for name, data in files.items():
        (src / name).write_bytes(data)
    out = _build(tmp_path / "images" / "img", src, "--chunk-size", "64KiB", "--compressor", "lz4_block")
    dev = FakeDevice()
    daemon = Daemon(dev, ImageStore(tmp_path / "images"), threads=2, amplify=0)  # type: ignore[arg-type]
    t = threading.Thread(target=daemon.run)
    t.start()
    try:
        yield daemon, dev, tmp_path, out, files
    finally:
        daemon.stop()
        t.join(TIMEOUT)
        daemon.store.close()
        dev.close()
    assert daemon.state == "STOPPED"
    for name in ("boot.cache", "blob.cache"):  # every anonymous fd is closed by now
        assert not any(_fd_open(int(fd), tmp_path / name) for fd in os.listdir("/proc/self/fd"))


def _anon_fd(path: Path) -> int:
    """A regular file as the 'anonymous fd' (pwrite works; READ_COMPLETE fails with ENOTTY and is logged)."""
    return os.open(path, os.O_RDWR | os.O_CREAT, 0o600)


def _fd_open(fd: int, path: Path) -> bool:
    """Whether ``fd`` still refers to ``path`` (its number may have been reused since)."""
    try:
        return os.readlink(f"/proc/self/fd/{fd}") == str(path)
    except FileNotFoundError:
        return False


def test_open_read_close(served: tuple[Daemon, FakeDevice, Path, dict, dict[str, bytes]]) -> None:
    daemon, dev, tmp, out, files = served
    blob = out["blobs"][0]
    boot_fd, blob_fd, bad_fd = _anon_fd(tmp / "boot.cache"), _anon_fd(tmp / "blob.cache"), _anon_fd(tmp / "x")
    dev.push(OpenRequest(1, 10, "erofs,img", "img", boot_fd, 0))
    dev.push(OpenRequest(2, 11, "erofs,img", blob["id"], blob_fd, 0))
    dev.push(OpenRequest(3, 12, "erofs,img", "unknown", bad_fd, 0))
    dev.push(ReadRequest(4, 10, 0, 8192))
    dev.push(ReadRequest(5, 11, 4096, 4096))  # one page of the first chunk (after the blob's zero prefix): all of
    # the chunk is written
    assert daemon.counters.wait_for(lambda c: c["reads"] == 2, TIMEOUT)
    boot = (tmp / "images" / "img" / "image.boot").read_bytes()
    assert dev.copens == {1: len(boot), 2: blob["uncompressed_size"], 3: -errno.ENOENT}
    assert not _fd_open(bad_fd, tmp / "x")  # refused: its fd is closed at once
    assert (tmp / "boot.cache").read_bytes()[:8192] == boot[:8192]
    cached = (tmp / "blob.cache").read_bytes()
    assert len(cached) == 4096 + 65536 and cached[4096:] in files["a"] + files["b"]
    stats = daemon.blobcache_metrics()
    assert stats["opens"] == 2 and stats["opens_failed"] == 1 and stats["reads_failed"] == 0
    assert stats["pipeline"]["chunks_written"] == 1
    assert daemon.backend_metrics()["bytes"] > 0
    info = daemon.info()
    assert {o["key"] for o in info["objects"]} == {"img", blob["id"]} and info["volumes"] == {"img": ["img"]}
    dev.push(CloseRequest(6, 10))
    dev.push(CloseRequest(7, 11))
    assert daemon.counters.wait_for(lambda c: c["closes"] == 2, TIMEOUT)
    assert daemon.info()["objects"] == []
    daemon.stop()  # an fd still used by a finishing READ is closed when that READ lets go of it; run() waits
    assert daemon.counters.wait_for(lambda c: c["reads"] == 2, TIMEOUT)


def test_a_damaged_chunk_is_never_written(served: tuple[Daemon, FakeDevice, Path, dict, dict[str, bytes]]) -> None:
    daemon, dev, tmp, out, files = served
    blob = out["blobs"][0]
    path = tmp / "images" / "img" / "blobs" / blob["id"]
    raw = bytearray(path.read_bytes())
    raw[4096 + 100] ^= 0xFF  # inside the first chunk's compressed data (after the zero prefix)
    path.write_bytes(raw)
    fd = _anon_fd(tmp / "blob.cache")
    dev.push(OpenRequest(1, 11, "erofs,img", blob["id"], fd, 0))
    dev.push(ReadRequest(2, 11, 4096, 4096))
    dev.push(ReadRequest(3, 11, 4096 + 65536, 4096))  # the second chunk is intact
    assert daemon.counters.wait_for(lambda c: c["reads"] == 2, TIMEOUT)
    cached = (tmp / "blob.cache").read_bytes()
    assert cached[:4096 + 65536] == bytes(4096 + 65536)  # nothing written there: the reader gets EIO
    assert cached[4096 + 65536:] in files["a"] + files["b"]
    assert daemon.blobcache_metrics()["reads_failed"] == 1
    dev.push(CloseRequest(4, 11))


def test_api_over_a_unix_socket(tmp_path: Path) -> None:
    path = tmp_path / "api.sock"
    sock = listen(path)
    server = ApiServer(sock, {"/api/v1/daemon": lambda: {"state": "RUNNING"},
                              "/api/v1/boom": lambda: 1 / 0}).start()  # fmt: skip
    try:
        assert get(path, "/api/v1/daemon") == {"state": "RUNNING"}
        assert get(path, "/api/v1/daemon/") == {"state": "RUNNING"}
        with pytest.raises(OSError, match="HTTP 404"):
            get(path, "/nope")
        with pytest.raises(OSError, match="HTTP 500: division by zero"):
            get(path, "/api/v1/boom")
    finally:
        server.stop()
        sock.close()
    assert listen(path).close() is None  # a stale socket file is replaced


def test_sd_notify(tmp_path: Path) -> None:
    path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.bind(str(path))
        assert notify("READY=1", "STATUS=serving", env={"NOTIFY_SOCKET": str(path)})
        assert s.recv(100) == b"READY=1\nSTATUS=serving"
    name = f"cachefilesd-py-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.bind("\0" + name)
        assert notify("STOPPING=1", env={"NOTIFY_SOCKET": "@" + name})
        assert s.recv(100) == b"STOPPING=1"
    assert not notify("READY=1", env={})
    assert not notify("READY=1", env={"NOTIFY_SOCKET": str(tmp_path / "nobody")})


def test_supervisor_restores_and_restarts_a_dead_worker() -> None:
    """The first worker dies by SIGKILL; the supervisor writes restore and starts the second, which asks the
    supervisor to stop (SIGTERM): it then stops that worker and returns 0."""
    dev = FakeDevice()

    def worker(restarts: int) -> int:
        if restarts == 0:
            os.kill(os.getpid(), signal.SIGKILL)
        os.kill(os.getppid(), signal.SIGTERM)
        signal.pause()  # until the supervisor's SIGTERM
        return 0

    sup = CachefilesSupervisor(dev, worker)  # type: ignore[arg-type]
    try:
        assert sup.run() == 0
    finally:
        dev.close()
    assert dev.restores == 1 and sup.restarts == 1 and sup.proc is None


def test_supervisor_gives_up_on_a_worker_that_keeps_dying() -> None:
    dev = FakeDevice()
    policy = RestartPolicy(delay=0.01, max_restarts=2)
    sup = CachefilesSupervisor(dev, lambda restarts: 3, policy=policy)  # type: ignore[arg-type]
    try:
        assert sup.run() == 1
    finally:
        dev.close()
    assert dev.restores == 3 and sup.restarts == 2  # restored after every death; gave up on the third


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return run(*args, prog=CACHEFILESD, timeout=TIMEOUT)


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["--device", "/nonexistent/cachefiles"], 1,
         "no /nonexistent/cachefiles: kernel lacks CONFIG_CACHEFILES (modprobe cachefiles?)"),
        (["--backend", "http"], 2, "--backend http needs --url"),
        (["--backend", "registry", "--host", "r.example"], 2, "--backend registry needs --host and --repo"),
        (["--amplify", "lots"], 2, "Invalid value for '--amplify': not a size: 'lots' (see --help)"),
        (["--threads", "0"], 2, "--threads must be at least 1"),
    ],
)  # fmt: skip
def test_startup_errors_are_one_line(tmp_path: Path, args: list[str], code: int, message: str) -> None:
    done = _cli("--cache-dir", str(tmp_path / "cache"), "--images-dir", str(tmp_path), *args)
    assert (done.returncode, done.stderr) == (code, f"cachefilesd-py: error: {message}\n")


def test_missing_images_dir_is_a_usage_error(tmp_path: Path) -> None:
    done = _cli("--cache-dir", str(tmp_path / "cache"), "--images-dir", str(tmp_path / "nope"))
    assert (done.returncode, done.stderr) == (2, f"cachefilesd-py: error: --images-dir {tmp_path}/nope: "
                                                 "not a directory\n")  # fmt: skip


@pytest.mark.skipif(os.path.exists("/dev/cachefiles"), reason="this host has /dev/cachefiles")
def test_no_dev_cachefiles_on_this_host(tmp_path: Path) -> None:
    done = _cli("--cache-dir", str(tmp_path / "cache"), "--images-dir", str(tmp_path))
    assert done.returncode == 1
    assert done.stderr == "cachefilesd-py: error: no /dev/cachefiles: kernel lacks CONFIG_CACHEFILES " \
                          "(modprobe cachefiles?)\n"  # fmt: skip


def test_json_logs(capsys: pytest.CaptureFixture[str]) -> None:
    import logging

    from cachefilesd_py.cli import _setup_logging

    log = logging.getLogger("cachefilesd_py")
    saved = (log.handlers[:], log.level, log.propagate)
    try:
        _setup_logging(True, "info")
        log.error("READ blob %s failed: %s", "abc", "digest mismatch")
        log.debug("not shown")
    finally:
        log.handlers[:], log.level, log.propagate = saved
    (line,) = capsys.readouterr().err.splitlines()
    record = json.loads(line)
    assert record["level"] == "error" and record["msg"] == "READ blob abc failed: digest mismatch"
    assert record["pid"] == os.getpid()

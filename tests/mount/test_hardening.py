"""Mounts trust nothing in the image (issue 19): nosuid/nodev by default, any number of blobs, a deadline per
fill, failure caching, and a ToC-less blob's chunk table cross-checked before it is served.

Each test drives ``nydus-erofs mount``/``umount`` (the CLI a user runs) against the running kernel.
"""

from __future__ import annotations

import dataclasses
import errno
import http.server
import io
import json
import os
import random
import shutil
import signal
import stat
import subprocess
import tarfile
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from cachefilesd_py.mount.record import RUN_DIR_ENV
from erofs.format.rafs_v6 import BLOB_FEATURE_HAS_TOC, BlobInfo, RafsV6Blob
from erofs.paths import process_start_time
from erofs.reader import Bootstrap
from fscache.mount import is_mounted
from tests.support.cli import run
from tests.support.damage import flip_chunk_byte
from tests.support.kmount import umount as kernel_umount
from tests.support.poll import wait_for

TIMEOUT = 120.0
NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]

pytestmark = pytest.mark.kernel("erofs", "fanotify")


class Cli:
    """``nydus-erofs`` run as a user would, with its own run dir; whatever a test left mounted is unmounted."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.env = dict(os.environ, **{RUN_DIR_ENV: str(tmp / "run")})
        self.mounted: list[Path] = []

    def run(self, *args: str, timeout: float = TIMEOUT) -> subprocess.CompletedProcess[str]:
        return run(*args, env=self.env, timeout=timeout)

    def mount(self, boot: Path, mp: Path, cache: Path, *extra: str) -> dict[str, Any]:
        mp.mkdir(parents=True, exist_ok=True)
        proc = self.run("mount", str(boot), str(mp), "--cache-dir", str(cache), "--json", *extra)
        assert proc.returncode == 0, proc.stderr
        self.mounted.append(mp)
        return json.loads(proc.stdout)

    def umount(self, mp: Path) -> dict[str, Any]:
        proc = self.run("umount", str(mp), "--json")
        self.mounted.remove(mp)
        assert proc.returncode == 0, proc.stderr
        assert not is_mounted(mp, None)
        return json.loads(proc.stdout)

    def cleanup(self) -> None:
        for mp in list(self.mounted):
            if self.run("umount", str(mp)).returncode and is_mounted(mp, None):
                kernel_umount(mp)


@pytest.fixture
def cli(tmp_path: Path) -> Iterator[Cli]:
    c = Cli(tmp_path)
    try:
        yield c
    finally:
        c.cleanup()


@pytest.fixture
def public_dir() -> Iterator[Path]:
    """A directory user nobody may traverse (pytest's tmp dirs are root's only)."""
    d = Path(tempfile.mkdtemp(prefix="nydus-erofs-test-"))
    d.chmod(0o755)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def build(sources: list[Path], out: Path, *extra: str) -> dict[str, Any]:
    proc = run("build", *sources, "--output-dir", out, "--json", *extra, timeout=TIMEOUT)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


# -- finding 6: nosuid, nodev -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def suid_image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An image holding a setuid-root copy of id(1) and a character device node (/dev/null's numbers)."""
    tmp = tmp_path_factory.mktemp("suid")
    src = tmp / "src"
    src.mkdir()
    shutil.copy(shutil.which("id") or "/usr/bin/id", src / "id")
    os.chown(src / "id", 0, 0)
    os.chmod(src / "id", 0o4755)
    os.mknod(src / "null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    build([src], tmp / "out")
    return tmp / "out"


def _euid_of_nobody_running(binary: Path) -> str:
    proc = subprocess.run([*NOBODY, str(binary), "-u"], capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


def _open_error(path: Path) -> int:
    try:
        os.close(os.open(path, os.O_RDONLY))
    except OSError as e:
        return e.errno or -1
    return 0


@pytest.mark.parametrize("mode", ["fanotify", "full"])
def test_setuid_binaries_and_device_nodes_of_an_image_grant_nothing(cli: Cli, suid_image: Path, public_dir: Path,
                                                                    tmp_path: Path, mode: str) -> None:  # fmt: skip
    boot, cache, mp = suid_image / "image.boot", tmp_path / "cache", public_dir / "mnt"
    cli.mount(boot, mp, cache, "--mode", mode)
    assert (mp / "id").stat().st_mode & stat.S_ISUID  # the bit is there, it just means nothing
    assert _euid_of_nobody_running(mp / "id") == "65534"
    assert _open_error(mp / "null") == errno.EACCES
    cli.umount(mp)

    cli.mount(boot, mp, cache, "--mode", mode, "--allow-suid", "--allow-dev")  # lifted on request
    assert _euid_of_nobody_running(mp / "id") == "0"
    assert _open_error(mp / "null") == 0
    cli.umount(mp)


# -- finding 8: any number of blobs -------------------------------------------------------------------------------
LAYERS = 127


@pytest.fixture(scope="module")
def many_layers(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An image of 127 tar layers, each adding one small file (127 blobs)."""
    tmp = tmp_path_factory.mktemp("layers")
    tars = []
    for i in range(LAYERS):
        data = f"layer {i}\n".encode() * (i + 1)
        tar = tmp / f"l{i:03d}.tar"
        with tarfile.open(tar, "w") as tf:
            info = tarfile.TarInfo(f"f{i:03d}")
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
        tars.append(tar)
    build(tars, tmp / "out")
    assert len(list((tmp / "out" / "blobs").iterdir())) == LAYERS
    return tmp / "out"


@pytest.mark.parametrize("mode", ["fanotify", "full"])
def test_image_of_127_blobs_mounts_and_reads_back(cli: Cli, many_layers: Path, tmp_path: Path, mode: str) -> None:
    cache = tmp_path / "a-cache-dir-with-a-rather-long-name-as-real-ones-have"
    mp = tmp_path / "mnt"
    cli.mount(many_layers / "image.boot", mp, cache, "--mode", mode)
    try:
        for i in range(LAYERS):
            assert (mp / f"f{i:03d}").read_bytes() == f"layer {i}\n".encode() * (i + 1)
    finally:
        cli.umount(mp)


# -- finding 5: a deadline per fill, umount stops everything ------------------------------------------------------
class TrickleServer:
    """The blobs of a directory over HTTP on 127.0.0.1 (``url``): at full speed, or, once ``slow`` is set, the
    headers at once and the body one byte a second."""

    def __init__(self, blobs: Path) -> None:
        self.slow = threading.Event()
        self.closing = threading.Event()
        self.trickling = 0
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def _blob(self) -> bytes | None:
                path = blobs / self.path.strip("/").rsplit("/", 1)[-1]
                return path.read_bytes() if path.is_file() else None

            def do_HEAD(self) -> None:
                data = self._blob()
                self.send_response(200 if data is not None else 404)
                self.send_header("Content-Length", str(len(data or b"")))
                self.end_headers()

            def do_GET(self) -> None:
                data = self._blob()
                if data is None:
                    self.send_response(404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                first, _, last = self.headers["Range"].removeprefix("bytes=").partition("-")
                start, end = int(first), min(int(last), len(data) - 1)
                body = data[start : end + 1]
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {start}-{end}/{len(data)}")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if not owner.slow.is_set():
                    self.wfile.write(body)
                    return
                owner.trickling += 1
                try:
                    for i in range(len(body)):  # one byte a second, until the client gives up
                        self.wfile.write(body[i : i + 1])
                        self.wfile.flush()
                        if owner.closing.wait(1.0):
                            return
                finally:
                    owner.trickling -= 1

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def requests_in_flight(self) -> int:
        """Bodies being trickled now."""
        return self.trickling

    def close(self) -> None:
        self.closing.set()
        self.server.shutdown()
        self.server.server_close()


def _timed(fn: Callable[[], Any], limit: float) -> tuple[Any, float]:
    """``fn()`` in a thread: (its result or the exception it raised, seconds taken); fails past ``limit``."""
    box: dict[str, Any] = {}
    t0 = time.monotonic()

    def run() -> None:
        try:
            box["value"] = fn()
        except BaseException as e:  # noqa: BLE001
            box["value"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(limit)
    assert not t.is_alive(), f"still blocked after {limit:g}s"
    return box["value"], time.monotonic() - t0


def test_a_trickling_backend_costs_a_read_its_deadline_and_umount_leaves_nothing(cli: Cli, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    data = random.Random(7).randbytes(300_000)
    (src / "file.bin").write_bytes(data)
    out = tmp_path / "out"
    build([src], out, "--chunk-size", "64KiB")
    server = TrickleServer(out / "blobs")
    cache, mp, deadline = tmp_path / "cache", tmp_path / "mnt", 3.0
    try:
        rec = cli.mount(out / "image.boot", mp, cache, "--mode", "fanotify", "--backend", "http",
                        "--backend-config", f"url={server.url}", "--fill-timeout", str(deadline))  # fmt: skip
        server.slow.set()
        got, took = _timed(lambda: (mp / "file.bin").read_bytes(), 60)
        assert isinstance(got, OSError) and got.errno == errno.EIO, got
        assert took < deadline + 5, f"EIO after {took:.1f}s"
        _, took = _timed(lambda: cli.umount(mp), 60)
        assert took < deadline + 10
        for pid in (rec["pid"], rec["worker_pid"]):
            assert process_start_time(pid) is None, f"daemon {pid} still running"
    finally:
        server.close()
    # the same cache dir, a good backend: every read is served
    cli.mount(out / "image.boot", mp, cache, "--mode", "fanotify", "--blob-dir", str(out / "blobs"))
    got, _ = _timed(lambda: (mp / "file.bin").read_bytes(), 60)
    assert got == data
    cli.umount(mp)


def test_a_worker_left_stuck_by_a_dead_supervisor_is_never_waited_on(cli: Cli, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    data = random.Random(8).randbytes(300_000)
    (src / "file.bin").write_bytes(data)
    out = tmp_path / "out"
    build([src], out, "--chunk-size", "64KiB")
    server = TrickleServer(out / "blobs")
    cache, mp, mp2 = tmp_path / "cache", tmp_path / "mnt", tmp_path / "mnt2"
    mp2.mkdir()
    cli.mounted.append(mp2)  # unmounted after the test whichever assertion below fails
    worker = None
    try:  # a worker stuck on a fill (a deadline of 10 minutes) whose supervisor was killed
        rec = cli.mount(out / "image.boot", mp, cache, "--mode", "fanotify", "--backend", "http",
                        "--backend-config", f"url={server.url}", "--fill-timeout", "600")  # fmt: skip
        worker = rec["worker_pid"]
        server.slow.set()
        reader = subprocess.Popen(["cat", str(mp / "file.bin")], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for(server.requests_in_flight, "the read reached the server", 30)
        os.kill(rec["pid"], signal.SIGKILL)
        reader.kill()
        reader.wait(30)
        kernel_umount(mp, detach_if_busy=False)
        cli.mounted.remove(mp)

        # the next mount of the cache dir neither waits for that worker nor shares the cache files with it: once the
        # worker has marked its image released it is killed; before, the mount is refused with an error naming it
        args = ("mount", str(out / "image.boot"), str(mp2), "--cache-dir", str(cache), "--blob-dir", str(out / "blobs"))
        # waiting for the stuck worker would take its fill deadline (600 s); a mount under load takes seconds
        proc = cli.run(*args, timeout=60)
        if proc.returncode:
            assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
            assert f"worker {worker} " in proc.stderr and "outlived its supervisor" in proc.stderr, proc.stderr
            assert not is_mounted(mp2, None)
            os.kill(worker, signal.SIGKILL)  # as the error says
            wait_for(lambda: process_start_time(worker) is None, "the worker is gone", 30)
            proc = cli.run(*args)
        assert proc.returncode == 0, proc.stderr
        assert process_start_time(worker) is None, "the stuck worker still runs"
        got, _ = _timed(lambda: (mp2 / "file.bin").read_bytes(), 60)
        assert got == data
        cli.umount(mp2)
    finally:
        server.close()
        if worker is not None and process_start_time(worker) is not None:
            os.kill(worker, signal.SIGKILL)


# -- finding 9: failure caching, log rate limit -------------------------------------------------------------------
def test_rereading_a_corrupt_page_neither_refetches_nor_grows_the_log(cli: Cli, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    data = random.Random(9).randbytes(3 << 20)
    (src / "victim.bin").write_bytes(data)
    out = tmp_path / "out"
    build([src], out)
    blobs = tmp_path / "damaged"
    shutil.copytree(out / "blobs", blobs)
    flipped = flip_chunk_byte(out / "image.boot", blobs, "/victim.bin", 1)

    mp = tmp_path / "mnt"
    rec = cli.mount(out / "image.boot", mp, tmp_path / "cache", "--mode", "fanotify", "--blob-dir", str(blobs),
                    "--readahead", "0")  # fmt: skip
    log = Path(rec["log"])
    fd = os.open(mp / "victim.bin", os.O_RDONLY)
    try:
        size0 = log.stat().st_size

        def reread() -> int:
            failures = 0
            for _ in range(200):
                try:
                    os.pread(fd, 4096, flipped.file_offset)
                except OSError as e:
                    assert e.errno == errno.EIO
                    failures += 1
            return failures

        failures, _ = _timed(reread, 60)
        assert failures == 200
        grown = log.stat().st_size - size0
    finally:
        os.close(fd)
    stats = cli.umount(mp)["stats"]
    assert stats["pipeline"]["digest_failures"] <= 2, stats["pipeline"]
    assert stats["pipeline"]["failures_cached"] >= 190, stats["pipeline"]
    assert grown < 4096, f"the log grew by {grown} bytes"


# -- finding 3: a blob without a ToC digest is cross-checked against the bootstrap --------------------------------
def _without_toc(boot: Path) -> None:
    """Make the bootstrap's (only) blob look like one from before upstream 2.2: no ToC, no ToC digest."""
    with Bootstrap(boot) as bs:
        off = bs.ext.s_blob_table_offset
    raw = bytearray(boot.read_bytes())
    blob = BlobInfo.unpack(raw, off, 0)
    blob = dataclasses.replace(blob, features=blob.features & ~BLOB_FEATURE_HAS_TOC, blob_toc_size=0,
                               blob_toc_digest=None)  # fmt: skip
    raw[off : off + RafsV6Blob.size] = blob.pack()
    boot.write_bytes(raw)


def test_swapped_chunk_info_of_a_toc_less_blob_is_never_served(cli: Cli, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    rnd = random.Random(3)
    data = b"".join(bytes([65 + i]) * 1000 + rnd.randbytes((64 << 10) - 1000) for i in range(4))  # 4 whole chunks
    (src / "file.bin").write_bytes(data)
    out = tmp_path / "out"
    build([src], out, "--chunk-size", "64KiB")
    boot = out / "image.boot"
    _without_toc(boot)
    assert cli.run("check", str(boot), "--blob-dir", str(out / "blobs")).returncode == 0  # a sound ToC-less image

    # a hostile blob source swaps the uncompressed offsets of the file's first two chunk-info entries: each
    # chunk still matches its digest, at the other's place
    with Bootstrap(boot) as bs:
        (blob,) = bs.blobs
        a, b = (fc.ci_index for fc in bs.file_chunks(bs.lookup("/file.bin"))[:2])
    assert blob.ci_compressor == "none"
    path = out / "blobs" / blob.blob_id
    raw = bytearray(path.read_bytes())
    ea, eb = blob.ci_offset + 16 * a, blob.ci_offset + 16 * b
    raw[ea : ea + 8], raw[eb : eb + 8] = raw[eb : eb + 8], raw[ea : ea + 8]
    path.write_bytes(raw)
    assert cli.run("check", str(boot), "--blob-dir", str(out / "blobs")).returncode == 3

    for mode in ("fanotify", "full"):
        mp = tmp_path / f"mnt-{mode}"
        mp.mkdir()
        proc = cli.run("mount", str(boot), str(mp), "--cache-dir", str(tmp_path / f"cache-{mode}"), "--mode", mode,
                       "--blob-dir", str(out / "blobs"))  # fmt: skip
        if proc.returncode == 0:  # then the swapped chunks must read as EIO, never as each other
            cli.mounted.append(mp)
            try:
                got: Any = (mp / "file.bin").read_bytes()
            except OSError as e:
                got = e
            cli.umount(mp)
            assert isinstance(got, OSError) and got.errno == errno.EIO, (mode, "swapped chunks served")
        else:
            assert proc.returncode == 3 and proc.stderr.count("\n") == 1, (mode, proc.stderr)
            assert "chunk-info" in proc.stderr and blob.blob_id in proc.stderr, proc.stderr
            assert not is_mounted(mp, None)

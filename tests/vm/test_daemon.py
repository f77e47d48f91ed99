"""cachefilesd-py in the test VM: EROFS images mounted by fsid through the fscache on-demand daemon.

Runs inside the VM only (tests/kernel_test/test_vm_suite.py runs tests/vm there).  Everything is written under
``$VM_SCRATCH/daemon``; images are built in the guest with ``nydus-erofs build``.  One daemon (with its
supervisor) serves the module; the tests that need the device free come first, the worker-killing test last.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from cachefilesd_py.api import get
from erofs.reader import Bootstrap, ImageReader, LocalBlobDir
from tests.support.fstree import assert_same_tree
from tests.support.kmount import MS_RDONLY, mount, umount
from tests.support.paths import NYDUS as UPSTREAM
from tests.support.rootfs import make_rootfs

pytestmark = pytest.mark.kernel("cachefiles")

BIN = Path(sys.executable).parent
NYDUS_EROFS = BIN / "nydus-erofs"
CACHEFILESD = BIN / "cachefilesd-py"
TIMEOUT = 120.0
MiB = 1 << 20
LARGE_MIB = 64  # the large image: one file of LARGE_MIB distinct 1 MiB chunks, stored uncompressed


def scratch() -> Path:
    path = Path(os.environ["VM_SCRATCH"]) / "daemon"
    path.mkdir(exist_ok=True)
    return path


# --- helpers (bench_daemon.py uses them too) ----------------------------------------------------------------


def build(out: Path, *sources: Path, compressor: str = "none", chunk_size: str = "1MiB") -> dict[str, Any]:
    """``nydus-erofs build SOURCES -o OUT``: OUT/image.boot + OUT/blobs/."""
    shutil.rmtree(out, ignore_errors=True)
    cmd = [str(NYDUS_EROFS), "build", *map(str, sources), "--output-dir", str(out), "--json",
           "--compressor", compressor, "--chunk-size", chunk_size]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def large_image() -> tuple[Path, str]:
    """(image dir, sha256 of its one file ``big``) of a ≥ 64 MiB single-blob image, built once per boot."""
    base = scratch() / "large"
    done = base / "sha256"
    if done.exists():
        return base / "image", done.read_text()
    shutil.rmtree(base, ignore_errors=True)
    src = base / "src"
    src.mkdir(parents=True)
    body = os.urandom(MiB)
    h = hashlib.sha256()
    with open(src / "big", "wb") as f:
        for i in range(LARGE_MIB):  # every chunk differs (no dedup): the blob holds LARGE_MIB MiB
            piece = struct.pack("<Q", i) + body[8:]
            h.update(piece)
            f.write(piece)
    build(base / "image", src)
    done.write_text(h.hexdigest())
    return base / "image", h.hexdigest()


def link_image(images: Path, fsid: str, image_dir: Path) -> None:
    """Serve ``image_dir`` as ``fsid`` too (a fresh fsid has fresh cache objects: a cold cache)."""
    target = images / fsid
    if target.is_symlink() or target.exists():
        target.unlink()
    target.symlink_to(image_dir, target_is_directory=True)


def sha256_file(path: Path, size: int = MiB) -> str:
    h = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        while piece := f.read(size):
            h.update(piece)
    return h.hexdigest()


class DaemonProc:
    """``cachefilesd-py`` as a child process: started and waited for through ``$NOTIFY_SOCKET`` (READY=1),
    stopped with SIGTERM, its API on a Unix socket."""

    def __init__(self, base: Path, *extra: str) -> None:
        self.base = base
        self.images = base / "images"
        self.cache = base / "cache"
        self.api_sock = base / "api.sock"
        self.log = base / "daemon.log"
        self.extra = extra
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> DaemonProc:
        shutil.rmtree(self.cache, ignore_errors=True)  # cache files outlive the daemon: start cold
        self.images.mkdir(parents=True, exist_ok=True)
        notify_path = self.base / "notify.sock"
        notify_path.unlink(missing_ok=True)
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as ns:
            ns.bind(str(notify_path))
            ns.settimeout(1.0)
            env = {**os.environ, "NOTIFY_SOCKET": str(notify_path)}
            cmd = [str(CACHEFILESD), "--cache-dir", str(self.cache), "--images-dir", str(self.images),
                   "--api-sock", str(self.api_sock), *self.extra]  # fmt: skip
            with open(self.log, "wb") as log:
                self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env)
            for _ in range(int(TIMEOUT)):
                try:
                    msg = ns.recv(4096)
                except TimeoutError:
                    if self.proc.poll() is not None:
                        break
                    continue
                if b"READY=1" in msg.split(b"\n"):
                    return self
            self.kill()
            raise AssertionError(f"cachefilesd-py did not get ready:\n{self.log_text()}")

    def api(self, path: str) -> dict[str, Any]:
        return get(self.api_sock, path, timeout=TIMEOUT)

    def backend_bytes(self, name: str) -> int:
        return int(self.api("/api/v1/metrics/backend")["backends"].get(name, {}).get("bytes", 0))

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def stop(self) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(TIMEOUT)
        except subprocess.TimeoutExpired:
            self.kill()
            raise

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@contextmanager
def mounted(fsid: str, options: str = "") -> Iterator[Path]:
    mnt = scratch() / "mnt" / fsid
    mnt.mkdir(parents=True, exist_ok=True)
    mount("none", mnt, "erofs", MS_RDONLY, f"fsid={fsid}" + (f",{options}" if options else ""))
    try:
        yield mnt
    finally:
        umount(mnt)


class Builds:
    """Images built in the background (``nydus-erofs build`` runs for seconds under TCG: use every vCPU)."""

    def __init__(self, images: Path) -> None:
        self.images = images
        self.pool = ThreadPoolExecutor(os.cpu_count() or 2)
        self.futures: dict[str, Future[dict[str, Any]]] = {}
        self.data: dict[str, Any] = {}  # what the tests compare against, by image

    def submit(self, fsid: str, *sources: Path, **kw: str) -> None:
        self.futures[fsid] = self.pool.submit(build, self.images / fsid, *sources, **kw)

    def result(self, fsid: str) -> dict[str, Any]:
        return self.futures[fsid].result(TIMEOUT * 2)


COMPRESSORS = [("none", "1MiB"), ("lz4_block", "64KiB"), ("zstd", "4KiB")]


def _rootfs(root: Path) -> Path:
    """What a container root file system holds (tests/support/rootfs.py), with a directory small enough for TCG."""
    shutil.rmtree(root, ignore_errors=True)
    return make_rootfs(root, entries=150)


def _layers(base: Path) -> tuple[Path, Path, Path]:
    """(lower, upper, what the two merged look like)"""
    shutil.rmtree(base, ignore_errors=True)
    lower, upper, merged = base / "lower", base / "upper", base / "merged"
    (lower / "etc").mkdir(parents=True)
    (lower / "etc" / "os-release").write_bytes(b"ID=lower\n")
    (lower / "data").write_bytes(os.urandom(3 * MiB + 5))
    os.symlink("data", lower / "link")
    (upper / "etc").mkdir(parents=True)
    (upper / "etc" / "os-release").write_bytes(b"ID=upper\n")  # replaces the lower one
    (upper / "app").mkdir()
    (upper / "app" / "bin").write_bytes(os.urandom(700_000))
    os.setxattr(upper / "app" / "bin", "user.layer", b"upper")
    for d in (lower, upper):
        for dirpath, dirnames, filenames in os.walk(d):
            for n in dirnames + filenames:
                os.utime(os.path.join(dirpath, n), ns=(1, 1_700_000_000_123_456_789), follow_symlinks=False)
        os.utime(d, ns=(1, 1_700_000_000_000_000_001))
    subprocess.run(["cp", "-a", str(lower), str(merged)], check=True)
    subprocess.run(["cp", "-a", f"{upper}/.", str(merged)], check=True)
    return lower, upper, merged


def _tree(path: Path, files: dict[str, bytes]) -> Path:
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    for name, data in files.items():
        (path / name).write_bytes(data)
    return path


@pytest.fixture(scope="module", autouse=True)
def builds() -> Iterator[Builds]:
    """Every image of this module, building while the first tests run (the daemon serves IMAGES live)."""
    b = Builds(scratch() / "main" / "images")
    b.images.mkdir(parents=True, exist_ok=True)
    base = scratch() / "sources"
    base.mkdir(exist_ok=True)
    rootfs = b.data["rootfs"] = _rootfs(base / "rootfs")
    for compressor, chunk_size in COMPRESSORS:
        b.submit(f"rootfs-{compressor}", rootfs, compressor=compressor, chunk_size=chunk_size)
    lower, upper, b.data["layers"] = _layers(base / "layers")
    b.submit("layers", lower, upper, compressor="zstd")
    shared = _tree(base / "shared", {"shared.bin": os.urandom(1_500_000)})
    for name in ("a", "b"):
        b.data[f"dom-{name}"] = top = _tree(base / name, {f"{name}.bin": os.urandom(1_500_000)})
        b.submit(f"dom-{name}", shared, top, compressor="lz4_block")
    b.data["shared"] = shared
    files = b.data["damaged"] = {name: os.urandom(200_000) for name in ("a-good", "b-bad", "c-good")}
    b.submit("damaged", _tree(base / "damaged", files), chunk_size="64KiB")
    try:
        yield b
    finally:
        b.pool.shutdown(wait=True, cancel_futures=True)


def _run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(CACHEFILESD), *args], capture_output=True, text=True, stdin=subprocess.DEVNULL,
                          timeout=TIMEOUT)  # fmt: skip


# --- with the device free -----------------------------------------------------------------------------------


def test_tmpfs_cache_dir_is_a_one_line_error() -> None:
    tmpfs = scratch() / "tmpfs"
    tmpfs.mkdir(exist_ok=True)
    mount("none", tmpfs, "tmpfs", 0, "size=1m")
    try:
        done = _run_cli("--cache-dir", str(tmpfs), "--images-dir", str(scratch()))
    finally:
        umount(tmpfs)
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert lines[-1].startswith("cachefilesd-py: error: cache dir ") and "unsupported filesystem" in lines[-1]
    assert "Traceback" not in done.stderr


# --- one daemon for the rest ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def daemon() -> Iterator[DaemonProc]:
    d = DaemonProc(scratch() / "main").start()
    try:
        yield d
    finally:
        info = d.api("/api/v1/daemon") if d.proc and d.proc.poll() is None else {}
        rc = d.stop()
        log = d.log_text()
        print(log[-3000:])
        assert rc == 0, log
        for pid in (info.get("pid"), info.get("supervisor_pid")):
            assert pid is None or not Path(f"/proc/{pid}").exists(), f"process {pid} left behind"


def test_second_daemon_is_a_busy_error(daemon: DaemonProc) -> None:
    done = _run_cli("--cache-dir", str(scratch() / "cache2"), "--images-dir", str(daemon.images))
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1] == \
        "cachefilesd-py: error: another cache daemon (cachefilesd?) holds /dev/cachefiles"  # fmt: skip


def test_api_reports_the_daemon(daemon: DaemonProc) -> None:
    info = daemon.api("/api/v1/daemon")
    assert info["state"] == "RUNNING" and info["restarts"] == 0
    assert info["supervisor_pid"] == daemon.proc.pid != info["pid"]  # type: ignore[union-attr]
    assert {"bytes", "requests", "errors"} <= set(daemon.api("/api/v1/metrics/backend"))
    assert "pipeline" in daemon.api("/api/v1/metrics/blobcache")


@pytest.mark.parametrize("compressor", [c for c, _ in COMPRESSORS])
def test_builder_image_mounted_by_fsid_equals_its_source(daemon: DaemonProc, builds: Builds, compressor: str) -> None:
    fsid = f"rootfs-{compressor}"
    builds.result(fsid)
    with mounted(fsid) as mnt:
        assert_same_tree(builds.data["rootfs"], mnt)


def test_multi_layer_image_equals_the_merged_layers(daemon: DaemonProc, builds: Builds) -> None:
    out = builds.result("layers")
    merged = builds.data["layers"]
    assert len(out["blobs"]) == 2
    with mounted("layers") as mnt:
        assert_same_tree(merged, mnt)
    # umounted: every object gets CLOSEd; the kernel sends CLOSE as the umount ends, so the daemon may still
    # be handling it when umount returns: poll the API, bounded
    deadline = time.monotonic() + 20
    while opened := [o for o in daemon.api("/api/v1/daemon")["objects"] if o["volume"] == "layers"]:
        assert time.monotonic() < deadline, f"still open after umount: {opened}"
        time.sleep(0.05)


def test_domain_sharing_opens_a_shared_blob_once(daemon: DaemonProc, builds: Builds) -> None:
    img_a, img_b = builds.result("dom-a"), builds.result("dom-b")
    shared, top_a, top_b = builds.data["shared"], builds.data["dom-a"], builds.data["dom-b"]
    shared_id = img_a["layers"][0]
    assert img_b["layers"][0] == shared_id
    with mounted("dom-a", "domain_id=dom") as ma, mounted("dom-b", "domain_id=dom") as mb:
        for mnt, top in ((ma, top_a), (mb, top_b)):
            for src in (shared / "shared.bin", top / next(p.name for p in top.iterdir())):
                assert (mnt / src.name).read_bytes() == src.read_bytes()
        objects = [o for o in daemon.api("/api/v1/daemon")["objects"] if o["volume"] == "dom"]
        keys = sorted(o["key"] for o in objects)
        assert keys.count(shared_id) == 1, objects  # one cache object for both mounts
        assert {"dom-a", "dom-b", img_a["layers"][1], img_b["layers"][1]} <= set(keys)


def test_an_impostor_of_a_shared_blob_id_is_refused_in_the_domain(daemon: DaemonProc, builds: Builds) -> None:
    """An impostor names dom-a's shared layer blob id, with content and digests of its own: in dom-a's domain it
    would be served from the shared cache object (or fill it for dom-a): its mount is refused."""
    shared_id = builds.result("dom-a")["layers"][0]
    src = _tree(scratch() / "sources" / "impostor", {"shared.bin": os.urandom(1_500_000)})
    built = scratch() / "impostor-built"
    own = build(built, src, compressor="lz4_block")["layers"][0]
    imp = daemon.images / "dom-imp"
    shutil.rmtree(imp, ignore_errors=True)
    (imp / "blobs").mkdir(parents=True)
    (imp / "image.boot").write_bytes((built / "image.boot").read_bytes().replace(own.encode(), shared_id.encode()))
    shutil.copyfile(built / "blobs" / own, imp / "blobs" / shared_id)
    want = (builds.data["shared"] / "shared.bin").read_bytes()
    with mounted("dom-a", "domain_id=dom") as ma:
        assert (ma / "shared.bin").read_bytes() == want
        with pytest.raises(OSError), mounted("dom-imp", "domain_id=dom"):
            pass
        assert (ma / "shared.bin").read_bytes() == want
    assert "describes other content under that id" in daemon.log_text()


def test_upstream_image_mounted_by_fsid_reads_back(daemon: DaemonProc) -> None:
    boot = UPSTREAM / "rafs-v6-2.2.boot"
    if not boot.exists():
        pytest.skip(f"no upstream fixtures at {UPSTREAM}")
    img = daemon.images / "upstream"
    shutil.rmtree(img, ignore_errors=True)
    img.mkdir()
    (img / "image.boot").symlink_to(boot)
    (img / "blobs").symlink_to(UPSTREAM / "blobs", target_is_directory=True)
    bs = Bootstrap(boot)
    reader = ImageReader(bs, LocalBlobDir(UPSTREAM / "blobs"))
    before = daemon.api("/api/v1/metrics/blobcache")["pipeline"]
    sizes = {}
    with mounted("upstream") as mnt:
        for path, _, ino in bs.walk():
            if ino.is_reg:
                data = (mnt / path.lstrip("/")).read_bytes()
                assert data == reader.read_file(ino), path
                sizes[path.rsplit("/", 1)[-1]] = len(data)
    assert sizes == {"lib.rs": 16931, "sync_io.rs": 13400}
    after = daemon.api("/api/v1/metrics/blobcache")["pipeline"]
    assert after["chunks_written"] > before["chunks_written"]  # blake3 digests checked on the way
    assert after["digest_failures"] == before["digest_failures"]


def test_unknown_fsid_fails_the_mount(daemon: DaemonProc) -> None:
    with pytest.raises(OSError) as info:
        with mounted("no-such-image"):
            pass
    assert info.value.errno in (errno.EIO, errno.ENOBUFS, errno.ENOENT)
    assert "OPEN no-such-image in erofs,no-such-image refused (ENOENT)" in daemon.log_text()


def test_partial_read_of_a_large_image_fetches_only_what_it_needs(daemon: DaemonProc) -> None:
    image, _ = large_image()
    (blob,) = (image / "blobs").iterdir()
    assert blob.stat().st_size >= 50 * MiB
    link_image(daemon.images, "large-partial", image)
    with mounted("large-partial") as mnt:
        with open(mnt / "big", "rb", buffering=0) as f:
            f.seek(30 * MiB + 12345)
            piece = f.read(100_000)
    fetched = daemon.backend_bytes("large-partial")
    with open(scratch() / "large" / "src" / "big", "rb") as src:
        src.seek(30 * MiB + 12345)
        assert piece == src.read(100_000)
    print(f"partial read: 100000 bytes of a {blob.stat().st_size}-byte blob fetched {fetched} backend bytes")
    assert 0 < fetched <= 3 * MiB  # the chunk, at most ~1 MiB of amplification, and the blob's metadata


def test_corrupted_chunk_gives_eio_for_its_file_only(daemon: DaemonProc, builds: Builds) -> None:
    out = builds.result("damaged")
    files = builds.data["damaged"]
    blob = daemon.images / "damaged" / "blobs" / out["blobs"][0]["id"]
    raw = bytearray(blob.read_bytes())
    at = raw.find(files["b-bad"][100_000:100_064])
    assert at > 0
    raw[at] ^= 0xFF
    blob.write_bytes(raw)
    with mounted("damaged") as mnt:
        assert (mnt / "a-good").read_bytes() == files["a-good"]
        with pytest.raises(OSError) as info:
            (mnt / "b-bad").read_bytes()
        assert info.value.errno == errno.EIO
        assert (mnt / "c-good").read_bytes() == files["c-good"]
        with open(mnt / "b-bad", "rb", buffering=0) as f:  # the chunks before the damaged one are fine
            assert f.read(65536) == files["b-bad"][:65536]
    stats = daemon.api("/api/v1/metrics/blobcache")
    assert stats["reads_failed"] >= 1 and stats["pipeline"]["digest_failures"] >= 1
    assert "does not match its digest" in daemon.log_text()


def test_killed_worker_is_replaced_and_the_read_completes(daemon: DaemonProc) -> None:
    """SIGKILL the worker while a big cold read is going on: the supervisor writes ``restore`` and starts a
    new worker; the reader never notices (no remount)."""
    image, digest = large_image()
    link_image(daemon.images, "large-failover", image)
    first = daemon.api("/api/v1/daemon")
    started = threading.Event()
    result: dict[str, Any] = {}

    def reader(path: Path) -> None:
        h = hashlib.sha256()
        try:
            with open(path, "rb", buffering=0) as f:
                while piece := f.read(MiB):
                    h.update(piece)
                    started.set()
            result["sha256"] = h.hexdigest()
        except BaseException as e:  # noqa: BLE001 - reported by the test
            result["error"] = e
        finally:
            started.set()

    with mounted("large-failover") as mnt:
        t = threading.Thread(target=reader, args=(mnt / "big",))
        t.start()
        assert started.wait(TIMEOUT)
        os.kill(first["pid"], signal.SIGKILL)
        assert "sha256" not in result, "the read ended before the worker was killed"
        t.join(TIMEOUT * 2)
        assert not t.is_alive(), "the read did not complete after the worker was killed"
        second = daemon.api("/api/v1/daemon")
    assert "error" not in result, result
    assert result["sha256"] == digest
    assert second["restarts"] == 1 and second["pid"] != first["pid"]
    assert daemon.api("/api/v1/metrics/blobcache")["reads"] > 0  # the new worker served the rest
    assert second["supervisor_pid"] == first["supervisor_pid"]
    assert "died (killed by SIGKILL): restoring" in daemon.log_text()

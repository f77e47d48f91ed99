"""``nydus-erofs mount`` in fanotify pre-content mode (and full mode) against the running kernel (root, >= 6.14).

Images mounted lazily read back identical to their sources; a small read of a large image fetches little; a
damaged chunk gives EIO for its file only; a warm cache is reused; several mounts and readers at once; umount
leaves no mount and no process behind; a dead worker is replaced after a growing wait, which a stop ends at once;
a file open on a mount detached lazily (a stop signal, ``umount -l``, a supervisor giving up) reads right or fails
with EIO until it closes, never reads zeros.
"""

from __future__ import annotations

import errno
import hashlib
import http.server
import json
import os
import random
import re
import select
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from cachefilesd_py.backends import make_backend
from cachefilesd_py.blob_handles import open_image
from cachefilesd_py.mount.cachefile import cache_file_path, prepare_cache_files
from cachefilesd_py.mount.ready import daemon_error, error_line
from cachefilesd_py.mount.record import RUN_DIR_ENV, read_record, record_path
from cachefilesd_py.mount.service import mount_image, umount_image
from cachefilesd_py.mount.spec import MountSpec, spec_fd
from cachefilesd_py.pipeline import Pipeline
from cachefilesd_py.supervisor import TEST_BACKOFF_ENV, RestartPolicy
from erofs.errors import BackendError, DigestMismatchError, ImageError, NydusErofsError, UsageError
from erofs.paths import process_start_time
from erofs.reader import Bootstrap, ImageReader, LocalBlobDir
from fscache.errors import PreContentUnsupportedError
from fscache.fanotify import FanotifyGroup
from fscache.inotify import Inotify
from fscache.mount import MountError, is_mounted, umount
from tests.support.cli import run
from tests.support.damage import flip_chunk_byte
from tests.support.fstree import assert_same_tree
from tests.support.kmount import umount as kernel_umount
from tests.support.paths import NYDUS as UPSTREAM
from tests.support.poll import wait_for
from tests.support.rootfs import make_rootfs

UPSTREAM_FILES = {"lib.rs": 16931, "sync_io.rs": 13400}
TIMEOUT = 60.0

pytestmark = pytest.mark.kernel("erofs", "fanotify")


def _wait_exit(pid: int, act: Callable[[], object], what: str) -> None:
    """Run ``act`` (which should end process ``pid``) and wait, bounded, until the process is gone."""
    pidfd = os.pidfd_open(pid)
    try:
        act()
        p = select.poll()
        p.register(pidfd, select.POLLIN)
        assert p.poll(TIMEOUT * 1000), what
    finally:
        os.close(pidfd)


def build(sources: list[Path], out: Path, compressor: str = "none", chunk_size: str = "1MiB") -> dict[str, Any]:
    proc = run("build", *sources, "--output-dir", out, "--json", "--compressor", compressor, "--chunk-size", chunk_size)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


class Mounts:
    """Mounts made by a test; whatever is still mounted at the end is unmounted and its daemon stopped."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.active: list[Path] = []

    def mount(self, out: Path, name: str, *, mode: str = "fanotify", cache: Path | None = None,
              blobs: Path | None = None, boot: Path | None = None,
              **kw: Any) -> tuple[Path, dict[str, Any]]:  # fmt: skip
        mp = self.tmp / f"mnt-{name}"
        mp.mkdir(exist_ok=True)
        rec = mount_image(MountSpec(str(boot or out / "image.boot"), str(mp), str(cache or self.tmp / f"cache-{name}"),
                                    backend_config={"dir": str(blobs or out / "blobs")}, mode=mode, **kw))  # fmt: skip
        self.active.append(mp)
        assert is_mounted(mp)
        return mp, rec

    def umount(self, mp: Path) -> dict[str, Any]:
        rec = read_record(mp)
        assert rec is not None
        final = umount_image(mp)
        self.active.remove(mp)
        assert not is_mounted(mp, None), f"{mp} still mounted"
        assert read_record(mp) is None and not record_path(mp).with_suffix(".log").exists()
        if rec.get("pid"):
            assert process_start_time(rec["pid"]) is None, f"daemon {rec['pid']} still running"
        for worker in {final.get("worker_pid"), rec.get("worker_pid")} - {None}:  # the supervisor's worker(s)
            assert process_start_time(worker) is None, f"worker {worker} still running"
        return final

    def cleanup(self) -> None:
        for mp in list(self.active):
            rec = read_record(mp) or {}
            try:
                self.umount(mp)
            except Exception:  # noqa: BLE001 - best effort: never leave a mount or a process behind
                if is_mounted(mp, None):
                    subprocess.run(["umount", "-l", str(mp)], check=False)
                pid = rec.get("pid")
                if pid and process_start_time(pid) == rec.get("start_time"):
                    os.kill(pid, signal.SIGKILL)
                    try:
                        os.waitpid(pid, 0)
                    except ChildProcessError:
                        pass
        self.active.clear()


def _in_thread(fn: Callable[[], Any]) -> Any:
    """Run ``fn`` in a thread and return its result (a blocked read fails the test instead of hanging it)."""
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["value"] = fn()
        except BaseException as e:  # noqa: BLE001
            box["error"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(TIMEOUT)
    assert not t.is_alive(), "reader blocked"
    if "error" in box:
        raise box["error"]
    return box["value"]


# -- trees and images ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def rootfs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_rootfs(tmp_path_factory.mktemp("rootfs") / "root")


COMPRESSORS = ("none", "lz4_block", "zstd")


@pytest.fixture(scope="module")
def images(rootfs: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The rootfs built with each compressor (64 KiB chunks)."""
    out = {}
    for comp in COMPRESSORS:
        out[comp] = tmp_path_factory.mktemp(f"image-{comp}")
        build([rootfs], out[comp], comp, "64KiB")
    return out


@pytest.fixture(params=COMPRESSORS)
def image(request: pytest.FixtureRequest, images: dict[str, Path]) -> Path:
    return images[request.param]


def test_builder_images_read_identical(mounts: Mounts, image: Path, rootfs: Path) -> None:
    mp, rec = mounts.mount(image, "img")
    assert rec["mode"] == "fanotify" and rec["pid"]
    _in_thread(lambda: assert_same_tree(rootfs, mp))
    stats = mounts.umount(mp)["stats"]
    assert stats["events"]["denied"] == 0 and stats["pipeline"]["digest_failures"] == 0
    assert stats["pipeline"]["chunks_written"] > 0


def test_record_names_the_supervisor_and_a_worker_without_it_does_not_start(
        mounts: Mounts, images: dict[str, Path], tmp_path: Path) -> None:  # fmt: skip
    """``umount`` signals the recorded pid: it is the supervisor, passed to the worker explicitly (a worker whose
    supervisor died is re-parented to init or a subreaper, so ``getppid()`` could name pid 1)."""
    out = images["none"]
    mp, rec = mounts.mount(out, "rec")
    assert b"cachefilesd_py.mount.supervisor" in Path(f"/proc/{rec['pid']}/cmdline").read_bytes()
    status = Path(f"/proc/{rec['worker_pid']}/status").read_text()
    assert re.search(rf"^PPid:\s+{rec['pid']}$", status, re.M)
    mounts.umount(mp)
    # a worker told that another process is its supervisor: the start fails, nothing stays mounted
    mp2 = tmp_path / "mnt-orphan"
    mp2.mkdir()
    group, inotify = FanotifyGroup(pre_content=True), Inotify()
    try:
        r, w = os.pipe()
        spec = MountSpec(str(out / "image.boot"), str(mp2), str(tmp_path / "cache-orphan"), mode="fanotify",
                         backend_config={"dir": str(out / "blobs")})  # fmt: skip
        sfd = spec_fd(spec)
        proc = subprocess.run(
            [sys.executable, "-m", "cachefilesd_py.mount.worker", "--spec-fd", str(sfd),
             "--group-fd", str(group.fileno()), "--inotify-fd", str(inotify.fileno()),
             "--supervisor-pid", "1", "--ready-fd", str(w)],
            pass_fds=(group.fileno(), inotify.fileno(), w, sfd), capture_output=True, text=True, timeout=60,
            env=dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2])),
        )  # fmt: skip
        os.close(w)
        os.close(sfd)
        with os.fdopen(r, "rb") as rf:
            ready = rf.read().decode()
    finally:
        group.close()
        inotify.close()
    assert proc.returncode != 0 and ready.strip() == "error 5 the supervisor (pid 1) is gone", (ready, proc.stderr)
    assert not is_mounted(mp2, None) and not record_path(mp2).exists()


def test_multi_layer_image_reads_identical(mounts: Mounts, tmp_path: Path) -> None:
    lower, upper, merged = tmp_path / "lower", tmp_path / "upper", tmp_path / "merged"
    rnd = random.Random(3)
    for d in (lower, upper):
        (d / "etc").mkdir(parents=True)
    (lower / "etc" / "base.conf").write_bytes(b"base\n" * 1000)
    (lower / "big.bin").write_bytes(rnd.randbytes(3 << 20))
    (lower / "replaced.txt").write_bytes(b"old\n")
    (upper / "etc" / "app.conf").write_bytes(b"app\n" * 500)
    (upper / "app.bin").write_bytes(rnd.randbytes((2 << 20) + 77))
    (upper / "replaced.txt").write_bytes(b"new content\n" * 3)
    for d in (lower, upper):  # directories merge: give both layers the same directory times
        for p in (d, d / "etc"):
            os.utime(p, ns=(1_700_000_000 * 10**9, 1_700_000_000 * 10**9))
    shutil.copytree(lower, merged, symlinks=True)
    shutil.copytree(upper, merged, symlinks=True, dirs_exist_ok=True)
    for p in (merged, merged / "etc"):
        os.utime(p, ns=(1_700_000_000 * 10**9, 1_700_000_000 * 10**9))
    out = tmp_path / "out"
    info = build([lower, upper], out, "lz4_block")
    assert len(info["blobs"]) == 2, info
    mp, _ = mounts.mount(out, "layers")
    _in_thread(lambda: assert_same_tree(merged, mp))
    stats = mounts.umount(mp)["stats"]
    assert set(stats["blobs"]) == {b["id"] for b in info["blobs"]}
    assert stats["events"]["denied"] == 0


@pytest.mark.upstream
def test_upstream_image_reads_back(mounts: Mounts, tmp_path: Path) -> None:
    mp, _ = mounts.mount(UPSTREAM, "upstream", boot=UPSTREAM / "rafs-v6-2.2.boot", blobs=UPSTREAM / "blobs")
    with Bootstrap(UPSTREAM / "rafs-v6-2.2.boot") as bs:
        reader = ImageReader(bs, LocalBlobDir(UPSTREAM / "blobs"))  # the library path, digests verified
        expected = {name: reader.read_file(bs.lookup("/" + name)) for name in UPSTREAM_FILES}
    for name, size in UPSTREAM_FILES.items():
        data = _in_thread(lambda n=name: (mp / n).read_bytes())
        assert len(data) == size and data == expected[name], name
    assert sorted(os.listdir(mp)) == sorted(UPSTREAM_FILES)
    stats = mounts.umount(mp)["stats"]
    assert stats["pipeline"]["chunks_written"] == 2 and stats["pipeline"]["digest_failures"] == 0


# -- what is fetched ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def big_image(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(source, image): ~104 MB of incompressible data in many files, plus a few small ones."""
    base = tmp_path_factory.mktemp("big")
    src = base / "src"
    (src / "data").mkdir(parents=True)
    rnd = random.Random(11)
    for i in range(50):
        (src / "data" / f"part-{i:02d}.bin").write_bytes(rnd.randbytes((2 << 20) + i * 4096 + 3))
    (src / "small.txt").write_bytes(b"a small file in a big image\n" * 20)
    (src / "other.txt").write_bytes(b"another small file\n" * 30)
    out = base / "out"
    build([src], out, "lz4_block")
    return src, out


def test_small_read_of_big_image_fetches_little(mounts: Mounts, big_image: tuple[Path, Path]) -> None:
    src, out = big_image
    blob_bytes = sum(p.stat().st_size for p in (out / "blobs").iterdir())
    assert blob_bytes >= 100_000_000
    mp, _ = mounts.mount(out, "big")
    assert _in_thread(lambda: (mp / "small.txt").read_bytes()) == (src / "small.txt").read_bytes()
    stats = mounts.umount(mp)["stats"]
    fetched = stats["backend"]["bytes"]  # everything read from the backend: blob metadata and chunks
    print(f"fetched {fetched} of {blob_bytes} blob bytes ({100 * fetched / blob_bytes:.3f}%)")
    assert 0 < fetched < 0.02 * blob_bytes
    assert stats["pipeline"]["bytes_fetched"] > 0


def test_remount_over_warm_cache_fetches_nothing_already_read(mounts: Mounts, big_image: tuple[Path, Path],
                                                              tmp_path: Path) -> None:  # fmt: skip
    src, out = big_image
    cache = tmp_path / "warm-cache"
    names = ["small.txt", "data/part-03.bin", "data/part-17.bin"]
    mp, _ = mounts.mount(out, "warm1", cache=cache)
    for n in names:
        assert _in_thread(lambda n=n: _sha(mp / n)) == _sha(src / n)
    first = mounts.umount(mp)["stats"]["pipeline"]
    assert first["chunks_fetched"] > 0
    # readahead off: it would fetch beyond the files (speculatively, for sequential readers)
    mp, _ = mounts.mount(out, "warm2", cache=cache, readahead=0)
    for n in names:
        assert _in_thread(lambda n=n: _sha(mp / n)) == _sha(src / n)
    stats = mounts.umount(mp)["stats"]
    assert stats["pipeline"]["backend_reads"] == 0 and stats["pipeline"]["chunks_fetched"] == 0, stats["pipeline"]
    assert stats["events"]["events"] > 0 and stats["events"]["filled"] == 0 and stats["events"]["denied"] == 0
    # with readahead on, reading them again needs no fill either: every event finds its range present
    mp, _ = mounts.mount(out, "warm2b", cache=cache)
    for n in names:
        assert _in_thread(lambda n=n: _sha(mp / n)) == _sha(src / n)
    assert mounts.umount(mp)["stats"]["events"]["filled"] == 0
    # the daemon still fetches what is not cached yet
    mp, _ = mounts.mount(out, "warm3", cache=cache)
    assert _in_thread(lambda: _sha(mp / "data/part-40.bin")) == _sha(src / "data/part-40.bin")
    assert mounts.umount(mp)["stats"]["pipeline"]["chunks_fetched"] > 0


def test_two_mounts_share_a_cache_dir(mounts: Mounts, big_image: tuple[Path, Path], tmp_path: Path) -> None:
    """Two daemons mark the same cache file: every read is an event to both; sequential reads through the
    second mount (whose own fd the first daemon's mark watches) neither deadlock nor fetch twice."""
    src, out = big_image
    cache = tmp_path / "shared-cache"
    first, _ = mounts.mount(out, "share1", cache=cache)
    second, _ = mounts.mount(out, "share2", cache=cache)
    names = [f"data/part-{i:02d}.bin" for i in (7, 8, 9, 30)]
    for n in names:
        assert _in_thread(lambda n=n: _sha(second / n)) == _sha(src / n)
    for n in names:
        assert _in_thread(lambda n=n: _sha(first / n)) == _sha(src / n)
    s2 = mounts.umount(second)["stats"]
    s1 = mounts.umount(first)["stats"]
    assert s1["events"]["denied"] == s2["events"]["denied"] == 0
    assert s2["events"]["readahead"] == 0
    needed = sum((src / n).stat().st_size for n in names)
    fetched = s1["pipeline"]["bytes_fetched"] + s2["pipeline"]["bytes_fetched"]
    assert needed <= fetched < 2 * needed + (32 << 20), (needed, fetched)  # not twice (readahead aside)


# -- failures -----------------------------------------------------------------------------------------------------
def test_corrupted_chunk_gives_eio_for_its_file_only(mounts: Mounts, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    rnd = random.Random(5)
    files = {
        "before.bin": rnd.randbytes((1 << 20) + 100),
        "victim.bin": rnd.randbytes(3 << 20),
        "after.txt": b"after the victim\n" * 4000,
        "last.bin": rnd.randbytes(700_000),
    }
    for name, data in files.items():
        (src / name).write_bytes(data)
    out = tmp_path / "out"
    build([src], out, "none")
    # flip a byte in the middle chunk of victim.bin
    blobs = tmp_path / "damaged-blobs"
    shutil.copytree(out / "blobs", blobs)
    flipped = flip_chunk_byte(out / "image.boot", blobs, "/victim.bin", 1)

    mp, rec = mounts.mount(out, "damaged", blobs=blobs)
    with pytest.raises(OSError) as info:
        _in_thread(lambda: (mp / "victim.bin").read_bytes())
    assert info.value.errno == errno.EIO
    # other files are fine, before and after the damaged one, and the daemon keeps serving
    for name in ("before.bin", "after.txt", "last.bin"):
        assert _in_thread(lambda n=name: (mp / n).read_bytes()) == files[name], name
    # the damaged chunk was never written: reading it again fails again (no zeros), the rest of the file reads
    with pytest.raises(OSError) as info:
        _in_thread(lambda: (mp / "victim.bin").read_bytes())
    assert info.value.errno == errno.EIO

    def head() -> bytes:
        with open(mp / "victim.bin", "rb") as f:
            return f.read(1 << 20)

    assert _in_thread(head) == files["victim.bin"][: 1 << 20]
    log_text = Path(rec["log"]).read_text()
    assert flipped.blob_id in log_text and f"chunk {flipped.ci_index}" in log_text
    stats = mounts.umount(mp)["stats"]
    assert stats["events"]["denied"] >= 2 and stats["pipeline"]["digest_failures"] >= 1
    # full mode verifies everything before mounting: the damaged chunk fails the mount, nothing is mounted
    with pytest.raises(DigestMismatchError) as failed:
        mounts.mount(out, "damaged-full", mode="full", blobs=blobs)
    assert flipped.blob_id in str(failed.value) and "\n" not in str(failed.value)
    assert not is_mounted(tmp_path / "mnt-damaged-full", None) and read_record(tmp_path / "mnt-damaged-full") is None


# -- concurrency --------------------------------------------------------------------------------------------------
def test_several_mounts_and_concurrent_readers(mounts: Mounts, rootfs: Path, tmp_path: Path) -> None:
    outs = []
    for comp in ("none", "zstd"):
        out = tmp_path / f"out-{comp}"
        build([rootfs], out, comp, "64KiB")
        outs.append(out)
    # a and c: the same image over one cache dir (two daemons, each marking the same cache file)
    mps = [mounts.mount(outs[0], "a")[0], mounts.mount(outs[1], "b")[0],
           mounts.mount(outs[0], "c", cache=tmp_path / "cache-a")[0]]  # fmt: skip
    files = sorted(p.relative_to(rootfs) for p in rootfs.rglob("*")
                   if stat.S_ISREG(p.lstat().st_mode) and p.lstat().st_size > 0)  # fmt: skip
    want = {f: _sha(rootfs / f) for f in files}
    errors: list[str] = []
    barrier = threading.Barrier(6)

    def reader(i: int) -> None:
        mp = mps[i % len(mps)]
        k = i * len(files) // 6
        order = files[k:] + files[:k]  # every reader starts somewhere else
        barrier.wait(TIMEOUT)
        for f in order:
            try:
                if _sha(mp / f) != want[f]:
                    errors.append(f"{mp}/{f}: content differs")
            except OSError as e:
                errors.append(f"{mp}/{f}: {e}")

    threads = [threading.Thread(target=reader, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(TIMEOUT * 2)
        assert not t.is_alive(), "reader blocked"
    assert not errors, errors[:5]
    for mp in mps:
        stats = mounts.umount(mp)["stats"]
        assert stats["events"]["denied"] == 0
        if mp.name == "mnt-c":  # the second daemon of a cache file never writes through its own fd
            assert stats["events"]["readahead"] == 0


# -- modes, CLI and cleanup ---------------------------------------------------------------------------------------
def test_full_mode_fetches_everything_then_mounts_without_daemon(mounts: Mounts, images: dict[str, Path],
                                                                 rootfs: Path, tmp_path: Path) -> None:  # fmt: skip
    image = images["none"]
    cache = tmp_path / "full-cache"
    mp, rec = mounts.mount(image, "full", mode="full", cache=cache)
    assert rec["mode"] == "full" and rec["pid"] is None
    for f in cache.iterdir():
        fd = os.open(f, os.O_RDONLY)
        try:
            start = os.lseek(fd, 0, os.SEEK_DATA)  # a blob's first block, its zero prefix, no chunk: a hole
            assert start <= 4096 and os.lseek(fd, start, os.SEEK_HOLE) == os.fstat(fd).st_size, f"{f} has holes"
        finally:
            os.close(fd)
    assert_same_tree(rootfs, mp)
    mounts.umount(mp)
    # a lazy mount over the complete cache marks nothing: no event, no fetch
    mp, rec = mounts.mount(image, "after-full", cache=cache)
    assert rec["mode"] == "fanotify"
    _in_thread(lambda: assert_same_tree(rootfs, mp))
    stats = mounts.umount(mp)["stats"]
    assert stats["events"]["events"] == 0 and stats["events"]["complete_unmarked"] == 1
    assert stats["pipeline"]["backend_reads"] == 0


def test_plain_umount_stops_the_daemon(mounts: Mounts, images: dict[str, Path]) -> None:
    """Unmounted by other means (util-linux umount): the daemon notices and exits, recording its stats."""
    image = images["none"]
    mp, rec = mounts.mount(image, "plain")
    assert (mp / "small").read_bytes() == b"hello\n"
    _wait_exit(rec["pid"], lambda: kernel_umount(mp), "daemon still running after its mount went away")
    left = read_record(mp)
    assert left is not None and left["stopped"] and left["stats"]["pipeline"]["chunks_written"] > 0
    mounts.umount(mp)  # forgets the record, reaps the daemon


def test_sigterm_while_mounted_unmounts(mounts: Mounts, images: dict[str, Path]) -> None:
    """The daemon stopped without umount takes its mount with it (holes must never read as zeros)."""
    image = images["lz4_block"]
    mp, rec = mounts.mount(image, "term")
    _wait_exit(rec["pid"], lambda: os.kill(rec["pid"], signal.SIGTERM), "daemon did not stop")
    assert not is_mounted(mp, None)
    assert read_record(mp)["stopped"]
    mounts.umount(mp)


def test_cache_files_reused_or_started_afresh(images: dict[str, Path], tmp_path: Path) -> None:
    image = images["none"]
    backend = make_backend("localfs", dir=image / "blobs")
    try:
        handles = open_image(image / "image.boot", backend)
        cache = tmp_path / "cache"
        cache.mkdir()
        stale = cache_file_path(cache, handles[0])
        stale.write_bytes(b"junk" * 1000)  # wrong size: emptied, then sized
        (cf,) = prepare_cache_files(cache, handles)
        try:
            assert cf.size == handles[0].uncompressed_size == stale.stat().st_size and not cf.reused
            assert cf.data_extents() == [] and cf.missing() > 0 and not cf.complete()
            chunk = handles[0].meta.chunk(0)
            with Pipeline() as p:
                p.fill(handles[0], chunk[2], 1, cf.pwrite, cf.present)
        finally:
            cf.close()
        (again,) = prepare_cache_files(cache, handles)  # right size: reused, what the chunk map records is present
        try:
            assert again.reused and again.present(chunk[2], chunk[3]) and again.data_extents()
        finally:
            again.close()
    finally:
        backend.close()


def _cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return run(*args, env=env, timeout=TIMEOUT)


def test_cli_mount_umount_and_errors(images: dict[str, Path], rootfs: Path, tmp_path: Path) -> None:
    image = images["zstd"]
    env = dict(os.environ, **{RUN_DIR_ENV: str(tmp_path / "run")})
    mp = tmp_path / "mnt"
    mp.mkdir()
    boot = str(image / "image.boot")
    proc = _cli("mount", boot, str(mp), "--cache-dir", str(tmp_path / "cache"), "--json", env=env)
    assert proc.returncode == 0, proc.stderr
    rec = json.loads(proc.stdout)
    try:
        assert rec["mode"] == "fanotify" and process_start_time(rec["pid"]) is not None
        assert _sha(mp / "odd") == _sha(rootfs / "odd")
        again = _cli("mount", boot, str(mp), "--cache-dir", str(tmp_path / "cache"), env=env)
        assert again.returncode == 2 and "already a mountpoint" in again.stderr
        assert again.stderr.count("\n") == 1
    finally:
        proc = _cli("umount", str(mp), env=env)
    assert proc.returncode == 0, proc.stderr
    assert not is_mounted(mp, None)
    assert process_start_time(rec["pid"]) is None  # the daemon has exited (and was reaped by init)
    assert not any((tmp_path / "run").iterdir())

    # errors are one line
    proc = _cli("umount", str(mp), env=env)
    assert proc.returncode == 2 and "not mounted" in proc.stderr and proc.stderr.count("\n") == 1
    proc = _cli("mount", boot, str(mp), "--cache-dir", str(tmp_path / "cache"), "--mode", "fscache", env=env)
    assert proc.returncode == 2 and "fscache" in proc.stderr and proc.stderr.count("\n") == 1
    shm = Path("/dev/shm")
    if shm.is_dir():
        cache = shm / f"nydus-erofs-test-{os.getpid()}"
        try:
            proc = _cli("mount", boot, str(mp), "--cache-dir", str(cache), "--mode", "fanotify", env=env)
            assert proc.returncode == 2 and "tmpfs" in proc.stderr and proc.stderr.count("\n") == 1, proc.stderr
        finally:
            shutil.rmtree(cache, ignore_errors=True)
    proc = _cli("mount", boot, str(mp), "--cache-dir", str(tmp_path / "c2"), "--blob-dir", str(tmp_path), env=env)
    assert proc.returncode == 4 and proc.stderr.count("\n") == 1 and "not found" in proc.stderr, proc.stderr
    assert not is_mounted(mp, None)


def test_daemon_errors_keep_their_exit_status_across_the_ready_pipe() -> None:
    # every error line used to come back as a MountError (exit 5): a damaged blob gave 5 here and 3 in full mode
    no_space = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "/run/x/rec.json")
    cases: list[tuple[BaseException, type[Exception], int, str]] = [
        (ImageError("blob b: ToC: checksum mismatch"), ImageError, 3, "blob b: ToC: checksum mismatch"),
        (DigestMismatchError("chunk 1 does not match"), ImageError, 3, "chunk 1 does not match"),
        (BackendError("blob b: not found in /blobs"), BackendError, 4, "blob b: not found in /blobs"),
        (UsageError("2 cache files\nsecond line"), UsageError, 2, "2 cache files"),
        (MountError(errno.EINVAL, "mount a on b: Invalid argument"), MountError, 5, "mount a on b: Invalid argument"),
        (no_space, NydusErofsError, 1, "No space left on device: /run/x/rec.json"),  # not "[Errno 28] ..."
        (PreContentUnsupportedError(errno.EINVAL, "no pre-content events"), MountError, 5, "no pre-content events"),
        (RuntimeError("a bug"), MountError, 5, "a bug"),
        (KeyboardInterrupt(), MountError, 5, "KeyboardInterrupt"),
    ]  # fmt: skip
    for exc, kind, code, message in cases:
        line = error_line(exc)
        assert "\n" not in line, line
        err = daemon_error(line)
        assert (type(err), err.exit_code, str(err)) == (kind, code, message), (exc, line)
    # a line without a known status (an older daemon's): a mount failure, the message whole
    for line, message in (("error 7 days", "7 days"), ("error blob b: gone", "blob b: gone"), ("error 3", "3")):
        err = daemon_error(line)
        assert (type(err), str(err)) == (MountError, message), line


# -- worker failover ----------------------------------------------------------------------------------------------
def _kill_worker(rec: dict[str, Any]) -> int:
    """SIGKILL the mount's worker and wait until it is gone; its pid."""
    worker = rec["worker_pid"]
    assert worker and worker != rec["pid"] and process_start_time(worker) is not None
    _wait_exit(worker, lambda: os.kill(worker, signal.SIGKILL), f"worker {worker} survived SIGKILL")
    return worker


def _new_worker(mp: Path, old: int) -> dict[str, Any]:
    """The record once the supervisor's next worker serves (polled, bounded)."""
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        rec = read_record(mp) or {}
        pid = rec.get("worker_pid")
        if pid and pid != old and process_start_time(pid) == rec.get("worker_start_time"):
            return rec
        time.sleep(0.01)
    raise AssertionError(f"no new worker after {old} died: {read_record(mp)}")


def test_worker_killed_during_cold_read(mounts: Mounts, big_image: tuple[Path, Path]) -> None:
    """SIGKILL the worker in the middle of a cold read of many files: every byte read is right, a read the
    dead worker held fails with EIO (never zeros); the new worker serves the rest and the files read again."""
    src, out = big_image
    mp, rec = mounts.mount(out, "kill", readahead=0)  # every 1 MiB window is an event the worker fills
    names = [f"data/part-{i:02d}.bin" for i in range(50)]
    started = threading.Event()
    result: dict[str, Any] = {"wrong": [], "eio": [], "other": [], "complete": []}

    def reader() -> None:
        for name in names:
            want = (src / name).read_bytes()
            pos = 0
            try:
                with open(mp / name, "rb", buffering=0) as f:
                    while piece := f.read(256 << 10):
                        if piece != want[pos : pos + len(piece)]:
                            result["wrong"].append((name, pos))
                            break
                        pos += len(piece)
                        started.set()
            except OSError as e:
                result["eio" if e.errno == errno.EIO else "other"].append((name, pos, e.errno))
            else:
                if pos == len(want):
                    result["complete"].append(name)
        started.set()

    t = threading.Thread(target=reader, daemon=True)
    t.start()
    assert started.wait(TIMEOUT)
    old = _kill_worker(rec)
    t.join(TIMEOUT * 2)
    assert not t.is_alive(), "reader blocked"
    assert not result["wrong"] and not result["other"], result
    assert len(result["complete"]) + len(result["eio"]) == len(names), result
    print(f"{len(result['eio'])} reads failed with EIO: {result['eio']}")
    new = _new_worker(mp, old)
    assert new["pid"] == rec["pid"] and new["restarts"] >= 1
    # a fresh read of every file is right, the one the worker died in included; other files too
    for name in [*names, "small.txt", "other.txt"]:
        assert _in_thread(lambda n=name: _sha(mp / n)) == _sha(src / name), name
    log_text = Path(rec["log"]).read_text()
    assert f"worker {old} died (killed by SIGKILL)" in log_text
    print(*(line for line in log_text.splitlines() if "denied" in line or "worker" in line), sep="\n")
    stats = mounts.umount(mp)["stats"]
    assert stats["pipeline"]["digest_failures"] == 0
    assert process_start_time(old) is None and process_start_time(new["worker_pid"]) is None


def test_worker_killed_while_idle_then_read(mounts: Mounts, images: dict[str, Path], rootfs: Path) -> None:
    """Reads made while no worker runs wait for the next one, which serves them right."""
    mp, rec = mounts.mount(images["zstd"], "idle")
    assert (mp / "small").read_bytes() == b"hello\n"
    old = _kill_worker(rec)
    _in_thread(lambda: assert_same_tree(rootfs, mp))  # started before the new worker (probably): it waits
    new = _new_worker(mp, old)
    assert new["pid"] == rec["pid"]
    # and again: the restarted worker is supervised like the first
    again = _kill_worker(new)
    _in_thread(lambda: assert_same_tree(rootfs, mp))
    last = _new_worker(mp, again)
    assert last["restarts"] == 2
    stats = mounts.umount(mp)["stats"]
    assert stats["events"]["denied"] == 0
    for pid in (rec["pid"], old, again, last["worker_pid"]):
        assert process_start_time(pid) is None, pid
    assert not is_mounted(mp, None)


class GatedBlobServer:
    """Blobs over HTTP (ranged GETs); while ``armed``, a GET reports itself (``arrived``) and waits for
    ``release``: the worker is then certainly in the middle of a fill it has not answered."""

    def __init__(self, blobs: Path) -> None:
        self.armed, self.arrived, self.release = threading.Event(), threading.Event(), threading.Event()
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
                pass

            def _blob(self) -> Path | None:
                path = blobs / self.path.strip("/")
                if not path.is_file():
                    self.send_error(404)
                    return None
                return path

            def do_HEAD(self) -> None:  # noqa: N802 - the base class's name
                if path := self._blob():
                    self.send_response(200)
                    self.send_header("Content-Length", str(path.stat().st_size))
                    self.end_headers()

            def do_GET(self) -> None:  # noqa: N802
                if outer.armed.is_set():
                    outer.arrived.set()
                    outer.release.wait(TIMEOUT)
                path = self._blob()
                if path is None:
                    return
                size = path.stat().st_size
                m = re.fullmatch(r"bytes=(\d+)-(\d+)", self.headers.get("Range", ""))
                first, last = (int(m.group(1)), min(int(m.group(2)), size - 1)) if m else (0, size - 1)
                with open(path, "rb") as f:
                    f.seek(first)
                    body = f.read(last + 1 - first)
                self.send_response(206 if m else 200)
                if m:
                    self.send_header("Content-Range", f"bytes {first}-{last}/{size}")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                try:
                    self.wfile.write(body)
                except OSError:
                    pass  # the worker was killed

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.armed.clear()
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


def _seen_by_nobody(paths: list[str]) -> bytes:
    """What user 65534 can read of ``paths`` (a file it may not read reads as nothing)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: drop to nobody, read what it can
        try:
            os.close(r)
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            out = b""
            for p in paths:
                try:
                    out += Path(p).read_bytes()
                except OSError:
                    pass
            os.write(w, out)
        finally:
            os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        seen = f.read()
    os.waitpid(pid, 0)
    return seen


def test_backend_secrets_are_not_on_the_daemon_command_lines(mounts: Mounts, images: dict[str, Path], rootfs: Path,
                                                             tmp_path: Path) -> None:  # fmt: skip
    """Any user reads /proc/PID/cmdline: the backend options (a token here) reach the supervisor and its worker
    some other way, and the record and the log do not hold them either."""
    server = GatedBlobServer(images["none"] / "blobs")
    secret = "SECRET-b64f9e2c"
    config = json.dumps({"url": server.url, "headers": {"Authorization": f"Bearer {secret}"}})
    mp = tmp_path / "mnt-secret"
    mp.mkdir()
    try:
        proc = run("mount", images["none"] / "image.boot", mp, "--cache-dir", tmp_path / "cache-secret", "--backend",
                   "http", "--backend-config", config, "--mode", "fanotify", "--json", timeout=TIMEOUT)  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        mounts.active.append(mp)
        rec = json.loads(proc.stdout)
        assert secret not in proc.stdout
        procs = [rec["pid"], rec["worker_pid"]]
        seen = _seen_by_nobody([f"/proc/{pid}/{name}" for pid in procs for name in ("cmdline", "environ")])
        assert b"cachefilesd_py" in seen  # the cmdlines were read
        assert secret.encode() not in seen
        assert secret not in record_path(mp).read_text() and secret not in Path(rec["log"]).read_text()
        _in_thread(lambda: assert_same_tree(rootfs, mp))  # served through the http backend
        mounts.umount(mp)
    finally:
        server.close()


def test_worker_killed_holding_an_event_reader_gets_eio(mounts: Mounts, big_image: tuple[Path, Path],
                                                        tmp_path: Path) -> None:  # fmt: skip
    """The worker dies in the middle of a fill (its backend request stalled): the supervisor denies the event
    it held, the reader gets EIO, not zeros; the next worker serves the file and the others."""
    src, out = big_image
    server = GatedBlobServer(out / "blobs")
    try:
        mp = tmp_path / "mnt-gated"
        mp.mkdir()
        rec = mount_image(MountSpec(str(out / "image.boot"), str(mp), str(tmp_path / "cache-gated"), backend="http",
                                    backend_config={"url": server.url, "retry_limit": 0}, mode="fanotify"))  # fmt: skip
        mounts.active.append(mp)
        name = "data/part-05.bin"
        server.armed.set()
        box: dict[str, Any] = {}

        def reader() -> None:
            try:
                box["data"] = (mp / name).read_bytes()
            except OSError as e:
                box["errno"] = e.errno

        t = threading.Thread(target=reader, daemon=True)
        t.start()
        assert server.arrived.wait(TIMEOUT), "no fetch for the read"
        old = _kill_worker(rec)
        server.armed.clear()
        server.release.set()
        t.join(TIMEOUT)
        assert not t.is_alive(), "reader blocked"
        # the read the dead worker held fails with EIO; the kernel may retry it (a failed readahead is read
        # again page by page), then the new worker serves it: right data then, never zeros
        assert box.get("errno") == errno.EIO or box.get("data") == (src / name).read_bytes(), box.get("errno")
        print("reader got", "EIO" if "errno" in box else "the right data")
        new = _new_worker(mp, old)
        assert new["pid"] == rec["pid"] and new["restarts"] == 1
        for n in (name, "data/part-06.bin", "small.txt"):
            assert _in_thread(lambda n=n: _sha(mp / n)) == _sha(src / n), n
        denied = re.search(rf"denied (\d+) events of worker {old} ", Path(rec["log"]).read_text())
        assert denied and int(denied.group(1)) >= 1  # the event it held, answered by the supervisor
        stats = mounts.umount(mp)["stats"]  # the new worker's
        assert stats["pipeline"]["digest_failures"] == 0 and stats["events"]["denied"] == 0
        # it reads ahead too, writing through a dup of an event fd (its own fds, opened after the marks, are
        # watched by the group)
        assert stats["events"]["readahead"] > 0
        assert process_start_time(old) is None and process_start_time(new["worker_pid"]) is None
    finally:
        server.close()


def test_worker_that_cannot_restart_the_supervisor_unmounts(mounts: Mounts, images: dict[str, Path], tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """Workers that keep failing (here: the blobs went away): the supervisor gives up and takes the mount with
    it rather than leave holes to read as zeros."""
    monkeypatch.setenv(TEST_BACKOFF_ENV, "0.1,0.4,4")  # give up after 4 restarts, not half a minute
    blobs = tmp_path / "blobs"
    shutil.copytree(images["none"] / "blobs", blobs)
    mp, rec = mounts.mount(images["none"], "giveup", blobs=blobs)
    blobs.rename(tmp_path / "gone")
    _wait_exit(rec["pid"], lambda: _kill_worker(rec), "supervisor still running")
    assert not is_mounted(mp, None)
    assert "giving up" in Path(rec["log"]).read_text()
    mounts.umount(mp)


# -- restart backoff ----------------------------------------------------------------------------------------------
RESTARTING = re.compile(r"^(\S+ \S+) .*restarting the worker in ([\d.]+) s \(restart (\d+),", re.M)
STARTED = re.compile(r"^(\S+ \S+) .*worker \d+ started \(restart (\d+)\)", re.M)


def _log_time(stamp: str) -> float:
    return datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f").timestamp()


def _wait_log(rec: dict[str, Any], pattern: str, count: int = 1) -> str:
    """The daemon's log once ``pattern`` occurs ``count`` times in it (polled, bounded)."""
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        text = Path(rec["log"]).read_text()
        if len(re.findall(pattern, text)) >= count:
            return text
        time.sleep(0.01)
    raise AssertionError(f"{pattern!r} not {count} times in the log: {Path(rec['log']).read_text()}")


class BlockedReader:
    """Reads a file in a thread; :meth:`wait_blocked` returns once the read waits in the kernel for a fanotify
    answer (the thread's wchan)."""

    def __init__(self, path: Path) -> None:
        self.result: dict[str, Any] = {}
        self.tid = 0
        self.started = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(path,), daemon=True)
        self.thread.start()
        assert self.started.wait(TIMEOUT)

    def _run(self, path: Path) -> None:
        self.tid = threading.get_native_id()
        self.started.set()
        try:
            self.result["data"] = path.read_bytes()
        except OSError as e:
            self.result["errno"] = e.errno

    def wait_blocked(self) -> None:
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline:
            assert self.thread.is_alive(), f"the read did not block: {self.result}"
            if "fanotify" in Path(f"/proc/self/task/{self.tid}/wchan").read_text():
                return
            time.sleep(0.01)
        raise AssertionError("the read never waited for a fanotify answer")

    def join(self) -> dict[str, Any]:
        self.thread.join(TIMEOUT)
        assert not self.thread.is_alive(), "reader blocked"
        return self.result


def _children(pid: int) -> str:
    return Path(f"/proc/{pid}/task/{pid}/children").read_text().strip()


def test_restart_backoff_doubles_to_its_cap_gives_up_and_resets() -> None:
    sup = RestartPolicy(delay=0.1, max_delay=1.0, max_restarts=6, stable=60.0)
    waits = [sup.next_delay(0.5) for _ in range(7)]
    assert waits == [pytest.approx(w) for w in (0.1, 0.2, 0.4, 0.8, 1.0, 1.0)] + [None]
    # a worker that lived `stable` seconds ends the row: its death is the first of a new one
    sup = RestartPolicy(delay=0.1, max_delay=1.0, max_restarts=6, stable=60.0)
    assert [sup.next_delay(lived) for lived in (0.5, 0.5, 0.5, 60.0, 0.5)] == pytest.approx([0.1, 0.2, 0.4, 0.1, 0.2])
    # the defaults: 0.1 s doubling to 5 s, giving up on the 11th death in a row, about half a minute of waits
    sup = RestartPolicy()
    waits = [sup.next_delay(1.0) for _ in range(11)]
    assert waits[:7] == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 5.0]) and waits[-1] is None
    assert 25 < sum(w for w in waits if w is not None) < 30


def test_worker_that_keeps_dying_is_restarted_with_growing_delays_then_unmounted(
        mounts: Mounts, images: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """Each new worker is SIGKILLed as soon as it serves: the waits before the restarts double up to the cap
    (really waited: the log's timestamps say so), and the death one past the limit unmounts."""
    monkeypatch.setenv(TEST_BACKOFF_ENV, "0.1,0.8,5")
    mp, rec = mounts.mount(images["none"], "dying")
    workers, current = [], rec
    for _ in range(5):
        workers.append(_kill_worker(current))
        current = _new_worker(mp, workers[-1])
    workers.append(current["worker_pid"])
    assert current["restarts"] == 5
    _wait_exit(rec["pid"], lambda: _kill_worker(current), "supervisor still running after the last death")
    assert not is_mounted(mp, None)
    for pid in workers:
        assert process_start_time(pid) is None, pid
    log_text = Path(rec["log"]).read_text()
    restarting = RESTARTING.findall(log_text)
    assert [(float(d), int(n)) for _, d, n in restarting] == [(0.1, 1), (0.2, 2), (0.4, 3), (0.8, 4), (0.8, 5)]
    started = {int(n): _log_time(t) for t, n in STARTED.findall(log_text)}
    for stamp, delay, n in restarting:  # from the restart line to the next worker's start: at least the delay
        waited = started[int(n)] - _log_time(stamp)
        assert waited >= float(delay) - 0.002, (n, delay, waited)
    print(*(line for line in log_text.splitlines() if "restart" in line or "giving up" in line), sep="\n")
    (give_up,) = [line for line in log_text.splitlines() if "giving up" in line]
    assert " ERROR: worker died 6 times in a row" in give_up
    assert f"unmounted {mp}" in log_text
    mounts.umount(mp)  # forgets the record


def test_sigterm_during_restart_backoff_stops_at_once(mounts: Mounts, images: dict[str, Path],
                                                      monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """SIGTERM while the supervisor waits (5 minutes) to restart a dead worker: it stops within seconds, denies
    the read queued meanwhile (the reader is released), nothing stays mounted, no process is left."""
    monkeypatch.setenv(TEST_BACKOFF_ENV, "300,300,5")
    mp, rec = mounts.mount(images["zstd"], "backoff-term")
    old = _kill_worker(rec)
    _wait_log(rec, r"restarting the worker in 300\.00 s")
    reader = BlockedReader(mp / "odd")
    reader.wait_blocked()
    assert _children(rec["pid"]) == ""  # no worker: the read waits in the group's queue
    start = time.monotonic()
    _wait_exit(rec["pid"], lambda: os.kill(rec["pid"], signal.SIGTERM), "supervisor did not stop")
    took = time.monotonic() - start
    print(f"supervisor stopped {took:.3f} s after SIGTERM")
    assert took < 10
    # the reader held the file open: the mount was detached, and its read (retried page by page by the kernel)
    # denied until it failed and closed the file, which released the filesystem
    assert reader.join() == {"errno": errno.EIO}
    assert not is_mounted(mp, None)
    assert process_start_time(old) is None and process_start_time(rec["pid"]) is None
    log_text = Path(rec["log"]).read_text()
    assert "stopped while waiting to restart the worker" in log_text and f"detached {mp}" in log_text
    assert re.search(r"released: \d+ reads allowed, [1-9]\d* denied \(EIO\)", log_text)
    assert "started (restart" not in log_text
    mounts.umount(mp)


def test_plain_umount_during_restart_backoff_stops_at_once(mounts: Mounts, images: dict[str, Path],
                                                          monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """The image unmounted by other means while the supervisor waits to restart: it stops at once (the wait
    watches the mount table too)."""
    monkeypatch.setenv(TEST_BACKOFF_ENV, "300,300,5")
    mp, rec = mounts.mount(images["none"], "backoff-umount")
    _kill_worker(rec)
    _wait_log(rec, r"restarting the worker in 300\.00 s")
    start = time.monotonic()
    _wait_exit(rec["pid"], lambda: kernel_umount(mp), "supervisor did not stop")
    assert time.monotonic() - start < 10
    assert f"{mp} was unmounted and released: stopping" in Path(rec["log"]).read_text()
    mounts.umount(mp)


def test_backend_back_during_backoff_queued_read_served_by_next_worker(
        mounts: Mounts, images: dict[str, Path], rootfs: Path, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """The backend goes away and the worker dies: restarts fail, with growing waits between them; a read made
    meanwhile stays queued; once the backend is back the next worker starts and serves it right."""
    monkeypatch.setenv(TEST_BACKOFF_ENV, "0.2,1.6,20")
    blobs = tmp_path / "blobs"
    shutil.copytree(images["none"] / "blobs", blobs)
    mp, rec = mounts.mount(images["none"], "comeback", blobs=blobs)
    blobs.rename(tmp_path / "away")
    old = _kill_worker(rec)
    # two restarts failed: the third is scheduled (not a second "restarted worker failed" line: the log counts
    # repeated lines and writes the count only 30 s later)
    _wait_log(rec, r"restarting the worker in [\d.]+ s \(restart 3,")
    reader = BlockedReader(mp / "odd")
    reader.wait_blocked()
    (tmp_path / "away").rename(blobs)
    new = _new_worker(mp, old)
    assert reader.join() == {"data": (rootfs / "odd").read_bytes()}
    log_text = Path(rec["log"]).read_text()
    delays = [float(d) for _, d, _ in RESTARTING.findall(log_text)]
    print(*(line for line in log_text.splitlines() if "restart" in line), sep="\n")
    assert len(delays) == new["restarts"] >= 3 and delays[:3] == [0.2, 0.4, 0.8], delays
    assert "giving up" not in log_text
    stats = mounts.umount(mp)["stats"]  # the new worker's: it answered the queued read
    assert stats["events"]["filled"] >= 1 and stats["events"]["denied"] == 0


# -- a detached mount still in use --------------------------------------------------------------------------------
def _read_all(fd: int) -> bytes:
    out = bytearray()
    while piece := os.pread(fd, 256 << 10, len(out)):
        out += piece
    return bytes(out)


def _serving(rec: dict[str, Any]) -> bool:
    return process_start_time(rec["pid"]) is not None and process_start_time(rec["worker_pid"]) is not None


def _closed_and_gone(mounts: Mounts, mp: Path, rec: dict[str, Any], fd: int) -> dict[str, Any]:
    """Close ``fd``, the last file open on the detached ``mp``: the daemon exits; no mount, no process left."""
    _wait_exit(rec["pid"], lambda: os.close(fd), "daemon still running after the last open file closed")
    assert not is_mounted(mp, None) and process_start_time(rec["worker_pid"]) is None
    return mounts.umount(mp)


def test_sigterm_with_a_file_open_serves_it_until_it_closes(mounts: Mounts, images: dict[str, Path],
                                                            rootfs: Path) -> None:  # fmt: skip
    """SIGTERM to the supervisor (systemd stop) while a file is open on the mount: the mount can only be
    detached, and the daemon serves the file until it closes (its holes read right, never as zeros; a second
    SIGTERM changes nothing), then exits."""
    mp, rec = mounts.mount(images["zstd"], "term-open")
    fd = os.open(mp / "odd", os.O_RDONLY)  # not read yet: its chunks are holes of the cache file
    try:
        os.kill(rec["pid"], signal.SIGTERM)
        wait_for(lambda: not is_mounted(mp, None), f"{mp} still in the mount table", TIMEOUT)
        os.kill(rec["pid"], signal.SIGTERM)  # (systemd may send it again)
        assert _in_thread(lambda: _read_all(fd)) == (rootfs / "odd").read_bytes()
        assert _serving(rec)
        _wait_log(rec, rf"stopping: {mp} is detached, serving it until its 1 open file close")
    except BaseException:
        os.close(fd)
        raise
    stats = _closed_and_gone(mounts, mp, rec, fd)["stats"]
    assert stats["events"]["filled"] >= 1 and stats["events"]["denied"] == 0


def test_lazy_umount_with_a_file_open_serves_it_until_it_closes(mounts: Mounts, images: dict[str, Path],
                                                                rootfs: Path) -> None:  # fmt: skip
    """``umount -l`` by someone else while a file is open: the mount leaves the table, the daemon stays and
    serves the file until it closes, then exits."""
    mp, rec = mounts.mount(images["none"], "detach-open")
    fd = os.open(mp / "odd", os.O_RDONLY)
    try:
        umount(mp, lazy=True)
        assert not is_mounted(mp, None)
        # nydus-erofs umount now waits for the daemon, then says why it is still there, without killing it
        with pytest.raises(MountError) as failed:
            umount_image(mp, timeout=0.5)
        assert failed.value.errno == errno.EBUSY and "files are still open on it" in str(failed.value)
        assert _in_thread(lambda: _read_all(fd)) == (rootfs / "odd").read_bytes()
        assert _serving(rec)
    except BaseException:
        os.close(fd)
        raise
    assert _closed_and_gone(mounts, mp, rec, fd)["stats"]["events"]["denied"] == 0


def test_worker_dying_on_a_detached_mount_is_replaced(mounts: Mounts, images: dict[str, Path], rootfs: Path) -> None:
    """The worker dies while the mount is detached and a file open on it: the next worker serves it (the watch of
    the image is inherited; the mountpoint no longer leads to it)."""
    mp, rec = mounts.mount(images["zstd"], "detach-restart")
    fd = os.open(mp / "odd", os.O_RDONLY)
    try:
        umount(mp, lazy=True)
        new = _new_worker(mp, _kill_worker(rec))
        assert new["restarts"] == 1
        assert _in_thread(lambda: _read_all(fd)) == (rootfs / "odd").read_bytes()
        assert _serving(new)
    except BaseException:
        os.close(fd)
        raise
    assert _closed_and_gone(mounts, mp, new, fd)["stats"]["events"]["filled"] >= 1


def test_umount_of_a_busy_mount_fails_and_of_an_idle_one_stops_the_daemon(mounts: Mounts, images: dict[str, Path],
                                                                          rootfs: Path) -> None:  # fmt: skip
    """``nydus-erofs umount`` never detaches: of a busy mount it fails with one line and the daemon serves on;
    once idle the umount releases the filesystem at once and the daemon stops promptly."""
    mp, rec = mounts.mount(images["lz4_block"], "busy")
    fd = os.open(mp / "odd", os.O_RDONLY)
    try:
        proc = _cli("umount", str(mp), env=dict(os.environ))
        assert proc.returncode != 0 and "busy" in proc.stderr and proc.stderr.count("\n") == 1, proc.stderr
        assert is_mounted(mp) and _serving(rec) and read_record(mp) is not None
        assert _in_thread(lambda: _read_all(fd)) == (rootfs / "odd").read_bytes()
    finally:
        os.close(fd)
    start = time.monotonic()
    mounts.umount(mp)  # no mount, no process left
    took = time.monotonic() - start
    print(f"umount took {took:.3f} s")
    assert took < 5


def test_supervisor_giving_up_with_a_file_open_denies_its_reads_until_it_closes(
        mounts: Mounts, images: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """Workers keep dying and the supervisor gives up while a file is open: it detaches the mount and, with no
    worker to fill the holes, fails their reads with EIO (never zeros), a stop signal changing nothing, until the
    file closes; then it closes the group and exits."""
    monkeypatch.setenv(TEST_BACKOFF_ENV, "0.1,0.2,2")  # give up on the third death in a row
    mp, rec = mounts.mount(images["zstd"], "giveup-open")
    fd = os.open(mp / "odd", os.O_RDONLY)
    try:
        current = rec
        for _ in range(2):
            current = _new_worker(mp, _kill_worker(current))
        _kill_worker(current)
        wait_for(lambda: not is_mounted(mp, None), "the supervisor did not give up", TIMEOUT)
        for offset in (0, 0, 1 << 20):  # the kernel retries a failed read page by page: each one fails
            with pytest.raises(OSError) as info:
                _in_thread(lambda o=offset: os.pread(fd, 256 << 10, o))
            assert info.value.errno == errno.EIO
        os.kill(rec["pid"], signal.SIGTERM)
        with pytest.raises(OSError) as info:
            _in_thread(lambda: os.pread(fd, 4096, 4096))
        assert info.value.errno == errno.EIO
        assert process_start_time(rec["pid"]) is not None
    except BaseException:
        os.close(fd)
        raise
    _wait_exit(rec["pid"], lambda: os.close(fd), "supervisor still running after the last open file closed")
    assert not is_mounted(mp, None)
    log_text = Path(rec["log"]).read_text()
    assert "giving up" in log_text
    assert f"no worker left: {mp} is detached, denying reads of missing data (EIO) until its 1 open file close" \
        in log_text  # fmt: skip
    assert re.search(r"released: 0 reads allowed, [1-9]\d* denied \(EIO\)", log_text)
    mounts.umount(mp)

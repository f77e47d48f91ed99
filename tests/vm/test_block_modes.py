"""``nydus-erofs mount`` on block devices, in the VM on each test kernel: ``--mode full`` over loop devices where
the kernel has no file-backed EROFS mounts (Debian 12's 6.1), and ``--mode nbd`` (lazy, one NBD device per blob)
wherever the kernel has NBD.  Images read back identical to their sources; a small read of a large image fetches
little; a damaged chunk is an EIO for its file only; the nbd worker killed mid-read is restarted by its
supervisor and the read completes with the right bytes (or EIO, never wrong ones); the ioctl fallback reads the
same; umount leaves no device bound."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import select
import shutil
import signal
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from cachefilesd_py.mount.record import read_record
from cachefilesd_py.supervisor import TEST_BACKOFF_ENV
from fscache.loop import backing_files
from fscache.nbd import TEST_IOCTL_ENV
from tests.support.fstree import assert_same_tree
from tests.support.machine import missing_erofs
from tests.vm.test_daemon import NYDUS_EROFS, MiB, _layers, build, large_image, scratch

TIMEOUT = 300


def nydus(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(NYDUS_EROFS), *args], capture_output=True, text=True, stdin=subprocess.DEVNULL,
                          timeout=TIMEOUT, env={**os.environ, **(env or {})})  # fmt: skip


def connected_nbd() -> list[str]:
    """NBD devices that have a server (``/sys/block/nbdN/pid`` exists while one is connected)."""
    return sorted(p.parent.name for p in Path("/sys/block").glob("nbd*/pid"))


@contextmanager
def mounted(image: Path, name: str, mode: str, *flags: str,
            env: dict[str, str] | None = None) -> Iterator[tuple[Path, dict[str, Any]]]:  # fmt: skip
    """``image`` mounted in ``mode`` with a fresh cache dir; unmounted afterwards, leaving no device bound."""
    base = scratch() / "block-modes" / name
    shutil.rmtree(base, ignore_errors=True)
    mp = base / "mnt"
    mp.mkdir(parents=True)
    blobs = image / "blobs"
    done = nydus("mount", str(image / "image.boot"), str(mp), "--cache-dir", str(base / "cache"), "--blob-dir",
                 str(blobs), "--mode", mode, "--json", *flags, env=env)  # fmt: skip
    assert done.returncode == 0, done.stderr
    rec = json.loads(done.stdout)
    try:
        yield mp, rec
    finally:
        gone = nydus("umount", str(mp), "--json")
    assert gone.returncode == 0, gone.stderr
    assert not [f for f in backing_files().values() if f.startswith((str(base), str(image)))]
    assert connected_nbd() == []
    rec.update(json.loads(gone.stdout))


@pytest.fixture(scope="module")
def layers() -> tuple[Path, Path]:
    """(merged source tree, image) of a two-layer zstd image."""
    lower, upper, merged = _layers(scratch() / "block-layers")
    out = scratch() / "block-layers" / "image"
    build(out, lower, upper, compressor="zstd")
    return merged, out


@pytest.mark.kernel("loop")
def test_full_mode_mounts_over_loop_devices_where_file_backed_is_missing(layers: tuple[Path, Path]) -> None:
    merged, image = layers
    with mounted(image, "full", "full") as (mp, rec):
        assert rec["mode"] == "full"
        # file-backed where the kernel has it; on 6.1 the bootstrap and each cache file on a loop device
        assert str(rec["source"]).startswith("/dev/loop") == (missing_erofs() is not None)
        assert_same_tree(merged, mp)


@pytest.mark.kernel("erofs-file-backed", "loop")  # without file-backed mounts, the test above is this one
def test_full_mode_forced_over_loop_devices(layers: tuple[Path, Path]) -> None:
    merged, image = layers
    with mounted(image, "full-loop", "full", "--no-file-backed") as (mp, rec):
        assert str(rec["source"]).startswith("/dev/loop")
        assert_same_tree(merged, mp)


@pytest.mark.kernel("loop", "nbd")
def test_nbd_mode_reads_identical_to_the_source(layers: tuple[Path, Path]) -> None:
    merged, image = layers
    with mounted(image, "nbd", "nbd") as (mp, rec):
        assert rec["mode"] == "nbd" and rec["pid"] and len(rec["nbd"]) == 2  # one device per layer blob
        assert connected_nbd() == sorted(Path(d).name for d in rec["nbd"])
        assert_same_tree(merged, mp)
    assert rec["stopped"] and sum(d["read_errors"] for d in rec["stats"]["devices"]) == 0


@pytest.mark.kernel("loop", "nbd")
def test_nbd_small_read_of_a_large_image_fetches_little() -> None:
    image, _ = large_image()
    (blob,) = (image / "blobs").iterdir()
    with mounted(image, "nbd-large", "nbd") as (mp, rec):
        (cache,) = [p for p in (mp.parent / "cache").iterdir() if p.suffix != ".map"]  # the cache file, not its map
        before = os.stat(cache).st_blocks * 512
        with open(mp / "big", "rb", buffering=0) as f:
            f.seek(30 * MiB + 12345)
            piece = f.read(100_000)
        fetched = os.stat(cache).st_blocks * 512 - before
    with open(scratch() / "large" / "src" / "big", "rb") as src:
        src.seek(30 * MiB + 12345)
        assert piece == src.read(100_000)
    size = blob.stat().st_size
    print(f"nbd partial read: 100000 bytes of a {size}-byte blob filled {fetched} bytes of its cache file")
    assert 0 < fetched < size * 0.02
    assert rec["stats"]["pipeline"]["bytes_fetched"] < size * 0.05  # the device's first block (partition scan) too


@pytest.mark.kernel("loop", "nbd")
def test_nbd_damaged_chunk_is_an_eio_for_its_file_only() -> None:
    base = scratch() / "block-damaged"
    shutil.rmtree(base, ignore_errors=True)
    (base / "src").mkdir(parents=True)
    files = {name: os.urandom(200_000) for name in ("a-good", "b-bad", "c-good")}
    for name, data in files.items():
        (base / "src" / name).write_bytes(data)
    out = build(base / "image", base / "src", chunk_size="64KiB")
    blob = base / "image" / "blobs" / out["blobs"][0]["id"]
    raw = bytearray(blob.read_bytes())
    at = raw.find(files["b-bad"][100_000:100_064])
    assert at > 0
    raw[at] ^= 0xFF
    blob.write_bytes(raw)
    with mounted(base / "image", "nbd-damaged", "nbd") as (mp, rec):
        assert (mp / "a-good").read_bytes() == files["a-good"]
        with pytest.raises(OSError) as info:
            (mp / "b-bad").read_bytes()
        assert info.value.errno == errno.EIO
        assert (mp / "c-good").read_bytes() == files["c-good"]
        with open(mp / "b-bad", "rb", buffering=0) as f:  # the chunks before the damaged one are fine
            assert f.read(65536) == files["b-bad"][:65536]
    (dev,) = rec["stats"]["devices"]
    assert dev["read_errors"] >= 1 and rec["stats"]["pipeline"]["digest_failures"] >= 1


def _kill(pid: int) -> None:
    """SIGKILL ``pid`` and wait until it is gone."""
    pidfd = os.pidfd_open(pid)
    try:
        os.kill(pid, signal.SIGKILL)
        select.select([pidfd], [], [])
    finally:
        os.close(pidfd)


def _record(mp: Path) -> dict[str, Any]:
    """The mount's runtime record as its daemon last wrote it."""
    rec = read_record(mp)
    assert rec is not None
    return rec


@pytest.mark.kernel("loop", "nbd")
def test_nbd_worker_killed_mid_read_is_restarted_and_the_read_completes_right() -> None:
    image, digest = large_image()
    env = {TEST_BACKOFF_ENV: "0.5,1,3"}
    with mounted(image, "nbd-killed", "nbd", env=env) as (mp, rec):
        worker = rec["worker_pid"]
        assert worker and worker != rec["pid"]
        # a cold read of the whole file, by another process; the worker is killed while it runs
        reader = subprocess.Popen(["sha256sum", str(mp / "big")], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True)  # fmt: skip
        cache = next(p for p in (mp.parent / "cache").iterdir() if p.suffix != ".map")
        with open(mp / "big", "rb") as f:  # the reader is under way once the first MiB is in (we read it too)
            assert f.read(MiB)
        _kill(worker)
        out, err = reader.communicate(timeout=TIMEOUT)
        if reader.returncode == 0:
            assert out.split()[0] == digest  # the right bytes...
        else:
            assert "Input/output error" in err  # ...or an I/O error, never wrong bytes
        print(f"nbd worker killed mid-read: reader {'completed' if reader.returncode == 0 else 'got EIO'}, "
              f"{os.stat(cache).st_blocks * 512} bytes in the cache file")
        Path("/proc/sys/vm/drop_caches").write_text("3")
        h = hashlib.sha256()
        with open(mp / "big", "rb") as f:  # the restarted worker serves the same devices
            while piece := f.read(MiB):
                h.update(piece)
        assert h.hexdigest() == digest
        now = _record(mp)
        assert now["worker_pid"] != worker and now["restarts"] >= 1  # the supervisor restarted the worker
        assert now["nbd"] == rec["nbd"] and connected_nbd() == sorted(Path(d).name for d in rec["nbd"])
    assert rec["stopped"] and rec["stats"]["devices"]


@pytest.mark.kernel("loop", "nbd")
def test_nbd_supervisor_gives_up_then_reads_are_eio_never_zeros(layers: tuple[Path, Path]) -> None:
    merged, image = layers
    env = {TEST_BACKOFF_ENV: "0.1,0.1,0"}  # no restart: the first death gives up
    with mounted(image, "nbd-giveup", "nbd", env=env) as (mp, rec):
        assert (mp / "app" / "bin").read_bytes() == (merged / "app" / "bin").read_bytes()
        with open(mp / "data", "rb", buffering=0) as f:  # open before the death: the detached image keeps it
            _kill(rec["worker_pid"])
            pidfd = os.pidfd_open(rec["pid"])
            try:
                select.select([pidfd], [], [], TIMEOUT)  # the supervisor gives up: it unmounts, disconnects, exits
            finally:
                os.close(pidfd)
            with pytest.raises(OSError) as info:  # no server: an I/O error, never the zeros of a hole
                f.read()
            assert info.value.errno == errno.EIO
        assert connected_nbd() == []


@pytest.mark.kernel("loop", "nbd")
def test_nbd_over_the_ioctls_reads_identical(layers: tuple[Path, Path]) -> None:
    merged, image = layers
    with mounted(image, "nbd-ioctl", "nbd", env={TEST_IOCTL_ENV: "1"}) as (mp, rec):
        assert _record(mp)["nbd_ioctl"] is True and len(rec["nbd"]) == 2
        assert connected_nbd() == sorted(Path(d).name for d in rec["nbd"])
        assert_same_tree(merged, mp)
    assert rec["stopped"] and sum(d["read_errors"] for d in rec["stats"]["devices"]) == 0

"""``nydus-erofs mount`` on block devices, in the VM on each test kernel: ``--mode full`` over loop devices where
the kernel has no file-backed EROFS mounts (Debian 12's 6.1), and ``--mode nbd`` (lazy, one NBD device per blob)
wherever the kernel has NBD.  Images read back identical to their sources; a small read of a large image fetches
little; a damaged chunk is an EIO for its file only; umount leaves no device bound."""

from __future__ import annotations

import errno
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

from fscache.loop import backing_files
from tests.support.fstree import assert_same_tree
from tests.support.machine import missing_erofs
from tests.vm.test_daemon import NYDUS_EROFS, MiB, _layers, build, large_image, scratch

TIMEOUT = 300


def nydus(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(NYDUS_EROFS), *args], capture_output=True, text=True, stdin=subprocess.DEVNULL,
                          timeout=TIMEOUT)  # fmt: skip


def connected_nbd() -> list[str]:
    """NBD devices that have a server (``/sys/block/nbdN/pid`` exists while one is connected)."""
    return sorted(p.parent.name for p in Path("/sys/block").glob("nbd*/pid"))


@contextmanager
def mounted(image: Path, name: str, mode: str, *flags: str) -> Iterator[tuple[Path, dict[str, Any]]]:
    """``image`` mounted in ``mode`` with a fresh cache dir; unmounted afterwards, leaving no device bound."""
    base = scratch() / "block-modes" / name
    shutil.rmtree(base, ignore_errors=True)
    mp = base / "mnt"
    mp.mkdir(parents=True)
    blobs = image / "blobs"
    done = nydus("mount", str(image / "image.boot"), str(mp), "--cache-dir", str(base / "cache"), "--blob-dir",
                 str(blobs), "--mode", mode, "--json", *flags)  # fmt: skip
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


@pytest.mark.kernel("loop", "nbd")
def test_nbd_daemon_killed_is_eio_never_zeros_and_umount_releases_its_devices(layers: tuple[Path, Path]) -> None:
    merged, image = layers
    with mounted(image, "nbd-killed", "nbd") as (mp, rec):
        assert (mp / "app" / "bin").read_bytes() == (merged / "app" / "bin").read_bytes()
        pidfd = os.pidfd_open(rec["pid"])
        try:
            os.kill(rec["pid"], signal.SIGKILL)
            select.select([pidfd], [], [])  # it is gone
        finally:
            os.close(pidfd)
        with pytest.raises(OSError) as info:  # no server: an I/O error, never the zeros of a hole
            (mp / "data").read_bytes()
        assert info.value.errno == errno.EIO
        assert connected_nbd() == sorted(Path(d).name for d in rec["nbd"])  # until umount releases them

"""Prefetch in cachefilesd-py (fscache on-demand, in the VM): once the daemon's API says the image's prefetch is
done, the blob is overwritten with zeros in place (every later fetch fails its digest): the files of the prefetch
table read back (they are in the cache, the kernel asks for nothing), an unlisted file never read fails with EIO;
with ``--prefetch-all`` the whole tree reads back."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.fstree import assert_same_tree
from tests.vm.test_daemon import NYDUS_EROFS, TIMEOUT, DaemonProc, mounted, scratch

pytestmark = pytest.mark.kernel("cachefiles")

SIZES = {"app/bin/main": 200_000, "app/lib/liba.so": 70_000, "app/lib/libb.so": 130_000, "etc/config": 66_000,
         "data/never": 150_000, "data/other": 90_000}  # fmt: skip
LIST = "/app/bin/main\n/app/lib\n/etc/config\n"
LISTED = ["app/bin/main", "app/lib/liba.so", "app/lib/libb.so", "etc/config"]


def _image(base: Path, fsid: str) -> Path:
    src = base / f"src-{fsid}"
    shutil.rmtree(src, ignore_errors=True)
    for rel, size in SIZES.items():
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_bytes(os.urandom(size))
    out = base / "images" / fsid
    shutil.rmtree(out, ignore_errors=True)
    done = subprocess.run([str(NYDUS_EROFS), "build", str(src), "-o", str(out), "--chunk-size", "64KiB",
                           "--compressor", "zstd", "--prefetch-list", "-"], input=LIST, capture_output=True,
                          text=True, timeout=TIMEOUT)  # fmt: skip
    assert done.returncode == 0, done.stderr
    return src


@pytest.fixture
def base() -> Path:
    return scratch() / "prefetch"


def _daemon(base: Path, *extra: str) -> Iterator[DaemonProc]:
    d = DaemonProc(base, "--amplify", "64KiB", *extra).start()
    try:
        yield d
    finally:
        rc = d.stop()
        assert rc == 0, d.log_text()


def _done(d: DaemonProc, key: str) -> dict:
    deadline = time.monotonic() + TIMEOUT
    while True:
        progress = d.api("/api/v1/daemon")["prefetch"].get(key)
        if progress and progress["state"] in ("done", "failed"):
            return progress
        assert time.monotonic() < deadline, f"prefetch of {key} not done: {progress}"
        time.sleep(0.05)  # polling another process' progress


def _zero_blobs(image: Path) -> None:
    for blob in (image / "blobs").iterdir():
        with open(blob, "r+b") as f:
            f.write(bytes(blob.stat().st_size))


def _errno(path: Path) -> int:
    try:
        path.read_bytes()
    except OSError as e:
        return e.errno or 0
    return 0


def test_table_files_prefetched_unlisted_ones_not(base: Path) -> None:
    base.mkdir(parents=True, exist_ok=True)
    src = _image(base, "pf-table")
    for d in _daemon(base):
        with mounted("pf-table") as mnt:
            progress = _done(d, "pf-table/pf-table")
            assert (progress["state"], progress["files_done"], progress["errors"]) == ("done", 4, 0), progress
            _zero_blobs(base / "images" / "pf-table")
            for rel in LISTED:
                assert (mnt / rel).read_bytes() == (src / rel).read_bytes(), rel
            assert _errno(mnt / "data" / "never") == errno.EIO


def test_prefetch_all_reads_the_whole_tree_from_the_cache(base: Path) -> None:
    base.mkdir(parents=True, exist_ok=True)
    src = _image(base, "pf-all")
    for d in _daemon(base, "--prefetch-all"):
        with mounted("pf-all") as mnt:
            progress = _done(d, "pf-all/pf-all")
            assert progress["state"] == "done" and progress["all_blobs"] and progress["errors"] == 0, progress
            _zero_blobs(base / "images" / "pf-all")
            assert_same_tree(src, mnt)


def test_trace_lists_the_files_read_in_order(base: Path) -> None:
    """The kernel's READs mapped back to files: what a workload read, first access first (a cold cache, no
    prefetch: data already cached raises no READ)."""
    base.mkdir(parents=True, exist_ok=True)
    src = _image(base, "pf-trace")
    order = ["etc/config", "app/bin/main", "data/other"]
    for d in _daemon(base, "--no-prefetch"):
        with mounted("pf-trace") as mnt:
            for rel in order:
                with open(mnt / rel, "rb") as f:
                    assert f.read(1000) == (src / rel).read_bytes()[:1000]
            deadline = time.monotonic() + TIMEOUT
            while len(files := d.api("/api/v1/trace").get("pf-trace/pf-trace", {}).get("files", [])) < len(order):
                assert time.monotonic() < deadline, files
                time.sleep(0.05)  # polling another process' progress
            assert [f["path"] for f in files] == ["/" + rel for rel in order]
            assert all(f["offset"] == 0 and f["length"] > 0 for f in files)

"""cachefilesd-py's ``--cache-size-limit`` in the test VM: cache objects no mount uses are culled through the
kernel's ``cull`` command, least recently used first, until the cache is under the limit; an object a mount uses
is passed over (a new object is an anonymous tmpfile until its mount releases it: only then is it in the tree);
a culled image reads right again, fetched anew."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path
from typing import Any

import pytest

from tests.support.poll import wait_for
from tests.vm.test_daemon import TIMEOUT, DaemonProc, build, mounted, scratch, sha256_file

pytestmark = pytest.mark.kernel("cachefiles")

MiB = 1 << 20
LIMIT = 16 * MiB


def _objects(cache: Path) -> dict[str, int]:
    """The cache's object files (by name) and their allocated bytes."""
    out = {}
    for root, _, names in os.walk(cache / "cache"):
        for name in names:
            out[name] = (Path(root) / name).lstat().st_blocks * 512
    return out


def test_unused_objects_are_culled_under_the_limit_and_read_right_again() -> None:
    base = scratch() / "cache-limit"
    shutil.rmtree(base, ignore_errors=True)
    data, blob = {}, {}
    for fsid in ("a", "b"):  # 12 MiB each: one fits under the limit, both do not
        src = base / "src" / fsid
        src.mkdir(parents=True)
        data[fsid] = os.urandom(12 * MiB)
        (src / "big").write_bytes(data[fsid])
        (built,) = build(base / "images" / fsid, src)["blobs"]
        blob[fsid] = built["id"]
    d = DaemonProc(base, "--cache-size-limit", "16MiB").start()

    def limit() -> dict[str, Any]:
        return d.api("/api/v1/daemon")["cache_limit"]

    def read(fsid: str, mnt: Path) -> None:
        assert sha256_file(mnt / "big") == hashlib.sha256(data[fsid]).hexdigest(), fsid

    try:
        with mounted("a") as mnt:
            read("a", mnt)
        wait_for(lambda: f"D{blob['a']}" in _objects(d.cache), "a's blob in the cache tree", TIMEOUT)
        with mounted("a") as mnt_a:  # a in use, b read and released: 24 MiB, b goes although a is older
            with mounted("b") as mnt_b:
                read("b", mnt_b)
            wait_for(lambda: limit()["culls"] >= 1, "b's unused blob culled", TIMEOUT)
            objects = _objects(d.cache)
            assert f"D{blob['b']}" not in objects and objects[f"D{blob['a']}"] >= 12 * MiB, objects
            assert sum(objects.values()) <= LIMIT and limit()["in_use"] >= 1, (objects, limit())
            read("a", mnt_a)
        assert not any((d.cache / "graveyard").iterdir()), "the graveyard is emptied"
        with mounted("b") as mnt:  # culled: fetched again, verified
            read("b", mnt)
        stats = limit()
        assert stats["limit"] == LIMIT and stats["bytes_culled"] >= 12 * MiB, stats
    finally:
        rc = d.stop()
        print(d.log_text()[-3000:])
    assert rc == 0

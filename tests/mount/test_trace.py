"""The access trace of a fanotify mount (``nydus-erofs trace``): the files a workload reads, first access
first, from file-level events on the EROFS mount, so files that only share a chunk with a read one are not
listed; the same workload on a second mount gives the same trace."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from cachefilesd_py.mount.record import RUN_DIR_ENV
from tests.mount.test_fanotify_mount import Mounts, build
from tests.support.cli import run
from tests.support.poll import wait_for

pytestmark = pytest.mark.kernel("erofs", "fanotify")

ORDER = ["/srv/b.txt", "/a.txt", "/usr/lib/c.so"]


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Small files that all share one 1 MiB chunk, so reading one fetches its neighbours too."""
    src = tmp_path_factory.mktemp("trace") / "src"
    for rel in ["a.txt", "srv/b.txt", "usr/lib/c.so", "usr/lib/neighbour.so", "untouched", "srv/stat-only"]:
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_bytes(rel.encode() * 200)
    out = src.parent / "out"
    build([src], out)
    return src, out


def trace_cli(mp: Path, *args: str) -> str:
    r = run("trace", mp, *args, timeout=30)
    assert r.returncode == 0, r.stderr
    return r.stdout


def workload(mp: Path) -> None:
    os.stat(mp / "srv" / "stat-only")  # no open, no read: not a read
    os.listdir(mp / "usr" / "lib")  # directories are not listed
    with open(mp / "srv" / "b.txt", "rb") as f:
        f.read(10)
    with open(mp / "a.txt", "rb") as f:
        f.read()
    with open(mp / "srv" / "b.txt", "rb") as f:  # a second read: still one entry, at its first place
        f.read()
    with open(mp / "usr" / "lib" / "c.so", "rb") as f:
        f.seek(100)
        f.read(5)


def traced(mp: Path) -> list[str]:
    # events are queued in order: once the last file shows, everything before it has been recorded
    return wait_for(lambda: (t := trace_cli(mp).splitlines()) and ORDER[-1] in t and t, "the trace shows c.so", 30)


def test_trace_lists_the_files_read_in_first_access_order(mounts: Mounts, image: tuple[Path, Path],
                                                           tmp_path: Path) -> None:  # fmt: skip
    src, out = image
    mp, _ = mounts.mount(out, "one")
    workload(mp)
    assert traced(mp) == ORDER  # not neighbour.so (same chunk), not stat-only, not directories
    info = json.loads(trace_cli(mp, "--json"))
    assert info["mountpoint"] == str(mp)
    files = info["files"]
    assert [f["path"] for f in files] == ORDER
    assert [(f["offset"], f["length"]) for f in files] == [(0, (src / p[1:]).stat().st_size) for p in ORDER]
    times = [f["t"] for f in files]
    assert 0 <= times[0] <= times[1] <= times[2]
    listing = tmp_path / "list.txt"
    assert trace_cli(mp, "--output", str(listing)) == ""
    assert listing.read_text() == "".join(p + "\n" for p in ORDER)
    final = mounts.umount(mp)
    assert final["stats"]["trace"]["entries"] == 3 and final["stats"]["trace"]["dropped"] == 0
    assert not any((mounts.tmp / "run").iterdir())  # the trace goes with the record

    # a second mount starts a new trace; the same workload gives the same one
    mp2, _ = mounts.mount(out, "one")
    assert mp2 == mp and trace_cli(mp) == ""
    workload(mp)
    assert traced(mp) == ORDER
    mounts.umount(mp)


def test_trace_of_an_unknown_mountpoint_is_a_one_line_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(RUN_DIR_ENV, str(tmp_path / "run"))
    r = run("trace", tmp_path, timeout=30)
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and "no access trace" in r.stderr

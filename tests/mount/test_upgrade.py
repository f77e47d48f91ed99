"""Upgrade in place of a fanotify mount's daemon (SIGHUP to its supervisor, :func:`request_upgrade`): during a cold
sequential read, a new worker takes over from the old one with no failed read; the supervisor re-executes itself.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import signal
from pathlib import Path
from typing import Any

import pytest

from cachefilesd_py.api import get
from cachefilesd_py.mount.record import read_record
from cachefilesd_py.mount.service import mount_image
from cachefilesd_py.mount.spec import MountSpec
from cachefilesd_py.mount.upgrade import request_upgrade
from erofs.errors import UsageError
from erofs.paths import process_start_time
from fscache.mount import MountError
from tests.mount.test_fanotify_mount import TIMEOUT, GatedBlobServer, Mounts, build
from tests.support.cli import run
from tests.support.cold_read import ColdReader
from tests.support.poll import wait_for

pytestmark = pytest.mark.kernel("erofs", "fanotify")

SIZE = 64 << 20


@pytest.fixture(scope="module")
def image64(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(source file, image dir): one 64 MiB file of incompressible data."""
    base = tmp_path_factory.mktemp("up")
    src = base / "src"
    src.mkdir()
    (src / "big.bin").write_bytes(random.Random(64).randbytes(SIZE))
    (src / "small.txt").write_bytes(b"small\n")
    out = base / "out"
    build([src], out, "none")
    return src / "big.bin", out


def _cmdline(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")


def _log_has(rec: dict[str, Any], pattern: str) -> str:
    log = Path(rec["log"])
    return wait_for(lambda: re.search(pattern, log.read_text()) and log.read_text(),
                    f"{pattern!r} not in the log: {log.read_text() if log.exists() else ''}", TIMEOUT)  # fmt: skip


def test_upgrade_during_cold_read_fails_no_read(mounts: Mounts, image64: tuple[Path, Path], tmp_path: Path) -> None:
    """SIGHUP to the supervisor while a cold 64 MiB read waits on a fill the old worker holds (its backend request
    stalled): the supervisor re-executes itself, the old worker finishes that fill and exits, a new worker serves
    the rest; the read gets every byte right, no EIO, and the old worker is gone."""
    src, out = image64
    want = hashlib.sha256(src.read_bytes()).hexdigest()
    server = GatedBlobServer(out / "blobs")
    try:
        mp = tmp_path / "mnt-up"
        mp.mkdir()
        rec = mount_image(MountSpec(str(out / "image.boot"), str(mp), str(tmp_path / "cache-up"), backend="http",
                                    backend_config={"url": server.url}, mode="fanotify", prefetch=False))  # fmt: skip
        mounts.active.append(mp)
        sup, old = rec["pid"], rec["worker_pid"]
        reader = ColdReader(mp / "big.bin", TIMEOUT)
        reader.wait_read(4 << 20)
        server.armed.set()  # the next fetch stalls: the old worker holds the reader's event while it hands over
        assert server.arrived.wait(TIMEOUT), "no fetch"
        server.armed.clear()  # (only that one: the new worker fetches the blob's metadata)
        os.kill(sup, signal.SIGHUP)
        _log_has(rec, rf"worker \d+ is ready: worker {old} hands over")
        assert reader.thread.is_alive() and reader.read < SIZE
        server.release.set()
        reader.join()
        assert not reader.errors, reader.errors
        assert reader.digest == want
        new = wait_for(lambda: (r := read_record(mp) or {}).get("worker_pid") not in (None, old) and r,
                       "no new worker in the record", TIMEOUT)  # fmt: skip
        assert new["pid"] == sup and process_start_time(old) is None
        assert "--resume" in _cmdline(sup)  # the supervisor runs the code on disk too
        log_text = Path(rec["log"]).read_text()
        assert f"worker {new['worker_pid']} took over from worker {old}" in log_text
        assert "denied" not in log_text and "died" not in log_text, log_text
        stats = mounts.umount(mp)["stats"]  # the new worker's
        assert stats["events"]["denied"] == 0 and stats["pipeline"]["digest_failures"] == 0
    finally:
        server.close()


def test_request_upgrade_twice_then_umount(mounts: Mounts, image64: tuple[Path, Path]) -> None:
    """:func:`request_upgrade` returns once a new worker serves: a second upgrade works on the re-executed
    supervisor; the mount reads right throughout and umounts cleanly."""
    src, out = image64
    mp, rec = mounts.mount(out, "twice")
    assert (mp / "small.txt").read_bytes() == b"small\n"
    first = request_upgrade(rec)
    assert first["pid"] == rec["pid"] and first["worker_pid"] != rec["worker_pid"]
    assert process_start_time(rec["worker_pid"]) is None
    # the second through the command line, as an operator does it; the API's socket survived the re-exec
    r = run("ctl", "--mount", mp, "upgrade", "--json", timeout=300)
    assert r.returncode == 0, r.stderr
    second = read_record(mp) or {}
    assert json.loads(r.stdout) == {"old_pid": first["worker_pid"], "pid": second["worker_pid"],
                                    "supervisor_pid": rec["pid"]}  # fmt: skip
    assert second["worker_pid"] not in (rec["worker_pid"], first["worker_pid"])
    assert process_start_time(first["worker_pid"]) is None
    assert get(second["api_sock"], "/api/v1/daemon", timeout=60)["pid"] == second["worker_pid"]
    assert hashlib.sha256((mp / "big.bin").read_bytes()).digest() == hashlib.sha256(src.read_bytes()).digest()
    assert len(re.findall("supervisor re-executed", Path(rec["log"]).read_text())) == 2
    mounts.umount(mp)


def test_request_upgrade_refuses_a_mount_without_supervisor(mounts: Mounts, image64: tuple[Path, Path]) -> None:
    _, out = image64
    mp, rec = mounts.mount(out, "full", mode="full")
    with pytest.raises(UsageError, match="only a fanotify mount"):
        request_upgrade(read_record(mp) or rec)
    mounts.umount(mp)


def test_upgrade_called_off_when_the_new_worker_cannot_start(mounts: Mounts, image64: tuple[Path, Path],
                                                             tmp_path: Path) -> None:  # fmt: skip
    """The bootstrap moved away after the mount: a new worker cannot load the image, so the supervisor calls the
    upgrade off; request_upgrade says so, and the old worker serves on."""
    src, out = image64
    boot = tmp_path / "image.boot"
    shutil.copyfile(out / "image.boot", boot)
    mp, rec = mounts.mount(out, "off", boot=boot)
    boot.rename(tmp_path / "moved.boot")  # (the mount holds it open)
    with pytest.raises(MountError, match=r"upgrade called off: new worker \d+ failed: error \d "):
        request_upgrade(rec)
    now = read_record(mp) or {}
    assert now["worker_pid"] == rec["worker_pid"] and process_start_time(rec["worker_pid"]) is not None
    assert hashlib.sha256((mp / "big.bin").read_bytes()).digest() == hashlib.sha256(src.read_bytes()).digest()
    mounts.umount(mp)

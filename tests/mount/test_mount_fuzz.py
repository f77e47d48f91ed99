"""Kernel-mounted fuzzed bootstraps: bit flips in the superblock, inodes, dirents and chunk indexes of a small
image, mounted file-backed and walked (every file read, every link read).  The kernel or our tools must fail
cleanly (a one-line error, EIO, EUCLEAN...), never hang, never oops (the kernel's taint flags stay as they were),
and nothing stays mounted.  Seeded: every run mounts the same cases (``MOUNT_FUZZ_CASES``, ``MOUNT_FUZZ_SEED``
for a longer local run).
"""

from __future__ import annotations

import json
import os
import random
import select
import signal
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from cachefilesd_py.mount.record import RUN_DIR_ENV
from erofs.reader import Bootstrap
from fscache.mount import MountError, is_mounted, mount_erofs_file_backed, umount
from tests.support.rootfs import make_rootfs

CLI = [str(Path(sys.executable).with_name("nydus-erofs"))]
CASES = int(os.environ.get("MOUNT_FUZZ_CASES", "300"))
SEED = int(os.environ.get("MOUNT_FUZZ_SEED", "19"))
WALK_TIMEOUT = 20.0  # seconds one walk of a mounted case may take
CLI_CASES = 12  # of the cases, mounted through `nydus-erofs mount --mode full` too

pytestmark = pytest.mark.kernel("erofs")


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("fuzz-image")
    root = make_rootfs(tmp / "root")
    proc = subprocess.run([*CLI, "build", str(root), "--output-dir", str(tmp / "out"), "--chunk-size", "4KiB"],
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return tmp / "out"


def _regions(boot: bytes) -> list[tuple[int, int]]:
    """Where the flips go: the superblock, the extended superblock, and the metadata area (inodes, dirents,
    chunk indexes), as (start, end) byte ranges."""
    with Bootstrap.from_bytes(boot) as bs:
        meta = bs.meta_base
    return [(1024, 1024 + 128), (1024 + 128, 1024 + 128 + 256), (meta, len(boot))]


def _cases(boot: bytes) -> Iterator[bytes]:
    rnd = random.Random(SEED)
    regions = _regions(boot)
    for _ in range(CASES):
        data = bytearray(boot)
        start, end = rnd.choice(regions)
        for _ in range(rnd.randint(1, 4)):
            pos = rnd.randrange(start, min(end, len(data)))
            data[pos] ^= 1 << rnd.randrange(8)
        yield bytes(data)


def _walk(top: Path) -> None:
    """lstat, readlink, read every entry under ``top`` (in a child process); every error is fine but a hang."""
    for dirpath, dirnames, filenames in os.walk(top, onerror=lambda e: None):
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            try:
                st = os.lstat(p)
                if stat.S_ISLNK(st.st_mode):
                    os.readlink(p)
                elif stat.S_ISREG(st.st_mode):
                    with open(p, "rb") as f:
                        while f.read(1 << 20):
                            pass
                os.listxattr(p, follow_symlinks=False)
            except OSError:
                pass


def _walk_bounded(top: Path) -> bool:
    """:func:`_walk` in a forked child; False if it did not finish within WALK_TIMEOUT (it is then killed)."""
    pid = os.fork()
    if pid == 0:
        try:
            _walk(top)
        finally:
            os._exit(0)
    pidfd = os.pidfd_open(pid)
    try:
        poller = select.poll()
        poller.register(pidfd, select.POLLIN)
        done = bool(poller.poll(int(WALK_TIMEOUT * 1000)))
        if not done:
            os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        return done
    finally:
        os.close(pidfd)


def _taint() -> str:
    return Path("/proc/sys/kernel/tainted").read_text().strip()


def test_fuzzed_bootstraps_mount_and_walk_cleanly(image: Path, tmp_path: Path) -> None:
    boot = (image / "image.boot").read_bytes()
    (blob,) = (image / "blobs").iterdir()
    mp = tmp_path / "mnt"
    mp.mkdir()
    case_boot = tmp_path / "case.boot"
    taint = _taint()
    outcomes = {"mount refused": 0, "walked": 0}
    env = dict(os.environ, **{RUN_DIR_ENV: str(tmp_path / "run")})
    for n, data in enumerate(_cases(boot)):
        case_boot.write_bytes(data)
        try:
            mount_erofs_file_backed(case_boot, mp, [blob])
        except MountError as e:
            assert "\n" not in str(e)
            outcomes["mount refused"] += 1
        else:
            try:
                assert _walk_bounded(mp), f"case {n} (seed {SEED}): the walk hung"
                outcomes["walked"] += 1
            finally:
                umount(mp, lazy=True)
        assert not is_mounted(mp, None)
        assert _taint() == taint, f"case {n} (seed {SEED}): the kernel got tainted ({_taint()})"
        if n < CLI_CASES:  # our tool: a one-line error (any exit status but a traceback), or a mount that walks
            proc = subprocess.run([*CLI, "mount", str(case_boot), str(mp), "--mode", "full", "--cache-dir",
                                   str(tmp_path / "cache"), "--blob-dir", str(image / "blobs"), "--json"],
                                  capture_output=True, text=True, env=env, timeout=60)  # fmt: skip
            if proc.returncode == 0:
                assert json.loads(proc.stdout)["mode"] == "full"
                try:
                    assert _walk_bounded(mp), f"case {n}: the walk of the tool's mount hung"
                finally:
                    out = subprocess.run([*CLI, "umount", str(mp)], capture_output=True, text=True, env=env,
                                         timeout=60)  # fmt: skip
                    assert out.returncode == 0, out.stderr
            else:
                assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr, proc.stderr
            assert not is_mounted(mp, None)
    print(f"{CASES} fuzzed bootstraps (seed {SEED}): {outcomes}")
    assert outcomes["walked"] and outcomes["mount refused"], outcomes

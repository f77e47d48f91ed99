"""Kernel-mounted fuzzed bootstraps, for the host suite (tests/mount/test_mount_fuzz.py) and the VM's
(tests/vm/test_mount_fuzz.py): bit flips in the superblock, inodes, dirents and chunk indexes of a small image,
mounted file-backed and walked (every file read, every link read).  The kernel or our tools must fail cleanly (a
one-line error, EIO, EUCLEAN...), never hang, never oops (the kernel's taint flags stay as they were), and nothing
stays mounted.  Seeded: every run mounts the same cases.
"""

from __future__ import annotations

import json
import os
import random
import select
import signal
import stat
from collections.abc import Iterator
from pathlib import Path

from cachefilesd_py.mount.record import RUN_DIR_ENV
from erofs.reader import Bootstrap
from fscache.mount import MountError, is_mounted, mount_erofs_file_backed, umount
from tests.support.cli import run

__all__ = ["build_image", "fuzz_mounts"]


def build_image(root: Path, out: Path) -> Path:
    """``nydus-erofs build ROOT`` with 4 KiB chunks (many chunk indexes to flip); returns ``out``."""
    proc = run("build", root, "--output-dir", out, "--chunk-size", "4KiB", timeout=600)
    assert proc.returncode == 0, proc.stderr
    return out


def _regions(boot: bytes) -> list[tuple[int, int]]:
    """Where the flips go: the superblock, the extended superblock, the metadata (inodes, dirents, chunk
    indexes, the RAFS tables), as (start, end) byte ranges."""
    with Bootstrap.from_bytes(boot) as bs:
        meta = bs.meta_base
    return [(1024, 1024 + 128), (1024 + 128, 1024 + 128 + 256), (meta, len(boot))]


def _cases(boot: bytes, count: int, seed: int) -> Iterator[bytes]:
    rnd = random.Random(seed)
    regions = _regions(boot)
    for _ in range(count):
        data = bytearray(boot)
        start, end = rnd.choice(regions)
        for _ in range(rnd.randint(1, 4)):
            pos = rnd.randrange(start, min(end, len(data)))
            data[pos] ^= 1 << rnd.randrange(8)
        yield bytes(data)


def _walk(top: Path) -> None:
    """lstat, readlink, read, listxattr every entry under ``top``; every error is fine (only a hang is not)."""
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


def _walk_bounded(top: Path, timeout: float) -> bool:
    """:func:`_walk` in a forked child; False if it did not finish within ``timeout`` seconds (then killed)."""
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
        done = bool(poller.poll(int(timeout * 1000)))
        if not done:
            os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        return done
    finally:
        os.close(pidfd)


def _taint() -> str:
    return Path("/proc/sys/kernel/tainted").read_text().strip()


def fuzz_mounts(image: Path, tmp: Path, *, cases: int, seed: int, cli_cases: int = 0,
                walk_timeout: float = 20.0, shard: tuple[int, int] = (0, 1)) -> dict[str, int]:  # fmt: skip
    """Mount ``cases`` fuzzed copies of ``image``'s bootstrap with mount(2) (the first ``cli_cases`` also with
    ``nydus-erofs mount --mode full``), walk each mount, unmount; assert a clean outcome for each.  Returns how
    many mounts were refused and how many were walked.  ``shard=(k, n)``: only the cases whose number is k modulo
    n (so n runs in parallel cover the same cases as one)."""
    boot = (image / "image.boot").read_bytes()
    (blob,) = (image / "blobs").iterdir()
    mp = tmp / "fuzz-mnt"
    mp.mkdir()
    case_boot = tmp / "case.boot"
    taint = _taint()
    outcomes = {"mount refused": 0, "walked": 0}
    env = dict(os.environ, **{RUN_DIR_ENV: str(tmp / "fuzz-run")})
    for n, data in enumerate(_cases(boot, cases, seed)):
        if n % shard[1] != shard[0]:
            continue
        case_boot.write_bytes(data)
        try:
            mount_erofs_file_backed(case_boot, mp, [blob])
        except MountError as e:
            assert "\n" not in str(e)
            outcomes["mount refused"] += 1
        else:
            try:
                assert _walk_bounded(mp, walk_timeout), f"case {n} (seed {seed}): the walk hung"
                outcomes["walked"] += 1
            finally:
                umount(mp, lazy=True)
        assert not is_mounted(mp, None)
        assert _taint() == taint, f"case {n} (seed {seed}): the kernel got tainted ({_taint()})"
        if n < cli_cases:  # our tool: a one-line error (never a traceback), or a mount that walks
            proc = run("mount", case_boot, mp, "--mode", "full", "--cache-dir", tmp / "fuzz-cache",
                       "--blob-dir", image / "blobs", "--json", env=env, timeout=120)  # fmt: skip
            if proc.returncode == 0:
                assert json.loads(proc.stdout)["mode"] == "full"
                try:
                    assert _walk_bounded(mp, walk_timeout), f"case {n} (seed {seed}): the walk of the tool's mount hung"
                finally:
                    out = run("umount", mp, env=env, timeout=120)
                    assert out.returncode == 0, out.stderr
            else:
                assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr, proc.stderr
            assert not is_mounted(mp, None)
    return outcomes

"""Mounts trust nothing in the image (issue 19): nosuid/nodev by default, any number of blobs, a deadline per
fill, failure caching, and a ToC-less blob's chunk table cross-checked before it is served.

Each test drives ``nydus-erofs mount``/``umount`` (the CLI a user runs) against the running kernel.
"""

from __future__ import annotations

import errno
import io
import json
import os
import shutil
import stat
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cachefilesd_py.mount.record import RUN_DIR_ENV
from erofs.paths import process_start_time
from fscache.mount import is_mounted
from tests.support.kmount import umount as kernel_umount

CLI = [str(Path(sys.executable).with_name("nydus-erofs"))]
TIMEOUT = 120.0
NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]

pytestmark = pytest.mark.kernel("erofs", "fanotify")


class Cli:
    """``nydus-erofs`` run as a user would, with its own run dir; whatever a test left mounted is unmounted."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.env = dict(os.environ, **{RUN_DIR_ENV: str(tmp / "run")})
        self.mounted: list[Path] = []

    def run(self, *args: str, timeout: float = TIMEOUT) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*CLI, *args], capture_output=True, text=True, env=self.env, timeout=timeout)

    def mount(self, boot: Path, mp: Path, cache: Path, *extra: str) -> dict[str, Any]:
        mp.mkdir(parents=True, exist_ok=True)
        proc = self.run("mount", str(boot), str(mp), "--cache-dir", str(cache), "--json", *extra)
        assert proc.returncode == 0, proc.stderr
        self.mounted.append(mp)
        return json.loads(proc.stdout)

    def umount(self, mp: Path) -> dict[str, Any]:
        proc = self.run("umount", str(mp), "--json")
        self.mounted.remove(mp)
        assert proc.returncode == 0, proc.stderr
        assert not is_mounted(mp, None)
        return json.loads(proc.stdout)

    def cleanup(self) -> None:
        for mp in list(self.mounted):
            if self.run("umount", str(mp)).returncode and is_mounted(mp, None):
                kernel_umount(mp)


@pytest.fixture
def cli(tmp_path: Path) -> Iterator[Cli]:
    c = Cli(tmp_path)
    try:
        yield c
    finally:
        c.cleanup()


@pytest.fixture
def public_dir() -> Iterator[Path]:
    """A directory user nobody may traverse (pytest's tmp dirs are root's only)."""
    d = Path(tempfile.mkdtemp(prefix="nydus-erofs-test-"))
    d.chmod(0o755)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def build(sources: list[Path], out: Path, *extra: str) -> dict[str, Any]:
    proc = subprocess.run([*CLI, "build", *map(str, sources), "--output-dir", str(out), "--json", *extra],
                          capture_output=True, text=True, timeout=TIMEOUT)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


# -- finding 6: nosuid, nodev -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def suid_image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An image holding a setuid-root copy of id(1) and a character device node (/dev/null's numbers)."""
    tmp = tmp_path_factory.mktemp("suid")
    src = tmp / "src"
    src.mkdir()
    shutil.copy(shutil.which("id") or "/usr/bin/id", src / "id")
    os.chown(src / "id", 0, 0)
    os.chmod(src / "id", 0o4755)
    os.mknod(src / "null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    build([src], tmp / "out")
    return tmp / "out"


def _euid_of_nobody_running(binary: Path) -> str:
    proc = subprocess.run([*NOBODY, str(binary), "-u"], capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


def _open_error(path: Path) -> int:
    try:
        os.close(os.open(path, os.O_RDONLY))
    except OSError as e:
        return e.errno or -1
    return 0


@pytest.mark.parametrize("mode", ["fanotify", "full"])
def test_setuid_binaries_and_device_nodes_of_an_image_grant_nothing(cli: Cli, suid_image: Path, public_dir: Path,
                                                                    tmp_path: Path, mode: str) -> None:  # fmt: skip
    boot, cache, mp = suid_image / "image.boot", tmp_path / "cache", public_dir / "mnt"
    cli.mount(boot, mp, cache, "--mode", mode)
    assert (mp / "id").stat().st_mode & stat.S_ISUID  # the bit is there, it just means nothing
    assert _euid_of_nobody_running(mp / "id") == "65534"
    assert _open_error(mp / "null") == errno.EACCES
    cli.umount(mp)

    cli.mount(boot, mp, cache, "--mode", mode, "--allow-suid", "--allow-dev")  # lifted on request
    assert _euid_of_nobody_running(mp / "id") == "0"
    assert _open_error(mp / "null") == 0
    cli.umount(mp)


# -- finding 8: any number of blobs -------------------------------------------------------------------------------
LAYERS = 127


@pytest.fixture(scope="module")
def many_layers(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An image of 127 tar layers, each adding one small file (127 blobs)."""
    tmp = tmp_path_factory.mktemp("layers")
    tars = []
    for i in range(LAYERS):
        data = f"layer {i}\n".encode() * (i + 1)
        tar = tmp / f"l{i:03d}.tar"
        with tarfile.open(tar, "w") as tf:
            info = tarfile.TarInfo(f"f{i:03d}")
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
        tars.append(tar)
    build(tars, tmp / "out")
    assert len(list((tmp / "out" / "blobs").iterdir())) == LAYERS
    return tmp / "out"


@pytest.mark.parametrize("mode", ["fanotify", "full"])
def test_image_of_127_blobs_mounts_and_reads_back(cli: Cli, many_layers: Path, tmp_path: Path, mode: str) -> None:
    cache = tmp_path / "a-cache-dir-with-a-rather-long-name-as-real-ones-have"
    mp = tmp_path / "mnt"
    cli.mount(many_layers / "image.boot", mp, cache, "--mode", mode)
    try:
        for i in range(LAYERS):
            assert (mp / f"f{i:03d}").read_bytes() == f"layer {i}\n".encode() * (i + 1)
    finally:
        cli.umount(mp)

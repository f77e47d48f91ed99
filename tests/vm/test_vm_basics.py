"""The test VM has what the daemon's tests need: an ext4 scratch disk, the host root, fanotify permission events;
on our 6.12 kernel also /dev/cachefiles in on-demand mode and file-backed EROFS mounts; on every kernel EROFS
mounted from a loop device."""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import gzip
import os
import stat
import subprocess
from pathlib import Path

import pytest

from tests.support.kmount import MS_RDONLY, mount, umount

libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)


def mounts() -> list[list[str]]:
    return [line.split() for line in Path("/proc/mounts").read_text().splitlines()]


@pytest.mark.kernel("cachefiles")
def test_kernel_has_fscache_ondemand() -> None:
    config = gzip.decompress(Path("/proc/config.gz").read_bytes()).decode()
    for option in ("CONFIG_CACHEFILES_ONDEMAND=y", "CONFIG_EROFS_FS_ONDEMAND=y",
                   "CONFIG_EROFS_FS_BACKED_BY_FILE=y", "CONFIG_FANOTIFY_ACCESS_PERMISSIONS=y"):
        assert option in config.splitlines()


@pytest.mark.kernel("cachefiles")
def test_dev_cachefiles_is_a_char_device() -> None:
    assert stat.S_ISCHR(os.stat("/dev/cachefiles").st_mode)


def test_scratch_is_writable_ext4(vm_scratch: Path, tmp_path: Path) -> None:
    (entry,) = [m for m in mounts() if m[1] == str(vm_scratch)]
    assert entry[2] == "ext4"
    assert "rw" in entry[3].split(",")
    assert vm_scratch in tmp_path.parents  # TMPDIR points into the scratch disk
    probe = tmp_path / "probe"
    probe.write_bytes(b"x" * 10000)
    assert probe.read_bytes() == b"x" * 10000


def test_root_is_read_only_host_root() -> None:
    (root,) = [m for m in mounts() if m[1] == "/"]
    assert root[2] == "9p" and "ro" in root[3].split(",")
    assert Path(__file__).is_file()  # the checkout, where it is on the host
    with pytest.raises(OSError) as exc:
        (Path(__file__).parent / "written-in-vm").write_text("x")
    assert exc.value.errno == errno.EROFS


@pytest.mark.kernel("cachefiles")
def test_cachefiles_bind_ondemand(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    cache.mkdir()
    fd = os.open("/dev/cachefiles", os.O_RDWR)
    try:
        for command in (f"dir {cache}", "tag t", "bind ondemand"):
            assert os.write(fd, command.encode()) == len(command)
        assert os.read(fd, 1024) == b""  # bound, no request pending
        assert (cache / "cache").is_dir() and (cache / "graveyard").is_dir()
    finally:
        os.close(fd)


@pytest.mark.kernel("erofs-file-backed")
@pytest.mark.tools("mkfs.erofs")
def test_file_backed_erofs_mount(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    (tree / "sub").mkdir(parents=True)
    (tree / "hello.txt").write_text("hello from erofs\n")
    (tree / "sub" / "big.bin").write_bytes(bytes(range(256)) * 100)
    image = tmp_path / "image.erofs"
    subprocess.run(["mkfs.erofs", "--quiet", str(image), str(tree)], check=True)
    target = tmp_path / "mnt"
    target.mkdir()
    mount(image, target, "erofs", MS_RDONLY)
    try:
        (entry,) = [m for m in mounts() if m[1] == str(target)]
        assert entry[0] == str(image) and entry[2] == "erofs"  # the file itself, no loop device
        assert (target / "hello.txt").read_text() == "hello from erofs\n"
        assert (target / "sub" / "big.bin").read_bytes() == bytes(range(256)) * 100
    finally:
        umount(target, detach_if_busy=False)


def test_fanotify_permission_events_available() -> None:
    fan_class_content, fan_cloexec = 0x04, 0x01
    fd = libc.fanotify_init(fan_class_content | fan_cloexec, os.O_RDONLY)
    assert fd >= 0, os.strerror(ctypes.get_errno())
    os.close(fd)

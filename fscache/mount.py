"""mount(2), umount2(2), the mount table (``/proc/self/mountinfo``) and a mount's readahead window.

mount(2) is called directly through ctypes: util-linux ``mount`` attaches a loop device, which breaks
``device=<regular file>`` of file-backed EROFS mounts.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import logging
import os
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from erofs.errors import NydusErofsError, UsageError

__all__ = [
    "MountError",
    "MountInfo",
    "filesystem_name",
    "is_mounted",
    "mount_bdi_name",
    "mount_erofs_file_backed",
    "mountinfo",
    "set_mount_readahead",
    "top_mount",
    "umount",
]

log = logging.getLogger(__name__)

MS_RDONLY = 1
MNT_DETACH = 2
FS_IOC_GETFSSYSFSPATH = 0x80811501  # _IOR(0x15, 1, struct fs_sysfs_path { __u8 len; __u8 name[128]; })
_TMPFS_MAGIC = {0x01021994: "tmpfs", 0x858458F6: "ramfs"}

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]


class MountError(NydusErofsError, OSError):
    """mount(2) / umount2(2) failed, or the daemon did not start."""

    exit_code = 5

    def __str__(self) -> str:  # the message alone, without OSError's "[Errno N] "
        return self.strerror or super().__str__()


def mount_erofs_file_backed(boot: str | os.PathLike[str], mountpoint: str | os.PathLike[str],
                            devices: Sequence[str | os.PathLike[str]]) -> None:  # fmt: skip
    """mount(2) the bootstrap file read-only as EROFS with ``device=`` files, in device-table order."""
    paths = [os.path.realpath(d) for d in devices]
    for p in paths:
        if "," in p:
            raise UsageError(f"device path {p!r} contains a comma, which mount options cannot carry")
    opts = ",".join(f"device={p}" for p in paths)
    src, dst = os.path.realpath(boot), os.path.realpath(mountpoint)
    if _libc.mount(os.fsencode(src), os.fsencode(dst), b"erofs", MS_RDONLY, opts.encode()) != 0:
        err = ctypes.get_errno()
        hint = ""
        if err == errno.EINVAL:
            hint = " (not an EROFS image, or a kernel without file-backed EROFS mounts: Linux >= 6.12)"
        elif err == errno.ENODEV:
            hint = " (the kernel has no EROFS)"
        raise MountError(err, f"mount {src} on {dst}: {os.strerror(err)}{hint}")


def umount(mountpoint: str | os.PathLike[str], *, lazy: bool = False) -> None:
    """umount2(2); EBUSY is an error unless ``lazy`` (then the mount is detached)."""
    target = os.fsencode(os.path.realpath(mountpoint))
    if _libc.umount2(target, MNT_DETACH if lazy else 0) == 0:
        return
    err = ctypes.get_errno()
    hint = " (files are still open there)" if err == errno.EBUSY else ""
    raise MountError(err, f"umount {os.fsdecode(target)}: {os.strerror(err)}{hint}")


def mount_bdi_name(mountpoint: str | os.PathLike[str]) -> str | None:
    """The backing-dev name of the filesystem mounted at ``mountpoint`` (``erofs-324`` for a file-backed
    EROFS mount, from its sysfs path ``erofs/erofs-324``), or None when the kernel does not say (< 6.8)."""
    fd = os.open(mountpoint, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        buf = bytearray(129)
        fcntl.ioctl(fd, FS_IOC_GETFSSYSFSPATH, buf)
    except OSError:
        return None
    finally:
        os.close(fd)
    name = bytes(buf[1 : 1 + min(buf[0], 128)]).decode(errors="replace")
    return name.rsplit("/", 1)[-1] or None


def set_mount_readahead(mountpoint: str | os.PathLike[str], kib: int) -> bool:
    """Set the readahead window of the mount's backing-dev (``/sys/class/bdi/<name>/read_ahead_kb``).

    A file-backed EROFS mount reads its ``device=`` files in windows of this size, so in fanotify mode it is
    the size of each pre-content event: 1 MiB windows mean 8x fewer daemon round trips than the 128 KiB
    default.  Best effort: False when the kernel does not say which bdi the mount has.
    """
    name = mount_bdi_name(mountpoint)
    if not name or "/" in name or name.startswith("."):
        return False
    path = Path("/sys/class/bdi") / name / "read_ahead_kb"
    try:
        path.write_text(f"{int(kib)}\n")
    except OSError as e:
        log.info("cannot set %s: %s", path, e)
        return False
    return True


# -- the mount table ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class MountInfo:
    """One line of ``/proc/self/mountinfo`` (the fields this project uses), octal escapes decoded."""

    mount_id: int
    dev: int  # st_dev form of major:minor
    mountpoint: str
    fstype: str
    source: str


def _unescape(field: str) -> str:
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and i + 3 < len(field) and field[i + 1 : i + 4].isdigit():
            out.append(chr(int(field[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def mountinfo() -> Iterator[MountInfo]:
    """The mounts of this mount namespace, in table order (of several at one place, the last is on top)."""
    with open("/proc/self/mountinfo") as f:
        for line in f:
            head, _, tail = line.partition(" - ")
            fields, rest = head.split(), tail.split()
            if len(fields) < 5:
                continue
            major, _, minor = fields[2].partition(":")
            yield MountInfo(int(fields[0]), os.makedev(int(major), int(minor)), _unescape(fields[4]),
                            rest[0] if rest else "", _unescape(rest[1]) if len(rest) > 1 else "")  # fmt: skip


def is_mounted(mountpoint: str | os.PathLike[str], fstype: str | None = "erofs") -> bool:
    """Whether something (of ``fstype``) is mounted exactly at ``mountpoint`` in this mount namespace."""
    target = os.path.realpath(mountpoint)
    return any(m.mountpoint == target and (fstype is None or m.fstype == fstype) for m in mountinfo())


def top_mount(mountpoint: str | os.PathLike[str]) -> MountInfo | None:
    """What is mounted at ``mountpoint`` last (on top), or None."""
    target = os.path.realpath(mountpoint)
    top = None
    for m in mountinfo():
        if m.mountpoint == target:
            top = m
    return top


def filesystem_name(path: str | os.PathLike[str]) -> str | None:
    """'tmpfs'/'ramfs' when ``path`` is on one of those, else None."""
    libc_statfs = getattr(_libc, "statfs", None)
    if libc_statfs is None:  # pragma: no cover
        return None
    buf = ctypes.create_string_buffer(256)
    if libc_statfs(os.fsencode(path), buf) != 0:
        return None
    magic = int.from_bytes(buf.raw[:8], sys.byteorder)  # f_type is the first member (long)
    return _TMPFS_MAGIC.get(magic & 0xFFFFFFFF)

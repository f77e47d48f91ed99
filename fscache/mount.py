"""mount(2), the new mount API, umount2(2), the mount table (``/proc/self/mountinfo``) and a mount's readahead.

The syscalls are called directly through ctypes: util-linux ``mount`` attaches a loop device, which breaks
``device=<regular file>`` of file-backed EROFS mounts.  An EROFS image is mounted with the new mount API
(fsopen/fsconfig/fsmount/move_mount, Linux >= 5.2), one ``fsconfig`` per ``device`` path: mount(2) passes its
options in one page, so a ``device=`` list longer than 4095 bytes (about 44 blobs in a cache dir of typical
length) would be cut by the kernel ("Unknown parameter").  Without the new API a list that long is a clear error.

Every image mount is ``nosuid,nodev`` unless the caller lifts it (``allow_suid``, ``allow_dev``): an image is
data from elsewhere, and its setuid-root binaries or device nodes must not grant anything on this host.
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
    "MS_NODEV",
    "MS_NOSUID",
    "MS_RDONLY",
    "MountError",
    "MountInfo",
    "filesystem_name",
    "is_mounted",
    "mount_bdi_name",
    "mount",
    "mount_erofs_file_backed",
    "mount_erofs_fscache",
    "mountinfo",
    "set_mount_readahead",
    "top_mount",
    "umount",
]

log = logging.getLogger(__name__)

MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MNT_DETACH = 2
OPTIONS_MAX = 4095  # mount(2) copies one page of options, NUL included

# the new mount API (the same numbers on every architecture)
SYS_MOVE_MOUNT, SYS_FSOPEN, SYS_FSCONFIG, SYS_FSMOUNT = 429, 430, 431, 432
FSOPEN_CLOEXEC = 1
FSCONFIG_SET_FLAG, FSCONFIG_SET_STRING, FSCONFIG_CMD_CREATE = 0, 1, 6
FSMOUNT_CLOEXEC = 1
MOUNT_ATTR_RDONLY, MOUNT_ATTR_NOSUID, MOUNT_ATTR_NODEV = 1, 2, 4
MOVE_MOUNT_F_EMPTY_PATH = 4
FS_IOC_GETFSSYSFSPATH = 0x80811501  # _IOR(0x15, 1, struct fs_sysfs_path { __u8 len; __u8 name[128]; })
_TMPFS_MAGIC = {0x01021994: "tmpfs", 0x858458F6: "ramfs"}

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
_libc.syscall.restype = ctypes.c_long


class MountError(NydusErofsError, OSError):
    """mount(2) / umount2(2) failed, or the daemon did not start."""

    exit_code = 5

    def __str__(self) -> str:  # the message alone, without OSError's "[Errno N] "
        return self.strerror or super().__str__()


def mount(source: str | os.PathLike[str] | None, target: str | os.PathLike[str], fstype: str | None,
          flags: int = 0, data: str | None = None) -> None:  # fmt: skip
    """mount(2) as it is; a MountError names the source, target, type and options."""
    opts = data.encode() if data else None
    if opts is not None and len(opts) > OPTIONS_MAX:
        raise MountError(errno.E2BIG, f"mount {source} on {target}: options are {len(opts)} bytes, more than "
                         f"mount(2) takes ({OPTIONS_MAX})")  # fmt: skip
    src = None if source is None else os.fsencode(source)
    if _libc.mount(src, os.fsencode(target), None if fstype is None else fstype.encode(), flags, opts) != 0:
        err = ctypes.get_errno()
        raise MountError(err, f"mount -t {fstype} {source} {target} ({data or 'no options'}): {os.strerror(err)}")


def _sys(number: int, *args: object) -> int:
    """A raw syscall; OSError on failure."""
    ret = _libc.syscall(ctypes.c_long(number), *args)
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return ret


def _fs_log(fs_fd: int) -> str:
    """The kernel's messages queued on an fs context (``e Unknown parameter ...``), joined; '' if none."""
    lines = []
    while True:
        try:
            msg = os.read(fs_fd, 1024)
        except OSError:
            break
        if not msg:
            break
        lines.append(msg.decode(errors="replace").strip())
    return "; ".join(lines)


def _mount_new_api(fstype: str, source: str, target: str, strings: Sequence[tuple[str, str]], attrs: int) -> None:
    """fsopen(fstype), one fsconfig(SET_STRING) per ``(key, value)``, ``source``, create, fsmount with ``attrs``,
    move_mount onto ``target``.  OSError (errno ENOSYS: no new mount API) with the kernel's message."""
    fs_fd = _sys(SYS_FSOPEN, fstype.encode(), ctypes.c_uint(FSOPEN_CLOEXEC))
    try:
        try:
            for key, value in (*strings, ("source", source)):
                _sys(SYS_FSCONFIG, ctypes.c_int(fs_fd), ctypes.c_uint(FSCONFIG_SET_STRING), key.encode(),
                     os.fsencode(value), ctypes.c_int(0))  # fmt: skip
            _sys(SYS_FSCONFIG, ctypes.c_int(fs_fd), ctypes.c_uint(FSCONFIG_SET_FLAG), b"ro", None, ctypes.c_int(0))
            _sys(SYS_FSCONFIG, ctypes.c_int(fs_fd), ctypes.c_uint(FSCONFIG_CMD_CREATE), None, None, ctypes.c_int(0))
            mnt_fd = _sys(SYS_FSMOUNT, ctypes.c_int(fs_fd), ctypes.c_uint(FSMOUNT_CLOEXEC), ctypes.c_uint(attrs))
        except OSError as e:
            why = _fs_log(fs_fd)
            raise OSError(e.errno, f"{e.strerror}{f' ({why})' if why else ''}") from None
        try:
            _sys(SYS_MOVE_MOUNT, ctypes.c_int(mnt_fd), b"", ctypes.c_int(-100), os.fsencode(target),
                 ctypes.c_uint(MOVE_MOUNT_F_EMPTY_PATH))  # fmt: skip
        finally:
            os.close(mnt_fd)
    finally:
        os.close(fs_fd)


def mount_erofs_file_backed(boot: str | os.PathLike[str], mountpoint: str | os.PathLike[str],
                            devices: Sequence[str | os.PathLike[str]], *, allow_suid: bool = False,
                            allow_dev: bool = False) -> None:  # fmt: skip
    """Mount the bootstrap file read-only as EROFS with ``device=`` files, in device-table order; ``nosuid`` and
    ``nodev`` unless ``allow_suid`` / ``allow_dev``.  Any number of devices (the new mount API; mount(2)'s
    one-page option list when the kernel lacks it, then a list too long for it is a clear error)."""
    paths = [os.path.realpath(d) for d in devices]
    for p in paths:
        if "," in p:
            raise UsageError(f"device path {p!r} contains a comma, which mount options cannot carry")
    src, dst = os.path.realpath(boot), os.path.realpath(mountpoint)
    attrs = MOUNT_ATTR_RDONLY | (0 if allow_suid else MOUNT_ATTR_NOSUID) | (0 if allow_dev else MOUNT_ATTR_NODEV)
    try:
        _mount_new_api("erofs", src, dst, [("device", p) for p in paths], attrs)
        return
    except OSError as e:
        if e.errno != errno.ENOSYS:
            raise _mount_error(e.errno or errno.EIO, src, dst, e.strerror) from None
    opts = ",".join(f"device={p}" for p in paths)
    if len(opts.encode()) > OPTIONS_MAX:
        raise MountError(errno.E2BIG, f"mount {src} on {dst}: {len(paths)} device= paths make {len(opts.encode())} "
                         f"bytes of options, more than mount(2) takes ({OPTIONS_MAX}), and the kernel has no new "
                         "mount API (fsopen): use a shorter --cache-dir")  # fmt: skip
    flags = MS_RDONLY | (0 if allow_suid else MS_NOSUID) | (0 if allow_dev else MS_NODEV)
    if _libc.mount(os.fsencode(src), os.fsencode(dst), b"erofs", flags, opts.encode()) != 0:
        err = ctypes.get_errno()
        raise _mount_error(err, src, dst, os.strerror(err))


def _mount_error(err: int, src: str, dst: str, what: str | None) -> MountError:
    hint = ""
    if err == errno.EINVAL and "(" not in (what or ""):
        hint = " (not an EROFS image, or a kernel without file-backed EROFS mounts: Linux >= 6.12)"
    elif err == errno.ENODEV:
        hint = " (the kernel has no EROFS)"
    return MountError(err, f"mount {src} on {dst}: {what or os.strerror(err)}{hint}")


def mount_erofs_fscache(fsid: str, mountpoint: str | os.PathLike[str], domain_id: str | None = None) -> None:
    """mount(2) ``-t erofs none -o fsid=FSID[,domain_id=DOMAIN]`` read-only: the image a cachefiles on-demand
    daemon serves under that fsid."""
    for name, value in (("fsid", fsid), ("domain_id", domain_id)):
        if value is not None and (not value or any(c in value for c in ",= \n")):
            raise UsageError(f"{name} {value!r} cannot be a mount option value")
    opts = f"fsid={fsid}" + (f",domain_id={domain_id}" if domain_id else "")
    dst = os.path.realpath(mountpoint)
    if _libc.mount(b"none", os.fsencode(dst), b"erofs", MS_RDONLY, opts.encode()) != 0:
        err = ctypes.get_errno()
        hint = ""
        if err == errno.EINVAL:
            hint = " (a kernel without EROFS over fscache: CONFIG_EROFS_FS_ONDEMAND)"
        elif err == errno.ENOENT:
            hint = " (the daemon does not serve that fsid)"
        raise MountError(err, f"mount -o {opts} on {dst}: {os.strerror(err)}{hint}")


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

"""Read-only loop block devices over regular files: how EROFS mounts a file on kernels without file-backed mounts.

:func:`attach` takes a free device from ``/dev/loop-control`` (``LOOP_CTL_GET_FREE``) and binds the file with
``LOOP_CONFIGURE`` (Linux >= 5.8): read-only, autoclear (the device releases itself when its last user — the
mount — goes) and direct I/O when the kernel can do it for that file; on older kernels ``LOOP_SET_FD`` then
``LOOP_SET_STATUS64``.  The returned :class:`LoopDevice` holds the device open until :meth:`LoopDevice.close`:
mount first, then close — autoclear then leaves the device to the mount.  :func:`backing_files` lists what each
bound device reads (``/sys/block/loopN/loop/backing_file``).
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from .errors import KernelInterfaceError

__all__ = ["LoopDevice", "attach", "backing_files", "has_loop"]

log = logging.getLogger(__name__)

LOOP_CONTROL = "/dev/loop-control"
LOOP_SET_FD = 0x4C00
LOOP_CLR_FD = 0x4C01
LOOP_SET_STATUS64 = 0x4C04
LOOP_CONFIGURE = 0x4C0A
LOOP_CTL_GET_FREE = 0x4C82
LO_FLAGS_READ_ONLY = 1
LO_FLAGS_AUTOCLEAR = 4
LO_FLAGS_DIRECT_IO = 16
LO_NAME_SIZE = 64
LO_KEY_SIZE = 32
_ATTEMPTS = 16  # another process may take the free device between GET_FREE and our bind: try the next one


class loop_info64(ctypes.Structure):  # noqa: N801 - the kernel's name
    _fields_ = [
        ("lo_device", ctypes.c_uint64),
        ("lo_inode", ctypes.c_uint64),
        ("lo_rdevice", ctypes.c_uint64),
        ("lo_offset", ctypes.c_uint64),
        ("lo_sizelimit", ctypes.c_uint64),
        ("lo_number", ctypes.c_uint32),
        ("lo_encrypt_type", ctypes.c_uint32),
        ("lo_encrypt_key_size", ctypes.c_uint32),
        ("lo_flags", ctypes.c_uint32),
        ("lo_file_name", ctypes.c_uint8 * LO_NAME_SIZE),
        ("lo_crypt_name", ctypes.c_uint8 * LO_NAME_SIZE),
        ("lo_encrypt_key", ctypes.c_uint8 * LO_KEY_SIZE),
        ("lo_init", ctypes.c_uint64 * 2),
    ]


class loop_config(ctypes.Structure):  # noqa: N801 - the kernel's name
    _fields_ = [
        ("fd", ctypes.c_uint32),
        ("block_size", ctypes.c_uint32),
        ("info", loop_info64),
        ("__reserved", ctypes.c_uint64 * 8),
    ]


@dataclass
class LoopDevice:
    """A bound loop device (``path``: ``/dev/loopN``), held open by ``fd`` until :meth:`close`."""

    path: str
    fd: int
    backing: str
    direct_io: bool

    def close(self) -> None:
        """Drop our hold; with autoclear the device unbinds once nothing (no mount) uses it."""
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            os.close(fd)

    def detach(self) -> None:
        """Unbind now (when the mount failed); then close."""
        if self.fd >= 0:
            try:
                fcntl.ioctl(self.fd, LOOP_CLR_FD)
            except OSError as e:
                log.debug("LOOP_CLR_FD %s: %s", self.path, e)
        self.close()

    def __enter__(self) -> LoopDevice:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def has_loop() -> bool:
    return os.path.exists(LOOP_CONTROL)


def _info(path: str, flags: int) -> loop_info64:
    info = loop_info64()
    info.lo_flags = flags
    name = os.fsencode(path)[: LO_NAME_SIZE - 1]
    ctypes.memmove(info.lo_file_name, name, len(name))
    return info


def _bind(dev_fd: int, file_fd: int, path: str, direct_io: bool) -> bool:
    """Bind ``file_fd`` to the device; returns whether direct I/O is on.  EBUSY: the device was taken."""
    flags = LO_FLAGS_READ_ONLY | LO_FLAGS_AUTOCLEAR
    for dio in (True, False) if direct_io else (False,):
        cfg = loop_config(fd=file_fd, block_size=4096 if dio else 0,
                          info=_info(path, flags | (LO_FLAGS_DIRECT_IO if dio else 0)))  # fmt: skip
        try:
            fcntl.ioctl(dev_fd, LOOP_CONFIGURE, bytearray(bytes(cfg)))
            return dio
        except OSError as e:
            if e.errno == errno.EBUSY:
                raise
            if e.errno in (errno.ENOTTY, errno.ENOSYS):  # before 5.8: no LOOP_CONFIGURE
                break
            if not dio:
                raise
            log.debug("loop: direct I/O refused for %s (%s): buffered", path, e)
    fcntl.ioctl(dev_fd, LOOP_SET_FD, file_fd)
    try:
        fcntl.ioctl(dev_fd, LOOP_SET_STATUS64, bytearray(bytes(_info(path, flags))))
    except OSError:
        fcntl.ioctl(dev_fd, LOOP_CLR_FD)
        raise
    return False


def attach(path: str | os.PathLike[str], *, direct_io: bool = True) -> LoopDevice:
    """Bind the file ``path`` read-only (autoclear, direct I/O when possible) to a free loop device."""
    backing = os.path.realpath(path)
    try:
        ctl = os.open(LOOP_CONTROL, os.O_RDWR | os.O_CLOEXEC)
    except OSError as e:
        raise KernelInterfaceError(e.errno, f"{LOOP_CONTROL}: {e.strerror} (no loop devices: modprobe loop)") from None
    file_fd = os.open(backing, os.O_RDONLY | os.O_CLOEXEC)
    try:
        for _ in range(_ATTEMPTS):
            number = fcntl.ioctl(ctl, LOOP_CTL_GET_FREE)
            dev = f"/dev/loop{number}"
            dev_fd = os.open(dev, os.O_RDONLY | os.O_CLOEXEC)
            try:
                dio = _bind(dev_fd, file_fd, backing, direct_io)
            except OSError as e:
                os.close(dev_fd)
                if e.errno == errno.EBUSY:
                    continue
                raise KernelInterfaceError(e.errno, f"cannot bind {backing} to {dev}: {e.strerror}") from None
            log.debug("loop: %s on %s (direct I/O %s)", backing, dev, "on" if dio else "off")
            return LoopDevice(dev, dev_fd, backing, dio)
        raise KernelInterfaceError(errno.EBUSY, f"no free loop device for {backing} after {_ATTEMPTS} attempts")
    finally:
        os.close(file_fd)
        os.close(ctl)


def backing_files() -> dict[str, str]:
    """``/dev/loopN`` -> the file it reads, for every bound loop device."""
    out: dict[str, str] = {}
    for entry in sorted(Path("/sys/block").glob("loop*")):
        try:
            out[f"/dev/{entry.name}"] = (entry / "loop" / "backing_file").read_text().strip()
        except OSError:
            continue  # not bound
    return out

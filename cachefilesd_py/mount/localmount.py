"""Mounting a bootstrap and its blob files as EROFS: file-backed where the kernel can, else over loop devices.

File-backed EROFS mounts (a regular file as the source and as each ``device=``) need Linux >= 6.12 with
``CONFIG_EROFS_FS_BACKED_BY_FILE``.  Elsewhere (Debian 12's 6.1, Ubuntu 22.04's 5.15) the kernel wants block
devices: :func:`mount_files` then binds the bootstrap and each blob file to a read-only, autoclear loop device
(:mod:`fscache.loop`) and mounts those, so the devices go when the mount goes.

Which to use: ``file_backed`` True (file-backed only), False (loop devices only) or None (auto: file-backed
first; a kernel that answers ENOTBLK — "block device required" — gets loop devices, and so does every later
mount of this process).  ``$NYDUS_EROFS_FORCE_LOOP=1`` makes auto choose loop devices (tests on a host that has
file-backed mounts).
"""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Sequence

from fscache.errors import KernelInterfaceError
from fscache.loop import LoopDevice, attach
from fscache.mount import MountError, mount_erofs_file_backed

__all__ = ["FORCE_LOOP_ENV", "mount_files", "mount_over_block_devices", "use_file_backed"]

log = logging.getLogger(__name__)

FORCE_LOOP_ENV = "NYDUS_EROFS_FORCE_LOOP"
_file_backed_works: list[bool] = []  # learnt once per process: [False] after the kernel said ENOTBLK


def use_file_backed(file_backed: bool | None) -> bool | None:
    """What ``file_backed`` (the spec's) means here: True, False, or None (try file-backed, fall back)."""
    if file_backed is not None:
        return file_backed
    if os.environ.get(FORCE_LOOP_ENV) == "1":
        return False
    return False if _file_backed_works == [False] else None


def mount_files(boot: str, mountpoint: str, devices: Sequence[str], *, file_backed: bool | None = None,
                allow_suid: bool = False, allow_dev: bool = False) -> str:  # fmt: skip
    """Mount the bootstrap ``boot`` read-only on ``mountpoint`` with the blob files ``devices`` (device-table
    order), ``nosuid,nodev`` unless ``allow_suid`` / ``allow_dev``; returns the mount's source: ``boot`` itself,
    or the loop device it was bound to."""
    choice = use_file_backed(file_backed)
    if choice is not False:
        try:
            mount_erofs_file_backed(boot, mountpoint, devices, allow_suid=allow_suid, allow_dev=allow_dev)
            return os.path.realpath(boot)
        except MountError as e:
            if e.errno != errno.ENOTBLK or choice is True:
                raise
            _file_backed_works[:] = [False]
            log.info("the kernel has no file-backed EROFS mounts: mounting over loop devices")
    return _mount_loop(boot, mountpoint, devices, devices, allow_suid=allow_suid, allow_dev=allow_dev)


def mount_over_block_devices(boot: str, mountpoint: str, devices: Sequence[str], *, allow_suid: bool = False,
                             allow_dev: bool = False) -> str:  # fmt: skip
    """Mount ``boot`` (a file: bound to a loop device) with the block devices ``devices`` (``/dev/nbdN``: a
    file-backed mount takes regular files only); returns the loop device."""
    return _mount_loop(boot, mountpoint, devices, [], allow_suid=allow_suid, allow_dev=allow_dev)


def _mount_loop(boot: str, mountpoint: str, devices: Sequence[str], files: Sequence[str], *, allow_suid: bool,
                allow_dev: bool) -> str:  # fmt: skip
    """Mount with ``boot`` and those of ``devices`` that are in ``files`` bound to loop devices."""
    loops: list[LoopDevice] = []
    try:
        sources: list[str] = []
        for path in (boot, *devices):
            if path is boot or path in files:
                try:
                    loops.append(attach(path))
                except KernelInterfaceError as e:
                    raise MountError(e.errno or errno.EIO, f"mount {boot} on {mountpoint}: {e}") from None
                sources.append(loops[-1].path)
            else:
                sources.append(path)
        mount_erofs_file_backed(sources[0], mountpoint, sources[1:], allow_suid=allow_suid, allow_dev=allow_dev)
    except BaseException:
        for lo in loops:
            lo.detach()
        raise
    for lo in loops:  # the mount holds them now; autoclear unbinds each when the mount goes
        lo.close()
    return sources[0]

"""mount(2) and umount2(2) for the tests — a thin wrapper of the project's own (:mod:`fscache.mount`), used by the
host and VM suites alike."""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from fscache.mount import MNT_DETACH, MS_RDONLY, MountError, mount_erofs_file_backed
from fscache.mount import is_mounted as _is_mounted
from fscache.mount import mount as _mount
from fscache.mount import umount as _umount

__all__ = ["MNT_DETACH", "MS_RDONLY", "is_mounted", "mount", "mount_erofs", "umount"]


def mount(source: str | os.PathLike[str], target: str | os.PathLike[str], fstype: str = "erofs",
          flags: int = MS_RDONLY, data: str = "") -> None:  # fmt: skip
    """mount(2); an OSError names the source, target, type and options."""
    _mount(source, target, fstype, flags, data or None)


def is_mounted(mountpoint: str | os.PathLike[str]) -> bool:
    """Whether anything (of any type) is mounted exactly at ``mountpoint``."""
    return _is_mounted(mountpoint, fstype=None)


def umount(target: str | os.PathLike[str], flags: int = 0, detach_if_busy: bool = True) -> None:
    """umount2(2); a busy mount is detached lazily instead, unless ``detach_if_busy`` is False."""
    try:
        _umount(target, lazy=bool(flags & MNT_DETACH))
    except MountError as e:
        if e.errno != errno.EBUSY or not detach_if_busy:
            raise
        _umount(target, lazy=True)


@contextmanager
def mount_erofs(boot: str | os.PathLike[str], mountpoint: str | os.PathLike[str],
                devices: Sequence[str | os.PathLike[str]] = ()) -> Iterator[Path]:  # fmt: skip
    """Mount a bootstrap file-backed and read-only, with blob files as ``device=`` (in device-table order)."""
    mp = Path(mountpoint)
    mp.mkdir(parents=True, exist_ok=True)
    mount_erofs_file_backed(boot, mp, devices)
    try:
        yield mp
    finally:
        umount(mp)

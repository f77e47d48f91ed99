"""mount(2) and umount2(2) for the tests — the one copy (host and VM suites alike).

mount(2) is called directly through ctypes: util-linux ``mount`` attaches a loop device, which breaks
``device=<regular file>`` of file-backed EROFS mounts (Linux ≥ 6.12).
"""

from __future__ import annotations

import ctypes
import errno
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

MS_RDONLY = 1
MNT_DETACH = 2

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]


def mount(source: str | os.PathLike[str], target: str | os.PathLike[str], fstype: str = "erofs",
          flags: int = MS_RDONLY, data: str = "") -> None:  # fmt: skip
    """mount(2); an OSError names the source, target, type and options."""
    if _libc.mount(os.fsencode(source), os.fsencode(target), fstype.encode(), flags, data.encode() or None) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount -t {fstype} {source} {target} ({data or 'no options'}): {os.strerror(err)}")


def umount(target: str | os.PathLike[str], flags: int = 0, detach_if_busy: bool = True) -> None:
    """umount2(2); a busy mount is detached lazily instead, unless ``detach_if_busy`` is False."""
    if _libc.umount2(os.fsencode(target), flags) == 0:
        return
    err = ctypes.get_errno()
    if err == errno.EBUSY and detach_if_busy and _libc.umount2(os.fsencode(target), flags | MNT_DETACH) == 0:
        return
    raise OSError(err, f"umount {target}: {os.strerror(err)}")


@contextmanager
def mount_erofs(boot: str | os.PathLike[str], mountpoint: str | os.PathLike[str],
                devices: Sequence[str | os.PathLike[str]] = ()) -> Iterator[Path]:  # fmt: skip
    """Mount a bootstrap file-backed and read-only, with blob files as ``device=`` (in device-table order)."""
    mp = Path(mountpoint)
    mp.mkdir(parents=True, exist_ok=True)
    opts = ",".join(f"device={Path(d).resolve()}" for d in devices)
    mount(Path(boot).resolve(), mp, "erofs", MS_RDONLY, opts)
    try:
        yield mp
    finally:
        umount(mp)

"""Exceptions of the kernel-interface layer.

Every error is an ``FscacheError``; those that come from a failed syscall are also ``OSError`` (with
``errno`` set) and, where one exists, the matching builtin subclass, so callers may catch either. ``str()``
is one line saying what failed and what to do.
"""

from __future__ import annotations

import errno as _errno
import os


class FscacheError(Exception):
    """Base of every error raised by :mod:`fscache`."""


class KernelInterfaceError(FscacheError, OSError):
    """A syscall on ``/dev/cachefiles`` or a fanotify group failed."""

    def __init__(self, err: int, message: str, filename: str | None = None) -> None:
        if filename is None:
            super().__init__(err, message)
        else:
            super().__init__(err, message, filename)

    def __str__(self) -> str:
        return str(self.strerror)


class DeviceNotFoundError(KernelInterfaceError, FileNotFoundError):
    """``/dev/cachefiles`` does not exist."""


class NotPrivilegedError(KernelInterfaceError, PermissionError):
    """The caller lacks CAP_SYS_ADMIN."""


class DeviceBusyError(KernelInterfaceError):
    """Another process already holds ``/dev/cachefiles`` (EBUSY has no builtin subclass)."""


class OnDemandUnsupportedError(KernelInterfaceError):
    """The kernel's cachefiles lacks on-demand mode (CONFIG_CACHEFILES_ONDEMAND)."""


class PreContentUnsupportedError(KernelInterfaceError):
    """The kernel has no fanotify pre-content events (Linux < 6.14 or no CONFIG_FANOTIFY_ACCESS_PERMISSIONS)."""


class UnsupportedFilesystemError(KernelInterfaceError):
    """The cache directory or cache file lives on a filesystem the kernel refuses (e.g. tmpfs)."""


class PathNotFoundError(KernelInterfaceError, FileNotFoundError):
    """A path given to the kernel (cache dir, file to mark) does not exist."""


class CommandError(KernelInterfaceError):
    """Any other failure of a cachefiles command or fanotify call."""


class ProtocolError(FscacheError, ValueError):
    """The kernel sent a message this binding cannot parse."""


def from_errno(err: int, what: str, filename: str | None = None) -> KernelInterfaceError:
    """Build the generic error for a failed call ``what`` with errno ``err``."""
    text = f"{what}: {os.strerror(err)}"
    if err == _errno.EPERM or err == _errno.EACCES:
        return NotPrivilegedError(err, f"{text} (needs root / CAP_SYS_ADMIN)", filename)
    if err == _errno.ENOENT:
        return PathNotFoundError(err, text, filename)
    return CommandError(err, text, filename)

"""Culling one cachefiles object through the kernel, and emptying the graveyard: what the cache size limit
(:mod:`cachefilesd_py.cache_limit`) and the API's GC (:mod:`cachefilesd_py.daemon_api`) both do.

The kernel's ``cull <name>`` command acts on a name in the *writer's* working directory, so a culling thread
first gets a working directory of its own (:func:`own_working_directory`, ``unshare(CLONE_FS)``): its ``chdir`` to
the object's directory moves no other thread (the daemon's relative paths stay right).  :func:`on_own_thread` runs
a function on such a thread and returns its result.  The kernel moves a culled object to ``CACHE/graveyard``;
emptying it (:func:`reap`) is the daemon's job in the cachefiles protocol.
"""

from __future__ import annotations

import ctypes
import enum
import errno
import logging
import os
import shutil
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from fscache.cachefiles import CachefilesDevice
from fscache.errors import FscacheError

__all__ = ["Cull", "cull_object", "on_own_thread", "own_working_directory", "reap"]

log = logging.getLogger(__name__)

_CLONE_FS = 0x00000200
_libc = ctypes.CDLL(None, use_errno=True)
T = TypeVar("T")


class Cull(enum.Enum):
    """What became of a ``cull``: done, refused by the kernel (EBUSY: in use), or the object was gone."""

    CULLED = "culled"
    BUSY = "busy"
    GONE = "gone"


def own_working_directory() -> None:
    """Give the calling thread a working directory of its own (``unshare(CLONE_FS)``): its chdir moves no other."""
    if _libc.unshare(_CLONE_FS) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"unshare(CLONE_FS): {os.strerror(err)}")


def on_own_thread(fn: Callable[[], T], name: str = "cull") -> T:
    """``fn()`` on a new thread with its own working directory (:func:`own_working_directory`); its result, or
    what it raised."""
    out: list[T] = []
    err: list[BaseException] = []

    def run() -> None:
        try:
            own_working_directory()
            out.append(fn())
        except BaseException as e:  # handed to the caller
            err.append(e)

    thread = threading.Thread(target=run, name=name, daemon=True)
    thread.start()
    thread.join()
    if err:
        raise err[0]
    return out[0]


def cull_object(device: CachefilesDevice, path: Path) -> Cull:
    """``cull`` the object at ``path`` from its directory; only on a thread with its own working directory.
    Errors other than EBUSY and ENOENT raise (:class:`~fscache.errors.FscacheError` or :class:`OSError`)."""
    try:
        os.chdir(path.parent)
        device.command(f"cull {path.name}")
    except (FscacheError, OSError) as e:
        err = getattr(e, "errno", None)
        if err == errno.EBUSY:
            return Cull.BUSY
        if err == errno.ENOENT:
            return Cull.GONE
        raise
    finally:
        os.chdir("/")
    return Cull.CULLED


def reap(cache_dir: Path) -> None:
    """Empty ``cache_dir/graveyard`` (culled objects land there)."""
    graveyard = cache_dir / "graveyard"
    try:
        names = os.listdir(graveyard)
    except FileNotFoundError:
        return
    for name in names:
        path = graveyard / name
        try:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
        except FileNotFoundError:  # another reaper's
            continue
        except OSError as e:
            log.warning("cannot remove %s: %s", path, e)

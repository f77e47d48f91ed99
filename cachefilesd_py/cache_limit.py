"""cachefilesd-py's ``--cache-size-limit``: whole cache objects culled through the kernel (:class:`ObjectCuller`).

In fscache mode the cache files are the kernel's (``CACHE/cache/I<volume>/@<fanout>/D<cookie>``, one per blob and
one per image's bootstrap); the daemon only writes into the objects the kernel opened.  Our own accounting is the
allocated bytes (``st_blocks``) of that tree; when it is over the limit, objects are culled least recently used
first (the later of a file's atime and mtime) with the kernel's own ``cull <name>`` command, written on
``/dev/cachefiles`` from the object's directory on a thread with a working directory of its own
(:mod:`cachefilesd_py.cull`, shared with the API's GC).  An object the daemon has open
(``in_use``: the cookie keys of its open objects, i.e. the bootstraps and blobs of mounted images) is never
culled, nor one the kernel refuses (EBUSY): the limit holds for what no mount uses, and a mounted image's cache
may take more (cachefiles on-demand has no culling of parts of an object; and a new object is an anonymous
tmpfile until its mount releases it: only then is it in the tree, counted, and cullable).
Culled files go to ``CACHE/graveyard``, which the culler empties (the daemon's job in the cachefiles protocol).
A culled object is fetched again, verified, on the next mount that reads it.

It checks every ``interval`` seconds and when :meth:`ObjectCuller.poke` is called.  Counters, as attributes and
in :meth:`ObjectCuller.stats`: ``culls``, ``bytes_culled``, ``in_use`` (objects passed over: open),
``allocated``.
"""

from __future__ import annotations

import logging
import os
import stat
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cachefilesd_py.cull import Cull, cull_object, own_working_directory, reap
from erofs.units import format_size
from fscache.cachefiles import CachefilesDevice
from fscache.errors import FscacheError

__all__ = ["CHECK_INTERVAL", "ObjectCuller"]

log = logging.getLogger(__name__)

CHECK_INTERVAL = 5.0  # seconds between two looks at the cache's size


@dataclass(frozen=True)
class _Object:
    path: Path
    allocated: int
    last_use: float


class ObjectCuller:
    """Keeps the cachefiles cache under ``limit`` bytes by culling unused objects, least recently used first."""

    def __init__(self, device: CachefilesDevice, cache_dir: Path, limit: int, in_use: Callable[[], set[str]], *,
                 interval: float = CHECK_INTERVAL) -> None:  # fmt: skip
        if limit <= 0:
            raise ValueError(f"cache size limit must be > 0, got {limit}")
        self.device = device
        self.cache_dir = cache_dir.resolve()
        self.limit = limit
        self.in_use = in_use
        self.interval = interval
        self.culls = 0
        self.bytes_culled = 0
        self.in_use_skipped = 0
        self.allocated = 0
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {"limit": self.limit, "allocated": self.allocated, "culls": self.culls,
                    "bytes_culled": self.bytes_culled, "in_use": self.in_use_skipped}  # fmt: skip

    def start(self) -> ObjectCuller:
        self._thread = threading.Thread(target=self._run, name="cache-limit", daemon=True)
        self._thread.start()
        return self

    def poke(self) -> None:
        """Look at the cache now (an object was closed)."""
        self._wake.set()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join()

    def _run(self) -> None:
        try:
            own_working_directory()
        except OSError as e:
            log.error("cache size limit: %s: not culling", e)
            return
        while not self._stop.is_set():
            try:
                self.check()
            except OSError as e:  # the cache dir is the kernel's: look again next time
                log.error("cache size limit: %s", e)
            self._wake.wait(self.interval)
            self._wake.clear()

    def objects(self) -> list[_Object]:
        """The objects of the cache (the files under ``CACHE/cache``), least recently used first."""
        out = []
        for root, _, names in os.walk(self.cache_dir / "cache"):
            for name in names:
                path = Path(root) / name
                try:
                    st = path.lstat()
                except FileNotFoundError:
                    continue
                if stat.S_ISREG(st.st_mode):
                    out.append(_Object(path, st.st_blocks * 512, max(st.st_atime, st.st_mtime)))
        out.sort(key=lambda o: o.last_use)
        return out

    def check(self) -> None:
        """One look: cull unused objects, oldest first, until the cache is under the limit."""
        self._reap()
        objects = self.objects()
        total = sum(o.allocated for o in objects)
        keys = self.in_use() if total > self.limit else set()
        for obj in objects:
            if total <= self.limit:
                break
            if obj.path.name[1:] in keys:  # D<cookie key>
                with self._lock:
                    self.in_use_skipped += 1
                continue
            if self._cull(obj):
                total -= obj.allocated
        with self._lock:
            self.allocated = total
        self._reap()

    def _cull(self, obj: _Object) -> bool:
        """``cull`` one object; False when the kernel refuses (in use) or it is gone."""
        try:
            result = cull_object(self.device, obj.path)
        except (FscacheError, OSError) as e:
            log.warning("cache size limit: cannot cull %s: %s", obj.path, e)
            return False
        if result is Cull.BUSY:
            with self._lock:
                self.in_use_skipped += 1
        if result is not Cull.CULLED:
            return False
        with self._lock:
            self.culls += 1
            self.bytes_culled += obj.allocated
        log.info("cache size limit %s: culled %s (%s)", format_size(self.limit), obj.path.name,
                 format_size(obj.allocated))  # fmt: skip
        return True

    def _reap(self) -> None:
        reap(self.cache_dir)

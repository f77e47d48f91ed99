"""Prefetch in the fscache daemon (:mod:`cachefilesd_py.daemon`): once the kernel has opened the cache objects
of every blob of an image mounted in a volume, the image's prefetch (:mod:`cachefilesd_py.prefetch`) runs on a
thread of its own, writing into those objects' anonymous fds like a READ would, and skipping what the cache
file holds already (``SEEK_HOLE`` on the anonymous fd: a warm cache is not fetched again).  The objects are
held (their fds stay open) until it ends; a CLOSE of any object of the volume (the umount) stops it after the
piece in progress.  :meth:`ObjectPrefetches.stats` is its progress, for the API (``GET /api/v1/daemon``).
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Mapping
from typing import Any, Protocol

from fscache.cachefiles import write_range

from .image_store import BlobEntry, Image
from .pipeline import Pipeline
from .prefetch import Prefetcher, PrefetchOptions, PrefetchTarget, plan_prefetch

__all__ = ["ObjectPrefetches"]

log = logging.getLogger("cachefilesd_py")


class CacheObject(Protocol):
    """What the daemon's cache objects offer a prefetch."""

    fd: int
    blob: BlobEntry | None
    written: set[int]

    def acquire(self) -> bool: ...

    def release(self) -> None: ...


def _writer(obj: CacheObject) -> Any:
    def write(d_off: int, data: memoryview) -> None:
        write_range(obj.fd, d_off, data)
        obj.written.add(d_off)

    return write


def _present(obj: CacheObject) -> Any:
    def present(d_off: int, d_size: int) -> bool:
        if d_off in obj.written:
            return True
        try:
            return os.lseek(obj.fd, d_off, os.SEEK_HOLE) >= d_off + d_size
        except OSError:  # ENXIO: past the data; or no llseek on this fd
            return False

    return present


class _Run:
    def __init__(self, key: str, image: Image, objects: Mapping[str, CacheObject], pipeline: Pipeline,
                 options: PrefetchOptions) -> None:  # fmt: skip
        self.key = key
        self.image = image
        self.objects = dict(objects)
        self.pipeline = pipeline
        self.options = options
        self.prefetcher: Prefetcher | None = None
        self.stopped = threading.Event()
        self.error: str | None = None
        self.thread = threading.Thread(target=self._run, name=f"prefetch-{key}", daemon=True)

    def _run(self) -> None:
        try:
            handles = {bid: obj.blob.handle() for bid, obj in self.objects.items() if obj.blob is not None}
            items, nfiles = plan_prefetch(self.image.bootstrap, handles, self.pipeline, merge=self.options.merge,
                                          everything=self.options.everything)  # fmt: skip
            targets = {bid: PrefetchTarget(h, _writer(self.objects[bid]), _present(self.objects[bid]))
                       for bid, h in handles.items()}  # fmt: skip
            p = Prefetcher(items if self.options.table else [i for i in items if i.file < 0], nfiles, targets,
                           self.pipeline, bandwidth=self.options.bandwidth,
                           all_blobs=self.options.everything)  # fmt: skip
            self.prefetcher = p
            if self.stopped.is_set():
                return
            p.start()
            if self.stopped.is_set():
                p.stop()
            p.wait()
        except Exception as e:  # noqa: BLE001 - on-demand reads still serve the image
            self.error = str(e)
            log.warning("prefetch of %s: %s", self.key, e)
        finally:
            for obj in self.objects.values():
                obj.release()

    def stop(self) -> None:
        self.stopped.set()
        p = self.prefetcher
        if p is not None:
            p.cancel()  # without joining: the message loop must not wait for a fetch

    def stats(self) -> dict[str, Any]:
        p = self.prefetcher
        out: dict[str, Any] = p.stats() if p is not None else {"state": "planning"}
        if self.error:
            out = {**out, "state": "failed", "error": self.error}
        return out


class ObjectPrefetches:
    """The prefetches of the images a daemon serves, one per (volume, fsid)."""

    def __init__(self, pipeline: Pipeline, options: PrefetchOptions) -> None:
        self.pipeline = pipeline
        self.options = options
        self._runs: dict[tuple[str, str], _Run] = {}
        self._ended: dict[str, _Run] = {}
        self._lock = threading.Lock()

    def maybe_start(self, volume: str, image: Image, blobs: Mapping[str, CacheObject]) -> None:
        """Start ``image``'s prefetch once every one of its blobs is among the volume's open ``blobs``."""
        if not self.options.enabled:
            return
        key = (volume, image.fsid)
        with self._lock:
            if key in self._runs or not set(image.blobs) <= set(blobs):
                return
            held: dict[str, CacheObject] = {}
            for bid in image.blobs:
                if not blobs[bid].acquire():
                    for obj in held.values():
                        obj.release()
                    return
                held[bid] = blobs[bid]
            run = _Run(f"{volume}/{image.fsid}", image, held, self.pipeline, self.options)
            self._runs[key] = run
        run.thread.start()

    def volume_closing(self, volume: str) -> None:
        """An object of ``volume`` was closed (its umount): stop its prefetches, without waiting."""
        with self._lock:
            keys = [k for k in self._runs if k[0] == volume]
            runs = [self._runs.pop(k) for k in keys]
        for run in runs:
            run.stop()
            self._ended[run.key] = run

    def stats(self) -> dict[str, dict[str, Any]]:
        with self._lock:
            runs = list(self._runs.values())
            ended = list(self._ended.values())
        return {r.key: r.stats() for r in (*ended, *runs)}

    def close(self) -> None:
        """Stop every prefetch and wait for them (the daemon is stopping)."""
        with self._lock:
            runs, self._runs = list(self._runs.values()), {}
        for run in runs:
            run.stop()
        for run in runs:
            run.thread.join()

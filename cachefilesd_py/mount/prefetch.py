"""Prefetch on a fanotify mount (:mod:`cachefilesd_py.prefetch`): written through the cache files' pre-mark fds
(no events), like readahead; a complete cache file is unmarked.  Files another mount serves too (``shared``) or
that a restarted worker has not adopted an event fd for yet (``watched``) are left to on-demand reads.

While it runs its progress is ``<key>.prefetch`` beside the mount's runtime record (JSON, rewritten whole after
each table file, every 64 pieces and at the end; removed when the worker exits); the final progress goes into
the record's ``stats.prefetch`` (``umount --json``).
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
from collections.abc import Sequence
from typing import Any

from erofs.reader.bootstrap import Bootstrap

from ..pipeline import Pipeline
from ..prefetch import Prefetcher, PrefetchTarget, plan_prefetch
from .cachefile import CacheFile
from .record import prefetch_progress_path, write_record
from .server import FanotifyServer
from .spec import MountSpec

__all__ = ["read_prefetch_progress", "start_prefetch", "stop_prefetch"]


def read_prefetch_progress(mountpoint: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The progress of the running mount's prefetch, or None (none, or not started yet)."""
    try:
        return json.loads(prefetch_progress_path(mountpoint).read_text())
    except (FileNotFoundError, ValueError):
        return None


def start_prefetch(spec: MountSpec, files: Sequence[CacheFile], server: FanotifyServer,
                   pipeline: Pipeline) -> Prefetcher | None:  # fmt: skip
    """Plan and start the mount's prefetch; None when the spec asks for none."""
    if not spec.prefetch and not spec.prefetch_all:
        return None
    limit = server.limit  # with a cache size limit, prefetched chunks are charged (and may evict) like any other
    targets = {
        cf.handle.blob_id: PrefetchTarget(cf.handle, cf.pwrite if limit is None else limit.writer(cf, cf.pwrite),
                                          cf.present, functools.partial(server.filled, cf))
        for cf in files
        if not cf.shared and not cf.watched
    }
    with Bootstrap(spec.boot) as bs:
        items, nfiles = plan_prefetch(bs, {k: t.handle for k, t in targets.items()}, pipeline,
                                      merge=spec.prefetch_merge, everything=spec.prefetch_all)  # fmt: skip
    path = prefetch_progress_path(spec.mountpoint)

    def progress(stats: dict[str, Any]) -> None:
        write_record(path, stats)

    prefetcher = Prefetcher(items, nfiles, targets, pipeline, bandwidth=spec.prefetch_bandwidth,
                            all_blobs=spec.prefetch_all, on_progress=progress)  # fmt: skip
    prefetcher.start()
    return prefetcher


def stop_prefetch(prefetcher: Prefetcher, mountpoint: str | os.PathLike[str]) -> dict[str, Any]:
    """Stop it, remove its progress file; its final progress."""
    prefetcher.stop()
    with contextlib.suppress(OSError):
        prefetch_progress_path(mountpoint).unlink()
    return prefetcher.stats()

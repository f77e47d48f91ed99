"""The API of a fanotify mount's daemon (:mod:`cachefilesd_py.api`, the routes of
:mod:`cachefilesd_py.api_routes`), served by the worker on the socket its supervisor listens on
(:func:`~.record.api_path`, named ``api_sock`` in the runtime record and in ``mount --json``): the socket outlives
a worker's death, and requests made meanwhile wait for the next worker.

- ``daemon``: ``mode`` ``fanotify``; ``pid`` is the worker's, ``supervisor_pid`` the supervisor's; ``uptime`` the
  worker's; ``restarts``; ``mountpoint``.
- ``images``: one, the mount: ``id`` (the mountpoint), ``boot``, ``backend`` (its type), ``blobs``.
- metrics: ``cache.hits`` counts the reads of present data that raised an event (those of a complete, unmarked
  cache file raise none and are not counted), ``cache.misses`` the other reads, those that needed a fill
  (counted as they arrive, before their fill); per blob
  ``cached``: the bytes its cache file holds.
- GC: a mount's cache holds its own blobs only: nothing to collect (``nydus-erofs ctl gc --cache-dir`` collects a
  cache dir's files that no mount uses: :mod:`.gc`).
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Sequence
from typing import Any

from ..api import ApiServer
from ..api_routes import routes
from ..backends import BlobBackend
from ..metrics import daemon_version, snapshot
from ..pipeline import Pipeline
from ..prefetch import Prefetcher
from .cachefile import CacheFile
from .server import FanotifyServer
from .spec import MountSpec

__all__ = ["MountApi"]

MODE = "fanotify"


class MountApi:
    """What the API of one fanotify mount answers; :meth:`serve` serves it on a listening socket."""

    def __init__(self, spec: MountSpec, files: Sequence[CacheFile], server: FanotifyServer, pipeline: Pipeline,
                 backend: BlobBackend, *, restarts: int, supervisor_pid: int | None) -> None:  # fmt: skip
        self.spec = spec
        self.files = list(files)
        self.server = server
        self.pipeline = pipeline
        self.backend = backend
        self.restarts = restarts
        self.supervisor_pid = supervisor_pid
        self.prefetcher: Prefetcher | None = None
        self.state = "RUNNING"
        self.started = time.monotonic()

    def info(self) -> dict[str, Any]:
        return {"version": daemon_version(), "pid": os.getpid(), "state": self.state,
                "uptime": round(time.monotonic() - self.started, 3), "mode": MODE, "restarts": self.restarts,
                "supervisor_pid": self.supervisor_pid, "mountpoint": self.spec.mountpoint}  # fmt: skip

    def images(self) -> dict[str, Any]:
        return {"images": [{"id": self.spec.mountpoint, "mountpoint": self.spec.mountpoint, "boot": self.spec.boot,
                            "mode": MODE, "backend": self.spec.backend,
                            "blobs": [cf.handle.blob_id for cf in self.files]}]}  # fmt: skip

    def metrics(self) -> dict[str, Any]:
        stats = self.server.stats()
        events = stats["events"]
        mp = self.spec.mountpoint
        prefetch = self.prefetcher.stats() if self.prefetcher is not None else None
        backend = self.backend.stats.snapshot()
        blobs = {b: {"image": mp, "size": s["size"], "cached": s["size"] - min(s["missing"], s["size"])}
                 for b, s in stats["blobs"].items()}  # fmt: skip
        return snapshot(daemon=self.info(), backend=backend, pipeline=stats["pipeline"],
                        hits=events["allowed_present"], misses=events["events"] - events["allowed_present"],
                        inflight=self.pipeline.inflight(),
                        images={mp: {"backend": backend, "blobs": list(blobs), "prefetch": prefetch}},
                        blobs=blobs, per_blob=self.pipeline.stats.per_blob())  # fmt: skip

    def gc(self) -> dict[str, Any]:
        return {"removed": [], "freed_bytes": 0,
                "message": "a fanotify mount's cache holds only its own blobs: nothing to collect"}  # fmt: skip

    def serve(self, sock: socket.socket) -> ApiServer:
        gets, posts = routes(info=self.info, images=self.images, metrics_snapshot=self.metrics, gc=self.gc)
        return ApiServer(sock, gets, actions=posts).start()

"""cachefilesd-py's API (``--api-sock``): the routes every daemon serves (:mod:`cachefilesd_py.api_routes`) from a
:class:`~cachefilesd_py.daemon.Daemon`, plus bind/unbind/describe (``PUT``/``DELETE``/``GET
/api/v1/images/{fsid}``), ``/api/v1/metrics/backend``, ``/api/v1/metrics/blobcache`` and ``/api/v1/trace``.

- ``daemon``: :meth:`Daemon.info` with ``version``, ``mode`` ``fscache``, ``supervisor_pid``, ``restarts``.
- metrics: the kernel reads what its cache holds without asking, so every READ is a miss: ``cache.misses``
  counts the READs, ``cache.hits`` the chunks a READ's fill found written already.  An image's backend
  counters are those of its backend (images sharing the daemon's one backend show the same).  Per blob:
  ``image`` (the first image listing it), ``images``, ``size``.
- GC (``POST /api/v1/gc``): lists (``unreferenced``) the blobs whose kernel cache objects
  (``CACHE/cache/I<volume>/@<fan>/D<blob id>``) no bound image references; it removes nothing yet: culling them
  through the device (``cull``) left the kernel's cache so that the next daemon did not start (tests/vm).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cachefilesd_py.api import Action, ApiError, ItemRoute, Route
from cachefilesd_py.api_routes import routes
from cachefilesd_py.bindings import parse_bind_request
from cachefilesd_py.daemon import Daemon, ImageInUseError
from cachefilesd_py.image_store import UnknownImageError, check_name
from cachefilesd_py.metrics import daemon_version, snapshot
from cachefilesd_py.reference import ImageNotFoundError
from erofs.errors import BackendError, ImageError, NydusErofsError, UsageError

__all__ = ["MODE", "daemon_routes"]

MODE = "fscache"
_BLOB_OBJECT = re.compile(r"D(?P<blob>[0-9a-f]{64})")


class _DaemonApi:
    def __init__(self, daemon: Daemon, cache_dir: Path, restarts: int, supervisor_pid: int | None,
                 more_info: Callable[[], dict[str, Any]] | None) -> None:  # fmt: skip
        self.daemon = daemon
        self.more_info = more_info
        self.cache_dir = cache_dir
        self.restarts = restarts
        self.supervisor_pid = supervisor_pid

    def info(self) -> dict[str, Any]:
        more = self.more_info() if self.more_info is not None else {}
        return {**self.daemon.info(), "version": daemon_version(), "mode": MODE,
                "supervisor_pid": self.supervisor_pid, "restarts": self.restarts, **more}  # fmt: skip

    def metrics(self) -> dict[str, Any]:
        d = self.daemon
        counters = d.counters.snapshot()
        pipeline = d.pipeline.stats.snapshot()
        prefetch = d.prefetches.stats() if d.prefetches is not None else {}
        images: dict[str, dict[str, Any]] = {}
        blobs: dict[str, dict[str, Any]] = {}
        for image in d.store.loaded_images():
            runs = [v for k, v in prefetch.items() if k.rsplit("/", 1)[-1] == image.fsid]
            images[image.fsid] = {"backend": image.backend.stats.snapshot(), "blobs": sorted(image.blobs),
                                  "prefetch": runs[-1] if runs else None}  # fmt: skip
            for blob_id in sorted(image.blobs):
                entry = blobs.setdefault(blob_id, {"image": image.fsid, "images": [], "size": image.blob_size(blob_id)})
                entry["images"].append(image.fsid)
        backend = {k: v for k, v in d.backend_metrics().items() if k != "backends"}
        return snapshot(daemon=self.info(), backend=backend, pipeline=pipeline, hits=pipeline["chunks_present"],
                        misses=counters["reads"], inflight=d.pipeline.inflight(), images=images,
                        blobs=blobs)  # fmt: skip

    def _referenced(self) -> set[str]:
        out: set[str] = set()
        for fsid in self.daemon.store.fsids():
            try:
                out.update(self.daemon.store.image(fsid).blobs)
            except (NydusErofsError, OSError) as e:  # an image that cannot be read: collect nothing
                raise ApiError(409, "Conflict", f"image {fsid}: {e}: nothing collected") from None
        return out

    def gc(self) -> dict[str, Any]:
        """The blobs whose cache objects no bound image references (``unreferenced``); nothing is culled yet."""
        keep = self._referenced()
        found = set()
        for path in (self.cache_dir / "cache").glob("I*/@*/D*"):
            m = _BLOB_OBJECT.fullmatch(path.name)
            if m is not None and m["blob"] not in keep:
                found.add(m["blob"])
        return {"removed": [], "freed_bytes": 0, "unreferenced": sorted(found),
                "message": "cachefilesd-py does not cull yet: the cache objects of these blobs are unreferenced"}


def daemon_routes(daemon: Daemon, cache_dir: Path, restarts: int, supervisor_pid: int | None,
                  more_info: Callable[[], dict[str, Any]] | None = None,
                  ) -> tuple[dict[str, Route], dict[tuple[str, str], ItemRoute], dict[str, Action]]:  # fmt: skip
    """The GET routes, item routes and POST actions of cachefilesd-py's API (``more_info``: what the daemon's info
    adds, e.g. the cache limit's counters)."""
    api = _DaemonApi(daemon, cache_dir, restarts, supervisor_pid, more_info)
    gets, posts = routes(info=api.info, images=daemon.images, metrics_snapshot=api.metrics, gc=api.gc)
    gets.update({"/api/v1/metrics/backend": daemon.backend_metrics,
                 "/api/v1/metrics/blobcache": daemon.blobcache_metrics,
                 "/api/v1/trace": daemon.traces.snapshot})  # fmt: skip
    return gets, image_routes(daemon), posts


def image_routes(daemon: Daemon) -> dict[tuple[str, str], ItemRoute]:
    """``PUT``/``DELETE``/``GET /api/v1/images/{fsid}``: bind, unbind, describe; errors as HTTP statuses."""

    def answer(fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        try:
            return fn()
        except ImageInUseError as e:
            raise ApiError(409, "Conflict", str(e)) from None
        except (UnknownImageError, ImageNotFoundError) as e:
            raise ApiError(404, "NotFound", str(e)) from None
        except UsageError as e:
            raise ApiError(400, "BadRequest", str(e)) from None
        except ImageError as e:
            raise ApiError(422, "BadImage", str(e)) from None
        except (BackendError, OSError) as e:
            raise ApiError(502, "BackendError", str(e)) from None

    def valid(fsid: str) -> str:
        try:
            if fsid.startswith("."):
                raise UnknownImageError(f"fsid {fsid!r} is not a valid image name")
            return check_name(fsid)
        except UnknownImageError as e:
            raise ApiError(400, "BadRequest", str(e)) from None

    def put(fsid: str, body: bytes | None) -> dict[str, Any]:
        req = parse_bind_request(valid(fsid), body or b"")
        return answer(lambda: daemon.bind(req))

    def bad_body(fsid: str, body: bytes | None) -> dict[str, Any]:
        try:
            return put(fsid, body)
        except UsageError as e:
            raise ApiError(400, "BadRequest", str(e)) from None

    def delete(fsid: str, body: bytes | None) -> dict[str, Any]:
        return answer(lambda: daemon.unbind(valid(fsid)))

    def describe(fsid: str, body: bytes | None) -> dict[str, Any]:
        return answer(lambda: {"fsid": valid(fsid), **daemon.describe(fsid)})

    prefix = "/api/v1/images/"
    return {("PUT", prefix): bad_body, ("DELETE", prefix): delete, ("GET", prefix): describe}

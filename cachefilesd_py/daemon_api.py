"""cachefilesd-py's API (``--api-sock``): the routes every daemon serves (:mod:`cachefilesd_py.api_routes`) from a
:class:`~cachefilesd_py.daemon.Daemon`, plus bind/unbind/describe (``PUT``/``DELETE``/``GET
/api/v1/images/{fsid}``), ``/api/v1/metrics/backend``, ``/api/v1/metrics/blobcache`` and ``/api/v1/trace``.

- ``daemon``: :meth:`Daemon.info` with ``version``, ``mode`` ``fscache``, ``supervisor_pid``, ``restarts``.
- metrics: the kernel reads what its cache holds without asking, so every READ is a miss: ``cache.misses``
  counts the READs, ``cache.hits`` the chunks a READ's fill found written already.  An image's backend
  counters are those of its backend (images sharing the daemon's one backend show the same).  Per blob:
  ``image`` (the first image listing it), ``images``, ``size``.
- GC (``POST /api/v1/gc``): culls the kernel cache objects (``CACHE/cache/I<volume>/@<fan>/D<blob id>``) of the
  blobs no bound image references (``unreferenced``), with the kernel's ``cull`` on a thread of its own (its own
  working directory: :mod:`cachefilesd_py.cull`), then empties ``CACHE/graveyard``.  Answers ``removed`` (blob
  ids), ``freed_bytes`` (their allocated bytes) and ``skipped`` (blob ids not culled: an object the daemon has
  open, one the kernel refuses with EBUSY, or a cull that failed otherwise, logged).  A referenced blob's object
  is never culled.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cachefilesd_py.api import Action, ApiError, ItemRoute, Route
from cachefilesd_py.api_routes import routes
from cachefilesd_py.bindings import parse_bind_request
from cachefilesd_py.cull import Cull, cull_object, on_own_thread, reap
from cachefilesd_py.daemon import Daemon, ImageInUseError
from cachefilesd_py.image_store import UnknownImageError, check_name
from cachefilesd_py.metrics import daemon_version, snapshot
from cachefilesd_py.reference import ImageNotFoundError
from erofs.errors import BackendError, ImageError, NydusErofsError, UsageError
from fscache.errors import FscacheError

__all__ = ["MODE", "daemon_routes"]

log = logging.getLogger(__name__)

MODE = "fscache"
_BLOB_OBJECT = re.compile(r"D(?P<blob>[0-9a-f]{64})")


class _DaemonApi:
    def __init__(self, daemon: Daemon, cache_dir: Path, restarts: int, supervisor_pid: int | None,
                 more_info: Callable[[], dict[str, Any]] | None) -> None:  # fmt: skip
        self.daemon = daemon
        self.more_info = more_info
        self.cache_dir = Path(os.path.abspath(cache_dir))  # the culling thread changes directory
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
                        blobs=blobs, per_blob=d.pipeline.stats.per_blob())  # fmt: skip

    def _referenced(self) -> set[str]:
        out: set[str] = set()
        for fsid in self.daemon.store.fsids():
            try:
                out.update(self.daemon.store.image(fsid).blobs)
            except (NydusErofsError, OSError) as e:  # an image that cannot be read: collect nothing
                raise ApiError(409, "Conflict", f"image {fsid}: {e}: nothing collected") from None
        return out

    def gc(self) -> dict[str, Any]:
        """Cull the cache objects of the blobs no bound image references, except those the daemon has open."""
        keep = self._referenced()
        found: list[tuple[str, Path]] = []
        for path in sorted((self.cache_dir / "cache").glob("I*/@*/D*")):
            m = _BLOB_OBJECT.fullmatch(path.name)
            if m is not None and m["blob"] not in keep:
                found.append((m["blob"], path))
        in_use = {o["key"] for o in self.daemon.info()["objects"]}
        removed, skipped, freed = on_own_thread(lambda: self._cull(found, in_use), name="gc")
        return {"removed": sorted(removed), "freed_bytes": freed, "skipped": sorted(skipped),
                "unreferenced": sorted({blob for blob, _ in found})}  # fmt: skip

    def _cull(self, found: list[tuple[str, Path]], in_use: set[str]) -> tuple[set[str], set[str], int]:
        """On a thread with its own working directory: cull ``found`` (blob id, object path) but what is
        ``in_use`` (open objects' keys); the culled blobs, the skipped ones and the bytes freed."""
        removed: set[str] = set()
        skipped: set[str] = set()
        freed = 0
        reap(self.cache_dir)
        for blob, path in found:
            if path.name[1:] in in_use:  # D<cookie key>
                skipped.add(blob)
                continue
            try:
                allocated = path.lstat().st_blocks * 512
                result = cull_object(self.daemon.device, path)
            except FileNotFoundError:
                continue
            except (FscacheError, OSError) as e:
                log.warning("gc: cannot cull %s: %s", path, e)
                skipped.add(blob)
                continue
            if result is Cull.CULLED:
                removed.add(blob)
                freed += allocated
                log.info("gc: culled %s (%d bytes)", path, allocated)
            elif result is Cull.BUSY:
                skipped.add(blob)
        reap(self.cache_dir)
        return removed, skipped, freed


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

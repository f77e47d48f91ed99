"""The fscache on-demand daemon: the ``/dev/cachefiles`` message loop and the worker pool that fills READs.

One thread reads messages (:meth:`Daemon.run`) and never waits on a fetch:

- OPEN, volume ``erofs,<domain_id|fsid>``: a cookie naming an image of the store is its bootstrap (copen size =
  the file's size; its READs are served from the local file); any other cookie is a blob id, looked up in the
  images opened in that volume first, then in every image (copen size = the blob's uncompressed size).
  Unknown fsid or blob: ``copen -ENOENT``.  Images of one ``domain_id`` share the kernel's cache object of a
  blob (its key is the blob id alone): a bootstrap listing a blob that is open in its domain as another image
  describes it otherwise (other digests: ``blob_description_key``) is refused (``copen -EIO``, its mount fails).
- READ: handed to the pool; a worker fills the range through the pipeline (chunks mapped, fetched once,
  verified, decompressed, written page-aligned into the cache file) and completes it.  A failure completes
  without writing — the reader gets EIO — and is logged in one line; the daemon keeps serving.
- CLOSE: the object's anonymous fd is closed once no READ is using it.

Images are bound and unbound at run time by :meth:`Daemon.bind` / :meth:`Daemon.unbind` (the API's ``PUT`` and
``DELETE /api/v1/images/{fsid}``): an image the kernel has objects of is not replaced or unbound (an unbind
waits a little for the CLOSEs an umount sends); unbinding drops everything the daemon holds of it.

The kernel interface is :mod:`fscache.cachefiles`; this module only decides what goes where.
:class:`~cachefilesd_py.daemon_supervisor.CachefilesSupervisor` holds the device and restarts a worker that dies
(failover); on SIGHUP it hands the device over to a new daemon (upgrade in place, :mod:`cachefilesd_py.takeover`).
"""

from __future__ import annotations

import errno
import filecmp
import logging
import os
import re
import select
import shutil
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from cachefilesd_py.bindings import BINDING_NAME, BindRequest, stage
from cachefilesd_py.blob_handles import blob_description_key
from cachefilesd_py.image_store import BlobEntry, Image, ImageStore, UnknownImageError, check_name, parse_volume_key
from cachefilesd_py.object_prefetch import ObjectPrefetches
from cachefilesd_py.object_trace import ReadTraces
from cachefilesd_py.pipeline import Pipeline
from cachefilesd_py.prefetch import PrefetchOptions
from erofs.errors import ImageError, NydusErofsError
from erofs.paths import BOOTSTRAP_NAME
from erofs.reader.backend import BackendStats
from fscache.cachefiles import (
    CachefilesDevice,
    CloseRequest,
    Message,
    OpenRequest,
    ReadRequest,
    read_complete,
    write_range,
)
from fscache.errors import FscacheError

__all__ = ["Daemon", "ImageInUseError"]

log = logging.getLogger("cachefilesd_py")

_BLOB_ID = re.compile(r"[0-9a-f]{64}")
UNBIND_WAIT = 10.0  # seconds an unbind waits for the CLOSEs of a just-unmounted image


class ImageInUseError(NydusErofsError):
    """The kernel has objects of the image open (it is mounted): it cannot be replaced or unbound now."""


class _Object:
    """A cache object the kernel opened: its anonymous fd, closed after CLOSE once no READ uses it."""

    __slots__ = ("object_id", "fd", "key", "volume", "image", "blob", "written", "_refs", "_closed", "_lock")

    def __init__(self, object_id: int, fd: int, key: str, volume: str, image: Image | None, blob: BlobEntry | None):
        self.object_id = object_id
        self.fd = fd
        self.key = key
        self.volume = volume
        self.image = image
        self.blob = blob
        self.written: set[int] = set()  # uncompressed offsets of the chunks this daemon wrote to the cache file
        self._refs = 0
        self._closed = False
        self._lock = threading.Lock()

    @property
    def kind(self) -> str:
        return "bootstrap" if self.image is not None else "blob"

    @property
    def what(self) -> str:
        return f"bootstrap {self.key}" if self.image is not None else f"blob {self.key[:16]}"

    def acquire(self) -> bool:
        with self._lock:
            if self._closed:
                return False
            self._refs += 1
            return True

    def release(self) -> None:
        with self._lock:
            self._refs -= 1
            close = self._closed and self._refs == 0
        if close:
            os.close(self.fd)

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            close = self._refs == 0
        if close:
            os.close(self.fd)


class _Counters:
    def __init__(self) -> None:
        self._cond = threading.Condition()
        self.values = {
            "opens": 0,
            "opens_failed": 0,
            "closes": 0,
            "reads": 0,
            "reads_failed": 0,
            "read_bytes": 0,
            "bytes_written": 0,
            "bootstrap_reads": 0,
        }

    def add(self, **kw: int) -> None:
        with self._cond:
            for k, v in kw.items():
                self.values[k] += v
            self._cond.notify_all()

    def snapshot(self) -> dict[str, int]:
        with self._cond:
            return dict(self.values)

    def wait_for(self, predicate: Callable[[dict[str, int]], bool], timeout: float | None = None) -> bool:
        """Wait until ``predicate(counters)`` holds (for tests and tools); False on timeout."""
        with self._cond:
            return self._cond.wait_for(lambda: predicate(self.values), timeout)


class Daemon:
    """Serve the kernel's requests for the images of ``store`` on a bound ``device``.

    ``run()`` loops until ``stop()`` (safe from a signal handler or another thread); ``threads`` workers fill
    READs.  The device is not closed here: its owner (the CLI or the supervisor) does that.
    """

    def __init__(
        self,
        device: CachefilesDevice,
        store: ImageStore,
        *,
        threads: int = 4,
        amplify: int = 1 << 20,
        pipeline: Pipeline | None = None,
        prefetch: PrefetchOptions | None = None,
    ) -> None:
        self.device = device
        self.store = store
        self.threads = max(1, threads)
        self.pipeline = pipeline if pipeline is not None else Pipeline(amplify=amplify, workers=self.threads)
        self.counters = _Counters()
        self.traces = ReadTraces()
        self.prefetches = ObjectPrefetches(self.pipeline, prefetch) if prefetch and prefetch.enabled else None
        self.state = "INIT"
        self.started = time.time()
        self._objects: dict[int, _Object] = {}
        self._volumes: dict[str, list[str]] = {}  # volume (domain or fsid) -> fsids opened in it
        self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="cachefilesd-read")
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._closed = threading.Condition(self._lock)  # notified when objects go (CLOSE)
        self._binding = threading.Lock()  # one bind or unbind at a time
        self.unbind_wait = UNBIND_WAIT

    # -- loop ---------------------------------------------------------------------------------------------------
    def run(self) -> None:
        """Read and dispatch messages until :meth:`stop`; then wait for the READs in flight."""
        poller = select.poll()
        poller.register(self.device.fileno(), select.POLLIN)
        poller.register(self._wake_r, select.POLLIN)
        self.state = "RUNNING"
        log.info("serving %s (pid %d, %d threads)", self.store.images_dir, os.getpid(), self.threads)
        try:
            while not self._stop.is_set():
                poller.poll()
                while not self._stop.is_set():
                    try:
                        msg = self.device.read_message()
                    except FscacheError as e:  # e.g. a message the binding cannot parse: skip it
                        log.error("reading a request failed: %s", e)
                        break
                    if msg is None:
                        break
                    self.handle(msg)
        finally:
            self.state = "STOPPING"
            if self.prefetches is not None:
                self.prefetches.close()
            self._pool.shutdown(wait=True, cancel_futures=True)
            self.pipeline.close()
            with self._lock:
                objects, self._objects = list(self._objects.values()), {}
            for obj in objects:
                obj.close()
            os.close(self._wake_r)
            os.close(self._wake_w)
            self.state = "STOPPED"

    def stop(self) -> None:
        """Ask :meth:`run` to return (async-signal safe enough: sets a flag and writes one byte to a pipe)."""
        self._stop.set()
        try:
            os.write(self._wake_w, b"x")
        except OSError:
            pass

    def handle(self, msg: Message) -> None:
        """Dispatch one message (READs go to the pool)."""
        if isinstance(msg, OpenRequest):
            self._open(msg)
        elif isinstance(msg, ReadRequest):
            self._read(msg)
        elif isinstance(msg, CloseRequest):
            self._close(msg)

    # -- OPEN ---------------------------------------------------------------------------------------------------
    def _lookup(self, msg: OpenRequest) -> tuple[str, Image | None, BlobEntry | None, int]:
        volume = check_name(parse_volume_key(msg.volume_key), "volume")
        key = msg.cookie_key
        if self.store.has_image(key):
            image = self.store.image(key)
            self._check_domain(volume, image)
            with self._lock:
                fsids = self._volumes.setdefault(volume, [])
                if key not in fsids:
                    fsids.append(key)
            return volume, image, None, image.size
        if key == volume or not _BLOB_ID.fullmatch(key):  # an fsid, not a blob id
            raise UnknownImageError(f"no image {key!r}: {self.store.bootstrap_path(key)} does not exist")
        with self._lock:
            prefer = [*self._volumes.get(volume, ()), volume]
        blob = self.store.blob(key, prefer=prefer)
        return volume, None, blob, blob.size

    def _check_domain(self, volume: str, image: Image) -> None:
        """ImageError when a blob ``image`` lists is open in ``volume`` (a shared domain) for another image that
        describes it otherwise: the kernel would serve this image the other one's bytes from the shared object."""
        with self._lock:
            entries = {id(o.blob): o.blob for o in self._objects.values()
                       if o.volume == volume and o.blob is not None and o.blob.image is not image}  # fmt: skip
        for entry in entries.values():
            info = image.blobs.get(entry.blob_id)
            if info is not None and blob_description_key(image.bootstrap, info) != entry.description:
                raise ImageError(f"image {image.fsid}: blob {entry.blob_id} is open in domain {volume} for "
                                 f"image {entry.image.fsid}, which describes other content under that id: not shared")

    def _open(self, msg: OpenRequest) -> None:
        try:
            volume, image, blob, size = self._lookup(msg)
        except UnknownImageError as e:
            self._refuse(msg, errno.ENOENT, str(e), logging.WARNING)
            return
        except (NydusErofsError, OSError) as e:
            self._refuse(msg, errno.EIO, str(e), logging.ERROR)
            return
        except Exception as e:  # a bug: fail this mount, keep serving the others
            log.exception("OPEN %s: unexpected error", msg.cookie_key)
            self._refuse(msg, errno.EIO, f"unexpected error: {e!r}", logging.ERROR)
            return
        obj = _Object(msg.object_id, msg.fd, msg.cookie_key, volume, image, blob)
        with self._lock:
            old = self._objects.pop(msg.object_id, None)
            self._objects[msg.object_id] = obj
        if old is not None:
            old.close()
        try:
            self.device.copen(msg.msg_id, size)
        except FscacheError as e:
            log.error("OPEN %s in %s: copen failed: %s", msg.cookie_key, msg.volume, e)
            self.counters.add(opens_failed=1)
            with self._lock:
                if self._objects.get(msg.object_id) is obj:
                    del self._objects[msg.object_id]
            obj.close()
            return
        self.counters.add(opens=1)
        log.debug("OPEN object %d: %s in volume %s, %d bytes", msg.object_id, obj.what, volume, size)
        if image is not None:
            self.traces.opened(volume, image)
        if self.prefetches is not None:
            self._prefetch(volume)

    def _prefetch(self, volume: str) -> None:
        """Start the prefetch of the volume's images whose blobs are all open now."""
        assert self.prefetches is not None
        with self._lock:
            blobs = {o.key: o for o in self._objects.values() if o.volume == volume and o.blob is not None}
            fsids = list(self._volumes.get(volume, ()))
        for fsid in fsids:
            try:
                self.prefetches.maybe_start(volume, self.store.image(fsid), blobs)
            except (NydusErofsError, OSError) as e:
                log.warning("prefetch of %s: %s", fsid, e)

    def _refuse(self, msg: OpenRequest, err: int, why: str, level: int) -> None:
        log.log(level, "OPEN %s in %s refused (%s): %s", msg.cookie_key, msg.volume_key, errno.errorcode[err], why)
        self.counters.add(opens_failed=1)
        try:
            self.device.copen(msg.msg_id, -err)
        except FscacheError as e:
            log.error("OPEN %s: copen -%s failed: %s", msg.cookie_key, errno.errorcode[err], e)
        finally:
            os.close(msg.fd)

    # -- CLOSE --------------------------------------------------------------------------------------------------
    def _close(self, msg: CloseRequest) -> None:
        with self._lock:
            obj = self._objects.pop(msg.object_id, None)
        if obj is not None:
            if self.prefetches is not None:
                self.prefetches.volume_closing(obj.volume)
            with self._lock:
                self._closed.notify_all()
            obj.close()
            self.counters.add(closes=1)
            log.debug("CLOSE object %d (%s)", msg.object_id, obj.what)

    # -- READ ---------------------------------------------------------------------------------------------------
    def _read(self, msg: ReadRequest) -> None:
        with self._lock:
            obj = self._objects.get(msg.object_id)
        if obj is None or not obj.acquire():
            log.error("READ %d+%d for unknown object %d: ignored", msg.offset, msg.length, msg.object_id)
            return
        try:
            self._pool.submit(self._serve, obj, msg)
        except RuntimeError:  # pool shut down: stopping
            obj.release()

    def _serve(self, obj: _Object, msg: ReadRequest) -> None:
        written = 0
        ok = False
        try:
            if obj.image is not None:
                written = self._serve_bootstrap(obj.image, obj.fd, msg.offset, msg.length)
            else:
                assert obj.blob is not None
                written = self._serve_blob(obj, msg.offset, msg.length)
            ok = True
        except (NydusErofsError, FscacheError, OSError, ValueError) as e:
            log.error("READ %s %d+%d failed: %s", obj.what, msg.offset, msg.length, e)
        except Exception as e:  # a bug must not stop the worker: the reader gets EIO, the daemon goes on
            log.exception("READ %s %d+%d failed: %s", obj.what, msg.offset, msg.length, e)
        finally:
            self.counters.add(  # before completing: whoever sees the reader done sees the counters too
                reads=1,
                reads_failed=0 if ok else 1,
                read_bytes=msg.length if ok else 0,
                bytes_written=written,
                bootstrap_reads=1 if obj.image is not None else 0,
            )
            try:
                read_complete(obj.fd, msg.msg_id)
            except FscacheError as e:
                log.error("READ %s %d+%d: completion failed: %s", obj.what, msg.offset, msg.length, e)
            obj.release()
            if ok and obj.blob is not None:  # after the reader has its data
                try:
                    self.traces.read(obj.volume, obj.key, msg.offset, msg.length)
                except Exception as e:  # noqa: BLE001 - the trace is an aid
                    log.warning("access trace of %s: %s", obj.what, e)

    @staticmethod
    def _serve_bootstrap(image: Image, fd: int, offset: int, length: int) -> int:
        data = image.bootstrap.data
        end = min(offset + length, len(data))
        piece = data[offset:end] if offset < end else memoryview(b"")
        pad = length - len(piece)
        return write_range(fd, offset, [piece, bytes(pad)] if pad else piece)

    def _serve_blob(self, obj: _Object, offset: int, length: int) -> int:
        assert obj.blob is not None
        written = 0

        def write(d_off: int, data: memoryview) -> None:
            nonlocal written
            written += write_range(obj.fd, d_off, data)
            obj.written.add(d_off)

        def present(d_off: int, d_size: int) -> bool:
            return d_off in obj.written

        obj.blob.fill(self.pipeline, offset, length, write, present)
        return written

    # -- bind / unbind (API) -------------------------------------------------------------------------------------
    def _users(self, fsid: str) -> int:
        """How many open objects belong to image ``fsid`` (its bootstrap, or its copies of blobs); under _lock."""
        return sum(1 for o in self._objects.values() if _image_of(o) == fsid)

    def _wait_unused(self, fsid: str, timeout: float) -> None:
        with self._lock:
            if not self._closed.wait_for(lambda: self._users(fsid) == 0, timeout):
                n = self._users(fsid)
                raise ImageInUseError(f"image {fsid} is in use ({n} open cache object{'s' if n > 1 else ''}): "
                                      "umount it first")  # fmt: skip
            for fsids in self._volumes.values():
                if fsid in fsids:
                    fsids.remove(fsid)

    def bind(self, req: BindRequest) -> dict[str, Any]:
        """Bind ``req.fsid`` to the image ``req`` names (fetched and checked first); the same image bound again is
        a no-op, another one replaces it unless it is in use (:class:`ImageInUseError`)."""
        fsid = check_name(req.fsid)
        if fsid.startswith("."):
            raise UnknownImageError(f"fsid {fsid!r} is not a valid image name")
        staged = stage(req, self.store.images_dir, default_backend=self.store.shared_backend is not None)
        try:
            with self._binding:
                current = self.store.images_dir / fsid
                if _same_image(current, staged):
                    return {"fsid": fsid, "changed": False, **self.describe(fsid)}
                if self.store.has_image(fsid):
                    self._wait_unused(fsid, 0)
                self.store.install(fsid, staged)
        finally:
            shutil.rmtree(staged, ignore_errors=True)
        log.info("bound image %s (%s)", fsid, req.reference or req.bootstrap)
        return {"fsid": fsid, "changed": True, **self.describe(fsid)}

    def unbind(self, fsid: str) -> dict[str, Any]:
        """Unbind ``fsid`` once the kernel has closed its objects (waiting up to :attr:`unbind_wait` seconds)."""
        check_name(fsid)
        if fsid.startswith(".") or not os.path.lexists(self.store.images_dir / fsid):
            raise UnknownImageError(f"no image {fsid!r}")
        with self._binding:
            self._wait_unused(fsid, self.unbind_wait)
            self.store.remove(fsid)
        log.info("unbound image %s", fsid)
        return {"fsid": fsid, "unbound": True}

    def describe(self, fsid: str) -> dict[str, Any]:
        """How ``fsid`` is bound, its blobs and bootstrap size; UnknownImageError when there is no such image."""
        binding = self.store.binding(fsid)
        image = self.store.image(fsid)
        return {**(binding.public() if binding else {"backend": None}), "blobs": sorted(image.blobs),
                "size": image.size}  # fmt: skip

    def images(self) -> dict[str, Any]:
        """Every image the store serves, with how it was bound."""
        out = []
        for fsid in self.store.fsids():
            try:
                binding = self.store.binding(fsid)
            except NydusErofsError as e:
                out.append({"fsid": fsid, "error": str(e)})
                continue
            with self._lock:
                users = self._users(fsid)
            out.append({"fsid": fsid, **(binding.public() if binding else {"backend": None}), "open_objects": users})
        return {"images": out}

    # -- introspection (API) ------------------------------------------------------------------------------------
    def info(self) -> dict[str, Any]:
        with self._lock:
            objects = list(self._objects.values())
            volumes = {k: list(v) for k, v in self._volumes.items()}
        images = []
        for img in self.store.loaded_images():
            images.append(
                {
                    "fsid": img.fsid,
                    "bootstrap": str(img.path),
                    "blobs": sorted(img.blobs),
                    "open": any(o.image is img for o in objects),
                }
            )
        return {
            "state": self.state,
            "pid": os.getpid(),
            "threads": self.threads,
            "images_dir": str(self.store.images_dir),
            "available": self.store.fsids(),
            "images": images,
            "volumes": volumes,
            "objects": [{"id": o.object_id, "volume": o.volume, "key": o.key, "kind": o.kind} for o in objects],
            "uptime": round(time.time() - self.started, 3),
            "prefetch": self.prefetches.stats() if self.prefetches is not None else {},
        }

    def backend_metrics(self) -> dict[str, Any]:
        backends = self.store.backends()
        per = {name: b.stats.snapshot() for name, b in backends.items()}
        total = BackendStats.combined(b.stats for b in backends.values()).snapshot()
        return {**total, "backends": per}

    def blobcache_metrics(self) -> dict[str, Any]:
        return {**self.counters.snapshot(), "pipeline": self.pipeline.stats.snapshot()}


def _image_of(obj: _Object) -> str:
    """The fsid of the image an object belongs to (its bootstrap, or the image whose copy of a blob it reads)."""
    if obj.image is not None:
        return obj.image.fsid
    assert obj.blob is not None
    return obj.blob.image.fsid


def _same_image(current: Path, staged: Path) -> bool:
    """Whether image directory ``current`` holds the very bootstrap and binding that ``staged`` does."""
    try:
        return all(filecmp.cmp(current / name, staged / name, shallow=False) for name in (BOOTSTRAP_NAME, BINDING_NAME))
    except OSError:
        return False

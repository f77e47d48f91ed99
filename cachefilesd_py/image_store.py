"""The image store: which bootstrap and which blobs serve an fsid.

Layout: ``IMAGES/<fsid>/image.boot`` is the bootstrap served for ``mount -t erofs none -o fsid=<fsid>``; its
blobs come from the backend its ``IMAGES/<fsid>/binding.json`` names (an image bound through the API,
:mod:`cachefilesd_py.bindings`), else from the one shared backend if configured (``--blob-dir``, ``--backend
http|registry``), else from ``IMAGES/<fsid>/blobs/<blob_id>`` (a localfs backend per image).
:meth:`ImageStore.install` and :meth:`ImageStore.remove` bind and unbind, renaming whole image directories.

Bootstraps are opened when first asked for (and reopened when the file changes); blob metadata (chunk-info
table, digests) is fetched when a blob is first read, by :meth:`BlobEntry.handle`, never at OPEN time.

Several images may list the same blob (a shared layer).  Each image's copy is its own :class:`BlobEntry`; a
read tries the copy of the image the kernel opened the blob for first, then the other images' copies that
describe the blob alike (:meth:`BlobEntry.fill`; a blob id is only a name: an image may name another's blob id
with other content and digests), so one damaged copy costs a retry, not an EIO for every image sharing the blob.

Key parsing for the kernel's OPEN requests is here too: the volume key is ``erofs,<domain_id or fsid>``, the
cookie key the fsid (bootstrap) or a device tag (a blob id).
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from cachefilesd_py.backends import BlobBackend, make_backend
from cachefilesd_py.bindings import STAGING_DIR, Binding, read_binding
from cachefilesd_py.blob_handles import blob_description_key, blob_handle
from cachefilesd_py.pipeline import BlobHandle, Pipeline, PresentFn, WriteFn
from erofs.errors import ImageError, NydusErofsError
from erofs.format.rafs_v6 import BlobInfo
from erofs.paths import BLOBS_DIR, BOOTSTRAP_NAME
from erofs.reader.bootstrap import Bootstrap

__all__ = [
    "BOOTSTRAP_NAME",
    "BlobEntry",
    "Image",
    "ImageStore",
    "UnknownImageError",
    "check_name",
    "parse_volume_key",
]

log = logging.getLogger(__name__)

_NAME = re.compile(r"[A-Za-z0-9._:+=@-]{1,255}")


class UnknownImageError(NydusErofsError, LookupError):
    """No image (or no blob) by that name in the store: the kernel is answered with ``-ENOENT``."""

    exit_code = 1


def check_name(name: str, what: str = "fsid") -> str:
    """An fsid, domain id or blob id usable as a directory name (no ``/``, not ``.``/``..``)."""
    if not _NAME.fullmatch(name) or name in (".", ".."):
        raise UnknownImageError(f"{what} {name!r} is not a valid image name")
    return name


def parse_volume_key(volume_key: str) -> str:
    """``"erofs,<domain or fsid>"`` (NUL already stripped) → the domain or fsid."""
    prefix, sep, volume = volume_key.partition(",")
    if prefix != "erofs" or not sep or not volume:
        raise UnknownImageError(f"volume key {volume_key!r} is not an EROFS volume (erofs,<fsid>)")
    return volume


@dataclass(frozen=True)
class _Stamp:
    ino: int
    size: int
    mtime_ns: int


class Image:
    """One image: its bootstrap (mapped read-only) and the backend its blobs are fetched from."""

    def __init__(self, fsid: str, path: Path, backend: BlobBackend, stamp: _Stamp) -> None:
        self.fsid = fsid
        self.path = path
        self.backend = backend
        self.stamp = stamp
        self.bootstrap = Bootstrap(path)
        self.size = stamp.size
        self.blobs: dict[str, BlobInfo] = {b.blob_id: b for b in self.bootstrap.blobs}

    def blob_size(self, blob_id: str) -> int:
        """Uncompressed size of ``blob_id`` (the copen size of its cache object)."""
        info = self.blobs[blob_id]
        if info.uncompressed_size:
            return info.uncompressed_size
        for dev in self.bootstrap.devices:  # older bootstraps: the device slot says how many blocks
            if dev.tag == blob_id:
                return dev.blocks * self.bootstrap.blksz
        raise ImageError(f"image {self.fsid}: blob {blob_id} has no uncompressed size and no device slot")

    def close(self) -> None:
        self.bootstrap.close()

    def __repr__(self) -> str:
        return f"<Image {self.fsid} {len(self.blobs)} blobs>"


class BlobEntry:
    """One image's copy of a blob; its metadata is fetched on first use (thread-safe, once; failures are retried).

    ``others(entry)``: the same blob in other images (the store's lookup), tried when this copy fails a read.
    """

    def __init__(self, image: Image, info: BlobInfo, others: Callable[[BlobEntry], list[BlobEntry]] | None = None):
        self.blob_id = info.blob_id
        self.image = image
        self.info = info
        self.backend = image.backend
        self.size = image.blob_size(info.blob_id)
        self._others = others
        self._handle: BlobHandle | None = None
        self._description: bytes | None = None
        self._lock = threading.Lock()

    @property
    def loaded(self) -> bool:
        return self._handle is not None

    def handle(self) -> BlobHandle:
        """The pipeline's handle of this blob, its verified chunk table fetched from the backend the first time."""
        handle = self._handle
        if handle is not None:
            return handle
        with self._lock:
            if self._handle is None:
                self._handle = blob_handle(self.image.bootstrap, self.info, self.backend)
            return self._handle

    @property
    def description(self) -> bytes:
        """What the image's bootstrap says about the blob's content (:func:`blob_description_key`)."""
        if self._description is None:
            self._description = blob_description_key(self.image.bootstrap, self.info)
        return self._description

    def copies(self) -> Iterator[BlobEntry]:
        """This copy, then (looked up only when asked for) the same blob in the other images' own backends, those
        whose bootstraps describe it alike (the same digests): another image's content under this blob id is
        never written where this image reads."""
        yield self
        if self._others is not None:
            for other in self._others(self):
                if other.description == self.description:
                    yield other
                else:
                    log.warning("blob %s: image %s describes it otherwise than image %s: not a copy of it",
                                self.blob_id[:16], other.image.fsid, self.image.fsid)  # fmt: skip

    def fill(self, pipeline: Pipeline, offset: int, length: int, write: WriteFn, present: PresentFn) -> int:
        """:meth:`Pipeline.fill` from this copy; chunks it cannot deliver come from the other images' copies.

        ``present`` must say which chunks ``write`` already received, so a retry on another copy fetches only
        what is still missing.  Raises the first copy's error when no copy delivers the range.
        """
        written = 0
        first: Exception | None = None
        for copy in self.copies():
            try:
                written += pipeline.fill(copy.handle(), offset, length, write, present)
            except (NydusErofsError, OSError) as e:
                if first is None:
                    first = e
                log.warning("blob %s: the copy of image %s failed (%s); trying another", self.blob_id[:16],
                            copy.image.fsid, e)  # fmt: skip
                continue
            if first is not None:
                log.info("blob %s %d+%d: served from the copy of image %s", self.blob_id[:16], offset, length,
                         copy.image.fsid)  # fmt: skip
            return written
        assert first is not None
        raise first

    def __repr__(self) -> str:
        return f"<BlobEntry {self.blob_id[:12]} of {self.image.fsid}>"


class ImageStore:
    """Images under ``images_dir`` by fsid; blobs by id.

    ``backend``: one backend for every image's blobs; when None, each image reads ``<fsid>/blobs/`` through its
    own localfs backend.  Thread-safe.
    """

    def __init__(
        self,
        images_dir: str | os.PathLike[str],
        backend: BlobBackend | None = None,
        *,
        backend_factory: Callable[[Path], BlobBackend] | None = None,
    ) -> None:
        self.images_dir = Path(images_dir)
        self.shared_backend = backend
        self._factory = backend_factory or (lambda d: make_backend("localfs", dir=d))
        self._images: dict[str, Image] = {}
        self._image_backends: dict[str, BlobBackend] = {}
        self._blobs: dict[tuple[str, str], BlobEntry] = {}  # (fsid, blob id): each image's copy
        self._lock = threading.RLock()

    # -- images -------------------------------------------------------------------------------------------------
    def bootstrap_path(self, fsid: str) -> Path:
        return self.images_dir / check_name(fsid) / BOOTSTRAP_NAME

    def has_image(self, fsid: str) -> bool:
        try:
            return self.bootstrap_path(fsid).is_file()
        except UnknownImageError:
            return False

    def fsids(self) -> list[str]:
        """Every fsid with a bootstrap in the store, sorted."""
        try:
            names = sorted(p.name for p in self.images_dir.iterdir())
        except OSError:
            return []
        return [n for n in names if self.has_image(n)]

    def _backend_for(self, fsid: str) -> BlobBackend:
        backend = self._image_backends.get(fsid)
        if backend is not None:
            return backend
        binding = read_binding(self.images_dir / fsid)
        if binding is not None and binding.backend is not None:
            backend = make_backend(binding.backend.type, **binding.backend.config)
        elif self.shared_backend is not None:
            return self.shared_backend
        else:
            backend = self._factory(self.images_dir / fsid / BLOBS_DIR)
        self._image_backends[fsid] = backend
        return backend

    def binding(self, fsid: str) -> Binding | None:
        """How ``fsid`` was bound through the API (None: put there by hand)."""
        return read_binding(self.images_dir / check_name(fsid))

    def install(self, fsid: str, staged: Path) -> bool:
        """Make the image directory ``staged`` (from :func:`cachefilesd_py.bindings.stage`, on the same
        filesystem) the image ``fsid``, replacing any there (True then); the store forgets what it had loaded."""
        dest = self.images_dir / check_name(fsid)
        with self._lock:
            old = self._retire(dest)
            os.rename(staged, dest)
            self.forget(fsid)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return old is not None

    def remove(self, fsid: str) -> bool:
        """Unbind ``fsid``: its directory goes, the store forgets it (bootstrap mapping, blob entries, backend).
        False when there was no such image."""
        with self._lock:
            old = self._retire(self.images_dir / check_name(fsid))
            self.forget(fsid)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return old is not None

    def _retire(self, path: Path) -> Path | None:
        """Move an image directory out of the way (into the staging area), or None when there is none."""
        if not os.path.lexists(path):
            return None
        staging = self.images_dir / STAGING_DIR
        staging.mkdir(mode=0o700, exist_ok=True)
        gone = Path(tempfile.mkdtemp(prefix=f"gone-{path.name}-", dir=staging))
        os.rename(path, gone / "image")
        return gone

    def forget(self, fsid: str) -> None:
        """Drop what is loaded of ``fsid`` (its bootstrap mapping, blob entries and own backend)."""
        with self._lock:
            img = self._images.pop(fsid, None)
            self._blobs = {k: v for k, v in self._blobs.items() if k[0] != fsid}
            backend = self._image_backends.pop(fsid, None)
        if img is not None:
            img.close()
        if backend is not None:
            backend.close()

    def image(self, fsid: str) -> Image:
        """The image served for ``fsid``; UnknownImageError when there is none, ImageError when it is broken."""
        path = self.bootstrap_path(fsid)
        try:
            st = path.stat()
        except OSError:
            raise UnknownImageError(f"no image {fsid!r}: {path} does not exist") from None
        stamp = _Stamp(st.st_ino, st.st_size, st.st_mtime_ns)
        with self._lock:
            img = self._images.get(fsid)
            if img is not None and img.stamp == stamp:
                return img
            try:
                new = Image(fsid, path, self._backend_for(fsid), stamp)
            except OSError as e:
                raise UnknownImageError(f"image {fsid!r}: cannot open {path}: {e.strerror}") from None
            except ImageError as e:
                raise ImageError(f"image {fsid!r}: {e}") from None
            self._images[fsid] = new
            # blob entries of a replaced bootstrap are dropped; the old mapping stays valid for readers holding it
            if img is not None:
                self._blobs = {k: v for k, v in self._blobs.items() if v.image is not img}
            return new

    def loaded_images(self) -> list[Image]:
        with self._lock:
            return list(self._images.values())

    # -- blobs --------------------------------------------------------------------------------------------------
    def blob(self, blob_id: str, prefer: Iterable[str] = ()) -> BlobEntry:
        """The copy of ``blob_id`` in the first image of ``prefer`` that lists it, else in any image.

        Several images may list the same blob (layers shared across images, ``domain_id`` sharing): a blob id
        names its content, so any of them serves it; the others are its fallbacks (:meth:`BlobEntry.copies`).
        """
        for fsid in self._candidates(prefer):
            entry = self._entry(fsid, blob_id)
            if entry is not None:
                return entry
        raise UnknownImageError(f"no image in {self.images_dir} has blob {blob_id}")

    def _candidates(self, prefer: Iterable[str]) -> list[str]:
        seen: dict[str, None] = {}
        for fsid in [*prefer, *self.fsids()]:
            if fsid not in seen and self.has_image(fsid):
                seen[fsid] = None
        return list(seen)

    def _entry(self, fsid: str, blob_id: str) -> BlobEntry | None:
        """Image ``fsid``'s copy of ``blob_id``, None when the image is missing, broken or does not list it."""
        try:
            img = self.image(fsid)
        except (UnknownImageError, ImageError):
            return None
        info = img.blobs.get(blob_id)
        if info is None:
            return None
        with self._lock:
            entry = self._blobs.get((fsid, blob_id))
            if entry is None or entry.image is not img:
                entry = self._blobs[(fsid, blob_id)] = BlobEntry(img, info, self._other_copies)
            return entry

    def _other_copies(self, entry: BlobEntry) -> list[BlobEntry]:
        """The same blob in the other images that have backends of their own."""
        others = []
        for fsid in self._candidates(()):
            if fsid == entry.image.fsid:
                continue
            other = self._entry(fsid, entry.blob_id)
            if other is not None and other.backend is not entry.backend:
                others.append(other)
        return others

    def backends(self) -> dict[str, BlobBackend]:
        """Every backend in use, by name ("shared" or the fsid)."""
        with self._lock:
            shared = {"shared": self.shared_backend} if self.shared_backend is not None else {}
            return {**shared, **self._image_backends}

    def close(self) -> None:
        with self._lock:
            images, self._images, self._blobs = list(self._images.values()), {}, {}
            backends = list(self.backends().values())
            self._image_backends = {}
        for img in images:
            img.close()
        for b in backends:
            b.close()

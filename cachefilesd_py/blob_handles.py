"""An image's data blobs as :class:`~cachefilesd_py.pipeline.BlobHandle` objects, ready for the pipeline: the
blobs of one bootstrap in device-table order (a fanotify mount's ``device=`` files), or one blob of it (the
fscache daemon's :mod:`~cachefilesd_py.image_store`, on first use)."""

from __future__ import annotations

import os

from erofs.errors import ImageError
from erofs.format.rafs_v6 import BlobInfo
from erofs.reader.blob import BlobMeta, check_chunk_table
from erofs.reader.bootstrap import Bootstrap

from .backends import BlobBackend
from .pipeline import BlobHandle

__all__ = ["open_image", "blob_handle", "blob_handles", "blob_order"]


def blob_handle(bootstrap: Bootstrap, blob: BlobInfo, backend: BlobBackend) -> BlobHandle:
    """The handle of ``blob`` of ``bootstrap``, its metadata read and verified through ``backend``: a blob whose
    chunk-info table no digest in the bootstrap covers (no ToC digest) must agree with the bootstrap's chunk
    table (:func:`~erofs.reader.blob.check_chunk_table`), else ImageError."""
    meta = BlobMeta.load(backend, blob, bootstrap)
    if blob.blob_toc_digest is None:
        check_chunk_table(meta, bootstrap, blob.blob_index)
    return BlobHandle(blob.blob_id, meta, backend)


def blob_handles(bootstrap: Bootstrap, backend: BlobBackend) -> list[BlobHandle]:
    """One handle per data blob of ``bootstrap``, in device-table order (the order of ``device=`` options and
    of the kernel's blob indexes); each blob's metadata is read and verified through ``backend``."""
    return [blob_handle(bootstrap, b, backend) for b in blob_order(bootstrap)]


def blob_order(bootstrap: Bootstrap) -> list[BlobInfo]:
    """The data blobs of a Nydus bootstrap in device-table order (ImageError for a bootstrap that is not one)."""
    if not bootstrap.is_rafs:
        raise ImageError(f"{bootstrap.path}: not a Nydus RAFS v6 bootstrap (no blob table)")
    blobs = bootstrap.blobs
    if bootstrap.devices:
        if len(bootstrap.devices) != len(blobs):
            raise ImageError(
                f"{bootstrap.path}: device table has {len(bootstrap.devices)} slots, blob table {len(blobs)} blobs"
            )
        return [bootstrap.blob_by_id(d.tag) for d in bootstrap.devices]
    return list(blobs)


def open_image(bootstrap_path: str | os.PathLike[str], backend: BlobBackend) -> list[BlobHandle]:
    """:func:`blob_handles` of the bootstrap file at ``bootstrap_path``."""
    with Bootstrap(bootstrap_path) as bs:
        return blob_handles(bs, backend)

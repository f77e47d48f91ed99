"""An image's data blobs as :class:`~cachefilesd_py.pipeline.BlobHandle` objects, ready for the pipeline: the
blobs of one bootstrap in device-table order (a fanotify mount's ``device=`` files), or one blob of it (the
fscache daemon's :mod:`~cachefilesd_py.image_store`, on first use).

And what two images must agree on before they share a blob's cached bytes: :func:`chunk_table_key` (from the
blob's verified metadata: what the cache files are keyed by) and :func:`blob_description_key` (from the bootstrap
alone, without reading the blob: what the fscache daemon compares when images share a ``domain_id``).  A blob id
is only a name: an image may name another image's blob id and describe other content."""

from __future__ import annotations

import hashlib
import os
import struct

from erofs.errors import ImageError
from erofs.format.rafs_v6 import BlobInfo
from erofs.reader.blob import BlobMeta, check_chunk_table
from erofs.reader.bootstrap import Bootstrap

from .backends import BlobBackend
from .pipeline import BlobHandle

__all__ = ["open_image", "blob_description_key", "blob_handle", "blob_handles", "blob_order", "chunk_table_key"]

_ENTRY = struct.Struct("<QQQQQ")


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


def chunk_table_key(meta: BlobMeta) -> bytes:
    """sha256 of the blob's uncompressed layout as the image describes it: the digester, then per chunk (in
    chunk-index order) ``d_off``, ``d_size`` and its digest (32 zero bytes for a chunk without one)."""
    h = hashlib.sha256(b"nydus-erofs chunk table v1\0" + meta.digester.encode() + b"\0")
    for ci in range(meta.chunk_count):
        _, _, d_off, d_size = meta.chunk(ci)
        h.update(_ENTRY.pack(d_off, d_size, 0, 0, 0))
        h.update(meta.digest(ci) or bytes(32))
    return h.digest()


def blob_description_key(bootstrap: Bootstrap, blob: BlobInfo) -> bytes:
    """sha256 of what ``bootstrap`` says about ``blob``'s content, the blob unread: its blob-table entry (but its
    index) and, unless a ToC digest pins the blob's chunk-info table and digests, the bootstrap's chunk-table
    entries of the blob.  Images agreeing on it verify the blob's chunks against the same digests."""
    h = hashlib.sha256(b"nydus-erofs blob description v1\0")
    fields = (blob.blob_id, blob.chunk_size, blob.chunk_count, blob.compressor, blob.digester, blob.features,
              blob.compressed_size, blob.uncompressed_size, blob.ci_compressor, blob.ci_offset, blob.ci_compressed_size,
              blob.ci_uncompressed_size, blob.blob_toc_size, blob.blob_meta_size)  # fmt: skip
    h.update(repr(fields).encode())
    h.update(blob.blob_toc_digest or b"-")
    h.update(blob.blob_meta_digest or b"-")
    if not blob.blob_toc_digest:
        entries = {(c.index, c.compressed_offset, c.compressed_size, c.uncompressed_offset, c.uncompressed_size,
                    c.digest) for c in bootstrap.chunk_table if c.blob_index == blob.blob_index}  # fmt: skip
        for index, c_off, c_size, d_off, d_size, digest in sorted(entries):
            h.update(_ENTRY.pack(index, c_off, c_size, d_off, d_size) + digest)
    return h.digest()

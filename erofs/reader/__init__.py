"""Reading Nydus RAFS v6 / EROFS images: bootstraps, blobs and file data, verified; checking and unpacking them.

Everything read is untrusted: a malformed image is an :class:`~erofs.errors.ImageError`, never another
exception.  Blobs are read through a :class:`BlobBackend` (the interface the daemon's backends implement too).

Typical use::

    bs = Bootstrap("image.boot")
    backend = LocalBlobDir("blobs/")
    reader = ImageReader(bs, backend)
    for path, dirent, inode in bs.walk():
        ...
    data = reader.read_file(bs.lookup("/etc/os-release"))

The daemon's path: ``meta = BlobMeta.load(backend, bs.blobs[i], bs)``, then for a READ of ``[off, off+len)`` of
that blob, ``cis = meta.chunks_for_range(off, len)`` and ``read_chunks(backend, meta, cis)`` (one ranged read over
adjacent chunks; verified, decompressed); ``meta.chunk(ci)[2]`` is where each chunk goes (uncompressed offset).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from erofs.format.rafs_v6 import BlobInfo
    from erofs.reader.backend import BackendStats, BlobBackend, BlobFiles, ChainBackend, LocalBlobDir
    from erofs.reader.blob import BlobMeta, TocEntry, plan_reads, read_chunks
    from erofs.reader.bootstrap import Bootstrap
    from erofs.reader.data import ImageReader
    from erofs.reader.records import ChunkInfo, Device, Dirent, FileChunk, Inode, erofs_superblock_csum

# where each name above lives: imported on first use, so a process that needs one module of the reader (the
# daemon's backends need only ``erofs.reader.backend``) does not import the others
_HOME = {
    "BlobInfo": "erofs.format.rafs_v6",
    **dict.fromkeys(("BackendStats", "BlobBackend", "BlobFiles", "ChainBackend", "LocalBlobDir"),
                    "erofs.reader.backend"),
    **dict.fromkeys(("BlobMeta", "TocEntry", "plan_reads", "read_chunks"), "erofs.reader.blob"),
    "Bootstrap": "erofs.reader.bootstrap",
    "ImageReader": "erofs.reader.data",
    **dict.fromkeys(("ChunkInfo", "Device", "Dirent", "FileChunk", "Inode", "erofs_superblock_csum"),
                    "erofs.reader.records"),
}


def __getattr__(name: str) -> Any:
    home = _HOME.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(home), name)
    globals()[name] = value
    return value


__all__ = [
    "BackendStats",
    "BlobFiles",
    "BlobInfo",
    "BlobMeta",
    "BlobBackend",
    "Bootstrap",
    "ChainBackend",
    "ChunkInfo",
    "Device",
    "Dirent",
    "FileChunk",
    "ImageReader",
    "Inode",
    "LocalBlobDir",
    "TocEntry",
    "erofs_superblock_csum",
    "plan_reads",
    "read_chunks",
]

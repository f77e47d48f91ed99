"""Reading Nydus RAFS v6 / EROFS images: bootstraps, blobs and file data.

Typical use::

    bs = Bootstrap("image.boot")
    src = LocalBlobDir("blobs/")
    reader = ImageReader(bs, src)
    for path, dirent, inode in bs.walk():
        ...
    data = reader.read_file(bs.lookup("/etc/os-release"))

The daemon's path: ``meta = BlobMeta.load(src, bs.blobs[i], bs)``, then for a READ of ``[off, off+len)`` of
that blob, ``cis = meta.chunks_for_range(off, len)`` and ``read_chunks(src, meta, cis)`` (one ranged read over
adjacent chunks; verified, decompressed); ``meta.chunk(ci)[2]`` is where each chunk goes (uncompressed offset).
"""

from __future__ import annotations

from erofs.reader.blob import BlobMeta, TocEntry, plan_reads, read_chunks
from erofs.reader.bootstrap import (
    BlobInfo,
    Bootstrap,
    ChunkInfo,
    Device,
    Dirent,
    FileChunk,
    Inode,
    erofs_superblock_csum,
)
from erofs.reader.data import ImageReader
from erofs.reader.source import BlobFiles, BlobSource, ChainSource, LocalBlobDir

__all__ = [
    "BlobFiles",
    "BlobInfo",
    "BlobMeta",
    "BlobSource",
    "Bootstrap",
    "ChainSource",
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

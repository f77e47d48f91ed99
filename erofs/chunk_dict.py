"""A chunk dict: an existing image's chunks pre-seeded into dedup (``nydus-image create --chunk-dict``).

Only what dedup needs is read from the dict's bootstrap: the extended superblock, the blob table and the
80-byte chunk table (``../shared/reference/nydus-rafs-v6.md`` §1.3, §1.6, §1.7).  The dict's blobs become
the first blob slots of the new image; those it ends up referencing are copied into its ``blobs/``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from erofs.blob import BlobInfo
from erofs.bootstrap import ImageOptions
from erofs.chunker import ChunkIndex
from erofs.errors import SourceError
from erofs.format import erofs_fs as e
from erofs.format import rafs_v6 as r
from erofs.tree import ChunkRef

_COMPRESSOR_NAMES = {v: k for k, v in r.COMPRESSORS.items()}
_DIGESTER_NAMES = {v: k for k, v in r.DIGESTERS.items()}


@dataclass(slots=True)
class ChunkDict:
    blobs: list[BlobInfo]
    known: ChunkIndex
    blob_files: dict[str, Path]  # blob id -> its file in the dict's blob dir


def load_chunk_dict(bootstrap: str | os.PathLike[str], blob_dir: str | os.PathLike[str] | None,
                    opts: ImageOptions) -> ChunkDict:  # fmt: skip
    """Read the dict image's blobs and chunks; SourceError if it cannot serve a build with ``opts``."""
    path = Path(bootstrap)
    blobs_at = Path(blob_dir) if blob_dir is not None else path.parent / "blobs"
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise SourceError(f"chunk dict {path}: {exc.strerror}") from None
    where = f"chunk dict {path}"
    try:
        sb = e.erofs_super_block.unpack(data, e.EROFS_SUPER_OFFSET)
        if sb.magic != e.EROFS_SUPER_MAGIC_V1 or not sb.feature_compat & r.EROFS_FEATURE_COMPAT_RAFS_V6:
            raise SourceError(f"{where}: not a RAFS v6 bootstrap")
        ext = r.RafsV6SuperBlockExt.unpack(data, r.RAFSV6_SUPER_EXT_OFFSET)
    except ValueError:
        raise SourceError(f"{where}: not a RAFS v6 bootstrap (too short)") from None
    if ext.s_chunk_size != opts.chunk_size:
        raise SourceError(f"{where}: chunk size {ext.s_chunk_size} differs from this build's {opts.chunk_size}")
    nblobs = ext.s_blob_table_size // r.RafsV6Blob.size
    nchunks = ext.s_chunk_table_size // r.RafsV5ChunkInfo.size
    if (ext.s_blob_table_offset + ext.s_blob_table_size > len(data)
            or ext.s_chunk_table_offset + ext.s_chunk_table_size > len(data)
            or nblobs > r.RAFS_MAX_BLOBS):  # fmt: skip
        raise SourceError(f"{where}: blob or chunk table out of bounds")
    blobs: list[BlobInfo] = []
    files: dict[str, Path] = {}
    for i in range(nblobs):
        b = r.RafsV6Blob.unpack(data, ext.s_blob_table_offset + i * r.RafsV6Blob.size)
        blob_id = b.blob_id.rstrip(b"\0").decode("ascii", "replace")
        compressor = _COMPRESSOR_NAMES.get(b.compression_algo)
        digester = _DIGESTER_NAMES.get(b.digest_algo)
        if digester != opts.digester:
            raise SourceError(f"{where}: blob {blob_id} uses digester {digester}, this build {opts.digester}")
        if compressor != opts.compressor:
            raise SourceError(
                f"{where}: blob {blob_id} is compressed with {compressor}; build with --compressor {compressor}"
            )
        if len(blob_id) != 64 or not all(c in "0123456789abcdef" for c in blob_id):
            raise SourceError(f"{where}: blob id {blob_id!r} is not a sha256 digest")
        blob_file = blobs_at / blob_id
        try:
            size = blob_file.stat().st_size
        except OSError:
            raise SourceError(f"{where}: blob {blob_id} not found in {blobs_at} (see --chunk-dict-blob-dir)") from None
        if size != b.compressed_size:
            raise SourceError(f"{where}: blob file {blob_file} has {size} bytes, the dict says {b.compressed_size}")
        files[blob_id] = blob_file
        blobs.append(BlobInfo(
            blob_id=blob_id, blob_index=i, chunk_size=b.chunk_size, chunk_count=b.chunk_count,
            compressor=compressor, digester=digester, features=b.features, compressed_size=b.compressed_size,
            uncompressed_size=b.uncompressed_size, ci_compressor=_COMPRESSOR_NAMES.get(b.ci_compressor, "none"),
            ci_offset=b.ci_offset, ci_compressed_size=b.ci_compressed_size,
            ci_uncompressed_size=b.ci_uncompressed_size, blob_toc_size=b.blob_toc_size,
            blob_toc_digest=b.blob_toc_digest,
        ))  # fmt: skip
    known: ChunkIndex = {}
    for i in range(nchunks):
        c = r.RafsV5ChunkInfo.unpack(data, ext.s_chunk_table_offset + i * r.RafsV5ChunkInfo.size)
        if c.blob_index >= nblobs or c.index >= blobs[c.blob_index].chunk_count:
            raise SourceError(f"{where}: chunk {i} names blob {c.blob_index} chunk {c.index}, which do not exist")
        if c.uncompressed_offset % e.EROFS_BLKSIZ or not 0 < c.uncompressed_size <= opts.chunk_size:
            raise SourceError(f"{where}: chunk {i} has an invalid layout")
        ref = ChunkRef(c.blob_index, c.index, c.compressed_offset, c.compressed_size, c.uncompressed_offset,
                       c.uncompressed_size, bytes(c.block_id))  # fmt: skip
        known.setdefault((ref.digest, ref.d_size), ref)
    return ChunkDict(blobs, known, files)

"""A chunk dict: an existing image's chunks pre-seeded into dedup (``nydus-image create --chunk-dict``).

Only what dedup needs is read from the dict's bootstrap (through :mod:`erofs.reader`): the blob table and
the 80-byte chunk table (``docs/format.md`` §4, §9.5).  The dict's blobs become
the first blob slots of the new image; those it ends up referencing are copied into its ``blobs/``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from erofs.build.bootstrap import ImageOptions
from erofs.build.chunker import ChunkIndex
from erofs.build.tree import ChunkRef
from erofs.errors import ImageError, SourceError
from erofs.format.rafs_v6 import BlobInfo
from erofs.paths import BLOBS_DIR
from erofs.reader.bootstrap import Bootstrap

BLOCK = 4096


@dataclass(slots=True)
class ChunkDict:
    blobs: list[BlobInfo]
    known: ChunkIndex
    blob_files: dict[str, Path]  # blob id -> its file in the dict's blob dir


def load_chunk_dict(bootstrap: str | os.PathLike[str], blob_dir: str | os.PathLike[str] | None,
                    opts: ImageOptions) -> ChunkDict:  # fmt: skip
    """Read the dict image's blobs and chunks; SourceError if it cannot serve a build with ``opts``."""
    path = Path(bootstrap)
    blobs_at = Path(blob_dir) if blob_dir is not None else path.parent / BLOBS_DIR
    where = f"chunk dict {path}"
    try:
        boot = Bootstrap(path)
    except OSError as exc:
        raise SourceError(f"{where}: {exc.strerror}") from None
    except ImageError as exc:
        raise SourceError(f"{where}: {exc}") from None
    try:
        if boot.ext is None:
            raise SourceError(f"{where}: not a RAFS v6 bootstrap (plain EROFS has no chunk table)")
        if boot.chunk_size != opts.chunk_size:
            raise SourceError(f"{where}: chunk size {boot.chunk_size} differs from this build's {opts.chunk_size}")
        blobs: list[BlobInfo] = []
        files: dict[str, Path] = {}
        for b in boot.blobs:
            if b.digester != opts.digester:
                raise SourceError(f"{where}: blob {b.blob_id} uses digester {b.digester}, this build {opts.digester}")
            if b.compressor != opts.compressor:
                raise SourceError(  # its blobs are used as they are, and an image has one compressor (RAFS flags)
                    f"{where}: blob {b.blob_id[:12]} is compressed with {b.compressor}, this build with "
                    f"{opts.compressor}: give --compressor {b.compressor}"
                )
            if len(b.blob_id) != 64 or not all(c in "0123456789abcdef" for c in b.blob_id):
                raise SourceError(f"{where}: blob id {b.blob_id!r} is not a sha256 digest")
            blob_file = blobs_at / b.blob_id
            try:
                size = blob_file.stat().st_size
            except OSError:
                raise SourceError(f"{where}: blob {b.blob_id} not in {blobs_at} (see --chunk-dict-blob-dir)") from None
            if size != b.compressed_size:
                raise SourceError(f"{where}: blob file {blob_file} has {size} bytes, the dict says {b.compressed_size}")
            files[b.blob_id] = blob_file
            blobs.append(b)
        known: ChunkIndex = {}
        for n, c in enumerate(boot.chunk_table):
            if c.blob_index >= len(blobs) or c.index >= blobs[c.blob_index].chunk_count:
                raise SourceError(f"{where}: chunk {n} names blob {c.blob_index} chunk {c.index}, which do not exist")
            if c.uncompressed_offset % BLOCK or not 0 < c.uncompressed_size <= opts.chunk_size:
                raise SourceError(f"{where}: chunk {n} has an invalid layout")
            ref = ChunkRef(c.blob_index, c.index, c.compressed_offset, c.compressed_size, c.uncompressed_offset,
                           c.uncompressed_size, bytes(c.digest))  # fmt: skip
            known.setdefault((ref.digest, ref.d_size), ref)
    except ImageError as exc:
        raise SourceError(f"{where}: {exc}") from None
    finally:
        boot.close()
    return ChunkDict(blobs, known, files)

"""Chunk digests and chunk compression, as Nydus stores them (``utils/src/{compress,digest}.rs``).

Digests are of the uncompressed chunk.  ``lz4_block`` is a raw LZ4 block (no size prefix, no frame),
``zstd`` one zstd frame; a chunk that does not shrink is stored raw.  All three C libraries release the GIL.
"""

from __future__ import annotations

import hashlib

import blake3
import lz4.block
import zstandard

from erofs.errors import ImageError

DIGEST_SIZE = 32
_ZSTD_LEVEL = 3
_zstd_c = zstandard.ZstdCompressor(level=_ZSTD_LEVEL, write_checksum=False, write_content_size=True)


def chunk_digest(digester: str, data: bytes | memoryview) -> bytes:
    """The 32-byte digest of an uncompressed chunk."""
    if digester == "blake3":
        return blake3.blake3(data).digest()
    if digester == "sha256":
        return hashlib.sha256(data).digest()
    raise ValueError(f"unknown digester {digester!r}")


def compress_chunk(compressor: str, data: bytes | memoryview) -> bytes | memoryview:
    """The bytes to store for ``data``: compressed when that is smaller, else ``data`` itself."""
    if compressor == "none":
        return data
    if compressor == "lz4_block":
        out = lz4.block.compress(data, mode="default", store_size=False)
    elif compressor == "zstd":
        out = _zstd_c.compress(data)
    else:
        raise ValueError(f"unknown compressor {compressor!r}")
    return out if len(out) < len(data) else data


def decompress_chunk(compressor: str, data: bytes | memoryview, d_size: int) -> bytes:
    """Inverse of :func:`compress_chunk` for a chunk stored compressed (``c_size != d_size``).

    Raises :class:`ImageError` on corrupt input or a size mismatch; never returns more than ``d_size``.
    """
    try:
        if compressor == "lz4_block":
            out = lz4.block.decompress(data, uncompressed_size=d_size)
        elif compressor == "zstd":
            out = zstandard.ZstdDecompressor().decompress(data, max_output_size=d_size)
        else:
            raise ImageError(f"chunk is compressed but the blob's compressor is {compressor!r}")
    except (lz4.block.LZ4BlockError, zstandard.ZstdError) as e:
        raise ImageError(f"corrupt {compressor} chunk: {e}") from None
    if len(out) != d_size:
        raise ImageError(f"{compressor} chunk decompressed to {len(out)} bytes, expected {d_size}")
    return out

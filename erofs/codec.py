"""Chunk digests, compression and decompression by Nydus compressor, as Nydus stores them
(``utils/src/{compress,digest}.rs``); the only module that calls the compression libraries for blobs.

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


def decompress(compressor: str, data: bytes | memoryview, size: int) -> bytes:
    """The ``size`` bytes stored as ``data`` with ``compressor`` (a Nydus compressor name; ``none``: stored as
    they are).  The one decompression of chunks and blob metadata, for the reader and the daemon alike.

    Raises :class:`ImageError` on corrupt input, a size mismatch or a compressor this project cannot decode;
    never returns more than ``size`` bytes.
    """
    if compressor == "none":
        if len(data) != size:
            raise ImageError(f"stored size {len(data)} does not match its uncompressed size {size}")
        return bytes(data)
    try:
        if compressor == "lz4_block":
            out = lz4.block.decompress(data, uncompressed_size=size)
        elif compressor == "zstd":
            out = zstandard.ZstdDecompressor().decompress(data, max_output_size=size)
        else:
            raise ImageError(f"unsupported compressor {compressor}")
    except (lz4.block.LZ4BlockError, zstandard.ZstdError) as e:
        raise ImageError(f"corrupt {compressor} data: {e}") from None
    if len(out) != size:
        raise ImageError(f"{compressor} data decompressed to {len(out)} bytes, expected {size}")
    return out

"""Damage an image's blob on purpose: the tests that prove a bad chunk is an EIO, never wrong bytes."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cachefilesd_py.backends import make_backend
from cachefilesd_py.blob_handles import open_image
from erofs.reader import Bootstrap


@dataclass(frozen=True)
class Flipped:
    blob_id: str  # the blob damaged
    ci_index: int  # the chunk's index in the blob's chunk table (what the daemon's log names)
    file_offset: int  # where the chunk starts in the file


def flip_chunk_byte(boot: Path, blobs: Path, path: str, nth: int) -> Flipped:
    """Flip the middle byte of the ``nth`` data chunk of ``path`` (in the image) in its blob under ``blobs``."""
    backend = make_backend("localfs", dir=blobs)
    try:
        (handle,) = open_image(boot, backend)
    finally:
        backend.close()
    with Bootstrap(boot) as bs:
        chunks = [fc for fc in bs.file_chunks(bs.lookup(path)) if fc.ci_index is not None]
    c_off, c_size, _, _ = handle.meta.chunk(chunks[nth].ci_index)
    blob = blobs / handle.blob_id
    raw = bytearray(blob.read_bytes())
    raw[c_off + c_size // 2] ^= 0xFF
    blob.write_bytes(raw)
    return Flipped(handle.blob_id, chunks[nth].ci_index, chunks[nth].file_offset)

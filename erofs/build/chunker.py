"""Cutting file data into chunks and storing each unique chunk once (dedup by digest and size).

A :class:`ChunkStore` belongs to one layer: it knows every chunk already stored (lower layers, a chunk
dict) and opens the layer's blob only when the first new chunk arrives, so a fully deduplicated or empty
layer gets no blob.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from pathlib import Path

from erofs import codec
from erofs.build.blob import BlobWriter
from erofs.build.tree import ChunkRef
from erofs.format.rafs_v6 import BlobInfo
from erofs.progress import ProgressCallback

ChunkIndex = dict[tuple[bytes, int], ChunkRef]


class ChunkStore:
    def __init__(self, blobs_dir: Path, blob_index: int, chunk_size: int, compressor: str, digester: str,
                 known: ChunkIndex | None = None,
                 progress: ProgressCallback | None = None) -> None:  # fmt: skip
        self.progress = progress  # called with the bytes of each chunk taken in (stored or deduplicated)
        self.blobs_dir = blobs_dir
        self.blob_index = blob_index
        self.chunk_size = chunk_size
        self.compressor = compressor
        self.digester = digester
        self.known: ChunkIndex = known if known is not None else {}
        self._writer: BlobWriter | None = None
        self.bytes_in = 0
        self.bytes_deduped = 0

    def add(self, data: bytes | memoryview) -> ChunkRef:
        """The stored chunk for ``data``: an existing one with the same digest, or a new one in this blob."""
        digest = codec.chunk_digest(self.digester, data)
        key = (digest, len(data))
        self.bytes_in += len(data)
        if self.progress is not None:
            self.progress(len(data))
        ref = self.known.get(key)
        if ref is not None:
            self.bytes_deduped += len(data)
            return ref
        if self._writer is None:
            self._writer = BlobWriter(self.blobs_dir, self.blob_index, self.chunk_size, self.compressor,
                                      self.digester)  # fmt: skip
        ref = self._writer.add_chunk(data, digest)
        self.known[key] = ref
        return ref

    def add_stream(self, readinto: Callable[[memoryview], int], size: int) -> list[ChunkRef | None]:
        """Chunk ``size`` bytes delivered by ``readinto`` (a file's or tar member's); short input is an error."""
        buf = bytearray(min(self.chunk_size, size))
        view = memoryview(buf)
        chunks: list[ChunkRef | None] = []
        left = size
        while left:
            want = min(self.chunk_size, left)
            got = 0
            while got < want:
                n = readinto(view[got:want])
                if not n:
                    raise EOFError(f"data ended {left - got} bytes early")
                got += n
            chunks.append(self.add(view[:want]))
            left -= want
        return chunks

    def add_file(self, fd: int, size: int) -> list[ChunkRef | None]:
        """Chunk an open regular file; chunks lying wholly in a hole become holes (``None``), unread."""
        buf = bytearray(min(self.chunk_size, size))
        view = memoryview(buf)
        chunks: list[ChunkRef | None] = []
        for off in range(0, size, self.chunk_size):
            want = min(self.chunk_size, size - off)
            try:
                data_at = os.lseek(fd, off, os.SEEK_DATA)
            except OSError as e:
                if e.errno != errno.ENXIO:  # ENXIO: only a hole from here on
                    raise
                data_at = size
            if data_at >= off + want:
                chunks.append(None)
                continue
            got = 0
            while got < want:
                n = os.preadv(fd, [view[got:want]], off + got)
                if not n:
                    raise EOFError(f"file shrank while being read ({off + got} of {size} bytes)")
                got += n
            chunks.append(self.add(view[:want]))
        return chunks

    def finish(self) -> BlobInfo | None:
        """Seal the layer's blob, if it got any chunk."""
        return self._writer.finish() if self._writer is not None else None

    def abort(self) -> None:
        if self._writer is not None:
            self._writer.abort()

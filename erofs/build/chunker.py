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
from erofs.format.rafs_v6 import RAFS_MAX_CHUNK_SIZE, BlobInfo
from erofs.progress import ProgressCallback

ChunkIndex = dict[tuple[bytes, int], ChunkRef]
_ZEROS = bytes(RAFS_MAX_CHUNK_SIZE)  # what a chunk read from a hole holds


def _in_hole(fd: int, off: int, want: int, size: int) -> bool:
    """Whether ``want`` bytes at ``off`` of a file of ``size`` bytes lie wholly in a hole."""
    try:
        data_at = os.lseek(fd, off, os.SEEK_DATA)
    except OSError as e:
        if e.errno != errno.ENXIO:  # ENXIO: only a hole from here on
            raise
        data_at = size
    return data_at >= off + want


def _read_full(fd: int, view: memoryview, off: int, size: int) -> None:
    got = 0
    want = len(view)
    while got < want:
        n = os.preadv(fd, [view[got:]], off + got)
        if not n:
            raise EOFError(f"file shrank while being read ({off + got} of {size} bytes)")
        got += n


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
        ref = self._blob().add_chunk(data, digest)
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

    def _blob(self) -> BlobWriter:
        if self._writer is None:
            self._writer = BlobWriter(self.blobs_dir, self.blob_index, self.chunk_size, self.compressor,
                                      self.digester)  # fmt: skip
        return self._writer

    def add_file(self, fd: int, size: int, maybe_sparse: bool = True) -> list[ChunkRef | None]:
        """Chunk an open regular file; chunks lying wholly in a hole become holes (``None``).

        ``maybe_sparse`` (its blocks hold less than its size) looks for holes before reading; otherwise only
        a chunk that reads as zeros is checked for being a hole.  Uncompressed, a chunk is read straight into
        the blob's write buffer and stays there unless it is a duplicate."""
        if self.compressor != "none":
            return self._add_file_compressed(fd, size)
        blob = self._writer or self._blob()
        chunks: list[ChunkRef | None] = []
        chunk_size = self.chunk_size
        known = self.known
        digester = self.digester
        progress = self.progress
        taken = 0
        for off in range(0, size, chunk_size):
            want = size - off if size - off < chunk_size else chunk_size
            if maybe_sparse and _in_hole(fd, off, want, size):
                chunks.append(None)
                continue
            view = blob.reserve(want)
            if os.preadv(fd, (view,), off) != want:  # short: read on (or fail) the slow way
                _read_full(fd, view, off, size)
            if (not view[0] and not view[-1] and not maybe_sparse and _ZEROS.startswith(view)
                    and _in_hole(fd, off, want, size)):  # fmt: skip
                chunks.append(None)
                continue
            digest = codec.chunk_digest(digester, view)
            taken += want
            if progress is not None:
                progress(want)
            ref = known.get((digest, want))
            if ref is None:
                ref = known[(digest, want)] = blob.commit_chunk(want, digest)
            else:
                self.bytes_deduped += want
            chunks.append(ref)
        self.bytes_in += taken
        return chunks

    def _add_file_compressed(self, fd: int, size: int) -> list[ChunkRef | None]:
        buf = bytearray(min(self.chunk_size, size))
        view = memoryview(buf)
        chunks: list[ChunkRef | None] = []
        for off in range(0, size, self.chunk_size):
            want = min(self.chunk_size, size - off)
            if _in_hole(fd, off, want, size):
                chunks.append(None)
                continue
            _read_full(fd, view[:want], off, size)
            chunks.append(self.add(view[:want]))
        return chunks

    def finish(self) -> BlobInfo | None:
        """Seal the layer's blob, if it got any chunk."""
        if self._writer is not None and not self._writer.chunk_count:  # every chunk was a duplicate
            self.abort()
            self._writer = None
        return self._writer.finish() if self._writer is not None else None

    def abort(self) -> None:
        if self._writer is not None:
            self._writer.abort()

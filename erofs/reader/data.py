"""File contents: :class:`ImageReader` joins a bootstrap's chunk mapping with blob backends.

Chunks of RAFS blobs are fetched in batches through :func:`~erofs.reader.blob.read_chunks` (verified and
decompressed); chunks on plain EROFS devices and flat data in the bootstrap are read as they are.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence

from erofs.errors import BackendError, ImageError, UsageError
from erofs.reader.backend import BlobBackend, BlobFiles, ChainBackend, LocalBlobDir
from erofs.reader.blob import BlobMeta, read_chunks
from erofs.reader.bootstrap import Bootstrap
from erofs.reader.records import FileChunk, Inode

BATCH_BYTES = 8 << 20  # uncompressed bytes per read_chunks batch
PLAIN_READ = 4 << 20  # bytes per read from a plain EROFS device


class ImageReader:
    """A bootstrap plus the backend of its blobs.  ``backend`` may be None for metadata-only use."""

    def __init__(self, bootstrap: Bootstrap, backend: BlobBackend | None) -> None:
        self.bootstrap = bootstrap
        self.backend = backend
        self._metas: dict[int, BlobMeta] = {}

    def _need_backend(self) -> BlobBackend:
        if self.backend is None:
            raise BackendError("file data lives in blobs, but no blob source was given (--blob-dir)")
        return self.backend

    def blob_meta(self, blob_index: int) -> BlobMeta:
        """The verified metadata of blob ``blob_index`` (loaded once)."""
        meta = self._metas.get(blob_index)
        if meta is None:
            bs = self.bootstrap
            if not 0 <= blob_index < len(bs.blobs):
                raise ImageError(f"blob index {blob_index} is not in the blob table")
            meta = BlobMeta.load(self._need_backend(), bs.blobs[blob_index], bs)
            self._metas[blob_index] = meta
        return meta

    def iter_file(self, ino: Inode) -> Iterator[tuple[int, memoryview | None, int]]:
        """(file_offset, data, length) pieces covering a regular file in order; ``data`` is None for a hole."""
        chunks = self.bootstrap.file_chunks(ino)
        i = 0
        while i < len(chunks):
            c = chunks[i]
            if c.blob_offset is None:
                yield c.file_offset, None, c.length
                i += 1
            elif c.blob_index < 0:
                yield c.file_offset, self.bootstrap._span(c.blob_offset, c.length, f"nid {ino.nid}: data"), c.length
                i += 1
            elif c.ci_index is None:
                yield from self._plain(c)
                i += 1
            else:
                batch = [c]
                total = c.length
                i += 1
                while (
                    i < len(chunks)
                    and chunks[i].ci_index is not None
                    and chunks[i].blob_index == c.blob_index
                    and total < BATCH_BYTES
                ):
                    batch.append(chunks[i])
                    total += chunks[i].length
                    i += 1
                yield from self._rafs(ino, batch)

    def _rafs(self, ino: Inode, batch: list[FileChunk]) -> Iterator[tuple[int, memoryview | None, int]]:
        meta = self.blob_meta(batch[0].blob_index)
        cis = [c.ci_index for c in batch]
        for c, data in zip(batch, read_chunks(self._need_backend(), meta, cis), strict=True):  # type: ignore[arg-type]
            if len(data) < c.length:
                raise ImageError(
                    f"nid {ino.nid}: chunk {c.ci_index} of blob {meta.blob_id} holds {len(data)} bytes, "
                    f"the file needs {c.length} at offset {c.file_offset}"
                )
            yield c.file_offset, data[: c.length], c.length

    def _plain(self, c: FileChunk) -> Iterator[tuple[int, memoryview | None, int]]:
        src = self._need_backend()
        key = self.bootstrap.blob_key(c.blob_index)
        assert c.blob_offset is not None
        for off in range(0, c.length, PLAIN_READ):
            n = min(PLAIN_READ, c.length - off)
            data = src.read(key, c.blob_offset + off, n)
            if len(data) != n:
                raise BackendError(f"device {key}: short read at {c.blob_offset + off}")
            yield c.file_offset + off, memoryview(data), n

    def read_file(self, ino: Inode) -> bytes:
        """A whole regular file in memory (for small files and tests)."""
        out = bytearray(ino.size)
        for off, data, n in self.iter_file(ino):
            if data is not None:
                out[off : off + n] = data
        return bytes(out)


def open_backend(
    bootstrap: Bootstrap, blob_dir: str | os.PathLike[str] | None, device_files: Sequence[str | os.PathLike[str]] = ()
) -> BlobBackend | None:
    """The blob backend for the CLIs: ``--device`` files (in device-table order) and/or a ``--blob-dir``."""
    backends: list[BlobBackend] = []
    if device_files:
        keys = [bootstrap.blob_key(i) for i in range(len(bootstrap.blobs or bootstrap.devices))]
        if len(device_files) > len(keys):
            raise UsageError(f"{len(device_files)} --device files given, the image has {len(keys)} devices")
        backends.append(BlobFiles(dict(zip(keys, device_files, strict=False))))
    if blob_dir is not None:
        if not os.path.isdir(blob_dir):
            raise UsageError(f"{blob_dir}: blob directory does not exist")
        backends.append(LocalBlobDir(blob_dir))
    if not backends:
        return None
    return backends[0] if len(backends) == 1 else ChainBackend(*backends)

"""Writing one Nydus data blob: chunks, then the blob metadata that lets a daemon find and verify them.

Layout (``docs/format.md`` §9; every tar header follows its payload)::

    [4 KiB of zeros][chunks][hdr image.blob][chunk-info table][CCT header 4 KiB][hdr blob.meta]
    [chunk digests 32 B each][hdr blob.digest][ToC entries][hdr rafs.blob.toc]

The zero prefix is one EROFS block (uncompressed chunks stay block aligned) and, being two zero tar blocks and
more, an end-of-archive marker: read forwards, the blob is an empty tar with trailing data, so containerd's own
differ applies it as an empty layer whose diff ID is the blob's digest (``docs/format.md`` §9.1).
Uncompressed offsets advance by 4 KiB-rounded chunk sizes.  With ``compressor="none"`` the stored bytes
sit at exactly those offsets (zero padded), so the data region is what the kernel reads through a
file-backed ``device=`` mount.  The blob id is the sha256 of the whole file.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import queue
import threading
from pathlib import Path

from erofs import codec
from erofs.build.tree import ChunkRef
from erofs.format import rafs_v6 as r
from erofs.format.rafs_v6 import BlobInfo

BLOCK = 4096
_ZEROS = bytes(BLOCK)


# sync_file_range(2) (not in the os module): the blob writer starts each batch's writeback as soon as it is
# written, so the fsync that publishes the blob waits for the last batches only, not for all of it (measured
# here: a 200 MB build's fsync from ~0.12 s to ~1 ms, and no dirty-page throttling of the writes)
_sync_file_range = getattr(ctypes.CDLL(None, use_errno=True), "sync_file_range", None)
if _sync_file_range is not None:
    _sync_file_range.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
SYNC_FILE_RANGE_WRITE = 2


def _start_writeback(fd: int, offset: int, length: int) -> None:
    """Start writing back ``length`` bytes at ``offset`` of ``fd`` (asynchronously; a no-op where unsupported:
    the fsync that follows does all the work then)."""
    if _sync_file_range is not None:
        _sync_file_range(fd, offset, length, SYNC_FILE_RANGE_WRITE)


def _align(x: int, a: int) -> int:
    return -(-x // a) * a


def tar_header(name: bytes, size: int) -> bytes:
    """The 512-byte GNU tar header Nydus writes after each blob section (empty mode/uid/gid, mtime 0)."""
    h = bytearray(512)
    h[0 : len(name)] = name
    h[124:136] = b"%011o\0" % size
    h[136:148] = b"%011o\0" % 0
    h[156:157] = b"0"
    h[257:265] = b"ustar  \0"
    h[148:156] = b" " * 8
    h[148:156] = b"%06o\0 " % sum(h)
    return bytes(h)


class _Sink:
    """Writes and hashes the blob in a background thread (both release the GIL), in batches of ~4 MiB, so
    reading, digesting and compressing the next chunks overlap with it.

    Batches are a few preallocated buffers passed round (filled here, written and hashed there, handed back):
    file data is read straight into them (:meth:`reserve`), no copy and no fresh pages per batch, and memory
    is bounded by their number whatever the file sizes."""

    BATCH = 4 << 20
    BUFFERS = 4

    def __init__(self, f: object, largest: int = 0) -> None:
        self.f = f
        self.sha = hashlib.sha256()
        self._capacity = self.BATCH + largest  # a batch is sent once BATCH is reached: room for one more piece
        self._free: queue.Queue[bytearray] = queue.Queue()
        for _ in range(self.BUFFERS):
            self._free.put(bytearray(self._capacity))
        self._buf = self._free.get()
        self._view = memoryview(self._buf)
        self._fill = 0
        self._written = 0  # bytes handed to the file
        self._q: queue.Queue[tuple[bytearray, int] | None] = queue.Queue()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="blob-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        fd = self.f.fileno()  # type: ignore[attr-defined]
        while (item := self._q.get()) is not None:
            buf, fill = item
            if self._error is None:
                try:
                    with memoryview(buf) as view, view[:fill] as data:
                        self.f.write(data)  # type: ignore[attr-defined]
                        self.sha.update(data)
                    if fill >= self.BATCH:  # a whole batch (so written through the file's buffer)
                        _start_writeback(fd, self._written, fill)
                    self._written += fill
                except BaseException as e:  # reported to the producer at its next write or drain
                    self._error = e
            self._free.put(buf)

    def reserve(self, n: int) -> memoryview:
        """Room for the next ``n`` bytes of the blob, to be filled and then taken with :meth:`commit` (or
        dropped by not committing)."""
        if self._fill + n > self._capacity:
            self._flush()
            if n > self._capacity:
                self._capacity = n
                self._buf = bytearray(n)
                self._view = memoryview(self._buf)
        return self._view[self._fill : self._fill + n]

    def commit(self, n: int) -> None:
        self._fill += n
        if self._fill >= self.BATCH:
            self._flush()

    def write(self, data: bytes | memoryview) -> None:
        n = len(data)
        self.reserve(n)[:] = data
        self.commit(n)

    def _flush(self) -> None:
        if self._error is not None:
            raise self._error
        if self._fill:
            self._q.put((self._buf, self._fill))
            self._buf = self._free.get()  # waits while every buffer is queued: memory stays bounded
            self._view = memoryview(self._buf)
            self._fill = 0

    def drain(self) -> None:
        """Wait until everything written so far is on its way to the file and in the hash."""
        self._flush()
        self._q.put(None)
        self._thread.join()
        if self._error is not None:
            raise self._error
        self._thread = threading.Thread(target=self._run, name="blob-writer", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._q.put(None)
        self._thread.join()


class BlobWriter:
    """Appends chunks to a temporary blob file; :meth:`finish` writes the metadata and names the blob."""

    def __init__(self, directory: Path, blob_index: int, chunk_size: int, compressor: str, digester: str) -> None:
        self.directory = directory
        self.blob_index = blob_index
        self.chunk_size = chunk_size
        self.compressor = compressor
        self.digester = digester
        self._tmp = directory / f".blob-{blob_index}.tmp"
        self._f = open(self._tmp, "wb")  # noqa: SIM115 - closed in finish()/abort()
        self._sink = _Sink(self._f, _align(chunk_size, BLOCK))
        self._c_off = 0
        self._write(_ZEROS)  # the prefix (module docstring): chunks start at BLOCK in both layouts
        self._d_off = BLOCK
        self._ci: list[tuple[int, int]] = []
        self._digests: list[bytes] = []

    @property
    def chunk_count(self) -> int:
        return len(self._ci)

    def _write(self, data: bytes | memoryview) -> None:
        self._sink.write(data)
        self._c_off += len(data)

    def reserve(self, size: int) -> memoryview:
        """Where an uncompressed chunk of ``size`` bytes goes when stored: read it into this view, then
        :meth:`commit_chunk` it, or leave it (a duplicate) and it is not stored.  The padding to the next
        4 KiB that follows the view is zeroed here."""
        pad = -size % BLOCK
        view = self._sink.reserve(size + pad)
        if pad:
            view[size:] = _ZEROS[:pad]
        return view[:size]

    def commit_chunk(self, size: int, digest: bytes) -> ChunkRef:
        """Store the chunk just read into :meth:`reserve`'s view (``compressor="none"`` only)."""
        ci = self._ci
        index = len(ci)
        if index >= r.RAFS_MAX_CHUNKS_PER_BLOB:
            raise OverflowError("a blob holds at most 2^24 chunks: use a larger --chunk-size")
        stored = size + (-size % BLOCK)
        self._sink.commit(stored)
        off = self._c_off  # uncompressed: the data offset is the stored offset
        self._c_off = self._d_off = off + stored
        ci.append(r.chunk_info_v1_encode(off, size, off, size))
        self._digests.append(digest)
        return ChunkRef(self.blob_index, index, off, size, off, size, digest)

    def add_chunk(self, data: bytes | memoryview, digest: bytes) -> ChunkRef:
        """Store one chunk (``digest`` is of ``data``, computed by the caller for dedup) and return where."""
        if len(self._ci) >= r.RAFS_MAX_CHUNKS_PER_BLOB:
            raise OverflowError("a blob holds at most 2^24 chunks: use a larger --chunk-size")
        d_size = len(data)
        stored = codec.compress_chunk(self.compressor, data)
        c_off, c_size = self._c_off, len(stored)
        ref = ChunkRef(self.blob_index, len(self._ci), c_off, c_size, self._d_off, d_size, digest)
        self._write(stored)
        pad = -d_size % BLOCK
        if self.compressor == "none" and pad:
            self._write(_ZEROS[:pad])
        self._d_off += d_size + pad
        self._ci.append(r.chunk_info_v1_encode(c_off, c_size, ref.d_off, d_size))
        self._digests.append(digest)
        return ref

    def abort(self) -> None:
        self._sink.close()
        self._f.close()
        self._tmp.unlink(missing_ok=True)

    def finish(self) -> BlobInfo:
        """Write the blob metadata, fsync, and rename the file to its id.  Returns the blob table facts."""
        toc: list[bytes] = []

        def section(name: bytes, payload: bytes, digest_of: bytes | None = None) -> None:
            offset = self._c_off
            self._write(payload)
            self._write(tar_header(name, len(payload)))
            toc.append(self._toc_entry(name, hashlib.sha256(digest_of or payload).digest(), offset, len(payload)))

        data_end = self._c_off
        self._write(tar_header(r.TOC_ENTRY_BLOB_RAW, data_end))
        self._sink.drain()
        # as upstream: the running blob hash at this point, i.e. sha256 of the data and its tar header
        data_digest = self._sink.sha.copy().digest()
        # Upstream records the data section with compressed_offset = its end (builder's running offset).
        toc.append(
            r.TocEntry.pack(
                flags=r.TOC_FLAG_COMPRESSION_NONE,
                name=r.TOC_ENTRY_BLOB_RAW,
                uncompressed_digest=data_digest,
                compressed_offset=data_end,
                compressed_size=data_end,
                uncompressed_size=self._d_off,
            )
        )
        features = (
            r.BLOB_FEATURE_ALIGNED
            | r.BLOB_FEATURE_INLINED_CHUNK_DIGEST
            | r.BLOB_FEATURE_HAS_TAR_HEADER
            | r.BLOB_FEATURE_HAS_TOC
            | r.BLOB_FEATURE_CAP_TAR_TOC
        )
        table = b"".join(r.BlobChunkInfoV1Ondisk.pack(uncomp_info=u, comp_info=c) for u, c in self._ci)
        stored = codec.compress_chunk(self.compressor, table) if table else table
        ci_compressor = self.compressor if len(stored) < len(table) else "none"
        ci_offset = self._c_off
        header = r.BlobCompressionContextHeader.pack(
            s_magic=r.BLOB_CCT_MAGIC,
            s_features=features,
            s_ci_compressor=r.COMPRESSORS[ci_compressor],
            s_ci_entries=len(self._ci),
            s_ci_offset=ci_offset,
            s_ci_compressed_size=len(stored),
            s_ci_uncompressed_size=len(table),
            s_magic2=r.BLOB_CCT_MAGIC,
        )
        # blob.meta's tar member holds the table and its header; the ToC names both parts.
        self._write(stored)
        toc.append(
            self._toc_entry(
                r.TOC_ENTRY_BLOB_META, hashlib.sha256(table).digest(), ci_offset, len(stored), len(table), ci_compressor
            )
        )
        header_off = self._c_off
        self._write(header)
        self._write(tar_header(r.TOC_ENTRY_BLOB_META, len(stored) + len(header)))
        toc.append(
            self._toc_entry(r.TOC_ENTRY_BLOB_META_HEADER, hashlib.sha256(header).digest(), header_off, len(header))
        )
        section(r.TOC_ENTRY_BLOB_DIGEST, b"".join(self._digests))
        entries = b"".join(toc)
        toc_header = tar_header(r.TOC_ENTRY_BLOB_TOC, len(entries))
        self._write(entries)
        self._write(toc_header)
        self._sink.drain()
        self._sink.close()
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()
        blob_id = self._sink.sha.hexdigest()
        os.replace(self._tmp, self.directory / blob_id)
        return BlobInfo(
            blob_id=blob_id,
            blob_index=self.blob_index,
            chunk_size=self.chunk_size,
            chunk_count=len(self._ci),
            compressor=self.compressor,
            digester=self.digester,
            features=features,
            compressed_size=self._c_off,
            uncompressed_size=self._d_off,
            ci_compressor=ci_compressor,
            ci_offset=ci_offset,
            ci_compressed_size=len(stored),
            ci_uncompressed_size=len(table),
            blob_toc_size=len(entries) + len(toc_header),
            blob_toc_digest=hashlib.sha256(entries + toc_header).digest(),
        )

    @staticmethod
    def _toc_entry(
        name: bytes, digest: bytes, offset: int, c_size: int, d_size: int | None = None, compressor: str = "none"
    ) -> bytes:
        return r.TocEntry.pack(
            flags=r.TOC_FLAG_COMPRESSORS[compressor],
            name=name,
            uncompressed_digest=digest,
            compressed_offset=offset,
            compressed_size=c_size,
            uncompressed_size=c_size if d_size is None else d_size,
        )

"""Reading a Nydus data blob: its ToC, chunk-info table and digests (:class:`BlobMeta`), and its chunks
(:func:`read_chunks`: one ranged read over adjacent chunks, then verify and decompress each).

Layout (``storage/src/meta/``, ``docs/format.md`` §9.1), each tar header *after* its payload::

    [chunks][hdr image.blob][chunk-info table][4K CCT header][hdr blob.meta]
    [digests 32B*N][hdr blob.digest][ToC 128B*k][hdr rafs.blob.toc]

Everything read from the blob is untrusted: sizes are checked against the blob's real size and the format's
limits before anything is allocated, and every failure is an :class:`~erofs.errors.ImageError` (a
:class:`~erofs.errors.DigestMismatchError` for content that does not match its digest) naming the blob.
"""

from __future__ import annotations

import bisect
import hashlib
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from erofs.codec import chunk_digest, decompress
from erofs.errors import BackendError, DigestMismatchError, ImageError
from erofs.format import rafs_v6 as rv
from erofs.format.rafs_v6 import BlobInfo, compressor_name
from erofs.reader.backend import BlobBackend
from erofs.reader.bootstrap import Bootstrap

MAX_CHUNK_SIZE = rv.RAFS_MAX_CHUNK_SIZE  # 16 MiB: no chunk, compressed or not, may claim more
MAX_TOC_SIZE = 64 * 1024
MAX_READ_SPAN = 32 << 20  # one ranged read covers at most this many bytes
MAX_READ_GAP = 64 << 10  # chunks closer than this share one ranged read
_TAR = rv.TAR_BLOCK_SIZE
_CI = struct.Struct("<QQ")
_MASK_D_OFF = 0xFFF_FFFF_F000
_MASK_C_OFF = 0xFF_FFFF_FFFF
_TOC_FLAG_COMPRESSORS = {flag: name for name, flag in rv.TOC_FLAG_COMPRESSORS.items()}


@dataclass(frozen=True, slots=True)
class TocEntry:
    name: str
    flags: int
    digest: bytes
    compressed_offset: int
    compressed_size: int
    uncompressed_size: int


def _tar_name_and_size(hdr: bytes | memoryview) -> tuple[bytes, int]:
    """(member name, payload size) of a 512-byte tar header, its checksum verified."""
    hdr = bytes(hdr)
    stored = hdr[148:156].split(b"\0", 1)[0].strip()
    try:
        want = int(stored or b"x", 8)
        size = int(hdr[124:136].split(b"\0", 1)[0].strip() or b"0", 8)
    except ValueError:
        raise ImageError("tar header: bad checksum or size field") from None
    if sum(hdr[:148]) + 8 * 32 + sum(hdr[156:]) != want:
        raise ImageError("tar header: checksum mismatch")
    return hdr[:100].split(b"\0", 1)[0], size


def _decompress(compressor: str, data: bytes | memoryview, size: int, what: str) -> bytes:
    try:
        return decompress(compressor, data, size)
    except ImageError as e:
        raise ImageError(f"{what}: {e}") from None


class BlobMeta:
    """A blob's chunk-info table, digests and ToC, read and verified through a :class:`BlobBackend`.

    ``chunk(ci)`` → (c_off, c_size, d_off, d_size); ``digest(ci)``; ``chunks_for_range(off, len)`` maps an
    uncompressed range to chunk indexes; ``decode_chunk(ci, raw)`` decompresses and verifies one chunk.
    """

    def __init__(
        self,
        blob_id: str,
        *,
        size: int,
        chunk_count: int,
        compressor: str,
        digester: str,
        ci_table: bytes,
        digests: bytes | None,
        data_end: int,
        uncompressed_size: int | None,
        toc: dict[str, TocEntry] | None,
        info: BlobInfo | None = None,
    ) -> None:
        self.blob_id = blob_id
        self.size = size
        self.chunk_count = chunk_count
        self.compressor = compressor
        self.digester = digester
        self._ci = ci_table
        self.digests = digests
        self.data_end = data_end
        self.uncompressed_size = uncompressed_size
        self.toc = toc
        self.info = info
        self._order: list[int] | None = None
        self._d_offs: list[int] | None = None

    # -- loading ------------------------------------------------------------------------------------------------
    @classmethod
    def load(cls, backend: BlobBackend, blob: BlobInfo, bootstrap: Bootstrap | None = None) -> BlobMeta:
        """Read and verify the metadata of ``blob`` (a blob-table entry).

        The ToC (when the blob has one) is checked against ``blob_toc_digest`` and each section against its ToC
        digest; the chunk-info table against its CCT header and the blob-table entry.  Digests come from the
        ``blob.digest`` section, else from ``bootstrap``'s chunk table.
        """
        bid = blob.blob_id
        size = backend.size(bid)
        what = f"blob {bid}"
        n = blob.chunk_count
        if n > rv.RAFS_MAX_CHUNKS_PER_BLOB or n > size:
            raise ImageError(f"{what}: chunk_count {n} is impossible for a {size}-byte blob")
        if not 4096 <= blob.chunk_size <= MAX_CHUNK_SIZE or blob.chunk_size & (blob.chunk_size - 1):
            raise ImageError(f"{what}: chunk_size {blob.chunk_size} is not a power of two in 4K..16M")
        if blob.features & (rv.BLOB_FEATURE_CHUNK_INFO_V2 | rv.BLOB_FEATURE_ZRAN | rv.BLOB_FEATURE_BATCH):
            raise ImageError(f"{what}: chunk-info v2 / zran / batch blobs are not supported")
        if blob.features & rv.BLOB_FEATURE_ENCRYPTED:
            raise ImageError(f"{what}: encrypted blobs are not supported")

        toc = cls._read_toc(backend, blob, size) if (blob.has_toc or blob.blob_toc_size) else None
        toc_start = size if toc is None else size - _TAR - 128 * len(toc)

        def read_section(name: str, off: int, c_size: int, d_size: int) -> bytes:
            if off < 0 or c_size < 0 or off + c_size > toc_start:
                raise ImageError(f"{what}: {name} at {off}+{c_size} is outside the blob ({size} bytes)")
            if c_size > 16 * n + 4096 + 32 * n + 4096 or d_size > 16 * n + 4096 + 32 * n:
                raise ImageError(f"{what}: {name} claims an implausible size ({c_size} -> {d_size})")
            raw = backend.read(bid, off, c_size)
            if len(raw) != c_size:
                raise BackendError(f"{what}: short read of {name}")
            return raw

        def section(name: str, off: int, c_size: int, d_size: int, compressor: str) -> bytes:
            raw = read_section(name, off, c_size, d_size)
            if compressor == "none" or c_size == d_size:
                return raw
            return _decompress(compressor, raw, d_size, f"{what}: {name}")

        def toc_section(name: str, d_size: int, fallback_compressor: str) -> bytes | None:
            e = toc.get(name) if toc else None
            if e is None:
                return None
            if e.uncompressed_size != d_size:
                raise ImageError(f"{what}: ToC entry {name} has size {e.uncompressed_size}, expected {d_size}")
            comp = _TOC_FLAG_COMPRESSORS.get(e.flags & 0x7, fallback_compressor)
            if comp == "none" and e.compressed_size != d_size:
                comp = fallback_compressor
            raw = read_section(name, e.compressed_offset, e.compressed_size, d_size)
            data = raw if comp == "none" or len(raw) == d_size else _decompress(comp, raw, d_size, f"{what}: {name}")
            if any(e.digest) and e.digest not in (hashlib.sha256(data).digest(), hashlib.sha256(raw).digest()):
                raise DigestMismatchError(f"{what}: ToC section {name} does not match its digest")
            return data

        # CCT header: from the ToC, else right after the chunk-info table (blob table's ci_offset)
        header = toc_section("blob.meta.header", rv.BLOB_CCT_HEADER_SIZE, "none")
        if header is None:
            header = section(
                "chunk-info header",
                blob.ci_offset + blob.ci_compressed_size,
                rv.BLOB_CCT_HEADER_SIZE,
                rv.BLOB_CCT_HEADER_SIZE,
                "none",
            )
        h = rv.BlobCompressionContextHeader.unpack(header)
        if h.s_magic != rv.BLOB_CCT_MAGIC or h.s_magic2 != rv.BLOB_CCT_MAGIC:
            raise ImageError(f"{what}: chunk-info header has bad magic {h.s_magic:#x}/{h.s_magic2:#x}")
        if h.s_ci_entries != n:
            raise ImageError(f"{what}: chunk-info header says {h.s_ci_entries} chunks, blob table {n}")
        if h.s_ci_uncompressed_size != 16 * n or blob.ci_uncompressed_size != 16 * n:
            raise ImageError(
                f"{what}: chunk-info table is {h.s_ci_uncompressed_size} bytes (header) / "
                f"{blob.ci_uncompressed_size} (blob table), expected {16 * n} for {n} v1 entries"
            )
        if (h.s_ci_offset, h.s_ci_compressed_size) != (blob.ci_offset, blob.ci_compressed_size):
            raise ImageError(
                f"{what}: chunk-info header places the table at {h.s_ci_offset}+{h.s_ci_compressed_size}, "
                f"the blob table at {blob.ci_offset}+{blob.ci_compressed_size}"
            )
        ci_comp = compressor_name(h.s_ci_compressor)
        table = toc_section("blob.meta", 16 * n, ci_comp)
        if table is None:
            table = section("chunk-info table", blob.ci_offset, blob.ci_compressed_size, 16 * n, ci_comp)
        if len(table) != 16 * n:
            raise ImageError(f"{what}: chunk-info table is {len(table)} bytes, expected {16 * n}")

        digests = toc_section("blob.digest", 32 * n, "none")
        if digests is None and bootstrap is not None and bootstrap.chunk_table:
            buf = bytearray(32 * n)
            have = 0
            for c in bootstrap.chunk_table:
                if c.blob_index == blob.blob_index and c.index < n:
                    buf[32 * c.index : 32 * c.index + 32] = c.digest
                    have += 1
            digests = bytes(buf) if have else None
        data_end = blob.ci_offset if blob.ci_offset else toc_start
        return cls(
            bid,
            size=size,
            chunk_count=n,
            compressor=blob.compressor,
            digester=blob.digester,
            ci_table=table,
            digests=digests,
            data_end=min(data_end, toc_start),
            uncompressed_size=blob.uncompressed_size,
            toc=toc,
            info=blob,
        )

    @staticmethod
    def _read_toc(backend: BlobBackend, blob: BlobInfo, size: int) -> dict[str, TocEntry]:
        what = f"blob {blob.blob_id}"
        if size < _TAR:
            raise ImageError(f"{what}: {size} bytes is too small to hold a ToC")
        want = blob.blob_toc_size or 4096
        if blob.blob_toc_size and (blob.blob_toc_size > MAX_TOC_SIZE or (blob.blob_toc_size - _TAR) % 128):
            raise ImageError(f"{what}: blob_toc_size {blob.blob_toc_size} is invalid")
        want = min(want, size)
        tail = backend.read(blob.blob_id, size - want, want)
        try:
            name, ent_len = _tar_name_and_size(tail[-_TAR:])
        except ImageError as e:
            raise ImageError(f"{what}: ToC {e}") from None
        if name != rv.TOC_ENTRY_BLOB_TOC:
            raise ImageError(f"{what}: last tar header is {name!r}, not the ToC ({rv.TOC_ENTRY_BLOB_TOC.decode()})")
        if ent_len % 128 or ent_len > MAX_TOC_SIZE or ent_len + _TAR > size:
            raise ImageError(f"{what}: ToC size {ent_len} is invalid")
        if ent_len + _TAR > len(tail):
            tail = backend.read(blob.blob_id, size - ent_len - _TAR, ent_len + _TAR)
        toc_bytes = tail[len(tail) - ent_len - _TAR :]
        if blob.blob_toc_size and blob.blob_toc_size != len(toc_bytes):
            raise ImageError(f"{what}: ToC is {len(toc_bytes)} bytes, the blob table says {blob.blob_toc_size}")
        if blob.blob_toc_digest is not None and hashlib.sha256(toc_bytes).digest() != blob.blob_toc_digest:
            raise DigestMismatchError(f"{what}: ToC does not match blob_toc_digest in the bootstrap")
        out: dict[str, TocEntry] = {}
        for i in range(ent_len // 128):
            e = rv.TocEntry.unpack(toc_bytes, 128 * i)
            ename = e.name.split(b"\0", 1)[0].decode("ascii", "backslashreplace")
            out[ename] = TocEntry(
                ename, e.flags, e.uncompressed_digest, e.compressed_offset, e.compressed_size, e.uncompressed_size
            )
        return out

    # -- chunks -------------------------------------------------------------------------------------------------
    def chunk(self, ci: int) -> tuple[int, int, int, int]:
        """(compressed offset, compressed size, uncompressed offset, uncompressed size) of chunk ``ci``."""
        if not 0 <= ci < self.chunk_count:
            raise ImageError(f"blob {self.blob_id}: chunk {ci} is out of range ({self.chunk_count} chunks)")
        uncomp, comp = _CI.unpack_from(self._ci, ci * 16)
        return rv.chunk_info_v1_decode(uncomp, comp)

    def digest(self, ci: int) -> bytes | None:
        if self.digests is None:
            return None
        d = self.digests[32 * ci : 32 * ci + 32]
        return d if any(d) else None

    def _sorted(self) -> tuple[list[int], list[int]]:
        if self._order is None:
            pairs = sorted((self.chunk(ci)[2], ci) for ci in range(self.chunk_count))
            self._d_offs = [p[0] for p in pairs]
            self._order = [p[1] for p in pairs]
        assert self._d_offs is not None
        return self._d_offs, self._order

    def find(self, d_off: int) -> int | None:
        """The chunk starting at uncompressed offset ``d_off``, if any."""
        d_offs, order = self._sorted()
        i = bisect.bisect_left(d_offs, d_off)
        return order[i] if i < len(d_offs) and d_offs[i] == d_off else None

    def chunks_for_range(self, offset: int, length: int) -> list[int]:
        """Chunk indexes (in uncompressed order) whose uncompressed extent meets ``[offset, offset+length)``."""
        d_offs, order = self._sorted()
        end = offset + length
        i = max(bisect.bisect_right(d_offs, offset) - 1, 0)
        out = []
        while i < len(d_offs) and d_offs[i] < end:
            ci = order[i]
            _, _, d_off, d_size = self.chunk(ci)
            if d_off + d_size > offset:
                out.append(ci)
            i += 1
        return out

    def decode_chunk(self, ci: int, raw: bytes | memoryview) -> memoryview:
        """Decompress (if stored compressed) and verify chunk ``ci`` from its stored bytes."""
        c_off, c_size, d_off, d_size = self.chunk(ci)
        if len(raw) != c_size:
            raise ImageError(f"blob {self.blob_id}: chunk {ci}: got {len(raw)} stored bytes, expected {c_size}")
        if c_size != d_size:
            where = f"blob {self.blob_id}: chunk {ci} (at {c_off})"
            data: bytes | memoryview = _decompress(self.compressor, raw, d_size, where)
        else:
            data = raw
        self.verify_chunk(ci, data)
        return memoryview(data)

    def verify_chunk(self, ci: int, data: bytes | memoryview) -> None:
        """DigestMismatchError unless ``data`` (chunk ``ci``'s uncompressed bytes) matches its digest; ImageError
        when the chunk has no digest or the digester is unknown."""
        c_off, c_size, _, _ = self.chunk(ci)
        want = self.digest(ci)
        if want is None:
            raise ImageError(f"blob {self.blob_id}: chunk {ci}: no digest recorded, cannot verify it")
        try:
            got = chunk_digest(self.digester, data)
        except ValueError:
            raise ImageError(f"blob {self.blob_id}: unsupported digester {self.digester}") from None
        if got != want:
            raise DigestMismatchError(
                f"blob {self.blob_id}: chunk {ci} (compressed {c_off}+{c_size}) does not match its digest "
                f"{want.hex()[:16]}…"
            )

    def check_chunk_bounds(self, ci: int) -> tuple[int, int, int, int]:
        """The chunk's info, after checking its sizes and offsets against the blob (ImageError otherwise)."""
        c_off, c_size, d_off, d_size = info = self.chunk(ci)
        if c_size > MAX_CHUNK_SIZE or d_size > MAX_CHUNK_SIZE:
            raise ImageError(f"blob {self.blob_id}: chunk {ci} claims {c_size}/{d_size} bytes (limit 16 MiB)")
        if c_off + c_size > self.data_end:
            raise ImageError(
                f"blob {self.blob_id}: chunk {ci} at {c_off}+{c_size} is past the chunk data ({self.data_end} bytes)"
            )
        if self.uncompressed_size is not None and d_off + d_size > self.uncompressed_size:
            raise ImageError(
                f"blob {self.blob_id}: chunk {ci} at uncompressed {d_off}+{d_size} is past the blob's "
                f"uncompressed size {self.uncompressed_size}"
            )
        return info

    def __repr__(self) -> str:
        return f"<BlobMeta {self.blob_id[:12]} {self.chunk_count} chunks {self.compressor}/{self.digester}>"


def chunk_table_mismatches(meta: BlobMeta, bootstrap: Bootstrap, blob_index: int) -> Iterator[tuple[int, str]]:
    """(chunk index, what differs) for each entry of ``bootstrap``'s chunk table for blob ``blob_index`` that the
    blob's own chunk-info table (offsets, sizes) or digest table contradicts.  Entries for chunks the blob does
    not have are left to the caller."""
    for c in bootstrap.chunk_table:
        if c.blob_index != blob_index or c.index >= meta.chunk_count:
            continue
        ours = (c.compressed_offset, c.compressed_size, c.uncompressed_offset, c.uncompressed_size)
        if ours != meta.chunk(c.index):
            yield c.index, "bootstrap chunk table entry does not match the blob's chunk-info table"
        d = meta.digest(c.index)
        if d is not None and d != c.digest:
            yield c.index, "bootstrap chunk digest does not match the blob's digest table"


def check_chunk_table(meta: BlobMeta, bootstrap: Bootstrap, blob_index: int) -> None:
    """ImageError unless the blob's chunk-info table agrees with ``bootstrap``'s chunk table entry by entry.

    Needed before serving a blob whose chunk-info table no digest in the bootstrap covers (no ``blob_toc_digest``:
    images from before upstream 2.2): each chunk is verified against its own digest, so a blob source that
    swapped two chunk-info entries would otherwise have the swapped, individually valid chunks served at each
    other's offsets."""
    for ci, what in chunk_table_mismatches(meta, bootstrap, blob_index):
        raise ImageError(f"blob {meta.blob_id}: chunk {ci}: {what}")


def plan_reads(
    meta: BlobMeta, ci_indexes: Iterable[int], max_span: int = MAX_READ_SPAN
) -> Iterator[tuple[int, int, list[int]]]:
    """Group chunks into ranged reads: (start, length, [ci...]) with chunks in the given order, each group's
    compressed extents ascending and at most MAX_READ_GAP apart, spanning at most ``max_span`` bytes (a single
    chunk may exceed it)."""
    start = end = -1
    group: list[int] = []
    for ci in ci_indexes:
        c_off, c_size, _, _ = meta.check_chunk_bounds(ci)
        if group and end <= c_off <= end + MAX_READ_GAP and c_off + c_size - start <= max_span:
            end = c_off + c_size
            group.append(ci)
            continue
        if group:
            yield start, end - start, group
        start, end, group = c_off, c_off + c_size, [ci]
    if group:
        yield start, end - start, group


def read_chunks(backend: BlobBackend, meta: BlobMeta, ci_indexes: Iterable[int]) -> Iterator[memoryview]:
    """Fetch → verify → decompress: the uncompressed bytes of each chunk in ``ci_indexes``, in that order.

    Adjacent chunks share one ranged read.  Raises DigestMismatchError naming the blob and chunk on damage.
    """
    for start, length, group in plan_reads(meta, ci_indexes):
        buf = backend.read(meta.blob_id, start, length)
        if len(buf) != length:
            raise BackendError(f"blob {meta.blob_id}: short read at {start}: {len(buf)} of {length} bytes")
        view = memoryview(buf)
        for ci in group:
            c_off, c_size, _, _ = meta.chunk(ci)
            yield meta.decode_chunk(ci, view[c_off - start : c_off - start + c_size])

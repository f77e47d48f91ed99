"""Structural validation of a bootstrap and, given its blobs, end-to-end verification of every chunk.

The rules are the kernel's (``fs/erofs``: superblock, inode formats, sorted dirents, nid bounds, inline
tails) and upstream Nydus's (``RafsV6SuperBlockExt::validate``, blob table, device table vs blob table,
chunk indexes inside their blob, chunk table vs chunk-info table); given the blobs, each blob's sha256 against
its id (a blob id is the digest of the blob's bytes: a blob named by another's id is not that blob).
:func:`check_image` never raises for a damaged image: it returns a :class:`CheckReport` whose problems each name
the path (and chunk) they concern.
"""

from __future__ import annotations

import hashlib
import os
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from erofs.errors import BackendError, ImageError, NydusErofsError, UnsupportedImageError
from erofs.format import erofs_fs as fs
from erofs.format import rafs_v6 as rv
from erofs.reader.backend import BlobBackend
from erofs.reader.blob import BlobMeta, chunk_table_mismatches, plan_reads
from erofs.reader.bootstrap import Bootstrap
from erofs.reader.data import ImageReader
from erofs.reader.prefetch import prefetch_problems
from erofs.reader.records import Inode, file_type_of_mode


@dataclass
class Problem:
    message: str
    path: str | None = None
    blob: str | None = None
    chunk: int | None = None

    def __str__(self) -> str:
        where = []
        if self.path:
            where.append(self.path)
        if self.chunk is not None:
            where.append(f"chunk {self.chunk}" + (f" of blob {self.blob}" if self.blob else ""))
        elif self.blob:
            where.append(f"blob {self.blob}")
        return (": ".join(where) + ": " if where else "") + self.message

    def to_json(self) -> dict[str, Any]:
        return {"path": self.path, "blob": self.blob, "chunk": self.chunk, "message": self.message}


@dataclass
class CheckReport:
    bootstrap: str
    problems: list[Problem] = field(default_factory=list)
    inodes: int = 0
    files: int = 0
    directories: int = 0
    blobs_checked: int = 0
    chunks_verified: int = 0
    bytes_verified: int = 0  # uncompressed bytes digest-checked
    bytes_read: int = 0  # compressed bytes fetched

    @property
    def ok(self) -> bool:
        return not self.problems

    def add(self, message: str, path: str | None = None, blob: str | None = None, chunk: int | None = None) -> None:
        self.problems.append(Problem(message, path, blob, chunk))

    def to_json(self) -> dict[str, Any]:
        return {
            "bootstrap": self.bootstrap,
            "ok": self.ok,
            "problems": [p.to_json() for p in self.problems],
            "inodes": self.inodes,
            "files": self.files,
            "directories": self.directories,
            "blobs_checked": self.blobs_checked,
            "chunks_verified": self.chunks_verified,
            "bytes_verified": self.bytes_verified,
            "bytes_read": self.bytes_read,
        }


def _msg(e: BaseException) -> str:
    return str(e) if isinstance(e, NydusErofsError) else f"{type(e).__name__}: {e}"


def _pow2_in(v: int, lo: int, hi: int) -> bool:
    return lo <= v <= hi and v & (v - 1) == 0


def check_image(
    bootstrap: str | os.PathLike[str] | Bootstrap,
    backend: BlobBackend | None = None,
    *,
    progress: Callable[[int], None] | None = None,
) -> CheckReport:
    """Validate ``bootstrap``; with ``backend`` also read, verify and decompress every chunk of every blob.

    ``progress`` (if given) is called with the number of compressed bytes read after each ranged read.
    """
    name = bootstrap.path if isinstance(bootstrap, Bootstrap) else os.fspath(bootstrap)
    report = CheckReport(str(name))
    if isinstance(bootstrap, Bootstrap):
        bs = bootstrap
    else:
        try:
            bs = Bootstrap(bootstrap, verify_checksum=False)
        except UnsupportedImageError:
            raise  # not damage: nothing to check
        except ImageError as e:
            report.add(_msg(e))
            return report
    try:
        _Checker(bs, backend, report, progress).run()
    finally:
        if not isinstance(bootstrap, Bootstrap):
            bs.close()
    return report


class _Checker:
    def __init__(
        self, bs: Bootstrap, backend: BlobBackend | None, report: CheckReport, progress: Callable[[int], None] | None
    ) -> None:
        self.bs = bs
        self.backend = backend
        self.r = report
        self.progress = progress
        # (blob_index, ci) -> (path, file_offset, blob_offset, length) of the first reference
        self.refs: dict[tuple[int, int], list[tuple[str, int, int, int]]] = {}
        self.plain_files: list[tuple[str, Inode]] = []
        self.plain_nids: set[int] = set()
        try:
            self.table = bs.chunk_table
        except ImageError:
            self.table = []  # reported by rafs_tables()

    def run(self) -> None:
        self.superblock()
        if self.bs.is_rafs:
            self.rafs_tables()
        self.tree()
        if self.bs.is_rafs:
            for problem in prefetch_problems(self.bs):
                self.r.add(problem)
        if self.backend is not None:
            self.data()

    # -- superblock and tables --------------------------------------------------------------------------------
    def superblock(self) -> None:
        bs, sb, add = self.bs, self.bs.sb, self.r.add
        if bs.checksum_ok is False:
            add("superblock: checksum does not match (the kernel refuses to mount this image)")
        if bs.size % bs.blksz:
            add(f"superblock: image size {bs.size} is not a multiple of the block size {bs.blksz}")
        if sb.dirblkbits:
            add(f"superblock: dirblkbits {sb.dirblkbits} must be 0")
        if 0 not in sb.volume_name:
            add("superblock: volume_name has no NUL terminator (the kernel rejects it)")
        if sb.feature_incompat & (fs.EROFS_FEATURE_INCOMPAT_ZERO_PADDING | fs.EROFS_FEATURE_INCOMPAT_COMPR_CFGS):
            add("superblock: compression features are set, but compressed images are not supported")
        if sb.extra_devices and not sb.feature_incompat & fs.EROFS_FEATURE_INCOMPAT_DEVICE_TABLE:
            add(f"superblock: extra_devices is {sb.extra_devices} but the DEVICE_TABLE feature is not set")
        if bs.devices:
            devt = sb.devt_slotoff * fs.EROFS_DEVT_SLOT_SIZE
            if devt < fs.EROFS_SUPER_OFFSET + fs.erofs_super_block.size + 16 * sb.sb_extslots:
                add(f"superblock: device table at {devt} overlaps the superblock")
        try:
            root = bs.root
            if not root.is_dir:
                add(f"superblock: root nid {bs.root_nid} is not a directory")
        except ImageError as e:
            add(f"superblock: root nid {bs.root_nid}: {_msg(e)}")

    def rafs_tables(self) -> None:
        bs, add = self.bs, self.r.add
        ext, sb = bs.ext, bs.sb
        flags = ext.s_flags
        if bs.blkszbits != 12:
            add(f"superblock: RAFS v6 needs 4096-byte blocks, not {bs.blksz}")
        # what upstream nydus (RafsV6SuperBlock validation) insists on, beyond the kernel
        if sb.checksum != 0:
            add(f"superblock: checksum {sb.checksum:#x} is not 0 (upstream nydus rejects RAFS v6 images with one)")
        want_incompat = fs.EROFS_FEATURE_INCOMPAT_CHUNKED_FILE | fs.EROFS_FEATURE_INCOMPAT_DEVICE_TABLE
        if sb.feature_incompat != want_incompat:
            add(
                f"superblock: feature_incompat is {sb.feature_incompat:#x}; upstream nydus accepts only "
                f"{want_incompat:#x} (chunked_file|device_table)"
            )
        if sb.xattr_blkaddr:
            add("superblock: shared xattrs (xattr_blkaddr) are not part of RAFS v6; upstream nydus ignores them")
        comp = [n for n, b in rv.COMPRESSOR_SUPER_FLAGS.items() if flags & b]
        digs = [n for n, b in rv.DIGESTER_SUPER_FLAGS.items() if flags & b]
        if len(comp) != 1:
            add(f"extended superblock: flags {flags:#x} name {len(comp)} compressors, need exactly one")
        if len(digs) != 1:
            add(f"extended superblock: flags {flags:#x} name {len(digs)} digesters, need exactly one")
        if not _pow2_in(ext.s_chunk_size, rv.RAFS_MIN_CHUNK_SIZE, rv.RAFS_MAX_CHUNK_SIZE):
            add(f"extended superblock: chunk_size {ext.s_chunk_size} is not a power of two in 4K..16M")
        tables = [
            ("blob table", ext.s_blob_table_offset, ext.s_blob_table_size),
            ("chunk table", ext.s_chunk_table_offset, ext.s_chunk_table_size),
            ("prefetch table", ext.s_prefetch_table_offset, ext.s_prefetch_table_size),
        ]
        spans = []
        for tname, off, size in tables:
            if size == 0:
                continue
            if off % 4096 and tname != "prefetch table":
                add(f"extended superblock: {tname} offset {off} is not 4K-aligned")
            if off + size > bs.size:
                add(f"extended superblock: {tname} at {off}+{size} is past the end of the bootstrap ({bs.size})")
            spans.append((off, off + size, tname))
        spans.sort()
        for (_, e1, n1), (s2, _, n2) in zip(spans, spans[1:], strict=False):
            if s2 < e1:
                add(f"extended superblock: {n1} overlaps the {n2}")
        if ext.s_chunk_table_size % rv.RafsV5ChunkInfo.size:
            add(f"chunk table: size {ext.s_chunk_table_size} is not a multiple of 80")
        # device table vs blob table
        if not sb.feature_incompat & fs.EROFS_FEATURE_INCOMPAT_CHUNKED_FILE and bs.blobs:
            add("superblock: CHUNKED_FILE feature is not set")
        if len(bs.devices) != len(bs.blobs):
            add(f"device table has {len(bs.devices)} slots, the blob table {len(bs.blobs)} blobs")
        for dev, blob in zip(bs.devices, bs.blobs, strict=False):
            if dev.tag != blob.blob_id:
                add(f"device {dev.index + 1}: tag {dev.tag!r} is not the blob id {blob.blob_id}", blob=blob.blob_id)
            want = -(-blob.uncompressed_size // 4096)
            if dev.blocks != want:
                add(
                    f"device {dev.index + 1}: {dev.blocks} blocks, but the blob is {blob.uncompressed_size} "
                    f"bytes uncompressed ({want} blocks)",
                    blob=blob.blob_id,
                )
        for blob in bs.blobs:
            bid = blob.blob_id
            recorded = bs.blob_table_index(blob.blob_index)
            if recorded != blob.blob_index:
                add(f"blob table entry {blob.blob_index} says blob_index {recorded}", blob=bid)
            if not bid or any(ch not in "0123456789abcdef" for ch in bid) or len(bid) != 64:
                add(f"blob id {bid!r} is not a sha256 hex digest", blob=bid)
            if not _pow2_in(blob.chunk_size, rv.RAFS_MIN_CHUNK_SIZE, rv.RAFS_MAX_CHUNK_SIZE):
                add(f"blob chunk_size {blob.chunk_size} is not a power of two in 4K..16M", blob=bid)
            if blob.chunk_count > rv.RAFS_MAX_CHUNKS_PER_BLOB:
                add(f"blob chunk_count {blob.chunk_count} exceeds 2^24", blob=bid)
            if blob.ci_uncompressed_size != 16 * blob.chunk_count:
                add(
                    f"ci_uncompressed_size {blob.ci_uncompressed_size} is not 16 x chunk_count ({blob.chunk_count})",
                    blob=bid,
                )
            if blob.compressor not in rv.COMPRESSORS or blob.digester not in rv.DIGESTERS:
                add(f"unknown compressor/digester {blob.compressor}/{blob.digester}", blob=bid)
            if blob.uncompressed_size % 4096:
                add(f"uncompressed_size {blob.uncompressed_size} is not 4K-aligned", blob=bid)
        try:
            table = bs.chunk_table
        except ImageError as e:
            add(_msg(e))
            return
        seen: set[tuple[int, int]] = set()
        for i, c in enumerate(table):
            if not 0 <= c.blob_index < len(bs.blobs):
                add(f"chunk table entry {i}: blob_index {c.blob_index} is not in the blob table")
                continue
            blob = bs.blobs[c.blob_index]
            if c.index >= blob.chunk_count:
                add(f"chunk table entry {i}: index {c.index} >= chunk_count {blob.chunk_count}", blob=blob.blob_id)
            if (c.blob_index, c.index) in seen:
                add(f"chunk table entry {i}: chunk listed twice", blob=blob.blob_id, chunk=c.index)
            seen.add((c.blob_index, c.index))
            if c.uncompressed_offset % 4096 or c.uncompressed_offset + c.uncompressed_size > blob.uncompressed_size:
                add(
                    f"chunk table entry {i}: uncompressed {c.uncompressed_offset}+{c.uncompressed_size} is not "
                    f"aligned or outside the blob ({blob.uncompressed_size})",
                    blob=blob.blob_id,
                    chunk=c.index,
                )
            if bool(c.flags & rv.BLOB_CHUNK_FLAG_COMPRESSED) != (c.compressed_size != c.uncompressed_size):
                add(
                    f"chunk table entry {i}: COMPRESSED flag disagrees with its sizes", blob=blob.blob_id, chunk=c.index
                )

    # -- the tree ---------------------------------------------------------------------------------------------
    def tree(self) -> None:
        bs, add = self.bs, self.r.add
        parents: dict[int, int] = {bs.root_nid: bs.root_nid}

        def on_error(path: str, e: ImageError) -> None:
            add(_msg(e), path)

        try:
            _ = bs.root
        except ImageError:
            return  # reported with the superblock
        for path, dirent, ino in bs.walk(on_error):
            self.r.inodes += 1
            if dirent is not None and dirent.file_type != file_type_of_mode(ino.mode):
                add(f"dirent type {dirent.file_type} does not match the inode mode {ino.mode:#o}", path)
            try:
                bs.xattrs(ino)
            except ImageError as e:
                add(_msg(e), path)
            if ino.is_dir:
                self.r.directories += 1
                self.directory(path, ino, parents)
            elif ino.is_symlink:
                try:
                    bs.readlink(ino)
                except ImageError as e:
                    add(_msg(e), path)
            elif ino.is_reg:
                self.r.files += 1
                self.regular(path, ino)
            elif ino.size and not ino.is_device:
                add(f"special file has size {ino.size}", path)

    def directory(self, path: str, ino: Inode, parents: dict[int, int]) -> None:
        bs, add = self.bs, self.r.add
        try:
            entries = bs.readdir(ino)
        except ImageError:
            return  # reported by walk()
        names = [d.name for d in entries]
        for a, b in zip(names, names[1:], strict=False):
            if not a < b:
                add(f"directory entries are not in strictly increasing byte order ({a!r} before {b!r})", path)
                break
        by_name = {d.name: d for d in entries}
        dot, dotdot = by_name.get(b"."), by_name.get(b"..")
        if dot is None or dot.nid != ino.nid:
            add("'.' is missing or does not point at the directory itself", path)
        parent = parents.get(ino.nid)
        if dotdot is None or (parent is not None and dotdot.nid != parent):
            add(f"'..' is missing or does not point at the parent (nid {parent})", path)
        for d in entries:
            if d.name not in (b".", b"..") and d.file_type == fs.EROFS_FT_DIR:
                parents.setdefault(d.nid, ino.nid)

    def regular(self, path: str, ino: Inode) -> None:
        bs, add = self.bs, self.r.add
        try:
            chunks = bs.file_chunks(ino)
        except ImageError as e:
            add(_msg(e), path)
            return
        for c in chunks:
            if c.blob_offset is None or c.blob_index < 0:
                continue
            if c.ci_index is None:
                if c.blob_index < len(bs.devices):
                    dev = bs.devices[c.blob_index]
                    if dev.blocks and c.blob_offset + c.length > dev.blocks * bs.blksz:
                        add(f"data at {c.blob_offset}+{c.length} is past the end of device {dev.index + 1}", path)
                if ino.nid not in self.plain_nids:
                    self.plain_nids.add(ino.nid)
                    self.plain_files.append((path, ino))
                continue
            blob = bs.blobs[c.blob_index]
            if c.ci_index >= blob.chunk_count:
                add(
                    f"chunk index {c.ci_index} is not in the blob ({blob.chunk_count} chunks)",
                    path,
                    blob.blob_id,
                    c.ci_index,
                )
                continue
            if c.blob_offset + c.length > -(-blob.uncompressed_size // 4096) * 4096:
                add(
                    f"blkaddr {c.blob_offset // 4096} is past the blob's uncompressed size {blob.uncompressed_size}",
                    path,
                    blob.blob_id,
                    c.ci_index,
                )
            if self.table:
                ct = bs.chunk_info(c.blob_index, c.ci_index)
                if ct is None:
                    add("chunk is not in the bootstrap's chunk table", path, blob.blob_id, c.ci_index)
                elif ct.uncompressed_offset != c.blob_offset:
                    add(
                        f"chunk index says uncompressed offset {c.blob_offset}, the chunk table "
                        f"{ct.uncompressed_offset}",
                        path,
                        blob.blob_id,
                        c.ci_index,
                    )
                elif ct.uncompressed_size < c.length:
                    add(
                        f"chunk holds {ct.uncompressed_size} bytes, the file needs {c.length} at offset "
                        f"{c.file_offset}",
                        path,
                        blob.blob_id,
                        c.ci_index,
                    )
            self.refs.setdefault((c.blob_index, c.ci_index), []).append((path, c.file_offset, c.blob_offset, c.length))

    # -- data -------------------------------------------------------------------------------------------------
    def _who(self, blob_index: int, ci: int) -> str | None:
        refs = self.refs.get((blob_index, ci))
        if not refs:
            return None
        path, foff, _, _ = refs[0]
        more = f" (and {len(refs) - 1} more)" if len(refs) > 1 else ""
        return f"{path} @{foff}{more}"

    def data(self) -> None:
        assert self.backend is not None
        for blob in self.bs.blobs:
            self.blob(blob.blob_index)
        if self.plain_files:
            reader = ImageReader(self.bs, self.backend)
            for path, ino in self.plain_files:
                try:
                    for _, data, n in reader.iter_file(ino):
                        self.r.bytes_read += n if data is not None else 0
                except (ImageError, BackendError) as e:
                    self.r.add(_msg(e), path)

    def blob(self, index: int) -> None:
        bs, add, backend = self.bs, self.r.add, self.backend
        assert backend is not None
        blob = bs.blobs[index]
        bid = blob.blob_id
        try:
            meta = BlobMeta.load(backend, blob, bs)
        except (ImageError, BackendError) as e:
            paths = sorted({refs[0][0] for (b, _), refs in self.refs.items() if b == index})
            users = ""
            if paths:
                users = f" (used by {paths[0]}" + (f" and {len(paths) - 1} more files)" if len(paths) > 1 else ")")
            add(_msg(e) + users, blob=None)
            return
        self.r.blobs_checked += 1
        if blob.compressed_size and meta.size < blob.compressed_size:
            add(f"blob file is {meta.size} bytes, the blob table says {blob.compressed_size}", blob=bid)
        # chunk table and file chunk indexes against the blob's own chunk-info table
        for ci, what in chunk_table_mismatches(meta, bs, index) if self.table else ():
            add(what, self._who(index, ci), bid, ci)
        for (b, ci), refs in self.refs.items():
            if b != index or ci >= meta.chunk_count:
                continue
            _, _, d_off, d_size = meta.chunk(ci)
            for path, foff, boff, length in refs:
                if boff != d_off:
                    add(f"chunk index says uncompressed offset {boff}, the blob {d_off}", path, bid, ci)
                elif d_size < length:
                    add(f"chunk holds {d_size} bytes, the file needs {length} at offset {foff}", path, bid, ci)
        # every chunk: fetch, decompress, verify
        order = []
        for ci in range(meta.chunk_count):
            try:
                c_off = meta.check_chunk_bounds(ci)[0]
            except ImageError as e:
                add(_msg(e), self._who(index, ci), bid, ci)
                continue
            order.append((c_off, ci))
        order.sort()
        workers = min(4, os.cpu_count() or 1)
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="check") as pool:
            whole = pool.submit(_blob_sha256, backend, bid, meta.size)  # beside the chunks, on one worker
            pending: deque[Future[tuple[int, list[tuple[int, str | None, int]]]]] = deque()
            for start, length, group in plan_reads(meta, [ci for _, ci in order], CHECK_READ_SPAN):
                pending.append(pool.submit(_verify_group, backend, meta, start, length, group))
                if len(pending) > 2 * workers:  # bounded read-ahead: at most ~3 x workers spans in memory
                    self._collect(index, pending.popleft().result())
            while pending:
                self._collect(index, pending.popleft().result())
            try:
                digest = whole.result()
            except BackendError as e:
                add(_msg(e), blob=bid)
            else:
                if digest != bid:
                    add(f"the blob's sha256 is {digest}, not its id: not this blob", blob=bid)

    def _collect(self, index: int, result: tuple[int, list[tuple[int, str | None, int]]]) -> None:
        read, chunks = result
        bid = self.bs.blobs[index].blob_id
        self.r.bytes_read += read
        for ci, error, d_size in chunks:
            if error is not None:
                self.r.add(error, self._who(index, ci), bid, ci)
            else:
                self.r.chunks_verified += 1
                self.r.bytes_verified += d_size
        if self.progress is not None and read:
            self.progress(read)


CHECK_READ_SPAN = 4 << 20  # smaller spans than the daemon's, so the workers share a blob evenly


def _blob_sha256(backend: BlobBackend, blob_id: str, size: int) -> str:
    """sha256 (hex) of the whole blob, read in CHECK_READ_SPAN pieces: a blob's id is the digest of its bytes."""
    h = hashlib.sha256()
    pos = 0
    while pos < size:
        piece = backend.read(blob_id, pos, min(CHECK_READ_SPAN, size - pos))
        if not piece:
            raise BackendError(f"blob {blob_id}: short read at {pos} of {size} bytes")
        h.update(piece)
        pos += len(piece)
    return h.hexdigest()


def _verify_group(
    backend: BlobBackend, meta: BlobMeta, start: int, length: int, group: list[int]
) -> tuple[int, list[tuple[int, str | None, int]]]:
    """Read one span and verify its chunks: (bytes read, [(ci, problem or None, uncompressed size)])."""
    bid = meta.blob_id
    try:
        buf = memoryview(backend.read(bid, start, length))
    except BackendError as e:
        return 0, [(ci, _msg(e), 0) for ci in group]
    out: list[tuple[int, str | None, int]] = []
    for ci in group:
        c_off, c_size, _, d_size = meta.chunk(ci)
        try:
            meta.decode_chunk(ci, buf[c_off - start : c_off - start + c_size])
        except ImageError as e:
            msg = _msg(e).removeprefix(f"blob {bid}: chunk {ci} ").removeprefix(f"blob {bid}: ")
            out.append((ci, msg, 0))
            continue
        out.append((ci, None, d_size))
    return length, out

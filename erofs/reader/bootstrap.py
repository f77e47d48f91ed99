"""Reading a bootstrap: an EROFS image, optionally with the Nydus RAFS v6 tables (blob table, chunk table).

The file is mapped read-only and every structure is bounds-checked before use: a malformed image raises
:class:`~erofs.errors.ImageError` naming what is wrong and where, never another exception.  Plain EROFS images
(mkfs.erofs, possibly with ``--blobdev`` devices) read too: no extended superblock means no blob table, and
chunks then point at devices by slot.
"""

from __future__ import annotations

import mmap
import os
import stat
import struct
from collections.abc import Callable, Iterator
from functools import cached_property
from typing import Any

from erofs.errors import ImageError, UnsupportedImageError, UsageError
from erofs.format import erofs_fs as fs
from erofs.format import rafs_v6 as rv
from erofs.format.rafs_v6 import BlobInfo
from erofs.reader.records import (
    LAYOUT_NAMES,
    ChunkInfo,
    Device,
    Dirent,
    FileChunk,
    Inode,
    erofs_superblock_csum,
    file_type_of_mode,
)

_NULL = fs.EROFS_NULL_ADDR
_MAX_DIR_DEPTH = 4096


def _cstr(raw: bytes) -> bytes:
    return raw.split(b"\0", 1)[0]



def _name_str(name: bytes) -> str:
    return os.fsdecode(name)


_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_CHUNK_INDEX = struct.Struct("<HHI")
_DIRENT = struct.Struct("<QHBB")
_XATTR_ENTRY = struct.Struct("<BBH")


# ---------------------------------------------------------------------------------------------------------------


class Bootstrap:
    """A bootstrap (EROFS image) opened read-only.

    ``Bootstrap(path)`` maps the file; ``Bootstrap.from_bytes(data)`` reads an in-memory image.  With
    ``verify_checksum`` (default) a bad superblock crc raises ImageError; :mod:`erofs.reader.check` opens with it
    off and reports it instead.
    """

    def __init__(self, path: str | os.PathLike[str], *, verify_checksum: bool = True) -> None:
        self.path = os.fspath(path)
        fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)  # a FIFO must not block the open
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise UsageError(f"{self.path}: not a regular file")
            size = st.st_size
            if size < fs.EROFS_SUPER_OFFSET + fs.erofs_super_block.size:
                raise ImageError(f"{self.path}: {size} bytes is too small for an EROFS image")
            self._mmap: mmap.mmap | None = mmap.mmap(fd, size, prot=mmap.PROT_READ)
        finally:
            os.close(fd)
        self._init(memoryview(self._mmap), verify_checksum)

    @classmethod
    def from_bytes(cls, data: bytes | bytearray | memoryview, *, verify_checksum: bool = True) -> Bootstrap:
        self = cls.__new__(cls)
        self.path = "<bytes>"
        self._mmap = None
        if len(data) < fs.EROFS_SUPER_OFFSET + fs.erofs_super_block.size:
            raise ImageError(f"{len(data)} bytes is too small for an EROFS image")
        self._init(memoryview(data).cast("B") if not isinstance(data, bytes) else memoryview(data), verify_checksum)
        return self

    # -- lifecycle ----------------------------------------------------------------------------------------------
    def close(self) -> None:
        self.data = memoryview(b"")
        if self._mmap is not None:
            try:
                self._mmap.close()
            except BufferError:  # a caller still holds a view; the mapping goes with it
                pass
            self._mmap = None

    def __enter__(self) -> Bootstrap:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- superblock ---------------------------------------------------------------------------------------------
    def _init(self, data: memoryview, verify_checksum: bool) -> None:
        self.data = data
        self.size = len(data)
        sb = fs.erofs_super_block.unpack(data, fs.EROFS_SUPER_OFFSET)
        self.sb = sb
        if sb.magic != fs.EROFS_SUPER_MAGIC_V1:
            raise ImageError(f"superblock: bad magic {sb.magic:#010x} (not an EROFS image)")
        if not 9 <= sb.blkszbits <= 16:
            raise ImageError(f"superblock: unsupported block size 2^{sb.blkszbits}")
        self.blkszbits = sb.blkszbits
        self.blksz = 1 << sb.blkszbits
        self.checksum_ok: bool | None = None
        if sb.feature_compat & fs.EROFS_FEATURE_COMPAT_SB_CHKSUM:
            want = erofs_superblock_csum(data[: max(self.blksz, fs.EROFS_SUPER_OFFSET * 2)], sb.blkszbits)
            self.checksum_ok = want == sb.checksum
            if verify_checksum and not self.checksum_ok:
                raise ImageError(f"superblock: checksum {sb.checksum:#010x} does not match the content ({want:#010x})")
        unknown = sb.feature_incompat & ~fs.EROFS_ALL_FEATURE_INCOMPAT_6_12
        if unknown:
            raise ImageError(f"superblock: unsupported feature_incompat bits {unknown:#x}")
        if sb.feature_incompat & (fs.EROFS_FEATURE_INCOMPAT_ZERO_PADDING | fs.EROFS_FEATURE_INCOMPAT_COMPR_CFGS):
            raise UnsupportedImageError(f"{self.path}: not a Nydus image: compressed EROFS is not supported")
        self.meta_base = sb.meta_blkaddr * self.blksz
        if self.meta_base >= self.size:
            raise ImageError(f"superblock: meta_blkaddr {sb.meta_blkaddr} is past the end of the image")
        self.root_nid = sb.root_nid
        self.build_time = fs.erofs_time_decode(sb.build_time)  # the time of every compact inode
        self.is_rafs = bool(sb.feature_compat & rv.EROFS_FEATURE_COMPAT_RAFS_V6)
        self.devices = self._read_devices()
        self.device_mask = 0
        if sb.feature_incompat & fs.EROFS_FEATURE_INCOMPAT_DEVICE_TABLE:
            n = len(self.devices) + 1
            self.device_mask = (1 << (n - 1).bit_length()) - 1
        self.ext = None
        self.blobs: list[BlobInfo] = []
        if self.is_rafs:
            self.ext = self._struct(rv.RafsV6SuperBlockExt, rv.RAFSV6_SUPER_EXT_OFFSET, "RAFS v6 extended superblock")
            self.blobs = self._read_blobs()
        self._long_prefixes: list[tuple[int, bytes]] | None = None

    def _struct(self, cs: Any, off: int, what: str) -> Any:
        if off < 0 or off + cs.size > self.size:
            raise ImageError(f"{what}: {cs.size} bytes at offset {off} are past the end of the bootstrap ({self.size})")
        return cs.unpack(self.data, off)

    def _span(self, off: int, length: int, what: str) -> memoryview:
        if off < 0 or length < 0 or off + length > self.size:
            raise ImageError(f"{what}: bytes {off}..{off + length} are past the end of the bootstrap ({self.size})")
        return self.data[off : off + length]

    def _read_devices(self) -> list[Device]:
        sb = self.sb
        if not sb.feature_incompat & fs.EROFS_FEATURE_INCOMPAT_DEVICE_TABLE or sb.extra_devices == 0:
            return []
        base = sb.devt_slotoff * fs.EROFS_DEVT_SLOT_SIZE
        self._span(base, sb.extra_devices * fs.EROFS_DEVT_SLOT_SIZE, "device table")
        out = []
        for i in range(sb.extra_devices):
            d = fs.erofs_deviceslot.unpack(self.data, base + i * fs.EROFS_DEVT_SLOT_SIZE)
            tag = _cstr(d.tag).decode("ascii", "backslashreplace")
            out.append(Device(i, tag, d.blocks, d.mapped_blkaddr))
        return out

    def _read_blobs(self) -> list[BlobInfo]:
        ext = self.ext
        if ext.s_blob_table_size % rv.RafsV6Blob.size:
            raise ImageError(f"blob table: size {ext.s_blob_table_size} is not a multiple of {rv.RafsV6Blob.size}")
        n = ext.s_blob_table_size // rv.RafsV6Blob.size
        if n > rv.RAFS_MAX_BLOBS:
            raise ImageError(f"blob table: {n} blobs, at most {rv.RAFS_MAX_BLOBS} are addressable")
        self._span(ext.s_blob_table_offset, ext.s_blob_table_size, "blob table")
        base = ext.s_blob_table_offset
        return [BlobInfo.unpack(self.data, base + i * rv.RafsV6Blob.size, i) for i in range(n)]

    # -- image-wide properties ----------------------------------------------------------------------------------
    @property
    def flags(self) -> int:
        return self.ext.s_flags if self.ext is not None else 0

    @property
    def chunk_size(self) -> int | None:
        return self.ext.s_chunk_size if self.ext is not None else None

    @property
    def compressor(self) -> str | None:
        """The image compressor (RAFS flags), or None for a plain EROFS image."""
        if self.ext is None:
            return None
        for name, bit in rv.COMPRESSOR_SUPER_FLAGS.items():
            if self.flags & bit:
                return name
        return self.blobs[0].compressor if self.blobs else None

    @property
    def digester(self) -> str | None:
        if self.ext is None:
            return None
        for name, bit in rv.DIGESTER_SUPER_FLAGS.items():
            if self.flags & bit:
                return name
        return self.blobs[0].digester if self.blobs else None

    def blob_table_index(self, blob_index: int) -> int:
        """The ``blob_index`` field the ``blob_index``-th blob-table entry records (it should be its position)."""
        assert self.ext is not None
        raw = rv.RafsV6Blob.unpack(self.data, self.ext.s_blob_table_offset + blob_index * rv.RafsV6Blob.size)
        return raw.blob_index

    def blob_by_id(self, blob_id: str) -> BlobInfo:
        for b in self.blobs:
            if b.blob_id == blob_id:
                return b
        raise ImageError(f"blob {blob_id} is not in the bootstrap's blob table")

    def blob_key(self, blob_index: int) -> str:
        """The id to fetch blob/device ``blob_index`` by (blob id, device tag, or ``device<N>``)."""
        if self.blobs:
            if not 0 <= blob_index < len(self.blobs):
                raise ImageError(f"blob index {blob_index} is not in the blob table ({len(self.blobs)} blobs)")
            return self.blobs[blob_index].blob_id
        if not 0 <= blob_index < len(self.devices):
            raise ImageError(f"device {blob_index + 1} is not in the device table ({len(self.devices)} devices)")
        return self.devices[blob_index].key

    # -- chunk table --------------------------------------------------------------------------------------------
    @cached_property
    def chunk_table(self) -> list[ChunkInfo]:
        """The bootstrap's 80-byte chunk table (RAFS v6; empty for plain EROFS)."""
        if self.ext is None or self.ext.s_chunk_table_size == 0:
            return []
        off, size = self.ext.s_chunk_table_offset, self.ext.s_chunk_table_size
        if size % rv.RafsV5ChunkInfo.size:
            raise ImageError(f"chunk table: size {size} is not a multiple of {rv.RafsV5ChunkInfo.size}")
        view = self._span(off, size, "chunk table")
        return [ChunkInfo._make(t) for t in struct.iter_unpack("<32sIIIIQQQII", view)]

    @cached_property
    def _chunk_by_index(self) -> dict[tuple[int, int], ChunkInfo]:
        return {(c.blob_index, c.index): c for c in self.chunk_table}

    @cached_property
    def _chunk_by_offset(self) -> dict[tuple[int, int], ChunkInfo]:
        return {(c.blob_index, c.uncompressed_offset): c for c in self.chunk_table}

    def chunk_info(self, blob_index: int, ci_index: int) -> ChunkInfo | None:
        """The chunk-table entry of chunk ``ci_index`` of blob ``blob_index``, if the table has one."""
        return self._chunk_by_index.get((blob_index, ci_index))

    # -- inodes -------------------------------------------------------------------------------------------------
    @property
    def root(self) -> Inode:
        return self.inode(self.root_nid)

    def inode(self, nid: int) -> Inode:
        off = self.meta_base + nid * fs.EROFS_SLOTSIZE
        if nid < 0 or off + 32 > self.size:
            raise ImageError(f"nid {nid}: inode is past the end of the bootstrap")
        fmt = _U16.unpack_from(self.data, off)[0]
        if fmt & ~fs.EROFS_I_ALL:
            raise ImageError(f"nid {nid}: unsupported i_format {fmt:#x}")
        layout = (fmt >> fs.EROFS_I_DATALAYOUT_BIT) & 7
        if layout in (fs.EROFS_INODE_COMPRESSED_FULL, fs.EROFS_INODE_COMPRESSED_COMPACT):
            raise ImageError(f"nid {nid}: compressed data layout ({LAYOUT_NAMES[layout]}) is not supported")
        if layout > fs.EROFS_INODE_CHUNK_BASED:
            raise ImageError(f"nid {nid}: invalid data layout {layout}")
        if fmt & 1:
            r = self._struct(fs.erofs_inode_extended, off, f"nid {nid}")
            ino = Inode(
                nid, off, fmt, True, layout, r.i_mode, r.i_nlink, r.i_size, r.i_u,
                r.i_uid, r.i_gid, fs.erofs_time_decode(r.i_mtime), r.i_mtime_nsec, r.i_xattr_icount,
            )  # fmt: skip
        else:
            if off // self.blksz != (off + 31) // self.blksz:
                raise ImageError(f"nid {nid}: compact inode crosses a block boundary")
            r = fs.erofs_inode_compact.unpack(self.data, off)
            ino = Inode(
                nid, off, fmt, False, layout, r.i_mode, r.i_nlink, r.i_size, r.i_u,
                r.i_uid, r.i_gid, self.build_time, self.sb.build_time_nsec, r.i_xattr_icount,
            )  # fmt: skip
        if file_type_of_mode(ino.mode) == fs.EROFS_FT_UNKNOWN:
            raise ImageError(f"nid {nid}: invalid file mode {ino.mode:#o}")
        if ino.xattr_icount == 1:
            raise ImageError(f"nid {nid}: i_xattr_icount 1 (a 12-byte xattr body) is invalid")
        if off + ino.isize + ino.xattr_isize > self.size:
            raise ImageError(f"nid {nid}: xattrs are past the end of the bootstrap")
        if layout == fs.EROFS_INODE_CHUNK_BASED and not ino.is_reg:
            raise ImageError(f"nid {nid}: chunk-based layout on a non-regular file")
        return ino

    # -- flat data (dirs, symlinks, plain EROFS files) ----------------------------------------------------------
    def _flat_extents(self, ino: Inode) -> list[tuple[int, int, int]]:
        """(file_offset, bootstrap_offset, length) pieces of a FLAT_PLAIN / FLAT_INLINE inode's data."""
        size = ino.size
        if size == 0:
            return []
        if size > self.size:
            raise ImageError(f"nid {ino.nid}: size {size} is larger than the bootstrap holding its data")
        nblocks = -(-size // self.blksz)
        if ino.layout == fs.EROFS_INODE_FLAT_PLAIN:
            self._span(ino.i_u * self.blksz, size, f"nid {ino.nid}: data")
            return [(0, ino.i_u * self.blksz, size)]
        if ino.layout != fs.EROFS_INODE_FLAT_INLINE:
            raise ImageError(f"nid {ino.nid}: data layout {ino.layout_name} is not flat")
        head = (nblocks - 1) * self.blksz
        tail_len = size - head
        pos = ino.offset + ino.isize + ino.xattr_isize
        if pos % self.blksz + tail_len > self.blksz:
            raise ImageError(f"nid {ino.nid}: inline tail of {tail_len} bytes crosses a block boundary")
        out = []
        if head:
            self._span(ino.i_u * self.blksz, head, f"nid {ino.nid}: data")
            out.append((0, ino.i_u * self.blksz, head))
        self._span(pos, tail_len, f"nid {ino.nid}: inline data")
        out.append((head, pos, tail_len))
        return out

    def _flat_data(self, ino: Inode) -> bytes:
        return b"".join(self.data[b : b + n] for _, b, n in self._flat_extents(ino))

    def readlink(self, ino: Inode) -> bytes:
        if not ino.is_symlink:
            raise ImageError(f"nid {ino.nid}: not a symlink")
        if ino.size > 4096 or ino.size == 0:
            raise ImageError(f"nid {ino.nid}: symlink target length {ino.size} is invalid")
        if ino.layout == fs.EROFS_INODE_CHUNK_BASED:
            raise ImageError(f"nid {ino.nid}: symlink with chunk-based data")
        target = self._flat_data(ino)
        if b"\0" in target:  # no path holds one: the kernel would show a shortened target
            raise ImageError(f"nid {ino.nid}: symlink target holds a NUL byte")
        return target

    # -- directories --------------------------------------------------------------------------------------------
    def _dir_blocks(self, ino: Inode) -> Iterator[tuple[int, memoryview]]:
        for foff, boff, length in self._flat_extents(ino):
            for b in range(0, length, self.blksz):
                yield foff + b, self.data[boff + b : boff + min(b + self.blksz, length)]

    def readdir(self, ino: Inode) -> list[Dirent]:
        """Every on-disk entry of a directory, in on-disk order, ``.`` and ``..`` included."""
        if not ino.is_dir:
            raise ImageError(f"nid {ino.nid}: not a directory")
        if ino.layout == fs.EROFS_INODE_CHUNK_BASED:
            raise ImageError(f"nid {ino.nid}: directory with chunk-based data")
        out: list[Dirent] = []
        for boff, blk in self._dir_blocks(ino):
            blen = len(blk)
            if blen < 12:
                raise ImageError(f"nid {ino.nid}: directory block at {boff} is truncated ({blen} bytes)")
            first = _U16.unpack_from(blk, 8)[0]
            if first == 0 or first % 12 or first >= self.blksz or first > blen:
                raise ImageError(f"nid {ino.nid}: directory block at {boff}: invalid first nameoff {first}")
            n = first // 12
            ents = [_DIRENT.unpack_from(blk, i * 12) for i in range(n)]
            for i, (nid, nameoff, ftype, _) in enumerate(ents):
                if i + 1 < n:
                    end = ents[i + 1][1]
                else:
                    end = blen
                    nul = bytes(blk[nameoff:blen]).find(b"\0") if nameoff < blen else -1
                    if nul >= 0:
                        end = nameoff + nul
                if not (first <= nameoff < end <= blen):
                    raise ImageError(f"nid {ino.nid}: directory block at {boff}: entry {i} has a bad name offset")
                if end - nameoff > fs.EROFS_NAME_LEN:
                    raise ImageError(f"nid {ino.nid}: directory block at {boff}: entry {i} name is too long")
                out.append(Dirent(bytes(blk[nameoff:end]), nid, ftype))
        return out

    def listdir(self, ino: Inode) -> list[Dirent]:
        """Directory entries without ``.`` and ``..``; names are validated (no '/', NUL or empty)."""
        out = []
        dots: set[bytes] = set()
        for d in self.readdir(ino):
            if d.name in (b".", b"..") and d.name not in dots:
                dots.add(d.name)
                continue
            if b"/" in d.name or b"\0" in d.name or not d.name or d.name in dots:
                raise ImageError(f"nid {ino.nid}: directory entry {d.name!r} is not a valid file name")
            out.append(d)
        return out

    def lookup(self, path: str | bytes) -> Inode:
        """The inode at an absolute (or root-relative) path; symlinks are not followed."""
        bpath = os.fsencode(path)
        ino = self.root
        for part in bpath.split(b"/"):
            if part in (b"", b"."):
                continue
            if not ino.is_dir:
                raise ImageError(f"{os.fsdecode(bpath)}: not a directory on the way")
            for d in self.readdir(ino):
                if d.name == part:
                    ino = self.inode(d.nid)
                    break
            else:
                raise FileNotFoundError(2, "No such file or directory in the image", os.fsdecode(bpath))
        return ino

    def walk(
        self, on_error: Callable[[str, ImageError], None] | None = None
    ) -> Iterator[tuple[str, Dirent | None, Inode]]:
        """Every (path, dirent, inode), parents before children, names in on-disk order; the root's dirent is
        None.  Directory cycles raise ImageError.  With ``on_error`` a broken entry is reported and skipped
        instead of ending the walk."""
        root = self.root
        yield "/", None, root
        seen = {root.nid}
        stack: list[tuple[str, Inode, int]] = [("/", root, 0)]
        while stack:
            path, dino, depth = stack.pop()
            try:
                entries = self.listdir(dino)
            except ImageError as e:
                if on_error is None:
                    raise
                on_error(path, e)
                continue
            subdirs = []
            for d in entries:
                child = path.rstrip("/") + "/" + _name_str(d.name)
                try:
                    ino = self.inode(d.nid)
                    if ino.is_dir:
                        if ino.nid in seen:
                            raise ImageError(f"directory nid {ino.nid} is reachable twice (a cycle or a hard link)")
                        if depth + 1 > _MAX_DIR_DEPTH:
                            raise ImageError(f"directories nest deeper than {_MAX_DIR_DEPTH}")
                        seen.add(ino.nid)
                except ImageError as e:
                    if on_error is None:
                        raise ImageError(f"{child}: {e}") from None
                    on_error(child, e)
                    continue
                yield child, d, ino
                if ino.is_dir:
                    subdirs.append((child, ino, depth + 1))
            stack.extend(reversed(subdirs))

    # -- xattrs -------------------------------------------------------------------------------------------------
    def _prefixes(self) -> list[tuple[int, bytes]]:
        if self._long_prefixes is None:
            out: list[tuple[int, bytes]] = []
            sb = self.sb
            if sb.xattr_prefix_count and sb.feature_incompat & fs.EROFS_FEATURE_INCOMPAT_XATTR_PREFIXES:
                if sb.packed_nid:
                    raise ImageError("long xattr prefixes in a packed inode are not supported")
                pos = sb.xattr_prefix_start * 4
                for i in range(sb.xattr_prefix_count):
                    ln = _U16.unpack_from(self._span(pos, 2, f"xattr prefix {i}"))[0]
                    body = self._span(pos + 2, ln, f"xattr prefix {i}")
                    if ln < 1:
                        raise ImageError(f"xattr prefix {i}: empty")
                    out.append((body[0], bytes(body[1:])))
                    pos += (2 + ln + 3) & ~3
            self._long_prefixes = out
        return self._long_prefixes

    def _xattr_entry(self, pos: int, end: int, what: str) -> tuple[bytes, bytes, int]:
        if pos + 4 > end:
            raise ImageError(f"{what}: truncated xattr entry")
        name_len, index, vsize = _XATTR_ENTRY.unpack_from(self.data, pos)
        body_end = pos + 4 + name_len + vsize
        if body_end > end:
            raise ImageError(f"{what}: xattr entry overruns its area")
        suffix = bytes(self.data[pos + 4 : pos + 4 + name_len])
        value = bytes(self.data[pos + 4 + name_len : body_end])
        if index & fs.EROFS_XATTR_LONG_PREFIX:
            prefixes = self._prefixes()
            pi = index & 0x7F
            if pi >= len(prefixes):
                raise ImageError(f"{what}: xattr long prefix {pi} is not in the prefix table")
            base, infix = prefixes[pi]
            if base not in fs.EROFS_XATTR_PREFIXES:
                raise ImageError(f"{what}: xattr long prefix {pi} has unknown base index {base}")
            name = fs.EROFS_XATTR_PREFIXES[base] + infix + suffix
        else:
            prefix = fs.EROFS_XATTR_PREFIXES.get(index)
            if prefix is None:
                raise ImageError(f"{what}: xattr name index {index} is unknown")
            name = prefix + suffix
        return name, value, (body_end - pos + 3) & ~3

    def xattrs(self, ino: Inode) -> list[tuple[bytes, bytes]]:
        """Every (full name, value) of an inode: shared ones first, then inline, in on-disk order."""
        if ino.xattr_icount == 0:
            return []
        what = f"nid {ino.nid}"
        start = ino.offset + ino.isize
        end = start + ino.xattr_isize
        if end > self.size:
            raise ImageError(f"{what}: xattrs are past the end of the bootstrap")
        shared = self.data[start + 4]
        pos = start + 12
        if pos + 4 * shared > end:
            raise ImageError(f"{what}: {shared} shared xattr ids overrun the xattr body")
        out = []
        for i in range(shared):
            xid = _U32.unpack_from(self.data, pos + 4 * i)[0]
            spos = self.sb.xattr_blkaddr * self.blksz + 4 * xid
            if spos + 4 > self.size:
                raise ImageError(f"{what}: shared xattr id {xid} is outside the shared xattr area")
            name, value, _ = self._xattr_entry(spos, self.size, f"{what} shared xattr {xid}")
            out.append((name, value))
        pos += 4 * shared
        while pos < end:
            name, value, step = self._xattr_entry(pos, end, what)
            out.append((name, value))
            pos += step
        return out

    # -- file data mapping --------------------------------------------------------------------------------------
    def file_chunks(self, ino: Inode) -> list[FileChunk]:
        """How a regular file's bytes map onto the bootstrap and blobs, in file order, holes included."""
        if not ino.is_reg:
            raise ImageError(f"nid {ino.nid}: not a regular file")
        if ino.layout != fs.EROFS_INODE_CHUNK_BASED:
            return [FileChunk(foff, n, -1, None, boff) for foff, boff, n in self._flat_extents(ino)]
        size = ino.size
        fmt = ino.i_u & 0xFFFF
        if ino.i_u & ~(fs.EROFS_CHUNK_FORMAT_INDEXES | fs.EROFS_CHUNK_FORMAT_BLKBITS_MASK):
            raise ImageError(f"nid {ino.nid}: unsupported chunk format {ino.i_u:#x}")
        chunkbits = self.blkszbits + (fmt & fs.EROFS_CHUNK_FORMAT_BLKBITS_MASK)
        if chunkbits > 40:
            raise ImageError(f"nid {ino.nid}: chunk size 2^{chunkbits} is absurd")
        chunk_size = 1 << chunkbits
        count = -(-size // chunk_size)
        indexes = bool(fmt & fs.EROFS_CHUNK_FORMAT_INDEXES)
        unit = 8 if indexes else 4
        base = (ino.offset + ino.isize + ino.xattr_isize + unit - 1) & ~(unit - 1)
        arr = self._span(base, count * unit, f"nid {ino.nid}: chunk indexes")
        out: list[FileChunk] = []
        for i in range(count):
            foff = i * chunk_size
            length = min(chunk_size, size - foff)
            if indexes:
                advise, device_id, blkaddr = _CHUNK_INDEX.unpack_from(arr, i * 8)
            else:
                advise, device_id, blkaddr = 0, 0, _U32.unpack_from(arr, i * 4)[0]
            if blkaddr == _NULL:
                out.append(FileChunk(foff, length, -1, None, None))
                continue
            if self.is_rafs and indexes:
                blob_index, ci = rv.chunk_index_decode(advise, device_id)
                if blob_index < 0:
                    # device 0: data inside the bootstrap (not written by Nydus, but the kernel reads it)
                    out.append(FileChunk(foff, length, -1, None, self._bootstrap_offset(ino, blkaddr, length)))
                    continue
                if blob_index >= len(self.blobs):
                    raise ImageError(
                        f"nid {ino.nid}: chunk {i} points at blob index {blob_index}, "
                        f"but the blob table has {len(self.blobs)}"
                    )
                blob = self.blobs[blob_index]
                boff = blkaddr * self.blksz
                if chunk_size > blob.chunk_size > 0:
                    out.extend(self._expand_big_chunk(ino, i, foff, length, blob, boff))
                else:
                    out.append(FileChunk(foff, length, blob_index, ci, boff))
            else:
                dev = device_id & self.device_mask
                if dev == 0:
                    out.append(FileChunk(foff, length, -1, None, self._bootstrap_offset(ino, blkaddr, length)))
                else:
                    if dev > len(self.devices):
                        raise ImageError(f"nid {ino.nid}: chunk {i} points at device {dev}, which does not exist")
                    out.append(FileChunk(foff, length, dev - 1, None, blkaddr * self.blksz))
        return out

    def _bootstrap_offset(self, ino: Inode, blkaddr: int, length: int) -> int:
        off = blkaddr * self.blksz
        self._span(off, length, f"nid {ino.nid}: chunk data in the bootstrap")
        return off

    def _expand_big_chunk(
        self, ino: Inode, i: int, foff: int, length: int, blob: BlobInfo, boff: int
    ) -> Iterator[FileChunk]:
        """Upstream advertises one big chunk for a file whose chunks are contiguous in one blob: map it back to
        the blob's real chunks by uncompressed offset through the chunk table."""
        step = blob.chunk_size
        for f in range(0, length, step):
            c = self._chunk_by_offset.get((blob.blob_index, boff + f))
            if c is None:
                raise ImageError(
                    f"nid {ino.nid}: chunk {i}: no chunk of blob {blob.blob_id} starts at uncompressed offset "
                    f"{boff + f}"
                )
            yield FileChunk(foff + f, min(step, length - f), blob.blob_index, c.index, boff + f)

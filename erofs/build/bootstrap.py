"""Laying out an image tree and writing the RAFS v6 bootstrap (``builder/src/core/v6.rs`` ``v6_dump``).

Bootstrap layout, every table 4 KiB aligned::

    0     [pad][erofs_super_block @1024][RafsV6SuperBlockExt @1152][erofs_deviceslot × blobs @1408]
    4K..  [RafsV6Blob × blobs][prefetch table: u32 nids, right after the blob table, unaligned]
    ..    inode area: per inode, 32-byte slot aligned: inode, inline xattrs, then its chunk indexes or its
          inline tail (dir/symlink data); meta_blkaddr is one block before it, so the root's nid is 128
    ..    data blocks of directories and symlinks too big to inline
    ..    [RafsV5ChunkInfo × unique chunks]

The kernel's rules this follows: dirents sorted bytewise ('.' and '..' included), a record with an inline
tail never crosses a block, ``i_xattr_icount`` is never 1, compact inodes only when nothing is lost (their
times come from the superblock's build_time, chosen as the tree's most common mtime).
"""

from __future__ import annotations

import os
import stat
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

from erofs.build import xattr
from erofs.build.tree import ChunkRef, Node
from erofs.errors import SourceError
from erofs.format import erofs_fs as e
from erofs.format import rafs_v6 as r
from erofs.format.rafs_v6 import BlobInfo

BLK = e.EROFS_BLKSIZ
_FT = {
    stat.S_IFREG: e.EROFS_FT_REG_FILE,
    stat.S_IFDIR: e.EROFS_FT_DIR,
    stat.S_IFCHR: e.EROFS_FT_CHRDEV,
    stat.S_IFBLK: e.EROFS_FT_BLKDEV,
    stat.S_IFIFO: e.EROFS_FT_FIFO,
    stat.S_IFSOCK: e.EROFS_FT_SOCK,
    stat.S_IFLNK: e.EROFS_FT_SYMLINK,
}


def _align(x: int, a: int) -> int:
    return -(-x // a) * a


@dataclass(slots=True, frozen=True)
class ImageOptions:
    chunk_size: int
    compressor: str
    digester: str


@dataclass(slots=True, eq=False)
class _Rec:
    """Placement of one inode: where its record goes, what follows the inode, where its data blocks are."""

    inode: Node
    ino: int
    nlink: int = 0
    extended: bool = False
    xattr_body: bytes = b""
    xattr_icount: int = 0
    data: bytes = b""  # directory or symlink bytes (nids patched in for directories later)
    dir_blocks: list[list[tuple[bytes, Node]]] = field(default_factory=list)
    layout: int = e.EROFS_INODE_FLAT_PLAIN
    tail: bytes = b""
    offset: int = 0  # of the inode record in the bootstrap
    raw_blkaddr: int = 0

    @property
    def head_size(self) -> int:
        return (64 if self.extended else 32) + len(self.xattr_body)

    def record_size(self) -> int:
        if self.layout == e.EROFS_INODE_CHUNK_BASED:
            return _align(self.head_size, 8) + 8 * len(self.inode.chunks)
        return self.head_size + len(self.tail)


def _dir_blocks(entries: list[tuple[bytes, Node]]) -> tuple[list[list[tuple[bytes, Node]]], int]:
    """Pack sorted entries greedily into blocks; returns the blocks and the directory's i_size."""
    blocks: list[list[tuple[bytes, Node]]] = [[]]
    used = 0
    for name, node in entries:
        need = e.erofs_dirent.size + len(name)
        if used + need > BLK:
            blocks.append([])
            used = 0
        blocks[-1].append((name, node))
        used += need
    return blocks, (len(blocks) - 1) * BLK + used


def _dir_bytes(blocks: list[list[tuple[bytes, Node]]], nid_of: dict[int, int]) -> bytes:
    out = bytearray()
    for i, block in enumerate(blocks):
        start = len(out)
        nameoff = e.erofs_dirent.size * len(block)
        names = []
        for name, node in block:
            out += e.erofs_dirent.pack(nid=nid_of[id(node)], nameoff=nameoff, file_type=_FT[stat.S_IFMT(node.mode)])
            nameoff += len(name)
            names.append(name)
        out += b"".join(names)
        if i < len(blocks) - 1:
            out += bytes(BLK - (len(out) - start))
    return bytes(out)


def _ordered(root: Node) -> tuple[list[Node], dict[int, list[tuple[bytes, Node]]], Counter[int]]:
    """Unique inodes breadth first (root first), each directory's sorted entries, dirent counts per inode."""
    order: list[Node] = [root]
    seen = {id(root)}
    entries: dict[int, list[tuple[bytes, Node]]] = {}
    links: Counter[int] = Counter()
    parent = {id(root): root}
    i = 0
    while i < len(order):
        node = order[i]
        i += 1
        if node.children is None:
            continue
        listing = [(b".", node), (b"..", parent[id(node)])]
        for name, child in node.children.items():
            if not name or b"/" in name or name in (b".", b".."):
                raise SourceError(f"invalid file name {name!r}")
            if len(name) > e.EROFS_NAME_LEN:
                raise SourceError(f"file name longer than 255 bytes: {name[:40]!r}...")
            listing.append((name, child))
            links[id(child)] += 1
            if id(child) not in seen:
                seen.add(id(child))
                order.append(child)
                if child.children is not None:
                    parent[id(child)] = node
            elif child.children is not None:
                raise SourceError(f"directory {name!r} is linked twice")
        listing.sort(key=lambda x: x[0])
        entries[id(node)] = listing
    return order, entries, links


def _build_time(order: Sequence[Node]) -> tuple[int, int]:
    counts = Counter((n.mtime, n.mtime_nsec) for n in order)
    best = max(counts.values())
    return min(k for k, v in counts.items() if v == best)


def _needs_extended(n: Node, nlink: int, build_time: tuple[int, int]) -> bool:
    return (
        n.size > 0xFFFFFFFF
        or n.uid > 0xFFFF
        or n.gid > 0xFFFF
        or nlink > 0xFFFF
        or (n.mtime, n.mtime_nsec) != build_time
    )


def write_bootstrap(path: str | os.PathLike[str], root: Node, blobs: Sequence[BlobInfo], opts: ImageOptions,
                    prefetch: Sequence[Node] = ()) -> int:  # fmt: skip
    """Lay out ``root`` and write the bootstrap to ``path``.  Returns the number of inodes.

    ``prefetch``: nodes of ``root`` the prefetch table lists, in order (:mod:`erofs.build.prefetch`); as
    upstream, an image without blobs gets no table.
    """
    if len(blobs) > r.RAFS_MAX_BLOBS:
        raise SourceError(f"an image holds at most {r.RAFS_MAX_BLOBS} blobs, this one needs {len(blobs)}")
    order, entries, links = _ordered(root)
    build_time = _build_time(order)
    recs: list[_Rec] = []
    has_xattr = False
    for ino, node in enumerate(order, 1):
        rec = _Rec(node, ino)
        fmt = stat.S_IFMT(node.mode)
        if fmt not in _FT:
            raise SourceError(f"unsupported file type {oct(node.mode)}")
        if node.children is not None:
            rec.nlink = 2 + sum(1 for _, c in entries[id(node)][2:] if c.children is not None)
            rec.dir_blocks, node.size = _dir_blocks(entries[id(node)])
        else:
            rec.nlink = links[id(node)] or 1
            if fmt == stat.S_IFLNK:
                rec.data = node.target or b""
                node.size = len(rec.data)
            elif fmt != stat.S_IFREG:
                node.size = 0
        rec.xattr_body, rec.xattr_icount = xattr.ibody(node.xattrs)
        has_xattr |= bool(node.xattrs)
        rec.extended = _needs_extended(node, rec.nlink, build_time)
        if fmt == stat.S_IFREG and node.size:
            rec.layout = e.EROFS_INODE_CHUNK_BASED
            expected = -(-node.size // opts.chunk_size)
            if len(node.chunks) != expected:
                raise AssertionError(f"file of {node.size} bytes has {len(node.chunks)} chunks, not {expected}")
        elif node.size:
            tail_len = node.size % BLK
            if tail_len and rec.head_size + tail_len <= BLK:
                rec.layout = e.EROFS_INODE_FLAT_INLINE
                rec.tail = b"\0" * tail_len  # placeholder of the right size; filled once nids are known
        recs.append(rec)

    # -- place: header block, blob table, inode area, data blocks, chunk table
    devt_end = r.RAFSV6_DEVTABLE_OFFSET + len(blobs) * e.EROFS_DEVT_SLOT_SIZE
    blob_table_off = _align(devt_end, BLK)
    prefetch_off = blob_table_off + len(blobs) * r.RafsV6Blob.size
    prefetch_len = len(prefetch) * r.RAFSV6_PREFETCH_ENTRY_SIZE if blobs else 0
    inode_area = _align(prefetch_off + prefetch_len, BLK) or BLK
    meta_blkaddr = inode_area // BLK - 1
    pos = inode_area
    for rec in recs:
        pos = _align(pos, e.EROFS_SLOTSIZE)
        size = rec.record_size()
        if rec.tail and pos % BLK + size > BLK:
            pos = _align(pos, BLK)
        rec.offset = pos
        pos += size
    nid_of = {id(rec.inode): (rec.offset - meta_blkaddr * BLK) // e.EROFS_SLOTSIZE for rec in recs}
    root_nid = nid_of[id(root)]
    assert root_nid <= 0xFFFF
    pos = _align(pos, BLK)
    for rec in recs:
        if rec.inode.children is not None:
            rec.data = _dir_bytes(rec.dir_blocks, nid_of)
            assert len(rec.data) == rec.inode.size
        if rec.data:
            full = len(rec.data) - len(rec.tail)
            if rec.layout == e.EROFS_INODE_FLAT_INLINE:
                rec.tail = rec.data[full:]
            if full:
                rec.raw_blkaddr = pos // BLK
                pos += _align(full, BLK)
            elif rec.layout == e.EROFS_INODE_FLAT_INLINE:
                rec.raw_blkaddr = e.EROFS_NULL_ADDR
    chunk_table_off = pos
    unique: dict[tuple[int, int], tuple[ChunkRef, int]] = {}
    for rec in recs:
        for i, c in enumerate(rec.inode.chunks):
            if c is not None and (c.blob_index, c.ci_index) not in unique:
                unique[(c.blob_index, c.ci_index)] = (c, i * opts.chunk_size)
    chunk_table = b"".join(
        r.RafsV5ChunkInfo.pack(
            block_id=c.digest,
            blob_index=c.blob_index,
            flags=r.BLOB_CHUNK_FLAG_COMPRESSED if c.compressed else 0,
            compressed_size=c.c_size,
            uncompressed_size=c.d_size,
            compressed_offset=c.c_off,
            uncompressed_offset=c.d_off,
            file_offset=file_offset,
            index=c.ci_index,
        )
        for c, file_offset in (unique[k] for k in sorted(unique))
    )
    total = _align(chunk_table_off + len(chunk_table), BLK)

    # -- emit
    img = bytearray(total)
    chunk_format = e.EROFS_CHUNK_FORMAT_INDEXES | (opts.chunk_size.bit_length() - 1 - e.EROFS_BLKSIZ_BITS)
    for rec in recs:
        node = rec.inode
        fmt = stat.S_IFMT(node.mode)
        if rec.layout == e.EROFS_INODE_CHUNK_BASED:
            i_u = chunk_format
        elif fmt in (stat.S_IFCHR, stat.S_IFBLK):
            i_u = e.erofs_new_encode_dev(os.major(node.rdev), os.minor(node.rdev))
        else:
            i_u = rec.raw_blkaddr
        i_format = (rec.layout << e.EROFS_I_DATALAYOUT_BIT) | int(rec.extended)
        if rec.extended:
            raw = e.erofs_inode_extended.pack(
                i_format=i_format, i_xattr_icount=rec.xattr_icount, i_mode=node.mode & 0xFFFF, i_size=node.size,
                i_u=i_u, i_ino=rec.ino, i_uid=node.uid, i_gid=node.gid, i_mtime=e.erofs_time_encode(node.mtime),
                i_mtime_nsec=node.mtime_nsec, i_nlink=rec.nlink,
            )  # fmt: skip
        else:
            raw = e.erofs_inode_compact.pack(
                i_format=i_format, i_xattr_icount=rec.xattr_icount, i_mode=node.mode & 0xFFFF, i_nlink=rec.nlink,
                i_size=node.size, i_u=i_u, i_ino=rec.ino, i_uid=node.uid, i_gid=node.gid,
            )  # fmt: skip
        p = rec.offset
        img[p : p + len(raw)] = raw
        p += len(raw)
        img[p : p + len(rec.xattr_body)] = rec.xattr_body
        p += len(rec.xattr_body)
        if rec.layout == e.EROFS_INODE_CHUNK_BASED:
            p = _align(p, 8)
            idx = bytearray()
            for c in node.chunks:
                if c is None:
                    idx += e.erofs_inode_chunk_index.pack(blkaddr=e.EROFS_NULL_ADDR)
                else:
                    advise, device_id = r.chunk_index_fields(c.blob_index, c.ci_index)
                    idx += e.erofs_inode_chunk_index.pack(advise=advise, device_id=device_id, blkaddr=c.d_off // BLK)
            img[p : p + len(idx)] = idx
        else:
            img[p : p + len(rec.tail)] = rec.tail
            full = len(rec.data) - len(rec.tail)
            if full:
                start = rec.raw_blkaddr * BLK
                img[start : start + full] = rec.data[:full]
    img[chunk_table_off : chunk_table_off + len(chunk_table)] = chunk_table
    if prefetch_len:
        nids = [nid_of[id(n)] for n in prefetch]
        if max(nids) > r.RAFSV6_PREFETCH_MAX_NID:
            raise SourceError("the bootstrap is too large for a prefetch table (a nid exceeds 32 bits)")
        img[prefetch_off : prefetch_off + prefetch_len] = r.prefetch_table_pack(nids)

    flags = (
        r.COMPRESSOR_SUPER_FLAGS[opts.compressor]
        | r.DIGESTER_SUPER_FLAGS[opts.digester]
        | r.RAFS_SUPER_FLAG_EXPLICIT_UID_GID
        | r.RAFS_SUPER_FLAG_INLINED_CHUNK_DIGEST
        | (r.RAFS_SUPER_FLAG_HAS_XATTR if has_xattr else 0)
    )
    img[r.RAFSV6_SUPER_EXT_OFFSET : r.RAFSV6_SUPER_EXT_OFFSET + r.RafsV6SuperBlockExt.size] = (
        r.RafsV6SuperBlockExt.pack(
            s_flags=flags,
            s_blob_table_offset=blob_table_off,
            s_blob_table_size=len(blobs) * r.RafsV6Blob.size,
            s_chunk_size=opts.chunk_size,
            s_chunk_table_offset=chunk_table_off,
            s_chunk_table_size=len(chunk_table),
            s_prefetch_table_offset=prefetch_off if prefetch_len else 0,
            s_prefetch_table_size=prefetch_len,
        )
    )
    for i, b in enumerate(blobs):
        slot = e.erofs_deviceslot.pack(tag=b.blob_id.encode(), blocks=b.uncompressed_size // BLK)
        off = r.RAFSV6_DEVTABLE_OFFSET + i * e.EROFS_DEVT_SLOT_SIZE
        img[off : off + len(slot)] = slot
        entry = b.pack()
        img[blob_table_off + i * r.RafsV6Blob.size : blob_table_off + (i + 1) * r.RafsV6Blob.size] = entry
    sb = e.erofs_super_block.pack(
        magic=e.EROFS_SUPER_MAGIC_V1,
        feature_compat=r.EROFS_FEATURE_COMPAT_RAFS_V6,
        blkszbits=e.EROFS_BLKSIZ_BITS,
        root_nid=root_nid,
        inos=len(recs),
        build_time=e.erofs_time_encode(build_time[0]),
        build_time_nsec=build_time[1],
        blocks=total // BLK,
        meta_blkaddr=meta_blkaddr,
        feature_incompat=e.EROFS_FEATURE_INCOMPAT_CHUNKED_FILE | e.EROFS_FEATURE_INCOMPAT_DEVICE_TABLE,
        extra_devices=len(blobs),
        devt_slotoff=r.RAFSV6_DEVT_SLOTOFF,
    )
    img[e.EROFS_SUPER_OFFSET : e.EROFS_SUPER_OFFSET + len(sb)] = sb
    with open(path, "wb") as f:
        f.write(img)
        f.flush()
        os.fsync(f.fileno())
    return len(recs)

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
from dataclasses import dataclass

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


# hot-loop packers of the structures the bootstrap holds per inode, dirent and chunk (fields as the C declares)
_COMPACT = e.erofs_inode_compact.packer("i_format", "i_xattr_icount", "i_mode", "i_nlink", "i_size", "i_u", "i_ino",
                                        "i_uid", "i_gid")  # fmt: skip
_EXTENDED = e.erofs_inode_extended.packer("i_format", "i_xattr_icount", "i_mode", "i_size", "i_u", "i_ino", "i_uid",
                                          "i_gid", "i_mtime", "i_mtime_nsec", "i_nlink")  # fmt: skip
_CHUNK_INDEX = e.erofs_inode_chunk_index.packer("advise", "device_id", "blkaddr")
_DIRENT = e.erofs_dirent.packer("nid", "nameoff", "file_type")
_CHUNK_INFO = r.RafsV5ChunkInfo.packer("block_id", "blob_index", "flags", "compressed_size", "uncompressed_size",
                                       "compressed_offset", "uncompressed_offset", "file_offset", "index")  # fmt: skip
_DIRENT_SIZE = e.erofs_dirent.size
_S_IFMT = 0o170000


def _dir_blocks(entries: list[tuple[bytes, Node]]) -> tuple[list[int], int]:
    """Pack sorted entries greedily into blocks; returns where each block starts (an index into ``entries``)
    and the directory's i_size."""
    starts = [0]
    used = 0
    for i, (name, _) in enumerate(entries):
        need = _DIRENT_SIZE + len(name)
        if used + need > BLK:
            starts.append(i)
            used = 0
        used += need
    return starts, (len(starts) - 1) * BLK + used


def _dir_bytes(entries: list[tuple[bytes, Node]], starts: list[int], size: int, nid_of: dict[int, int]) -> bytearray:
    out = bytearray(size)
    bounds = [*starts, len(entries)]
    for b in range(len(starts)):
        block = entries[bounds[b] : bounds[b + 1]]
        pos = b * BLK
        nameoff = pos + _DIRENT_SIZE * len(block)
        for name, node in block:
            _DIRENT.pack_into(out, pos, nid_of[id(node)], nameoff - b * BLK, _FT[node.mode & _S_IFMT])
            pos += _DIRENT_SIZE
            out[nameoff : nameoff + len(name)] = name
            nameoff += len(name)
    return out


def _ordered(root: Node) -> tuple[list[Node], dict[int, list[tuple[bytes, Node]]], dict[int, int]]:
    """Unique inodes breadth first (root first), each directory's sorted entries, and the number of extra
    directory entries (hard links) of the non-directories that have them."""
    order: list[Node] = [root]
    seen = {id(root)}
    entries: dict[int, list[tuple[bytes, Node]]] = {}
    extra_links: dict[int, int] = {}
    parent = {id(root): root}
    name_len = e.EROFS_NAME_LEN
    for node in order:  # grows while iterated: breadth first
        children = node.children
        if children is None:
            continue
        for name, child in children.items():
            if not name or len(name) > name_len or b"/" in name or name == b"." or name == b"..":
                if len(name) > name_len:
                    raise SourceError(f"file name longer than 255 bytes: {name[:40]!r}...")
                raise SourceError(f"invalid file name {name!r}")
            key = id(child)
            if key not in seen:
                seen.add(key)
                order.append(child)
                if child.children is not None:
                    parent[key] = node
            elif child.children is not None:
                raise SourceError(f"directory {name!r} is linked twice")
            else:
                extra_links[key] = extra_links.get(key, 1) + 1
        listing = [(b".", node), (b"..", parent[id(node)]), *children.items()]
        listing.sort()  # names are unique, so only they are compared: bytewise, '.' and '..' included
        entries[id(node)] = listing
    return order, entries, extra_links


def _build_time(order: Sequence[Node]) -> tuple[int, int]:
    counts = Counter((n.mtime, n.mtime_nsec) for n in order)
    best = max(counts.values())
    return min(k for k, v in counts.items() if v == best)


def write_bootstrap(path: str | os.PathLike[str], root: Node, blobs: Sequence[BlobInfo], opts: ImageOptions,
                    prefetch: Sequence[Node] = ()) -> int:  # fmt: skip
    """Lay out ``root`` and write the bootstrap to ``path``.  Returns the number of inodes.

    ``prefetch``: nodes of ``root`` the prefetch table lists, in order (:mod:`erofs.build.prefetch`); as
    upstream, an image without blobs gets no table.

    Per-inode facts live in lists indexed like ``order`` (no object per inode) and every structure is packed
    straight into the one image buffer.
    """
    if len(blobs) > r.RAFS_MAX_BLOBS:
        raise SourceError(f"an image holds at most {r.RAFS_MAX_BLOBS} blobs, this one needs {len(blobs)}")
    order, entries, extra_links = _ordered(root)
    build_time = _build_time(order)
    count = len(order)
    nlinks = [1] * count
    layouts = [e.EROFS_INODE_FLAT_PLAIN] * count
    xattr_bodies: list[bytes] = [b""] * count
    xattr_icounts = [0] * count
    extended = [False] * count
    sizes = [0] * count  # of each inode's record: inode, xattrs, then chunk indexes or inline tail
    tails = [0] * count  # inline tail length
    data: dict[int, bytes] = {}  # position -> symlink target (directories: built once nids are known)
    dir_starts: dict[int, list[int]] = {}
    has_xattr = False
    chunk_size = opts.chunk_size
    bt_sec, bt_nsec = build_time
    for i, node in enumerate(order):
        mode = node.mode
        fmt = mode & _S_IFMT
        if fmt not in _FT:
            raise SourceError(f"unsupported file type {oct(mode)}")
        if node.children is not None:
            listing = entries[id(node)]
            nlinks[i] = 2 + sum(1 for _, c in listing[2:] if c.children is not None)
            dir_starts[i], node.size = _dir_blocks(listing)
        else:
            nlinks[i] = extra_links.get(id(node), 1)
            if fmt == stat.S_IFLNK:
                data[i] = node.target or b""
                node.size = len(data[i])
            elif fmt != stat.S_IFREG:
                node.size = 0
        if node.xattrs:
            xattr_bodies[i], xattr_icounts[i] = xattr.ibody(node.xattrs)
            has_xattr = True
        ext = (node.mtime != bt_sec or node.mtime_nsec != bt_nsec or node.size > 0xFFFFFFFF or node.uid > 0xFFFF
               or node.gid > 0xFFFF or nlinks[i] > 0xFFFF)  # fmt: skip
        extended[i] = ext
        head = (64 if ext else 32) + len(xattr_bodies[i])
        size = node.size
        if fmt == stat.S_IFREG and size:
            layouts[i] = e.EROFS_INODE_CHUNK_BASED
            expected = -(-size // chunk_size)
            if len(node.chunks) != expected:
                raise AssertionError(f"file of {size} bytes has {len(node.chunks)} chunks, not {expected}")
            sizes[i] = _align(head, 8) + 8 * expected
        else:
            tail_len = size % BLK
            if tail_len and head + tail_len <= BLK:
                layouts[i] = e.EROFS_INODE_FLAT_INLINE
                tails[i] = tail_len
            sizes[i] = head + tails[i]

    # -- place: header block, blob table, inode area, data blocks, chunk table
    devt_end = r.RAFSV6_DEVTABLE_OFFSET + len(blobs) * e.EROFS_DEVT_SLOT_SIZE
    blob_table_off = _align(devt_end, BLK)
    prefetch_off = blob_table_off + len(blobs) * r.RafsV6Blob.size
    prefetch_len = len(prefetch) * r.RAFSV6_PREFETCH_ENTRY_SIZE if blobs else 0
    inode_area = _align(prefetch_off + prefetch_len, BLK) or BLK
    meta_blkaddr = inode_area // BLK - 1
    meta_base = meta_blkaddr * BLK
    pos = inode_area
    offsets = [0] * count
    slot_mask = e.EROFS_SLOTSIZE - 1
    for i in range(count):
        pos = (pos + slot_mask) & ~slot_mask
        size = sizes[i]
        if tails[i] and pos % BLK + size > BLK:
            pos = _align(pos, BLK)
        offsets[i] = pos
        pos += size
    slot_bits = e.EROFS_SLOTSIZE.bit_length() - 1
    nid_of = {id(node): (offsets[i] - meta_base) >> slot_bits for i, node in enumerate(order)}
    root_nid = nid_of[id(root)]
    assert root_nid <= 0xFFFF
    pos = _align(pos, BLK)
    blkaddrs = [0] * count
    for i, starts in dir_starts.items():
        node = order[i]
        data[i] = _dir_bytes(entries[id(node)], starts, node.size, nid_of)
    for i in sorted(data):
        full = len(data[i]) - tails[i]
        if full:
            blkaddrs[i] = pos // BLK
            pos += _align(full, BLK)
        elif layouts[i] == e.EROFS_INODE_FLAT_INLINE:
            blkaddrs[i] = e.EROFS_NULL_ADDR
    chunk_table_off = pos
    unique: dict[tuple[int, int], tuple[ChunkRef, int]] = {}
    for i, node in enumerate(order):
        if layouts[i] == e.EROFS_INODE_CHUNK_BASED:
            for n, c in enumerate(node.chunks):
                if c is not None and (c.blob_index, c.ci_index) not in unique:
                    unique[(c.blob_index, c.ci_index)] = (c, n * chunk_size)
    chunk_table_len = len(unique) * r.RafsV5ChunkInfo.size
    total = _align(chunk_table_off + chunk_table_len, BLK)

    # -- emit
    img = bytearray(total)
    pos = chunk_table_off
    for key in sorted(unique):
        c, file_offset = unique[key]
        _CHUNK_INFO.pack_into(img, pos, c.digest, c.blob_index, r.BLOB_CHUNK_FLAG_COMPRESSED if c.compressed else 0,
                              c.c_size, c.d_size, c.c_off, c.d_off, file_offset, c.ci_index)  # fmt: skip
        pos += _CHUNK_INFO.size
    chunk_format = e.EROFS_CHUNK_FORMAT_INDEXES | (chunk_size.bit_length() - 1 - e.EROFS_BLKSIZ_BITS)
    datalayout_bit = e.EROFS_I_DATALAYOUT_BIT
    chunk_based = e.EROFS_INODE_CHUNK_BASED
    time_encode = e.erofs_time_encode
    index_fields = r.chunk_index_fields
    for i, node in enumerate(order):
        layout = layouts[i]
        mode = node.mode
        fmt = mode & _S_IFMT
        if layout == chunk_based:
            i_u = chunk_format
        elif fmt == stat.S_IFCHR or fmt == stat.S_IFBLK:
            i_u = e.erofs_new_encode_dev(os.major(node.rdev), os.minor(node.rdev))
        else:
            i_u = blkaddrs[i]
        p = offsets[i]
        if extended[i]:
            _EXTENDED.pack_into(img, p, (layout << datalayout_bit) | 1, xattr_icounts[i], mode & 0xFFFF, node.size,
                                i_u, i + 1, node.uid, node.gid, time_encode(node.mtime), node.mtime_nsec,
                                nlinks[i])  # fmt: skip
            p += 64
        else:
            _COMPACT.pack_into(img, p, layout << datalayout_bit, xattr_icounts[i], mode & 0xFFFF, nlinks[i], node.size,
                               i_u, i + 1, node.uid, node.gid)  # fmt: skip
            p += 32
        body = xattr_bodies[i]
        if body:
            img[p : p + len(body)] = body
            p += len(body)
        if layout == chunk_based:
            p = (p + 7) & ~7
            for c in node.chunks:
                if c is None:
                    _CHUNK_INDEX.pack_into(img, p, 0, 0, e.EROFS_NULL_ADDR)
                else:
                    advise, device_id = index_fields(c.blob_index, c.ci_index)
                    _CHUNK_INDEX.pack_into(img, p, advise, device_id, c.d_off // BLK)
                p += 8
        elif i in data:
            raw = data[i]
            full = len(raw) - tails[i]
            if tails[i]:
                img[p : p + tails[i]] = raw[full:]
            if full:
                start = blkaddrs[i] * BLK
                img[start : start + full] = raw[:full]
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
            s_chunk_table_size=chunk_table_len,
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
        inos=count,
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
    return count

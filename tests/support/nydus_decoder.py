"""A small, independent decoder of Nydus RAFS v6 images, written straight from
the published RAFS v6 layout (``docs/format.md``: the Nydus tables and the EROFS inode/dirent layout)
with nothing but :mod:`struct`.

It deliberately shares no code with ``erofs.format`` / ``erofs.reader`` (or the builder), so tests that decode
our builder's output with it check the bytes against the reference, not against the code that wrote them.
Offsets below are the reference's, field by field.  It trusts its input (tests feed it good images).
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass, field
from typing import Any

BLOCK = 4096
SB_OFF = 1024
EXT_SB_OFF = 1152
EROFS_MAGIC = 0xE0F5E1E2
CCT_MAGIC = 0xB10BB10B
NULL_ADDR = 0xFFFFFFFF

# §1.3 RafsSuperFlags
FLAG_COMP_NONE, FLAG_LZ4, FLAG_BLAKE3, FLAG_SHA256 = 0x1, 0x2, 0x4, 0x8
FLAG_GZIP, FLAG_ZSTD, FLAG_INLINED_CHUNK_DIGEST = 0x40, 0x80, 0x100
COMPRESSION_FLAGS = {FLAG_COMP_NONE: "none", FLAG_LZ4: "lz4_block", FLAG_GZIP: "gzip", FLAG_ZSTD: "zstd"}
HASH_FLAGS = {FLAG_BLAKE3: "blake3", FLAG_SHA256: "sha256"}
# §1.6 algorithm numbers
COMPRESSION_ALGOS = {0: "none", 1: "lz4_block", 2: "gzip", 3: "zstd"}
DIGEST_ALGOS = {0: "blake3", 1: "sha256"}
# §1.8 BlobFeatures
BLOB_ALIGNED, BLOB_INLINED_CHUNK_DIGEST = 0x1, 0x20
BLOB_HAS_TAR_HEADER, BLOB_HAS_TOC, BLOB_CAP_TAR_TOC = 0x10000000, 0x20000000, 0x40000000


def u16(b: bytes, o: int) -> int:
    return struct.unpack_from("<H", b, o)[0]


def u32(b: bytes, o: int) -> int:
    return struct.unpack_from("<I", b, o)[0]


def u64(b: bytes, o: int) -> int:
    return struct.unpack_from("<Q", b, o)[0]


def cstr(b: bytes) -> bytes:
    return b.split(b"\0", 1)[0]


# ---- bootstrap (§1.1-1.7) --------------------------------------------------------------------------------------
def superblock(boot: bytes) -> dict[str, Any]:
    """§1.2: the EROFS superblock @1024."""
    s = boot[SB_OFF : SB_OFF + 128]
    return {
        "magic": u32(s, 0), "checksum": u32(s, 4), "feature_compat": u32(s, 8), "blkszbits": s[12],
        "extslots": s[13], "root_nid": u16(s, 14), "inos": u64(s, 16), "build_time": u64(s, 24),
        "build_time_nsec": u32(s, 32), "blocks": u32(s, 36), "meta_blkaddr": u32(s, 40),
        "xattr_blkaddr": u32(s, 44), "uuid": s[48:64], "volume_name": s[64:80], "feature_incompat": u32(s, 80),
        "u1": u16(s, 84), "extra_devices": u16(s, 86), "devt_slotoff": u16(s, 88),
    }  # fmt: skip


def ext_superblock(boot: bytes) -> dict[str, Any]:
    """§1.3: the 256-byte RafsV6SuperBlockExt @1152."""
    e = boot[EXT_SB_OFF : EXT_SB_OFF + 256]
    return {
        "flags": u64(e, 0), "blob_table_offset": u64(e, 8), "blob_table_size": u32(e, 16),
        "chunk_size": u32(e, 20), "chunk_table_offset": u64(e, 24), "chunk_table_size": u64(e, 32),
        "prefetch_table_offset": u64(e, 40), "prefetch_table_size": u32(e, 48),
    }  # fmt: skip


def devices(boot: bytes, sb: dict[str, Any]) -> list[dict[str, Any]]:
    """§1.4: 128-byte device slots at devt_slotoff*128."""
    base = sb["devt_slotoff"] * 128
    out = []
    for i in range(sb["extra_devices"]):
        d = boot[base + 128 * i : base + 128 * (i + 1)]
        out.append({"tag": cstr(d[0:64]).decode(), "blocks": u32(d, 64), "mapped_blkaddr": u32(d, 68)})
    return out


def blob_table(boot: bytes, ext: dict[str, Any]) -> list[dict[str, Any]]:
    """§1.6: 256-byte RafsV6Blob entries."""
    out = []
    for i in range(ext["blob_table_size"] // 256):
        b = boot[ext["blob_table_offset"] + 256 * i : ext["blob_table_offset"] + 256 * (i + 1)]
        out.append({
            "blob_id": cstr(b[0:64]).decode(), "blob_index": u32(b, 64), "chunk_size": u32(b, 68),
            "chunk_count": u32(b, 72), "compression_algo": u32(b, 76), "digest_algo": u32(b, 80),
            "features": u32(b, 84), "compressed_size": u64(b, 88), "uncompressed_size": u64(b, 96),
            "blob_toc_size": u32(b, 104), "ci_compressor": u32(b, 108), "ci_offset": u64(b, 112),
            "ci_compressed_size": u64(b, 120), "ci_uncompressed_size": u64(b, 128),
            "blob_toc_digest": b[136:168], "blob_meta_digest": b[168:200], "blob_meta_size": u64(b, 200),
            "cipher_algo": u32(b, 216),
        })  # fmt: skip
    return out


def chunk_table(boot: bytes, ext: dict[str, Any]) -> list[dict[str, Any]]:
    """§1.7: 80-byte RafsV5ChunkInfo entries."""
    out = []
    base = ext["chunk_table_offset"]
    for i in range(ext["chunk_table_size"] // 80):
        c = boot[base + 80 * i : base + 80 * (i + 1)]
        out.append({
            "digest": c[0:32], "blob_index": u32(c, 32), "flags": u32(c, 36), "c_size": u32(c, 40),
            "d_size": u32(c, 44), "c_off": u64(c, 48), "d_off": u64(c, 56), "file_offset": u64(c, 64),
            "index": u32(c, 72), "crc32": u32(c, 76),
        })  # fmt: skip
    return out


def prefetch_table(boot: bytes, ext: dict[str, Any]) -> list[int]:
    """§1.7: the prefetch table, little-endian u32 nids (size in bytes; offset 0 means no table)."""
    off, size = ext["prefetch_table_offset"], ext["prefetch_table_size"]
    if not off or not size:
        return []
    assert size % 4 == 0 and off + size <= len(boot), (off, size)
    return [u32(boot, off + 4 * i) for i in range(size // 4)]


@dataclass
class Bootstrap:
    raw: bytes
    sb: dict[str, Any]
    ext: dict[str, Any]
    devices: list[dict[str, Any]]
    blobs: list[dict[str, Any]]
    chunks: list[dict[str, Any]]


def decode_bootstrap(boot: bytes) -> Bootstrap:
    sb = superblock(boot)
    ext = ext_superblock(boot)
    return Bootstrap(boot, sb, ext, devices(boot, sb), blob_table(boot, ext), chunk_table(boot, ext))


# ---- inodes, dirents, chunk indexes (erofs-and-cachefiles.md §3-5, nydus §1.5) ---------------------------------
@dataclass
class Inode:
    nid: int
    offset: int
    extended: bool
    layout: int
    mode: int
    size: int
    i_u: int
    uid: int
    gid: int
    nlink: int
    xattr_icount: int

    @property
    def body_end(self) -> int:
        xsize = 0 if self.xattr_icount == 0 else 12 + 4 * (self.xattr_icount - 1)
        return self.offset + (64 if self.extended else 32) + xsize


def inode(bt: Bootstrap, nid: int) -> Inode:
    off = bt.sb["meta_blkaddr"] * BLOCK + 32 * nid
    b = bt.raw
    fmt = u16(b, off)
    if fmt & 1:  # extended, 64 B: '<HHHHQIIIIQII16x'
        _, xc, mode, _, size, i_u, _, uid, gid, _, _, nlink = struct.unpack_from("<HHHHQIIIIQII", b, off)
    else:  # compact, 32 B: '<HHHHIIIIHHI'
        _, xc, mode, nlink, size, _, i_u, _, uid, gid, _ = struct.unpack_from("<HHHHIIIIHHI", b, off)
    return Inode(nid, off, bool(fmt & 1), (fmt >> 1) & 7, mode, size, i_u, uid, gid, nlink, xc)


def _flat_data(bt: Bootstrap, ino: Inode) -> bytes:
    nblocks = -(-ino.size // BLOCK)
    if ino.layout == 0:  # FLAT_PLAIN
        return bt.raw[ino.i_u * BLOCK : ino.i_u * BLOCK + ino.size]
    assert ino.layout == 2, ino  # FLAT_INLINE: head blocks at raw_blkaddr, tail after inode+xattrs
    head = (nblocks - 1) * BLOCK
    return bt.raw[ino.i_u * BLOCK : ino.i_u * BLOCK + head] + bt.raw[ino.body_end : ino.body_end + ino.size - head]


def dirents(bt: Bootstrap, ino: Inode) -> list[tuple[bytes, int, int]]:
    """(name, nid, file_type) in on-disk order, '.' and '..' included (§5: 12-byte dirents, names after)."""
    data = _flat_data(bt, ino)
    out = []
    for start in range(0, len(data), BLOCK):
        blk = data[start : start + BLOCK]
        n = u16(blk, 8) // 12
        ents = [struct.unpack_from("<QHBB", blk, 12 * i) for i in range(n)]
        for i, (nid, nameoff, ftype, _) in enumerate(ents):
            end = ents[i + 1][1] if i + 1 < n else len(blk)
            out.append((cstr(blk[nameoff:end]), nid, ftype))
    return out


def lookup(bt: Bootstrap, path: str) -> Inode:
    ino = inode(bt, bt.sb["root_nid"])
    for part in path.strip("/").split("/"):
        if part:
            ino = inode(bt, next(nid for name, nid, _ in dirents(bt, ino) if name == part.encode()))
    return ino


def chunk_indexes(bt: Bootstrap, ino: Inode) -> tuple[int, list[tuple[int | None, int | None, int]]]:
    """(chunk size, [(blob_index, ci_index, blkaddr)...]) of a CHUNK_BASED file (§1.5 chunk index layout);
    holes (blkaddr 0xFFFFFFFF) have blob_index and ci_index None."""
    assert ino.layout == 4 and ino.i_u & 0x20, ino
    chunk_size = BLOCK << (ino.i_u & 0x1F)
    n = -(-ino.size // chunk_size)
    base = (ino.body_end + 7) & ~7
    out: list[tuple[int | None, int | None, int]] = []
    for i in range(n):
        lo, hi, blkaddr = struct.unpack_from("<HHI", bt.raw, base + 8 * i)
        if blkaddr == NULL_ADDR:
            out.append((None, None, blkaddr))
        else:
            out.append(((hi & 0xFF) - 1, (hi >> 8) << 16 | lo, blkaddr))
    return chunk_size, out


# ---- data blob (§1.8) ------------------------------------------------------------------------------------------
def tar_header(h: bytes) -> tuple[bytes, int, bool]:
    """(name, size, checksum ok) of a 512-byte tar header."""
    name = cstr(h[0:100])
    size = int(cstr(h[124:136]).strip() or b"0", 8)
    chk = int(cstr(h[148:156]).strip() or b"0", 8)
    return name, size, chk == sum(h[:148]) + 8 * 32 + sum(h[156:])


def chunk_info_v1(raw: bytes) -> dict[str, int]:
    """§1.8 chunk info v1 (16 B): uncomp_info then comp_info."""
    uncomp, comp = struct.unpack("<QQ", raw)
    d_off = ((uncomp >> 12) & ((1 << 32) - 1)) << 12  # offset in bits 12-43
    d_size = ((((uncomp >> 8) & 0xF) << 20) | (uncomp >> 44)) + 1  # size-1: low 20 bits at 44, high 4 at 8
    c_off = comp & ((1 << 40) - 1)  # offset in bits 0-39
    c_size = ((((comp >> 40) & 0xF) << 20) | (comp >> 44)) + 1  # size-1: high 4 bits at 40, low 20 at 44
    return {"c_off": c_off, "c_size": c_size, "d_off": d_off, "d_size": d_size}


@dataclass
class Blob:
    raw: bytes
    toc: dict[str, dict[str, Any]] = field(default_factory=dict)
    toc_bytes: bytes = b""
    toc_header_ok: bool = False
    cct: dict[str, Any] = field(default_factory=dict)
    ci_stored: bytes = b""
    chunks: list[dict[str, int]] = field(default_factory=list)
    digests: list[bytes] = field(default_factory=list)


def _decompress(algo: str, data: bytes, size: int) -> bytes:
    if algo == "none" or len(data) == size:
        return data
    if algo == "zstd":
        import zstandard

        return zstandard.ZstdDecompressor().decompress(data, max_output_size=size)
    if algo == "lz4_block":
        import lz4.block

        return lz4.block.decompress(data, uncompressed_size=size)
    raise ValueError(algo)


def decode_blob(raw: bytes, entry: dict[str, Any]) -> Blob:
    """Decode a blob given its blob-table entry: ToC (from the tail), CCT header, chunk-info table, digests."""
    blob = Blob(raw)
    name, size, ok = tar_header(raw[-512:])
    if name == b"rafs.blob.toc":
        blob.toc_header_ok = ok
        blob.toc_bytes = raw[-512 - size :]
        for i in range(size // 128):
            e = blob.toc_bytes[128 * i : 128 * (i + 1)]
            ename = cstr(e[8:24]).decode()
            blob.toc[ename] = {
                "flags": u32(e, 0), "digest": e[24:56], "c_off": u64(e, 56), "c_size": u64(e, 64),
                "d_size": u64(e, 72),
            }  # fmt: skip
    n = entry["chunk_count"]
    ci_comp = COMPRESSION_ALGOS[entry["ci_compressor"]]
    ci_off, ci_c, ci_d = entry["ci_offset"], entry["ci_compressed_size"], entry["ci_uncompressed_size"]
    blob.ci_stored = raw[ci_off : ci_off + ci_c]
    h = raw[ci_off + ci_c : ci_off + ci_c + 4096]  # "It directly follows the table"
    blob.cct = {
        "magic": u32(h, 0), "features": u32(h, 4), "ci_compressor": u32(h, 8), "ci_entries": u32(h, 12),
        "ci_offset": u64(h, 16), "ci_c_size": u64(h, 24), "ci_d_size": u64(h, 32), "magic2": u32(h, 4092),
        "raw": h,
    }  # fmt: skip
    table = _decompress(ci_comp, blob.ci_stored, ci_d)
    blob.chunks = [chunk_info_v1(table[16 * i : 16 * (i + 1)]) for i in range(n)]
    if "blob.digest" in blob.toc:
        d = blob.toc["blob.digest"]
        sect = raw[d["c_off"] : d["c_off"] + d["c_size"]]
        blob.digests = [sect[32 * i : 32 * (i + 1)] for i in range(n)]
    return blob


def chunk_data(blob: Blob, entry: dict[str, Any], ci: int) -> bytes:
    """The uncompressed bytes of chunk ``ci`` ("compressed iff c_size != d_size")."""
    c = blob.chunks[ci]
    stored = blob.raw[c["c_off"] : c["c_off"] + c["c_size"]]
    if c["c_size"] == c["d_size"]:
        return stored
    return _decompress(COMPRESSION_ALGOS[entry["compression_algo"]], stored, c["d_size"])


def digest(algo: str, data: bytes) -> bytes:
    if algo == "sha256":
        return hashlib.sha256(data).digest()
    import blake3

    return blake3.blake3(data).digest()


def read_file(bt: Bootstrap, path: str, blobs: dict[str, bytes]) -> bytes:
    """A regular file's bytes, through the chunk indexes and each blob's chunk-info table by uncompressed offset."""
    ino = lookup(bt, path)
    if ino.size == 0:
        return b""
    chunk_size, idx = chunk_indexes(bt, ino)
    out = bytearray()
    for blob_index, _ci, blkaddr in idx:
        want = min(chunk_size, ino.size - len(out))
        if blob_index is None:
            out += bytes(want)
            continue
        entry = bt.blobs[blob_index]
        blob = decode_blob(blobs[entry["blob_id"]], entry)
        start = blkaddr * BLOCK  # uncompressed offset in the blob; may span several real chunks (§1.5)
        by_off = {c["d_off"]: i for i, c in enumerate(blob.chunks)}
        got = b""
        while len(got) < want:
            ci = by_off[start + len(got)]
            got += chunk_data(blob, entry, ci)[: want - len(got)]
            if len(got) < want:
                got += bytes(-len(got) % BLOCK)[: want - len(got)]
        out += got
    return bytes(out)

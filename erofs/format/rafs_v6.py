"""What makes an EROFS image a Nydus RAFS v6 image: bootstrap tables and blob metadata.

Layouts from upstream Nydus (``rafs/src/metadata/layout/v6.rs``, ``rafs/src/metadata/layout/v5.rs``,
``storage/src/meta/{mod,toc,chunk_info_v1}.rs``, ``storage/src/device.rs``), named as there.
See ``docs/format.md`` §3, §4 and §9.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from erofs.format.cstruct import parse

# ---- bootstrap ---------------------------------------------------------------------------------
EROFS_FEATURE_COMPAT_RAFS_V6 = 0x40000000
RAFSV6_SUPER_EXT_OFFSET = 1152  # right after the 128-byte EROFS superblock at 1024
RAFSV6_DEVTABLE_OFFSET = 1408  # devt_slotoff = 11
RAFSV6_DEVT_SLOTOFF = RAFSV6_DEVTABLE_OFFSET // 128
RAFS_MAX_BLOBS = 254  # device_id low byte is blob_index + 1
RAFS_MAX_CHUNKS_PER_BLOB = 1 << 24  # ci_index is 24 bits across advise and device_id
RAFS_DEFAULT_CHUNK_SIZE = 1 << 20
RAFS_MIN_CHUNK_SIZE = 1 << 12
RAFS_MAX_CHUNK_SIZE = 1 << 24

# The prefetch table (RafsV6PrefetchTable): little-endian u32 nids, placed right after the blob table
# (not aligned); s_prefetch_table_size is in bytes.  See docs/format.md §3.
RAFSV6_PREFETCH_ENTRY_SIZE = 4
RAFSV6_PREFETCH_MAX_NID = 0xFFFFFFFE  # upstream asserts nid < u32::MAX

# RafsSuperFlags (rafs/src/metadata/mod.rs)
RAFS_SUPER_FLAG_COMPRESSION_NONE = 0x1
RAFS_SUPER_FLAG_COMPRESSION_LZ4 = 0x2
RAFS_SUPER_FLAG_HASH_BLAKE3 = 0x4
RAFS_SUPER_FLAG_HASH_SHA256 = 0x8
RAFS_SUPER_FLAG_EXPLICIT_UID_GID = 0x10
RAFS_SUPER_FLAG_HAS_XATTR = 0x20
RAFS_SUPER_FLAG_COMPRESSION_GZIP = 0x40
RAFS_SUPER_FLAG_COMPRESSION_ZSTD = 0x80
RAFS_SUPER_FLAG_INLINED_CHUNK_DIGEST = 0x100
RAFS_SUPER_FLAG_TARTFS_MODE = 0x200

# compression and digest algorithms as numbered in the blob table (utils/src/{compress,digest}.rs)
COMPRESSOR_NONE, COMPRESSOR_LZ4_BLOCK, COMPRESSOR_GZIP, COMPRESSOR_ZSTD = 0, 1, 2, 3
COMPRESSORS = {
    "none": COMPRESSOR_NONE,
    "lz4_block": COMPRESSOR_LZ4_BLOCK,
    "gzip": COMPRESSOR_GZIP,
    "zstd": COMPRESSOR_ZSTD,
}
COMPRESSOR_SUPER_FLAGS = {
    "none": RAFS_SUPER_FLAG_COMPRESSION_NONE,
    "lz4_block": RAFS_SUPER_FLAG_COMPRESSION_LZ4,
    "gzip": RAFS_SUPER_FLAG_COMPRESSION_GZIP,
    "zstd": RAFS_SUPER_FLAG_COMPRESSION_ZSTD,
}
DIGESTER_BLAKE3, DIGESTER_SHA256 = 0, 1
DIGESTERS = {"blake3": DIGESTER_BLAKE3, "sha256": DIGESTER_SHA256}
DIGESTER_SUPER_FLAGS = {"blake3": RAFS_SUPER_FLAG_HASH_BLAKE3, "sha256": RAFS_SUPER_FLAG_HASH_SHA256}
COMPRESSOR_NAMES = {v: k for k, v in COMPRESSORS.items()}
DIGESTER_NAMES = {v: k for k, v in DIGESTERS.items()}


def compressor_name(algo: int) -> str:
    """The name of a compressor id (``unknown-N`` for one this project does not know)."""
    return COMPRESSOR_NAMES.get(algo, f"unknown-{algo}")


def digester_name(algo: int) -> str:
    return DIGESTER_NAMES.get(algo, f"unknown-{algo}")


# BlobFeatures (storage/src/device.rs)
BLOB_FEATURE_ALIGNED = 0x1
BLOB_FEATURE_INLINED_FS_META = 0x2
BLOB_FEATURE_CHUNK_INFO_V2 = 0x4
BLOB_FEATURE_ZRAN = 0x8
BLOB_FEATURE_SEPARATE = 0x10
BLOB_FEATURE_INLINED_CHUNK_DIGEST = 0x20
BLOB_FEATURE_TARFS = 0x40
BLOB_FEATURE_BATCH = 0x80
BLOB_FEATURE_ENCRYPTED = 0x100
BLOB_FEATURE_HAS_TAR_HEADER = 0x10000000
BLOB_FEATURE_HAS_TOC = 0x20000000
BLOB_FEATURE_CAP_TAR_TOC = 0x40000000

# RafsV5ChunkInfo flags (the 80-byte bootstrap chunk table)
BLOB_CHUNK_FLAG_COMPRESSED = 0x1
BLOB_CHUNK_FLAG_ENCYPTED = 0x4
BLOB_CHUNK_FLAG_BATCH = 0x8
BLOB_CHUNK_FLAG_HAS_CRC32 = 0x10

# ---- blob metadata -----------------------------------------------------------------------------
BLOB_CCT_MAGIC = 0xB10BB10B
BLOB_CCT_HEADER_SIZE = 4096
BLOB_CHUNK_INFO_V1_SIZE = 16
TAR_BLOCK_SIZE = 512
# ToC entry names (storage/src/meta/toc.rs) and tar member names of the blob sections
TOC_ENTRY_BLOB_RAW = b"image.blob"
TOC_ENTRY_BLOB_META = b"blob.meta"
TOC_ENTRY_BLOB_META_HEADER = b"blob.meta.header"
TOC_ENTRY_BLOB_DIGEST = b"blob.digest"
TOC_ENTRY_BOOTSTRAP = b"image.boot"
TOC_ENTRY_BLOB_TOC = b"rafs.blob.toc"
# ToC entry flags: how the section is compressed
TOC_FLAG_COMPRESSION_NONE = 0x1
TOC_FLAG_COMPRESSION_ZSTD = 0x2
TOC_FLAG_COMPRESSION_LZ4_BLOCK = 0x4
TOC_FLAG_COMPRESSORS = {
    "none": TOC_FLAG_COMPRESSION_NONE,
    "zstd": TOC_FLAG_COMPRESSION_ZSTD,
    "lz4_block": TOC_FLAG_COMPRESSION_LZ4_BLOCK,
}

_C = """
struct RafsV6SuperBlockExt {
    __le64 s_flags;
    __le64 s_blob_table_offset;
    __le32 s_blob_table_size;
    __le32 s_chunk_size;
    __le64 s_chunk_table_offset;
    __le64 s_chunk_table_size;
    __le64 s_prefetch_table_offset;
    __le32 s_prefetch_table_size;
    __le32 s_padding;
    __u8 s_reserved[200];
};

struct RafsV6Blob {
    __u8 blob_id[64];
    __le32 blob_index;
    __le32 chunk_size;
    __le32 chunk_count;
    __le32 compression_algo;
    __le32 digest_algo;
    __le32 features;
    __le64 compressed_size;
    __le64 uncompressed_size;
    __le32 blob_toc_size;
    __le32 ci_compressor;
    __le64 ci_offset;
    __le64 ci_compressed_size;
    __le64 ci_uncompressed_size;
    __u8 blob_toc_digest[32];
    __u8 blob_meta_digest[32];
    __le64 blob_meta_size;
    __u8 cipher_iv[8];
    __le32 cipher_algo;
    __u8 reserved2[36];
};

struct RafsV5ChunkInfo {
    __u8 block_id[32];
    __le32 blob_index;
    __le32 flags;
    __le32 compressed_size;
    __le32 uncompressed_size;
    __le64 compressed_offset;
    __le64 uncompressed_offset;
    __le64 file_offset;
    __le32 index;
    __le32 crc32;
};

struct BlobChunkInfoV1Ondisk {
    __le64 uncomp_info;
    __le64 comp_info;
};

struct BlobCompressionContextHeader {
    __le32 s_magic;
    __le32 s_features;
    __le32 s_ci_compressor;
    __le32 s_ci_entries;
    __le64 s_ci_offset;
    __le64 s_ci_compressed_size;
    __le64 s_ci_uncompressed_size;
    __le64 s_ci_zran_offset;
    __le64 s_ci_zran_size;
    __le32 s_ci_zran_count;
    __u8 s_reserved[4032];
    __le32 s_magic2;
};

struct TocEntry {
    __le32 flags;
    __le32 reserved1;
    __u8 name[16];
    __u8 uncompressed_digest[32];
    __le64 compressed_offset;
    __le64 compressed_size;
    __le64 uncompressed_size;
    __u8 reserved2[48];
};
"""

_S = parse(_C)
RafsV6SuperBlockExt = _S["RafsV6SuperBlockExt"]
RafsV6Blob = _S["RafsV6Blob"]
RafsV5ChunkInfo = _S["RafsV5ChunkInfo"]
BlobChunkInfoV1Ondisk = _S["BlobChunkInfoV1Ondisk"]
BlobCompressionContextHeader = _S["BlobCompressionContextHeader"]
TocEntry = _S["TocEntry"]

SIZES = {
    "RafsV6SuperBlockExt": 256,
    "RafsV6Blob": 256,
    "RafsV5ChunkInfo": 80,
    "BlobChunkInfoV1Ondisk": 16,
    "BlobCompressionContextHeader": 4096,
    "TocEntry": 128,
}


def _cstr(raw: bytes) -> bytes:
    return raw.split(b"\0", 1)[0]


@dataclass(frozen=True, slots=True)
class BlobInfo:
    """One entry of the bootstrap's blob table (a ``RafsV6Blob``), decoded: what the builder records of a
    finished blob and what readers and the daemon know of it.  ``blob_index`` is the entry's position in the
    table (how chunks and the kernel's devices address it); all-zero digests read as None."""

    blob_index: int
    blob_id: str
    chunk_size: int
    chunk_count: int
    compressor: str
    digester: str
    features: int
    compressed_size: int  # the whole blob file
    uncompressed_size: int  # the 4 KiB aligned data layout
    ci_compressor: str
    ci_offset: int
    ci_compressed_size: int
    ci_uncompressed_size: int
    blob_toc_size: int
    blob_toc_digest: bytes | None = None
    blob_meta_digest: bytes | None = None
    blob_meta_size: int = 0

    @property
    def has_toc(self) -> bool:
        return bool(self.features & BLOB_FEATURE_HAS_TOC)

    def pack(self) -> bytes:
        """The blob-table entry."""
        return RafsV6Blob.pack(
            blob_id=self.blob_id.encode(),
            blob_index=self.blob_index,
            chunk_size=self.chunk_size,
            chunk_count=self.chunk_count,
            compression_algo=COMPRESSORS[self.compressor],
            digest_algo=DIGESTERS[self.digester],
            features=self.features,
            compressed_size=self.compressed_size,
            uncompressed_size=self.uncompressed_size,
            blob_toc_size=self.blob_toc_size,
            ci_compressor=COMPRESSORS[self.ci_compressor],
            ci_offset=self.ci_offset,
            ci_compressed_size=self.ci_compressed_size,
            ci_uncompressed_size=self.ci_uncompressed_size,
            blob_toc_digest=self.blob_toc_digest or bytes(32),
            blob_meta_digest=self.blob_meta_digest or bytes(32),
            blob_meta_size=self.blob_meta_size,
        )

    @classmethod
    def unpack(cls, buf: bytes | memoryview, offset: int, blob_index: int) -> BlobInfo:
        """The entry at ``offset`` of ``buf``, the ``blob_index``-th of its table (its own blob_index field is
        not trusted: :mod:`erofs.reader.check` compares it)."""
        b = RafsV6Blob.unpack(buf, offset)
        return cls(
            blob_index=blob_index,
            blob_id=_cstr(b.blob_id).decode("ascii", "backslashreplace"),
            chunk_size=b.chunk_size,
            chunk_count=b.chunk_count,
            compressor=compressor_name(b.compression_algo),
            digester=digester_name(b.digest_algo),
            features=b.features,
            compressed_size=b.compressed_size,
            uncompressed_size=b.uncompressed_size,
            blob_toc_size=b.blob_toc_size,
            ci_compressor=compressor_name(b.ci_compressor),
            ci_offset=b.ci_offset,
            ci_compressed_size=b.ci_compressed_size,
            ci_uncompressed_size=b.ci_uncompressed_size,
            blob_toc_digest=b.blob_toc_digest if any(b.blob_toc_digest) else None,
            blob_meta_digest=b.blob_meta_digest if any(b.blob_meta_digest) else None,
            blob_meta_size=b.blob_meta_size,
        )


# ---- bit fields --------------------------------------------------------------------------------
def chunk_index_fields(blob_index: int, ci_index: int) -> tuple[int, int]:
    """(advise, device_id) of an ``erofs_inode_chunk_index`` for chunk ``ci_index`` of blob ``blob_index``.

    ``advise`` keeps ci_index bits 0-15; ``device_id`` keeps ``blob_index + 1`` in its low byte (the kernel
    masks the rest away) and ci_index bits 16-23 in its high byte.
    """
    return ci_index & 0xFFFF, ((ci_index >> 16) & 0xFF) << 8 | (blob_index + 1)


def chunk_index_decode(advise: int, device_id: int) -> tuple[int, int]:
    """Inverse of :func:`chunk_index_fields`: (blob_index, ci_index); blob_index -1 means the bootstrap."""
    return (device_id & 0xFF) - 1, ((device_id >> 8) & 0xFF) << 16 | advise


def prefetch_table_pack(nids: list[int]) -> bytes:
    """The bytes of a prefetch table listing ``nids``."""
    return struct.pack(f"<{len(nids)}I", *nids)


def prefetch_table_unpack(raw: bytes | memoryview) -> list[int]:
    """The nids of a prefetch table (its size a multiple of 4)."""
    return list(struct.unpack(f"<{len(raw) // RAFSV6_PREFETCH_ENTRY_SIZE}I", raw))


def chunk_info_v1_encode(c_off: int, c_size: int, d_off: int, d_size: int) -> tuple[int, int]:
    """(uncomp_info, comp_info) of a ``BlobChunkInfoV1Ondisk``; sizes are 1..16 MiB, d_off 4 KiB aligned."""
    ds, cs = d_size - 1, c_size - 1
    uncomp = (d_off & 0xFFF_FFFF_F000) | ((ds >> 20) & 0xF) << 8 | (ds & 0xFFFFF) << 44
    comp = (c_off & 0xFF_FFFF_FFFF) | ((cs >> 20) & 0xF) << 40 | (cs & 0xFFFFF) << 44
    return uncomp, comp


def chunk_info_v1_decode(uncomp_info: int, comp_info: int) -> tuple[int, int, int, int]:
    """(c_off, c_size, d_off, d_size) of a ``BlobChunkInfoV1Ondisk``."""
    d_off = uncomp_info & 0xFFF_FFFF_F000
    d_size = (((uncomp_info >> 8) & 0xF) << 20 | (uncomp_info >> 44)) + 1
    c_off = comp_info & 0xFF_FFFF_FFFF
    c_size = (((comp_info >> 40) & 0xF) << 20 | (comp_info >> 44)) + 1
    return c_off, c_size, d_off, d_size

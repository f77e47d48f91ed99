"""The EROFS on-disk format, as the kernel's ``fs/erofs/erofs_fs.h`` (Linux 6.12) declares it.

Everything here is layout and constants; no logic.  Names follow the kernel so both trees grep alike.
"""

from __future__ import annotations

from erofs.format.cstruct import parse

EROFS_SUPER_OFFSET = 1024
EROFS_SUPER_MAGIC_V1 = 0xE0F5E1E2
EROFS_ISLOTBITS = 5
EROFS_SLOTSIZE = 1 << EROFS_ISLOTBITS  # nid = (inode offset - meta_blkaddr * blksz) / 32
EROFS_BLKSIZ_BITS = 12
EROFS_BLKSIZ = 1 << EROFS_BLKSIZ_BITS
EROFS_NULL_ADDR = 0xFFFFFFFF
EROFS_NAME_LEN = 255
EROFS_DEVT_SLOT_SIZE = 128

# feature_compat
EROFS_FEATURE_COMPAT_SB_CHKSUM = 0x00000001
EROFS_FEATURE_COMPAT_MTIME = 0x00000002
EROFS_FEATURE_COMPAT_XATTR_FILTER = 0x00000004
# feature_incompat (the subset an uncompressed chunked image uses, and what Linux 6.12 knows)
EROFS_FEATURE_INCOMPAT_ZERO_PADDING = 0x00000001
EROFS_FEATURE_INCOMPAT_COMPR_CFGS = 0x00000002
EROFS_FEATURE_INCOMPAT_CHUNKED_FILE = 0x00000004
EROFS_FEATURE_INCOMPAT_DEVICE_TABLE = 0x00000008
EROFS_FEATURE_INCOMPAT_ZTAILPACKING = 0x00000010
EROFS_FEATURE_INCOMPAT_FRAGMENTS = 0x00000020
EROFS_FEATURE_INCOMPAT_XATTR_PREFIXES = 0x00000040
EROFS_ALL_FEATURE_INCOMPAT_6_12 = 0x7F

# i_format: bit 0 version, bits 1-3 data layout; Linux 6.12 rejects any other bit
EROFS_I_VERSION_BIT = 0
EROFS_I_DATALAYOUT_BIT = 1
EROFS_I_ALL = 0xF
EROFS_INODE_LAYOUT_COMPACT = 0
EROFS_INODE_LAYOUT_EXTENDED = 1
EROFS_INODE_FLAT_PLAIN = 0
EROFS_INODE_COMPRESSED_FULL = 1
EROFS_INODE_FLAT_INLINE = 2
EROFS_INODE_COMPRESSED_COMPACT = 3
EROFS_INODE_CHUNK_BASED = 4

# chunk_info format (i_u of a CHUNK_BASED inode)
EROFS_CHUNK_FORMAT_BLKBITS_MASK = 0x001F
EROFS_CHUNK_FORMAT_INDEXES = 0x0020

# dirent file_type (FT_*)
EROFS_FT_UNKNOWN = 0
EROFS_FT_REG_FILE = 1
EROFS_FT_DIR = 2
EROFS_FT_CHRDEV = 3
EROFS_FT_BLKDEV = 4
EROFS_FT_FIFO = 5
EROFS_FT_SOCK = 6
EROFS_FT_SYMLINK = 7

# xattr e_name_index
EROFS_XATTR_INDEX_USER = 1
EROFS_XATTR_INDEX_POSIX_ACL_ACCESS = 2
EROFS_XATTR_INDEX_POSIX_ACL_DEFAULT = 3
EROFS_XATTR_INDEX_TRUSTED = 4
EROFS_XATTR_INDEX_LUSTRE = 5
EROFS_XATTR_INDEX_SECURITY = 6
EROFS_XATTR_LONG_PREFIX = 0x80

# prefix -> index; the ACL names are whole names (the entry stores an empty name)
EROFS_XATTR_PREFIXES: dict[int, bytes] = {
    EROFS_XATTR_INDEX_USER: b"user.",
    EROFS_XATTR_INDEX_POSIX_ACL_ACCESS: b"system.posix_acl_access",
    EROFS_XATTR_INDEX_POSIX_ACL_DEFAULT: b"system.posix_acl_default",
    EROFS_XATTR_INDEX_TRUSTED: b"trusted.",
    EROFS_XATTR_INDEX_SECURITY: b"security.",
}

_C = """
struct erofs_super_block {
    __le32 magic;
    __le32 checksum;
    __le32 feature_compat;
    __u8 blkszbits;
    __u8 sb_extslots;
    __le16 root_nid;
    __le64 inos;
    __le64 build_time;
    __le32 build_time_nsec;
    __le32 blocks;
    __le32 meta_blkaddr;
    __le32 xattr_blkaddr;
    __u8 uuid[16];
    __u8 volume_name[16];
    __le32 feature_incompat;
    union {
        __le16 available_compr_algs;
        __le16 lz4_max_distance;
    } u1;
    __le16 extra_devices;
    __le16 devt_slotoff;
    __u8 dirblkbits;
    __u8 xattr_prefix_count;
    __le32 xattr_prefix_start;
    __le64 packed_nid;
    __u8 xattr_filter_reserved;
    __u8 reserved2[23];
};

struct erofs_deviceslot {
    __u8 tag[64];
    __le32 blocks;
    __le32 mapped_blkaddr;
    __u8 reserved[56];
};

struct erofs_inode_compact {
    __le16 i_format;
    __le16 i_xattr_icount;
    __le16 i_mode;
    __le16 i_nlink;
    __le32 i_size;
    __le32 i_reserved;
    union {
        __le32 raw_blkaddr;
        __le32 rdev;
        __le32 compressed_blocks;
        __le32 chunk_info;
    } i_u;
    __le32 i_ino;
    __le16 i_uid;
    __le16 i_gid;
    __le32 i_reserved2;
};

struct erofs_inode_extended {
    __le16 i_format;
    __le16 i_xattr_icount;
    __le16 i_mode;
    __le16 i_reserved;
    __le64 i_size;
    union {
        __le32 raw_blkaddr;
        __le32 rdev;
        __le32 compressed_blocks;
        __le32 chunk_info;
    } i_u;
    __le32 i_ino;
    __le32 i_uid;
    __le32 i_gid;
    __le64 i_mtime;
    __le32 i_mtime_nsec;
    __le32 i_nlink;
    __u8 i_reserved2[16];
};

struct erofs_inode_chunk_index {
    __le16 advise;
    __le16 device_id;
    __le32 blkaddr;
};

struct erofs_dirent {
    __le64 nid;
    __le16 nameoff;
    __u8 file_type;
    __u8 reserved;
};

struct erofs_xattr_ibody_header {
    __le32 h_name_filter;
    __u8 h_shared_count;
    __u8 h_reserved2[7];
};

struct erofs_xattr_entry {
    __u8 e_name_len;
    __u8 e_name_index;
    __le16 e_value_size;
};
"""

_S = parse(_C)
erofs_super_block = _S["erofs_super_block"]
erofs_deviceslot = _S["erofs_deviceslot"]
erofs_inode_compact = _S["erofs_inode_compact"]
erofs_inode_extended = _S["erofs_inode_extended"]
erofs_inode_chunk_index = _S["erofs_inode_chunk_index"]
erofs_dirent = _S["erofs_dirent"]
erofs_xattr_ibody_header = _S["erofs_xattr_ibody_header"]
erofs_xattr_entry = _S["erofs_xattr_entry"]

# sizeof() of each, as the kernel's BUILD_BUG_ONs in fs/erofs/super.c assert them
SIZES = {
    "erofs_super_block": 128,
    "erofs_deviceslot": 128,
    "erofs_inode_compact": 32,
    "erofs_inode_extended": 64,
    "erofs_inode_chunk_index": 8,
    "erofs_dirent": 12,
    "erofs_xattr_ibody_header": 12,
    "erofs_xattr_entry": 4,
}


def erofs_xattr_ibody_size(icount: int) -> int:
    """Bytes of the inline xattr body for ``i_xattr_icount`` (kernel ``erofs_xattr_ibody_size``)."""
    return 0 if icount == 0 else 12 + 4 * (icount - 1)


def erofs_new_encode_dev(major: int, minor: int) -> int:
    """``new_encode_dev``: the rdev a device inode stores in ``i_u``."""
    return (minor & 0xFF) | (major << 8) | ((minor & ~0xFF) << 12)


def erofs_new_decode_dev(rdev: int) -> tuple[int, int]:
    """``new_decode_dev``: (major, minor) of a stored rdev."""
    return (rdev & 0xFFF00) >> 8, (rdev & 0xFF) | ((rdev >> 12) & 0xFFF00)


TIME64_MIN = -(1 << 63)
TIME64_MAX = (1 << 63) - 1


def erofs_time_encode(sec: int) -> int:
    """A ``time64_t`` (signed seconds; before 1970 is negative) as the ``__le64`` of ``i_mtime`` and the
    superblock's ``build_time`` hold it: two's complement, which the kernel reads back as ``time64_t``."""
    if not TIME64_MIN <= sec <= TIME64_MAX:
        raise OverflowError(f"{sec} seconds does not fit a signed 64-bit time")
    return sec & ((1 << 64) - 1)


def erofs_time_decode(raw: int) -> int:
    """Inverse of :func:`erofs_time_encode`: the signed seconds of an on-disk ``__le64`` time."""
    return raw - (1 << 64) if raw >= 1 << 63 else raw


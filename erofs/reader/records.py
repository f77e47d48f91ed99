"""What reading a bootstrap yields: an on-disk inode, a directory entry, a device slot, a chunk-table entry and
how a file's bytes map onto the bootstrap and blobs, as plain values; and the superblock checksum.
"""

from __future__ import annotations

import stat
from dataclasses import dataclass
from typing import NamedTuple

from erofs.errors import ImageError
from erofs.format import erofs_fs as fs

# ---------------------------------------------------------------------------------------------------------------
# superblock checksum

_SB_CSUM_OFF = fs.EROFS_SUPER_OFFSET + 4


def erofs_superblock_csum(block0: bytes | memoryview, blkszbits: int = fs.EROFS_BLKSIZ_BITS) -> int:
    """The kernel's ``erofs_superblock_csum_verify`` value for the first block of an image.

    Raw crc32c (seed ~0, no final inversion) over ``[1024, 1024 + len)`` with the checksum field zeroed, where
    ``len = blksz - 1024`` for blocks larger than 1 KiB (else ``blksz``).
    """
    blksz = 1 << blkszbits
    length = blksz - fs.EROFS_SUPER_OFFSET if blksz > fs.EROFS_SUPER_OFFSET else blksz
    end = fs.EROFS_SUPER_OFFSET + length
    if len(block0) < end:
        raise ImageError(f"superblock: image is {len(block0)} bytes, shorter than its first block ({end})")
    view = memoryview(block0)
    import crc32c  # here, not at the top: its package imports importlib.metadata and argparse (~20 ms) and only
    # images with EROFS_FEATURE_COMPAT_SB_CHKSUM (mkfs.erofs's, not ours or upstream Nydus's) need it

    crc = crc32c.crc32c(view[fs.EROFS_SUPER_OFFSET : _SB_CSUM_OFF])
    crc = crc32c.crc32c(b"\0\0\0\0", crc)
    crc = crc32c.crc32c(view[_SB_CSUM_OFF + 4 : end], crc)
    return crc ^ 0xFFFFFFFF


# ---------------------------------------------------------------------------------------------------------------
# value types

LAYOUT_NAMES = {0: "flat_plain", 1: "compressed_full", 2: "flat_inline", 3: "compressed_compact", 4: "chunk_based"}


@dataclass(frozen=True, slots=True)
class Device:
    """One slot of the EROFS device table (device ``index + 1``)."""

    index: int
    tag: str
    blocks: int
    mapped_blkaddr: int

    @property
    def key(self) -> str:
        """Name to fetch this device by: its tag, or ``device<N>`` when the tag is empty (mkfs.erofs --blobdev)."""
        return self.tag or f"device{self.index + 1}"


class ChunkInfo(NamedTuple):
    """One 80-byte ``RafsV5ChunkInfo`` of the bootstrap chunk table."""

    digest: bytes
    blob_index: int
    flags: int
    compressed_size: int
    uncompressed_size: int
    compressed_offset: int
    uncompressed_offset: int
    file_offset: int
    index: int
    crc32: int


class FileChunk(NamedTuple):
    """A piece of a file's data.

    ``blob_offset is None`` is a hole (reads as zeros).  ``blob_index == -1`` means the bootstrap itself
    (``blob_offset`` is then a byte offset in the bootstrap); otherwise the RAFS blob index / EROFS device slot,
    with ``blob_offset`` the uncompressed byte offset in it and ``ci_index`` the chunk's index in the blob's
    chunk-info table (None for plain EROFS devices, which have no chunk table).
    """

    file_offset: int
    length: int
    blob_index: int
    ci_index: int | None
    blob_offset: int | None

    @property
    def is_hole(self) -> bool:
        return self.blob_offset is None


class Dirent(NamedTuple):
    name: bytes
    nid: int
    file_type: int


@dataclass(frozen=True, slots=True)
class Inode:
    nid: int
    offset: int  # byte offset of the inode in the bootstrap
    i_format: int
    extended: bool
    layout: int
    mode: int
    nlink: int
    size: int
    i_u: int
    uid: int
    gid: int
    mtime: int
    mtime_nsec: int
    xattr_icount: int

    @property
    def isize(self) -> int:
        return 64 if self.extended else 32

    @property
    def xattr_isize(self) -> int:
        return fs.erofs_xattr_ibody_size(self.xattr_icount)

    @property
    def layout_name(self) -> str:
        return LAYOUT_NAMES.get(self.layout, f"layout-{self.layout}")

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)

    @property
    def is_reg(self) -> bool:
        return stat.S_ISREG(self.mode)

    @property
    def is_symlink(self) -> bool:
        return stat.S_ISLNK(self.mode)

    @property
    def is_device(self) -> bool:
        return stat.S_ISCHR(self.mode) or stat.S_ISBLK(self.mode)

    @property
    def rdev(self) -> tuple[int, int]:
        """(major, minor) of a device inode."""
        return fs.erofs_new_decode_dev(self.i_u) if self.is_device else (0, 0)

    @property
    def mtime_ns(self) -> int:
        return self.mtime * 1_000_000_000 + self.mtime_nsec


_FT_BY_MODE = {
    stat.S_IFREG: fs.EROFS_FT_REG_FILE,
    stat.S_IFDIR: fs.EROFS_FT_DIR,
    stat.S_IFCHR: fs.EROFS_FT_CHRDEV,
    stat.S_IFBLK: fs.EROFS_FT_BLKDEV,
    stat.S_IFIFO: fs.EROFS_FT_FIFO,
    stat.S_IFSOCK: fs.EROFS_FT_SOCK,
    stat.S_IFLNK: fs.EROFS_FT_SYMLINK,
}


def file_type_of_mode(mode: int) -> int:
    return _FT_BY_MODE.get(stat.S_IFMT(mode), fs.EROFS_FT_UNKNOWN)

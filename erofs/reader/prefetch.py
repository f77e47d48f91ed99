"""Reading a bootstrap's prefetch table (``RafsV6PrefetchTable``): its nids, their paths, the files to fetch.

The table is ``s_prefetch_table_size / 4`` little-endian u32 nids at ``s_prefetch_table_offset`` (docs/format.md
§3).  Upstream's rules for where it may sit (``RafsV6SuperBlockExt::validate``): past the first block and the
device table, inside the bootstrap, its size a multiple of 4; legacy images may carry a size with offset 0,
which means no table.  Each entry names a regular file (fetch it) or a directory (fetch everything under it).
"""

from __future__ import annotations

from dataclasses import dataclass

from erofs.errors import ImageError
from erofs.format import erofs_fs as fs
from erofs.format import rafs_v6 as rv
from erofs.reader.bootstrap import Bootstrap
from erofs.reader.records import Inode


def prefetch_nids(bs: Bootstrap) -> list[int]:
    """The table's nids, in order ([] when there is none); ImageError when the table is misplaced."""
    ext = bs.ext
    if ext is None or not ext.s_prefetch_table_size or not ext.s_prefetch_table_offset:
        return []
    off, size = ext.s_prefetch_table_offset, ext.s_prefetch_table_size
    devt_end = bs.sb.devt_slotoff * fs.EROFS_DEVT_SLOT_SIZE + len(bs.devices) * fs.EROFS_DEVT_SLOT_SIZE
    if size % rv.RAFSV6_PREFETCH_ENTRY_SIZE:
        raise ImageError(f"prefetch table: size {size} is not a multiple of {rv.RAFSV6_PREFETCH_ENTRY_SIZE}")
    if off < bs.blksz or off < devt_end:
        raise ImageError(f"prefetch table: offset {off} is inside the superblock or the device table")
    if off + size > bs.size:
        raise ImageError(f"prefetch table: bytes {off}..{off + size} are past the end of the bootstrap ({bs.size})")
    return rv.prefetch_table_unpack(bs.data[off : off + size])


@dataclass(frozen=True, slots=True)
class PrefetchEntry:
    """One table entry: its nid and, when the nid is an inode of the tree, its (first) path and inode."""

    nid: int
    path: str | None
    inode: Inode | None

    @property
    def kind(self) -> str:
        if self.inode is None:
            return "invalid"
        return "file" if self.inode.is_reg else "directory" if self.inode.is_dir else "other"


def _paths_by_nid(bs: Bootstrap) -> dict[int, tuple[str, Inode]]:
    out: dict[int, tuple[str, Inode]] = {}
    for path, _, ino in bs.walk(on_error=lambda _p, _e: None):
        out.setdefault(ino.nid, (path, ino))
    return out


def prefetch_entries(bs: Bootstrap) -> list[PrefetchEntry]:
    """The table's entries with their paths (None for a nid no directory entry reaches)."""
    nids = prefetch_nids(bs)
    if not nids:
        return []
    known = _paths_by_nid(bs)
    return [PrefetchEntry(nid, *known[nid]) if nid in known else PrefetchEntry(nid, None, None) for nid in nids]


def prefetch_problems(bs: Bootstrap) -> list[str]:
    """What ``check`` reports about the table: where it sits, and entries that are not a regular file or a
    directory of the tree."""
    try:
        entries = prefetch_entries(bs)
    except ImageError as e:
        return [str(e)]
    out = []
    for i, e in enumerate(entries):
        if e.inode is None:
            out.append(f"prefetch table entry {i}: nid {e.nid} is not an inode of the tree")
        elif e.kind == "other":
            out.append(f"prefetch table entry {i}: {e.path} (nid {e.nid}) is not a regular file or a directory")
    return out


def prefetch_files(bs: Bootstrap) -> list[tuple[str, Inode]]:
    """The regular files the table asks for, in table order, directories expanded (parents before children,
    on-disk name order), each file once, empty files left out."""
    entries = prefetch_entries(bs)
    if not entries:
        return []
    out: list[tuple[str, Inode]] = []
    seen: set[int] = set()
    tree: list[tuple[str, Inode]] | None = None
    for e in entries:
        if e.inode is None or e.path is None:
            continue
        if e.inode.is_reg:
            candidates = [(e.path, e.inode)]
        elif e.inode.is_dir:
            if tree is None:
                tree = [(p, i) for p, _, i in bs.walk(on_error=lambda _p, _e: None) if i.is_reg]
            prefix = e.path.rstrip("/") + "/"
            candidates = [(p, i) for p, i in tree if p.startswith(prefix)]
        else:
            continue
        for path, ino in candidates:
            if ino.nid not in seen and ino.size:
                seen.add(ino.nid)
                out.append((path, ino))
    return out

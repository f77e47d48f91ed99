"""Test helpers: compare two trees the way a user sees them (mounting is in :mod:`tests.support.kmount`)."""

from __future__ import annotations

import errno
import hashlib
import os
import stat
from pathlib import Path

from tests.support.kmount import mount_erofs

__all__ = ["assert_same_snapshot", "assert_same_tree", "image_devices", "mount_erofs", "snapshot"]


def image_devices(out_dir: Path) -> list[Path]:
    """The blob files of an image built into ``out_dir``, in device-table order (from the bootstrap)."""
    from erofs.format import erofs_fs as e

    raw = (out_dir / "image.boot").read_bytes()
    sb = e.erofs_super_block.unpack(raw, e.EROFS_SUPER_OFFSET)
    tags = []
    for i in range(sb.extra_devices):
        slot = e.erofs_deviceslot.unpack(raw, sb.devt_slotoff * 128 + i * 128)
        tags.append(slot.tag.rstrip(b"\0").decode())
    return [out_dir / "blobs" / t for t in tags]


def _digest(path: bytes) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _xattrs(path: bytes) -> dict[str, bytes]:
    try:
        return {
            n: os.getxattr(path, n, follow_symlinks=False) for n in sorted(os.listxattr(path, follow_symlinks=False))
        }
    except OSError as e:
        if e.errno == errno.ENOTSUP:
            return {}
        raise


def snapshot(root: str | os.PathLike[str], content: bool = True, ignore_dir_size: bool = True,
             skip: frozenset[bytes] = frozenset()) -> dict[bytes, tuple]:  # fmt: skip
    """Every entry below ``root`` as a comparable record; hard-link groups as sorted path lists."""
    top = os.fsencode(root)
    out: dict[bytes, tuple] = {}
    inodes: dict[tuple[int, int], list[bytes]] = {}
    for dirpath, dirnames, filenames in os.walk(top):
        for name in dirnames + filenames:
            full = os.path.join(dirpath, name)
            rel = os.path.relpath(full, top)
            if rel in skip:
                continue
            st = os.lstat(full)
            fmt = stat.S_IFMT(st.st_mode)
            rec: list[object] = [st.st_mode, st.st_uid, st.st_gid, st.st_mtime_ns]
            if fmt == stat.S_IFDIR:
                rec.append(None if ignore_dir_size else st.st_size)
            elif fmt == stat.S_IFREG:
                rec += [st.st_size, _digest(full) if content else None]
                if st.st_nlink > 1:
                    inodes.setdefault((st.st_dev, st.st_ino), []).append(rel)
            elif fmt == stat.S_IFLNK:
                rec.append(os.readlink(full))
            elif fmt in (stat.S_IFCHR, stat.S_IFBLK):
                rec.append((os.major(st.st_rdev), os.minor(st.st_rdev)))
            rec.append(tuple(_xattrs(full).items()))
            out[rel] = tuple(rec)
    root_st = os.lstat(top)
    out[b"."] = (root_st.st_mode, root_st.st_uid, root_st.st_gid, root_st.st_mtime_ns, tuple(_xattrs(top).items()))
    groups = sorted(sorted(g) for g in inodes.values() if len(g) > 1)
    out[b"<hardlinks>"] = tuple(tuple(g) for g in groups)
    return out


def assert_same_tree(expected: str | os.PathLike[str], actual: str | os.PathLike[str], **kw: object) -> None:
    """Assert two trees are equal entry by entry, with a readable diff of the first differences."""
    assert_same_snapshot(snapshot(expected, **kw), snapshot(actual, **kw))  # type: ignore[arg-type]


def assert_same_snapshot(a: dict[bytes, tuple], b: dict[bytes, tuple]) -> None:
    """Assert two :func:`snapshot` results are equal (one may come from elsewhere, e.g. the host for the VM)."""
    if a == b:
        return
    missing = sorted(a.keys() - b.keys())[:10]
    extra = sorted(b.keys() - a.keys())[:10]
    differ = [(k, a[k], b[k]) for k in sorted(a.keys() & b.keys()) if a[k] != b[k]][:10]
    raise AssertionError(f"trees differ:\n missing {missing}\n extra {extra}\n differ {differ}")

"""Encoding inline xattrs the way EROFS stores them (``fs/erofs/xattr.c``)."""

from __future__ import annotations

from erofs.errors import SourceError
from erofs.format.erofs_fs import (
    EROFS_XATTR_INDEX_POSIX_ACL_ACCESS,
    EROFS_XATTR_INDEX_POSIX_ACL_DEFAULT,
    EROFS_XATTR_PREFIXES,
    erofs_xattr_entry,
    erofs_xattr_ibody_header,
)

_WHOLE_NAMES = {
    EROFS_XATTR_PREFIXES[EROFS_XATTR_INDEX_POSIX_ACL_ACCESS]: EROFS_XATTR_INDEX_POSIX_ACL_ACCESS,
    EROFS_XATTR_PREFIXES[EROFS_XATTR_INDEX_POSIX_ACL_DEFAULT]: EROFS_XATTR_INDEX_POSIX_ACL_DEFAULT,
}
_PREFIXES = [(p, i) for i, p in EROFS_XATTR_PREFIXES.items() if p.endswith(b".")]


def split_name(name: bytes) -> tuple[int, bytes]:
    """(e_name_index, stored suffix) of a full xattr name; SourceError for names EROFS cannot hold."""
    if name in _WHOLE_NAMES:
        return _WHOLE_NAMES[name], b""
    for prefix, index in _PREFIXES:
        if name.startswith(prefix) and len(name) > len(prefix):
            suffix = name[len(prefix) :]
            if len(suffix) > 255:
                raise SourceError(f"xattr name too long for EROFS (>255 bytes after prefix): {name[:40]!r}...")
            return index, suffix
    raise SourceError(
        f"xattr {name.decode(errors='replace')!r}: EROFS stores only user., trusted., security. and POSIX ACL xattrs"
    )


def check_xattrs(xattrs: dict[bytes, bytes]) -> None:
    """Raise SourceError if any xattr cannot be stored."""
    for name, value in xattrs.items():
        split_name(name)
        if len(value) > 0xFFFF:
            raise SourceError(f"xattr {name.decode(errors='replace')!r}: value over 64 KiB")


def ibody(xattrs: dict[bytes, bytes]) -> tuple[bytes, int]:
    """(inline xattr body, i_xattr_icount) for ``xattrs``; empty body and 0 when there are none."""
    if not xattrs:
        return b"", 0
    parts = [erofs_xattr_ibody_header.pack()]
    for index, suffix, value in sorted((*split_name(n), v) for n, v in xattrs.items()):
        entry = erofs_xattr_entry.pack(e_name_len=len(suffix), e_name_index=index, e_value_size=len(value))
        raw = entry + suffix + value
        parts.append(raw + bytes(-len(raw) % 4))
    body = b"".join(parts)
    icount = (len(body) - 12) // 4 + 1
    if icount > 0xFFFF:
        raise SourceError("too many xattrs for one inode (over 256 KiB inline)")
    return body, icount

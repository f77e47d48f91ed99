"""A tar layer read as a stream into a layer tree (its bytes, plain, gzip or zstd, come through
:mod:`erofs.build.sources.stream`).

Nothing is extracted: each member's data flows from the archive straight into the layer's blob through
the :class:`~erofs.build.chunker.ChunkStore`, and the tree is built by name only (no path is ever resolved on
disk, so no symlink is followed).  Names are normalised (``./``, leading ``/``, repeated slashes); a
``..`` that would leave the root is an error.  Missing parent directories are created implicitly
(0755, root-owned, mtime 0) and marked so the merge keeps a lower layer's metadata for them.

Whiteouts (``.wh.NAME``, ``.wh..wh..opq``) stay in the layer tree as the ordinary entries they are in the
archive; :mod:`erofs.build.overlay` interprets them.  A hard link to a member that is not in this layer (tar
requires the target to precede the link) becomes a placeholder resolved against the lower layers by the
merge.
"""

from __future__ import annotations

import base64
import os
import stat
import sys
import tarfile
import urllib.parse
from collections.abc import Callable, Iterator
from typing import BinaryIO

from erofs.build.chunker import ChunkStore
from erofs.build.sources.stream import READ_SIZE, LayerStream, open_source
from erofs.build.tree import LINK_PLACEHOLDER_MODE, ChunkRef, LayerTree, Node, is_placeholder
from erofs.build.xattr import check_xattrs
from erofs.errors import NydusErofsError, SourceError
from erofs.format.erofs_fs import EROFS_NAME_LEN, TIME64_MAX, TIME64_MIN

_HEADER_READ = 16 << 10  # tarfile's read-ahead: small, since member data bypasses it
MAX_MAJOR = (1 << 12) - 1  # new_encode_dev: 12-bit major, 20-bit minor
MAX_MINOR = (1 << 20) - 1
_MAX_SYMLINK = 4095
_MAX_SPARSE_CHUNKS = 1 << 22  # a sparse file's chunk indexes stay under 32 MiB of bootstrap


# ---- names, times, numbers ---------------------------------------------------------------------


def _fs(text: str) -> bytes:
    return text.encode("utf-8", "surrogateescape")


def split_path(name: bytes, member: str) -> list[bytes]:
    """Normalised components of an archive path; '..' may not climb above the root."""
    if b"\0" in name:
        raise SourceError(f"member {member!r}: NUL byte in name")
    parts: list[bytes] = []
    for comp in name.split(b"/"):
        if comp in (b"", b"."):
            continue
        if comp == b"..":
            if not parts:
                raise SourceError(f"member {member!r}: path escapes the image root ('..')")
            parts.pop()
            continue
        if len(comp) > EROFS_NAME_LEN:
            raise SourceError(f"member {member[:60]!r}...: name component longer than {EROFS_NAME_LEN} bytes")
        parts.append(comp)
    return parts


def parse_pax_time(text: str, member: str) -> tuple[int, int]:
    """(seconds, nanoseconds) of a PAX time like '1700000000.123456789' or '-1.5' (floor semantics)."""
    t = text.strip()
    neg = t.startswith("-")
    body = t[1:] if neg else t
    whole, _, frac = body.partition(".")
    if not whole.isdigit() or (frac and not frac.isdigit()) or not whole.isascii() or not frac.isascii():
        raise SourceError(f"member {member!r}: invalid PAX time {text!r}")
    sec = int(whole)
    nsec = int((frac + "000000000")[:9]) if frac else 0
    if neg:
        sec = -sec
        if nsec:
            sec -= 1
            nsec = 1_000_000_000 - nsec
    return sec, nsec


def _check_time(sec: int, member: str) -> int:
    """``sec`` if EROFS can store it: any signed 64-bit time, before 1970 too (as mkfs.erofs does)."""
    if not TIME64_MIN <= sec <= TIME64_MAX:
        raise SourceError(f"member {member!r}: timestamp {sec} is out of range for EROFS (signed 64-bit seconds)")
    return sec


def _xattrs(info: tarfile.TarInfo) -> dict[bytes, bytes]:
    out: dict[bytes, bytes] = {}
    for key, value in info.pax_headers.items():
        if key.startswith("SCHILY.xattr."):
            out[_fs(key[len("SCHILY.xattr.") :])] = _fs(value)
        elif key.startswith("LIBARCHIVE.xattr."):
            name = urllib.parse.unquote_to_bytes(key[len("LIBARCHIVE.xattr.") :])
            try:
                out[name] = base64.b64decode(_fs(value) + b"==", validate=False)
            except ValueError:
                raise SourceError(f"member {info.name!r}: bad base64 in xattr {name!r}") from None
    try:
        check_xattrs(out)
    except SourceError as e:
        raise SourceError(f"member {info.name!r}: {e}") from None
    return out


# ---- the reader --------------------------------------------------------------------------------


class TarLayerReader:
    """Fills a :class:`LayerTree` from one tar stream; one instance per layer."""

    def __init__(self, stream: LayerStream, store: ChunkStore, label: str) -> None:
        self.stream = stream
        self.store = store
        self.label = label
        self.tree = LayerTree(Node.directory(0o755))
        self.tree.implicit.add(id(self.tree.root))

    # -- tree placement
    def _parent(self, parts: list[bytes]) -> Node:
        node = self.tree.root
        for comp in parts[:-1]:
            assert node.children is not None
            child = node.children.get(comp)
            if child is None or child.children is None:
                # absent, or a non-directory (a symlink, a file) in the way: the path wins by name
                child = Node.directory(0o755)
                self.tree.implicit.add(id(child))
                node.children[comp] = child
            node = child
        return node

    def _lookup(self, parts: list[bytes]) -> Node | None:
        node: Node | None = self.tree.root
        for comp in parts:
            if node is None or node.children is None:
                return None
            node = node.children.get(comp)
        return node

    def _place(self, parts: list[bytes], node: Node) -> None:
        if not parts:  # the root itself ('./')
            root = self.tree.root
            if node.children is None:
                raise SourceError(f"{self.label}: the archive's root entry is not a directory")
            self._set_meta(root, node)
            self.tree.implicit.discard(id(root))
            return
        parent = self._parent(parts)
        assert parent.children is not None
        name = parts[-1]
        old = parent.children.get(name)
        if old is not None and old.children is not None and node.children is not None:
            self._set_meta(old, node)  # a directory entry again: new metadata, same contents
            self.tree.implicit.discard(id(old))
            return
        parent.children[name] = node
        if is_placeholder(node):
            self.tree.link_sites.setdefault(id(node), []).append((parent, name))

    @staticmethod
    def _set_meta(dst: Node, src: Node) -> None:
        dst.mode, dst.uid, dst.gid = src.mode, src.uid, src.gid
        dst.mtime, dst.mtime_nsec, dst.xattrs = src.mtime, src.mtime_nsec, src.xattrs

    # -- members
    def _inode(self, info: tarfile.TarInfo, fmt: int) -> Node:
        name = info.name
        raw_mtime = info.pax_headers.get("mtime")
        if raw_mtime is not None:
            sec, nsec = parse_pax_time(raw_mtime, name)
        else:
            sec, nsec = int(info.mtime), 0
        sec = _check_time(sec, name)
        if not 0 <= info.uid < 1 << 32 or not 0 <= info.gid < 1 << 32:
            raise SourceError(f"member {name!r}: uid/gid {info.uid}/{info.gid} out of range (32 bits)")
        return Node(mode=fmt | (info.mode & 0o7777), uid=info.uid, gid=info.gid, mtime=sec, mtime_nsec=nsec,
                     xattrs=_xattrs(info))  # fmt: skip

    def _readinto(self, view: memoryview) -> int:
        """Member data straight from the decoded stream into ``view`` (no copies through tarfile's buffer).

        tarfile's stream object keeps a small read-ahead (``buf``) and a position (``pos``): the read-ahead
        is used first, then the layer stream fills the rest, and the position is advanced to match.
        """
        s = self._tar_fileobj
        if not self._direct:
            data = s.read(len(view))
            view[: len(data)] = data
            return len(data)
        n = 0
        if s.buf:
            n = min(len(s.buf), len(view))
            view[:n] = s.buf[:n]
            s.buf = s.buf[n:]
        while n < len(view):
            got = self.stream.readinto(view[n:])
            if not got:
                break
            n += got
        s.pos += n
        return n

    def _data(self, info: tarfile.TarInfo) -> list[ChunkRef | None]:
        self._tar_fileobj.seek(info.offset_data)
        if info.sparse is not None:
            return self._sparse_data(info)
        try:
            return self.store.add_stream(self._readinto, info.size)
        except EOFError:
            raise SourceError(f"{self.label}: truncated archive (data of {info.name!r} ends early)") from None

    def _sparse_data(self, info: tarfile.TarInfo) -> list[ChunkRef | None]:
        size, cs = info.size, self.store.chunk_size
        if -(-size // cs) > _MAX_SPARSE_CHUNKS:
            raise SourceError(f"member {info.name!r}: sparse file of {size} bytes is too large ({cs}-byte chunks)")
        segs = [(o, n) for o, n in info.sparse if n]  # type: ignore[union-attr]
        end = 0
        for o, n in segs:
            if o < end or o + n > size:
                raise SourceError(f"member {info.name!r}: invalid sparse map")
            end = o + n
        chunks: list[ChunkRef | None] = []
        buf = bytearray(min(cs, size))
        si = 0
        for start in range(0, size, cs):
            stop = min(size, start + cs)
            view = memoryview(buf)[: stop - start]
            has_data = False
            view[:] = bytes(len(view))
            while si < len(segs) and segs[si][0] < stop:
                o, n = segs[si]
                a, b = max(o, start), min(o + n, stop)
                if a < b:
                    if self._readinto(view[a - start : b - start]) != b - a:
                        raise SourceError(f"{self.label}: truncated archive (data of {info.name!r} ends early)")
                    has_data = True
                if o + n <= stop:
                    si += 1
                else:
                    break
            chunks.append(self.store.add(view) if has_data else None)
        return chunks

    def _member(self, info: tarfile.TarInfo) -> None:
        name = info.name
        parts = split_path(_fs(name), name)
        t = info.type
        if info.isdir():
            node = self._inode(info, stat.S_IFDIR)
            node.children = {}
        elif info.isreg():  # includes contiguous files and sparse members
            node = self._inode(info, stat.S_IFREG)
            node.size = info.size
            if info.size:
                node.chunks = self._data(info)
        elif info.issym():
            node = self._inode(info, stat.S_IFLNK)
            node.mode = stat.S_IFLNK | 0o777  # what every Linux filesystem shows for a symlink
            target = _fs(info.linkname)
            if not target or len(target) > _MAX_SYMLINK or b"\0" in target:
                raise SourceError(f"member {name!r}: invalid symlink target ({len(target)} bytes)")
            node.target = target
        elif info.islnk():
            self._hardlink(info, parts)
            return
        elif info.ischr() or info.isblk():
            node = self._inode(info, stat.S_IFCHR if info.ischr() else stat.S_IFBLK)
            if not (0 <= info.devmajor <= MAX_MAJOR and 0 <= info.devminor <= MAX_MINOR):
                raise SourceError(
                    f"member {name!r}: device {info.devmajor}:{info.devminor} does not fit EROFS "
                    f"(major ≤ {MAX_MAJOR}, minor ≤ {MAX_MINOR})"
                )
            node.rdev = os.makedev(info.devmajor, info.devminor)
        elif info.isfifo():
            node = self._inode(info, stat.S_IFIFO)
        elif t == b"V":  # GNU volume label: not a file
            return
        else:
            raise SourceError(f"member {name!r}: unsupported tar entry type {t!r}")
        if not parts and not info.isdir():
            raise SourceError(f"member {name!r}: the archive's root entry is not a directory")
        self._place(parts, node)

    def _hardlink(self, info: tarfile.TarInfo, parts: list[bytes]) -> None:
        name = info.name
        if not parts:
            raise SourceError(f"member {name!r}: a hard link cannot be the root")
        target_parts = split_path(_fs(info.linkname), name)
        target = self._lookup(target_parts)
        if target is not None and target.children is not None:
            raise SourceError(f"member {name!r}: hard link to a directory ({info.linkname!r})")
        if target is None:  # not (yet) in this layer: a lower layer's file, resolved by the merge
            target = Node(mode=LINK_PLACEHOLDER_MODE)
            self.tree.links[id(target)] = (target_parts, name)
            self.tree.keep.append(target)
        self._place(parts, target)

    # -- the archive
    def read(self) -> LayerTree:
        try:
            tf = tarfile.open(fileobj=self.stream, mode="r|", bufsize=_HEADER_READ, encoding="utf-8",
                              errors="surrogateescape")  # fmt: skip
        except tarfile.ReadError as e:
            raise SourceError(f"{self.label}: not a tar archive ({e})") from None
        self._tar_fileobj = tf.fileobj
        self._direct = isinstance(getattr(tf.fileobj, "buf", None), bytes) and isinstance(
            getattr(tf.fileobj, "pos", None), int
        )
        for info in self._members(tf):
            self._member(info)
        self.stream.drain()
        return self.tree

    def _members(self, tf: tarfile.TarFile) -> Iterator[tarfile.TarInfo]:
        """Each member, with tarfile's silent stops (garbage, truncation) turned into errors."""
        first = tf.firstmember
        tf.firstmember = None
        if first is None:
            if tf.offset == 0:
                return  # an archive of only its end marker
            raise SourceError(f"{self.label}: not a tar archive")
        yield first
        data_end = first.offset_data + (first.size if first.isreg() and first.sparse is None else 0)
        while True:
            pos = tf.fileobj.tell()
            while pos < tf.offset:  # skip the rest of the member and its padding
                got = len(tf.fileobj.read(min(READ_SIZE, tf.offset - pos)))
                if not got:
                    if pos >= data_end:
                        return  # only padding and the end marker are missing (umoci insert writes such)
                    raise SourceError(f"{self.label}: truncated archive (ends inside a member's data)")
                pos += got
            offset = tf.offset
            try:
                info = tf.tarinfo.fromtarfile(tf)
            except tarfile.EOFHeaderError:
                return
            except tarfile.EmptyHeaderError:
                return  # no end-of-archive marker, at a member boundary: GNU tar accepts it too
            except tarfile.TruncatedHeaderError:
                raise SourceError(f"{self.label}: truncated archive (partial header at {offset})") from None
            except tarfile.HeaderError as e:
                raise SourceError(f"{self.label}: invalid tar header at offset {offset} ({e})") from None
            data_end = info.offset_data + (info.size if info.isreg() and info.sparse is None else 0)
            yield info


def read_tar(stream: LayerStream, store: ChunkStore, label: str) -> LayerTree:
    """Read one tar layer stream into a layer tree; every failure is a one-line :class:`SourceError`."""
    try:
        return TarLayerReader(stream, store, label).read()
    except NydusErofsError:
        raise
    except (tarfile.TarError, EOFError) as e:
        raise SourceError(f"{label}: unreadable tar archive ({e})") from None
    except (ValueError, UnicodeError, OverflowError) as e:
        raise SourceError(f"{label}: malformed tar archive ({e})") from None


class TarLayer:
    """A layer reader for :func:`erofs.build.builder.build_layers`: opens its source, reads it, keeps the tree.

    ``verify`` (optional) is called with every raw byte and then ``None`` at the end, and raises
    :class:`SourceError` on a mismatch (an OCI layer's digest).
    """

    def __init__(self, source: str, label: str | None = None,
                 opener: Callable[[], BinaryIO] | None = None,
                 verify: Callable[[bytes | None], None] | None = None) -> None:  # fmt: skip
        self.source = source
        self.label = label or source
        self._opener = opener or (lambda: open_source(source))
        self._verify = verify
        self.result: LayerTree | None = None

    def __call__(self, store: ChunkStore) -> Node:
        raw = self._opener()
        stream: LayerStream | None = None
        try:
            stream = LayerStream(raw, self.label, on_raw=self._verify)
            self.result = read_tar(stream, store, self.label)
            if self._verify is not None:
                self._verify(None)
        finally:
            if stream is not None:
                stream.close()
            if raw is not sys.stdin.buffer:
                raw.close()
        return self.result.root

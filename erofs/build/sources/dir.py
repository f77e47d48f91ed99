"""A directory on disk as an image tree (``SOURCE`` of ``nydus-erofs build`` when it is a directory)."""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable
from operator import attrgetter

from erofs.build.chunker import ChunkStore
from erofs.build.tree import LayerTree, Node
from erofs.build.xattr import check_xattrs
from erofs.errors import SourceError


def _xattrs(path: bytes) -> dict[bytes, bytes]:
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError as e:
        if e.errno in (errno.ENOTSUP, errno.ENODATA):
            return {}
        raise
    out = {}
    for text in names:
        name = os.fsencode(text)  # xattr names are bytes, UTF-8 or not
        try:
            out[name] = os.getxattr(path, name, follow_symlinks=False)
        except OSError as e:
            if e.errno != errno.ENODATA:
                raise
    if out:
        check_xattrs(out)
    return out


_name = attrgetter("name")


def _inode(st: os.stat_result, path: bytes) -> Node:
    return Node(
        mode=st.st_mode,
        uid=st.st_uid,
        gid=st.st_gid,
        mtime=st.st_mtime_ns // 1_000_000_000,
        mtime_nsec=st.st_mtime_ns % 1_000_000_000,
        rdev=st.st_rdev if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode) else 0,
        xattrs=_xattrs(path),
    )


def read_directory(root: str | os.PathLike[str], store: ChunkStore,
                   progress: Callable[[int], None] | None = None) -> Node:  # fmt: skip
    """Walk ``root`` (not following symlinks), store file data through ``store``, return the tree."""
    top = os.fsencode(root)
    try:
        st = os.lstat(top)
    except OSError as e:
        raise SourceError(f"cannot read source {os.fsdecode(top)}: {e.strerror}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise SourceError(f"source {os.fsdecode(top)} is not a directory")
    tree = _inode(st, top)
    tree.children = {}
    hardlinks: dict[tuple[int, int], Node] = {}
    stack = [(top, tree)]
    while stack:
        path, node = stack.pop()
        assert node.children is not None
        with os.scandir(path) as it:
            entries = sorted(it, key=_name)
        for de in entries:
            full = de.path
            st = de.stat(follow_symlinks=False)
            if not stat.S_ISDIR(st.st_mode) and st.st_nlink > 1:
                linked = hardlinks.get((st.st_dev, st.st_ino))
                if linked is not None:
                    node.children[de.name] = linked
                    continue
            child = _inode(st, full)
            node.children[de.name] = child
            if not stat.S_ISDIR(st.st_mode) and st.st_nlink > 1:
                hardlinks[(st.st_dev, st.st_ino)] = child
            if stat.S_ISDIR(st.st_mode):
                child.children = {}
                stack.append((full, child))
            elif stat.S_ISLNK(st.st_mode):
                child.target = os.readlink(full)
            elif stat.S_ISREG(st.st_mode):
                child.size = st.st_size
                if st.st_size:
                    fd = os.open(full, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
                    try:
                        child.chunks = store.add_file(fd, st.st_size, st.st_blocks * 512 < st.st_size)
                    except EOFError as e:  # e.g. /sys files, whose size is a page whatever they hold
                        raise SourceError(f"{os.fsdecode(full)}: {e}") from None
                    finally:
                        os.close(fd)
                    if progress:
                        progress(st.st_size)
    return tree


class DirLayer:
    """A directory as a layer (no implicit directories, no unresolved links)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.result: LayerTree | None = None

    def __call__(self, store: ChunkStore) -> Node:
        self.result = LayerTree(read_directory(self.path, store))
        return self.result.root

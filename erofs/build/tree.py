"""The in-memory image tree every source (directory, tar layer, OCI image) is read into.

Data flows one way: a source fills a :class:`Node` tree, storing file data into a blob as it goes (so a
regular file carries :class:`ChunkRef` s, never its bytes); the layout then places the tree and the writer
emits the bootstrap.  Hard links are several directory entries holding the same :class:`Node`.
"""

from __future__ import annotations

import stat
from dataclasses import dataclass, field
from typing import NamedTuple


class ChunkRef(NamedTuple):
    """One stored chunk: where it sits in which blob, and its digest.  Chunks are shared (dedup).  A named
    tuple, not a frozen dataclass: one is made per chunk stored, tens of thousands a build, and a tuple's
    construction costs half the dataclass's."""

    blob_index: int
    ci_index: int  # index into the blob's chunk-info table
    c_off: int  # offset of the stored (maybe compressed) bytes in the blob file
    c_size: int
    d_off: int  # offset in the blob's uncompressed, 4 KiB aligned layout (what the kernel reads)
    d_size: int
    digest: bytes

    @property
    def compressed(self) -> bool:
        return self.c_size != self.d_size


@dataclass(slots=True, eq=False)
class Node:
    """One file of the image being built (an inode to be).  ``children`` is set for directories only
    (name bytes → node)."""

    mode: int
    uid: int = 0
    gid: int = 0
    mtime: int = 0
    mtime_nsec: int = 0
    size: int = 0
    rdev: int = 0  # (major, minor) packed as os.makedev
    xattrs: dict[bytes, bytes] = field(default_factory=dict)
    target: bytes | None = None  # symlink target
    chunks: list[ChunkRef | None] = field(default_factory=list)  # None = a hole (reads as zeros)
    children: dict[bytes, Node] | None = None

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)

    @classmethod
    def directory(cls, mode: int = 0o755, **kw: object) -> Node:
        return cls(mode=stat.S_IFDIR | (mode & 0o7777), children={}, **kw)  # type: ignore[arg-type]


# The placeholder of a hard link to a lower layer's file: no file type (never reaches the bootstrap).
LINK_PLACEHOLDER_MODE = 0


def is_placeholder(node: Node) -> bool:
    return node.mode == LINK_PLACEHOLDER_MODE


@dataclass(slots=True)
class LayerTree:
    """One layer as read: its tree, the implicitly created directories, unresolved hard links."""

    root: Node
    implicit: set[int] = field(default_factory=set)  # id() of directories the layer never named
    # id(placeholder) -> (target path components, member name); where each placeholder sits, for the merge
    links: dict[int, tuple[list[bytes], str]] = field(default_factory=dict)
    link_sites: dict[int, list[tuple[Node, bytes]]] = field(default_factory=dict)
    keep: list[Node] = field(default_factory=list)  # keeps placeholders alive so their ids stay unique


def walk(root: Node, prefix: bytes = b"") -> list[tuple[bytes, Node]]:
    """Every (path, inode) below ``root``, parents before children and siblings sorted; the root is ``b"/"``."""
    out: list[tuple[bytes, Node]] = [(prefix or b"/", root)]
    stack = [(prefix, root)]
    while stack:
        base, node = stack.pop()
        assert node.children is not None
        subdirs = []
        for name in sorted(node.children):
            child = node.children[name]
            path = base + b"/" + name
            out.append((path, child))
            if child.children is not None:
                subdirs.append((path, child))
        stack.extend(reversed(subdirs))
    return out

"""A directory on disk as an image tree (``SOURCE`` of ``nydus-erofs build`` when it is a directory)."""

from __future__ import annotations

import errno
import os
import queue
import stat
import threading
from collections.abc import Callable
from operator import attrgetter
from stat import S_IFDIR, S_IFLNK, S_IFREG

from erofs.build.chunker import ChunkStore
from erofs.build.tree import ChunkRef, LayerTree, Node
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
_S_IFMT = 0o170000


def _inode(st: os.stat_result, path: bytes) -> Node:
    mode = st.st_mode
    fmt = mode & _S_IFMT
    mtime, mtime_nsec = divmod(st.st_mtime_ns, 1_000_000_000)
    rdev = st.st_rdev if fmt == stat.S_IFCHR or fmt == stat.S_IFBLK else 0
    # positional, in Node's field order: one is made per entry, and keywords cost a third more
    return Node(mode, st.st_uid, st.st_gid, mtime, mtime_nsec, 0, rdev, _xattrs(path))


_FileJob = tuple[Node, bytes, int, bool]  # (inode, path, size, maybe sparse)


class _FileReader:
    """Stores regular files' data on a second thread, in the order they were handed over (so the blob is laid
    out as a plain walk would), while the walk goes on: open, read, hash and the blob write release the GIL,
    so the walk's ``lstat``/``listxattr`` and the data path overlap on two cores.  Jobs go over in batches."""

    BATCH = 64

    def __init__(self, store: ChunkStore) -> None:
        self.store = store
        self._q: queue.Queue[list[_FileJob] | None] = queue.Queue(maxsize=64)
        self._batch: list[_FileJob] = []
        self._error: BaseException | None = None
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="dir-reader", daemon=True)
        self._thread.start()

    def add(self, job: _FileJob) -> None:
        self._batch.append(job)
        if len(self._batch) >= self.BATCH:
            if self._error is not None:
                raise self._error
            self._q.put(self._batch)
            self._batch = []

    def _run(self) -> None:
        while (batch := self._q.get()) is not None:
            for node, path, size, maybe_sparse in batch:
                if self._error is not None or self._stop:
                    break
                try:
                    node.chunks = _read_file(self.store, path, size, maybe_sparse)
                except BaseException as e:  # raised in the walk's thread
                    self._error = e

    def finish(self) -> None:
        """Wait for every file handed over; raise what failed."""
        if self._batch:
            self._q.put(self._batch)
            self._batch = []
        self._q.put(None)
        self._thread.join()
        if self._error is not None:
            raise self._error

    def abort(self) -> None:
        self._stop = True
        while True:  # make room for the end marker
            try:
                self._q.get_nowait()
            except queue.Empty:
                break
        self._q.put(None)
        self._thread.join()


def _read_file(store: ChunkStore, path: bytes, size: int, maybe_sparse: bool) -> list[ChunkRef | None]:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        return store.add_file(fd, size, maybe_sparse)
    except EOFError as e:  # e.g. /sys files, whose size is a page whatever they hold
        raise SourceError(f"{os.fsdecode(path)}: {e}") from None
    finally:
        os.close(fd)


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
    reader = _FileReader(store)
    try:
        _walk(top, tree, reader, progress)
        reader.finish()
    except BaseException:
        reader.abort()
        raise
    return tree


def _walk(top: bytes, tree: Node, reader: _FileReader, progress: Callable[[int], None] | None) -> None:
    hardlinks: dict[tuple[int, int], Node] = {}
    stack = [(top, tree)]
    while stack:
        path, node = stack.pop()
        children = node.children
        assert children is not None
        with os.scandir(path) as it:
            entries = sorted(it, key=_name)
        for de in entries:
            full = de.path
            st = de.stat(follow_symlinks=False)
            fmt = st.st_mode & _S_IFMT
            linked = fmt != S_IFDIR and st.st_nlink > 1
            if linked:
                first = hardlinks.get((st.st_dev, st.st_ino))
                if first is not None:
                    children[de.name] = first
                    continue
            child = _inode(st, full)
            children[de.name] = child
            if linked:
                hardlinks[(st.st_dev, st.st_ino)] = child
            if fmt == S_IFREG:
                size = child.size = st.st_size
                if size:
                    reader.add((child, full, size, st.st_blocks * 512 < size))
                    if progress:
                        progress(size)
            elif fmt == S_IFDIR:
                child.children = {}
                stack.append((full, child))
            elif fmt == S_IFLNK:
                child.target = os.readlink(full)


class DirLayer:
    """A directory as a layer (no implicit directories, no unresolved links)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.result: LayerTree | None = None

    def __call__(self, store: ChunkStore) -> Node:
        self.result = LayerTree(read_directory(self.path, store))
        return self.result.root

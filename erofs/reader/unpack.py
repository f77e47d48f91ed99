"""Unpacking an image to a directory (full metadata, as root) or to a PAX tar.

File data streams chunk by chunk (verified and decompressed on the way); nothing is held whole.  Nothing is
written outside the output: every name is checked (no '/', not '.'/'..', not empty), every file is created
relative to a directory fd we made ourselves with O_NOFOLLOW/O_EXCL, and the tree is built under a temporary
name beside the output and renamed into place only when complete, so a failure leaves no partial output.
"""

from __future__ import annotations

import io
import os
import shutil
import socket
import stat
import tarfile
import tempfile
from collections.abc import Iterator
from pathlib import Path

from erofs.errors import ImageError, UsageError
from erofs.paths import make_dirs, remove_dirs, remove_stale_temps, temp_prefix
from erofs.progress import ProgressCallback
from erofs.reader.data import ImageReader
from erofs.reader.records import Dirent, Inode

_ZEROS = bytes(1 << 20)


def _safe_name(name: bytes, where: str) -> bytes:
    if not name or name in (b".", b"..") or b"/" in name or b"\0" in name:
        raise ImageError(f"{where}: directory entry {name!r} is not a safe file name")
    return name


def _temp_prefix(out: Path) -> str:
    """The name of the temporary beside ``out`` (a directory, or a file ``*.tmp``), after removing those
    that killed unpacks left there (to any output)."""
    remove_stale_temps(out.parent, r"\..{1,40}\.unpack-")
    return temp_prefix(f".{out.name[:40]}.unpack-")


# ---------------------------------------------------------------------------------------------------------------
# to a directory


def unpack_to_dir(reader: ImageReader, output: str | os.PathLike[str], progress: ProgressCallback | None = None) -> int:
    """Write the image's tree to ``output`` (must not exist, or be an empty directory).  Returns the number of
    inodes written (``progress`` is called with 1 for each).  On failure nothing is left at ``output``."""
    out = Path(output)
    if os.path.lexists(out) and (out.is_symlink() or not out.is_dir() or any(out.iterdir())):
        raise UsageError(f"{out}: output exists and is not an empty directory")
    made = make_dirs(out.parent)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=_temp_prefix(out), dir=out.parent))
        try:
            n = _Unpacker(reader, tmp, progress).run()
            os.rename(tmp, out)  # replaces an empty directory atomically
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    except BaseException:
        remove_dirs(made)
        raise
    return n


class _Unpacker:
    def __init__(self, reader: ImageReader, root: Path, progress: ProgressCallback | None) -> None:
        self.reader = reader
        self.progress = progress
        self.bs = reader.bootstrap
        self.root = root
        self.links: dict[int, bytes] = {}  # nid -> relative path of the first link (non-directories)

    def run(self) -> int:
        bs = self.bs
        root = bs.root
        root_fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        # open directories along the current path: (fd, inode, remaining entries, relative path)
        stack: list[tuple[int, Inode, Iterator[Dirent], bytes]] = [(root_fd, root, iter(bs.listdir(root)), b"")]
        seen = {root.nid}
        count = 1
        try:
            while stack:
                dfd, dino, entries, drel = stack[-1]
                d = next(entries, None)
                if d is None:
                    stack.pop()
                    self._close_dir(dfd, dino)
                    continue
                name = _safe_name(d.name, os.fsdecode(b"/" + drel))
                rel = drel + b"/" + name if drel else name
                path = "/" + os.fsdecode(rel)
                try:
                    ino = bs.inode(d.nid)
                except ImageError as e:
                    raise ImageError(f"{path}: {e}") from None
                count += 1
                if self.progress is not None:
                    self.progress(1)
                if ino.is_dir:
                    if ino.nid in seen:
                        raise ImageError(f"{path}: directory nid {ino.nid} is reachable twice (a cycle?)")
                    if len(stack) > 4096:
                        raise ImageError(f"{path}: directories nest too deep")
                    seen.add(ino.nid)
                    os.mkdir(name, 0o700, dir_fd=dfd)
                    fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dfd)
                    try:
                        children = iter(bs.listdir(ino))
                    except BaseException:
                        os.close(fd)
                        raise
                    stack.append((fd, ino, children, rel))
                    continue
                first = self.links.get(ino.nid)
                if first is not None:
                    os.link(first, name, src_dir_fd=root_fd, dst_dir_fd=dfd, follow_symlinks=False)
                    continue
                if ino.nlink > 1:
                    self.links[ino.nid] = rel
                try:
                    self._create(name, dfd, ino, path)
                except ImageError as e:
                    raise type(e)(f"{path}: {e}") from None
        finally:
            for dfd, _, _, _ in stack:
                os.close(dfd)
        return count

    def _close_dir(self, fd: int, ino: Inode) -> None:
        try:
            self._meta_fd(fd, ino)
        finally:
            os.close(fd)

    def _create(self, name: bytes, dfd: int, ino: Inode, path: str) -> None:
        mode = stat.S_IFMT(ino.mode)
        if mode == stat.S_IFREG:
            fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=dfd)
            try:
                for off, data, n in self.reader.iter_file(ino):
                    if data is None:
                        continue  # a hole: leave it sparse
                    view = data
                    done = 0
                    while done < n:
                        done += os.pwrite(fd, view[done:], off + done)
                os.ftruncate(fd, ino.size)
                self._meta_fd(fd, ino)
            finally:
                os.close(fd)
            return
        if mode == stat.S_IFLNK:
            os.symlink(self.bs.readlink(ino), name, dir_fd=dfd)
        elif mode in (stat.S_IFCHR, stat.S_IFBLK):
            os.mknod(name, mode | 0o600, os.makedev(*ino.rdev), dir_fd=dfd)
        elif mode == stat.S_IFIFO:
            os.mkfifo(name, 0o600, dir_fd=dfd)
        elif mode == stat.S_IFSOCK:
            _make_socket(dfd, name)
        else:  # pragma: no cover - inode() rejects other modes
            raise ImageError(f"{path}: unsupported file type {ino.mode:#o}")
        self._meta(name, dfd, ino)

    def _meta(self, name: bytes, dfd: int, ino: Inode) -> None:
        if stat.S_ISLNK(ino.mode):
            os.chown(name, ino.uid, ino.gid, dir_fd=dfd, follow_symlinks=False)
            for xname, value in self.bs.xattrs(ino):
                _setxattr_link(dfd, name, xname, value)
            os.utime(name, ns=_times(ino), dir_fd=dfd, follow_symlinks=False)
            return
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_PATH, dir_fd=dfd)
        try:
            # via /proc/self/fd so that fifos/devices are not opened for I/O
            self._meta_path(f"/proc/self/fd/{fd}", ino)
        finally:
            os.close(fd)

    def _meta_fd(self, fd: int, ino: Inode) -> None:
        """Owner, mode (after chown, which clears setuid/setgid), xattrs, then times, on an open fd."""
        os.fchown(fd, ino.uid, ino.gid)
        os.fchmod(fd, stat.S_IMODE(ino.mode))
        for xname, value in self.bs.xattrs(ino):
            os.setxattr(fd, xname, value)
        os.utime(fd, ns=_times(ino))

    def _meta_path(self, p: str, ino: Inode) -> None:
        os.chown(p, ino.uid, ino.gid)
        os.chmod(p, stat.S_IMODE(ino.mode))  # after chown, which clears setuid/setgid
        for xname, value in self.bs.xattrs(ino):
            os.setxattr(p, xname, value)
        os.utime(p, ns=_times(ino))


_MAX_TIME_NS = (2**63 - 1) // 10**9 * 10**9  # what a 64-bit time_t takes
_MIN_TIME_NS = -(2**63) * 10**9


def _times(ino: Inode) -> tuple[int, int]:
    """(atime, mtime) in ns; EROFS has one timestamp (before 1970 too).  One the host cannot represent is an
    ImageError."""
    ns = ino.mtime_ns
    if ino.mtime_nsec >= 10**9 or not _MIN_TIME_NS <= ns <= _MAX_TIME_NS:
        raise ImageError(f"nid {ino.nid}: mtime {ino.mtime}.{ino.mtime_nsec:09d} is out of range")
    return ns, ns


def _make_socket(dfd: int, name: bytes) -> None:
    # bind() creates the socket inode; do it from inside the directory (names may exceed sun_path otherwise)
    cwd = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fchdir(dfd)
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.bind(name)
    finally:
        os.fchdir(cwd)
        os.close(cwd)


def _setxattr_link(dfd: int, name: bytes, xname: bytes, value: bytes) -> None:
    # Python has no fsetxattrat; a symlink's xattrs go through its path relative to the directory fd
    os.setxattr(f"/proc/self/fd/{dfd}/".encode() + name, xname, value, follow_symlinks=False)


# ---------------------------------------------------------------------------------------------------------------
# to a tar


class _FileStream(io.RawIOBase):
    """A file's bytes as a readable stream (holes as zeros), pulled chunk by chunk."""

    def __init__(self, pieces: Iterator[tuple[int, memoryview | None, int]]) -> None:
        self._pieces = pieces
        self._cur: memoryview = memoryview(b"")
        self._hole = 0

    def readable(self) -> bool:
        return True

    def readinto(self, b: bytearray | memoryview) -> int:  # type: ignore[override]
        want = len(b)
        while not len(self._cur) and not self._hole:
            try:
                _, data, n = next(self._pieces)
            except StopIteration:
                return 0
            if data is None:
                self._hole = n
            else:
                self._cur = data
        if self._hole:
            k = min(want, self._hole, len(_ZEROS))
            b[:k] = _ZEROS[:k]
            self._hole -= k
            return k
        k = min(want, len(self._cur))
        b[:k] = self._cur[:k]
        self._cur = self._cur[k:]
        return k


def _text(raw: bytes) -> str:
    return raw.decode("utf-8", "surrogateescape")


class _RawPaxInfo(tarfile.TarInfo):
    """A tar member whose PAX record keywords may hold any bytes, as GNU tar writes ``SCHILY.xattr.<name>`` for
    an xattr name that is not UTF-8 (tarfile encodes keywords strictly; a surrogate-escaped byte would fail).
    Records whose keywords are UTF-8 are written by tarfile itself, unchanged."""

    @classmethod
    def _create_pax_generic_header(cls, pax_headers: dict[str, str], type: bytes, encoding: str) -> bytes:  # noqa: A002
        try:
            for keyword in pax_headers:
                keyword.encode("utf-8")
        except UnicodeEncodeError:
            pass
        else:
            return super()._create_pax_generic_header(pax_headers, type, encoding)  # type: ignore[misc]
        values = [v.encode("utf-8", "surrogateescape") for v in pax_headers.values()]
        binary = any(not _is_utf8(v) for v in values)
        records = b"21 hdrcharset=BINARY\n" if binary else b""  # values are raw bytes (POSIX hdrcharset)
        for keyword, value in zip(pax_headers, values, strict=True):
            body = b" " + keyword.encode("utf-8", "surrogateescape") + b"=" + value + b"\n"
            n = len(body) + 1
            while len(str(n)) + len(body) != n:  # the length counts its own digits
                n = len(str(n)) + len(body)
            records += str(n).encode() + body
        info = {"name": "././@PaxHeader", "type": type, "size": len(records), "magic": tarfile.POSIX_MAGIC}
        header = cls._create_header(info, tarfile.USTAR_FORMAT, "ascii", "replace")  # type: ignore[attr-defined]
        return header + cls._create_payload(records)  # type: ignore[attr-defined]


def _is_utf8(raw: bytes) -> bool:
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def unpack_to_tar(reader: ImageReader, output: str | os.PathLike[str], progress: ProgressCallback | None = None) -> int:
    """Write the image's tree as a PAX tar (xattrs as SCHILY.xattr.*, hard links, devices).  Returns the number
    of members (``progress`` is called with 1 for each).  The tar is written to a temporary file and renamed into
    place when complete."""
    out = Path(output)
    if os.path.lexists(out) and not stat.S_ISREG(os.lstat(out).st_mode):
        raise UsageError(f"{out}: output exists and is not a regular file")  # a FIFO, a device, /dev/stdout...
    made = make_dirs(out.parent)
    try:
        fd, tmpname = tempfile.mkstemp(prefix=_temp_prefix(out), suffix=".tmp", dir=out.parent)
    except BaseException:
        remove_dirs(made)
        raise
    bs = reader.bootstrap
    count = 0
    try:
        with os.fdopen(fd, "wb") as f, tarfile.open(
            fileobj=f, mode="w", format=tarfile.PAX_FORMAT, encoding="utf-8", errors="surrogateescape"
        ) as tar:
            umask = os.umask(0)
            os.umask(umask)
            os.fchmod(f.fileno(), 0o666 & ~umask)  # as a shell redirection creates it, not mkstemp's 0600
            tar.copybufsize = 1 << 20  # type: ignore[attr-defined]
            links: dict[int, str] = {}
            for path, dirent, ino in bs.walk():
                if dirent is not None:
                    _safe_name(dirent.name, path)
                name = "." if dirent is None else "./" + path.lstrip("/")
                try:
                    ti = _RawPaxInfo(name)
                    ti.mode = stat.S_IMODE(ino.mode)
                    ti.uid, ti.gid = ino.uid, ino.gid
                    _times(ino)  # validated like a directory unpack
                    ti.mtime = ino.mtime
                    # xattr names and values are bytes: surrogate-escaped here, written back as the same bytes
                    pax = {"SCHILY.xattr." + _text(k): _text(v) for k, v in bs.xattrs(ino)}
                    if ino.mtime_nsec:
                        pax["mtime"] = f"{ino.mtime}.{ino.mtime_nsec:09d}"  # exact, not a float
                    ti.pax_headers = pax
                    fileobj = None
                    if not ino.is_dir and ino.nid in links:
                        ti.type = tarfile.LNKTYPE
                        ti.linkname = links[ino.nid]
                    elif ino.is_dir:
                        ti.type = tarfile.DIRTYPE
                    elif ino.is_reg:
                        ti.type = tarfile.REGTYPE
                        ti.size = ino.size
                        fileobj = io.BufferedReader(_FileStream(reader.iter_file(ino)), 1 << 20)
                        if ino.nlink > 1:
                            links[ino.nid] = name
                    else:
                        if ino.nlink > 1:
                            links[ino.nid] = name
                        if ino.is_symlink:
                            ti.type = tarfile.SYMTYPE
                            ti.linkname = os.fsdecode(bs.readlink(ino))
                        elif ino.is_device:
                            ti.type = tarfile.CHRTYPE if stat.S_ISCHR(ino.mode) else tarfile.BLKTYPE
                            ti.devmajor, ti.devminor = ino.rdev
                        elif stat.S_ISFIFO(ino.mode):
                            ti.type = tarfile.FIFOTYPE
                        else:
                            continue  # sockets cannot be archived (tar has no type for them)
                    tar.addfile(ti, fileobj)
                except ImageError as e:
                    raise type(e)(f"{path}: {e}") from None
                count += 1
                if progress is not None:
                    progress(1)
        os.rename(tmpname, out)
    except BaseException:
        try:
            os.unlink(tmpname)
        except FileNotFoundError:
            pass
        remove_dirs(made)
        raise
    return count

"""A generated container root file system for tests: every file type and attribute the builder must keep."""

from __future__ import annotations

import os
import stat
import struct
from pathlib import Path

T0 = 1_700_000_000  # the common mtime: those inodes can be compact


def _acl(*entries: tuple[int, int, int]) -> bytes:
    return struct.pack("<I", 2) + b"".join(struct.pack("<HHI", *x) for x in entries)


ACL_ACCESS = _acl((0x01, 6, 0xFFFFFFFF), (0x02, 4, 1000), (0x04, 4, 0xFFFFFFFF), (0x10, 4, 0xFFFFFFFF),
                  (0x20, 4, 0xFFFFFFFF))  # fmt: skip
ACL_DEFAULT = _acl((0x01, 7, 0xFFFFFFFF), (0x04, 5, 0xFFFFFFFF), (0x20, 5, 0xFFFFFFFF))


def make_rootfs(root: Path, entries: int = 3000) -> Path:
    """A tree with everything a container root filesystem holds (issue 2, item 5); ``entries`` files in one
    directory make it span many blocks (fewer keep it quick under TCG)."""
    root.mkdir()
    (root / "empty").write_bytes(b"")
    (root / "small").write_bytes(b"hello\n")
    (root / "4k").write_bytes(os.urandom(4096))
    (root / "odd").write_bytes(os.urandom(1 << 20 | 123))  # two chunks, a partial block at the end
    with open(root / "sparse", "wb") as f:  # holes stay holes
        f.write(b"head")
        f.seek(3 << 20)
        f.write(os.urandom(5000))
        f.truncate((5 << 20) + 17)
    (root / "dup1").write_bytes(b"same content\n" * 10000)
    (root / "dup2").write_bytes(b"same content\n" * 10000)
    d = root / "many"
    d.mkdir()
    for i in range(entries):  # a directory of many blocks
        (d / f"entry-{i:05d}-{'x' * (i % 60)}").write_bytes(b"%d" % i if i % 3 else b"")
    (d / ("L" * 255)).write_bytes(b"longest name")
    for odd in ("-x", "!a", "#", ".hidden", "..."):  # sort before and around '.' and '..'
        (d / odd).write_bytes(odd.encode())
    os.mkdir(os.path.join(os.fsencode(root), b"not-utf8-\xff\xfe"))
    with open(os.path.join(os.fsencode(root), b"not-utf8-\xff\xfe", b"\xe9t\xe9"), "wb") as f:
        f.write(b"latin-1 name")
    (root / "emptydir").mkdir()
    os.symlink("small", root / "link-short")
    os.symlink("t" * 4095, root / "link-4095")
    os.symlink("/nonexistent/dangling", root / "link-dangling")
    os.link(root / "small", root / "hardlink-1")
    (root / "sub").mkdir()
    os.link(root / "small", root / "sub" / "hardlink-2")
    os.mkfifo(root / "fifo")
    os.mknod(root / "socket", stat.S_IFSOCK | 0o755)
    os.mknod(root / "chardev", stat.S_IFCHR | 0o600, os.makedev(1, 3))
    os.mknod(root / "blockdev", stat.S_IFBLK | 0o660, os.makedev(259, 70000))
    os.mknod(root / "whiteout", stat.S_IFCHR, os.makedev(0, 0))
    setuid = root / "setuid"
    setuid.write_bytes(b"#!/bin/sh\n")
    os.chmod(setuid, 0o4755)
    os.chmod(root / "sub", 0o2775)
    (root / "tmp").mkdir()
    os.chmod(root / "tmp", 0o1777)
    os.lchown(root / "odd", 100000, 200000)  # above 65535: extended inode
    os.lchown(root / "link-short", 70000, 70001)
    os.lchown(root / "4k", 1000, 1000)
    x = root / "xattrs"
    x.write_bytes(b"x")
    os.setxattr(x, "user.empty", b"")
    os.setxattr(x, "user.big", os.urandom(3000))
    os.setxattr(x, "trusted.overlay.opaque", b"y")
    os.setxattr(x, "security.capability", bytes.fromhex("0100000200200000000000000000000000000000"))
    os.setxattr(x, "system.posix_acl_access", ACL_ACCESS)
    os.setxattr(root / "sub", "system.posix_acl_default", ACL_DEFAULT)
    os.setxattr(root / "sub", "user." + "n" * 250, b"long name")
    os.setxattr(root / "many", "user.one", b"1")
    # times: most entries share T0 (compact inodes); some carry nanoseconds or odd values (extended)
    for dirpath, dirnames, filenames in os.walk(root, topdown=False):
        for name in dirnames + filenames:
            os.utime(os.path.join(dirpath, name), ns=(T0 * 10**9, T0 * 10**9), follow_symlinks=False)
    os.utime(root / "small", ns=(0, 1_234_567_890_123_456_789))
    os.utime(root / "link-short", ns=(0, 5 * 10**9 + 999_999_999), follow_symlinks=False)
    os.utime(root / "empty", ns=(0, 0))
    os.utime(root / "sub", ns=(0, (T0 + 1) * 10**9 + 1))
    os.utime(root, ns=(T0 * 10**9, T0 * 10**9))
    return root

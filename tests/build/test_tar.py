"""Tar fidelity: archives written by GNU tar in its formats (and compressions), built, mounted by the kernel
and compared entry by entry with GNU tar's own extraction of the same archive (issue 3, item 5)."""

from __future__ import annotations

import io
import json
import os
import stat
import subprocess
import tarfile
from pathlib import Path

import pytest

from tests.support.cli import run
from tests.support.fstree import assert_same_tree, image_devices
from tests.support.kmount import mount_erofs
from tests.support.paths import SHARED

ALL_ENTRY_TYPE = SHARED / "interop" / "nydus" / "all-entry-type.tar"

pytestmark = pytest.mark.kernel


def build(*args: str | Path) -> dict:
    proc = run("build", *args, "--json")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return json.loads(proc.stdout)


def gnutar(*args: str | Path, cwd: Path | None = None) -> None:
    proc = subprocess.run(["tar", *map(str, args)], capture_output=True, text=True, cwd=cwd)
    assert proc.returncode == 0, proc.stderr


def _tree(root: Path) -> Path:
    """Everything tar can carry: long names and link targets, ns mtimes, xattrs, sparse files, devices."""
    root.mkdir()
    deep = root / ("d" * 120) / ("e" * 200)
    deep.mkdir(parents=True)
    (deep / ("f" * 250)).write_text("long path\n")
    os.symlink("t" * 300, root / "long-symlink")
    os.link(deep / ("f" * 250), root / "hard-to-long")  # a GNU longlink / PAX linkpath
    (root / "plain").write_bytes(os.urandom(200_000))
    with open(root / "sparse", "wb") as f:
        f.write(b"start")
        f.seek(3 << 20)
        f.write(os.urandom(70_000))
        f.seek(9 << 20)
        f.write(b"end")
    with open(root / "all-hole", "wb") as f:
        f.truncate(4 << 20)
    os.setxattr(root / "plain", "user.note", b"value \xff binary")
    os.setxattr(root / "plain", "trusted.overlay.something", b"y")
    os.setxattr(root / "plain", "security.capability", bytes.fromhex("0100000200200000000000000000000000000000"))
    os.mknod(root / "chr", stat.S_IFCHR | 0o620, os.makedev(4095, 1048575))  # the largest EROFS encodes
    os.mknod(root / "blk", stat.S_IFBLK | 0o600, os.makedev(259, 3))
    os.mkfifo(root / "fifo", 0o640)
    (root / "ünïcode-名").write_text("utf-8 name\n")
    os.chown(root / "plain", 100_000, 65_536)  # ids beyond 16 bits need extended inodes
    for i, p in enumerate(sorted([*root.rglob("*"), root], key=str)):
        t = 1_600_000_000 + i
        os.utime(p, ns=(t * 10**9 + 123_456_789 + i, t * 10**9 + 987_654_321 - i), follow_symlinks=False)
    return root


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _tree(tmp_path_factory.mktemp("src") / "root")


FORMATS = {
    "gnu": ["--format=gnu", "--sparse"],
    "pax-sparse-1.0": ["--format=posix", "--sparse", "--sparse-version=1.0", "--xattrs", "--xattrs-include=*"],
    "pax-sparse-0.1": ["--format=posix", "--sparse", "--sparse-version=0.1", "--xattrs", "--xattrs-include=*"],
    "pax-sparse-0.0": ["--format=posix", "--sparse", "--sparse-version=0.0", "--xattrs", "--xattrs-include=*"],
}
COMPRESS = {"tar": [], "gz": ["--gzip"], "zst": ["--zstd"]}


@pytest.mark.parametrize(("fmt", "comp"), [("gnu", "gz"),
                                           pytest.param("pax-sparse-1.0", "zst", marks=pytest.mark.tools("zstd")),
                                           ("pax-sparse-0.1", "tar"), ("pax-sparse-0.0", "gz")])  # fmt: skip
def test_gnu_tar_archive_mounts_like_its_extraction(tree: Path, tmp_path: Path, fmt: str, comp: str) -> None:
    archive = tmp_path / f"layer.{comp}"  # the name says nothing: content decides
    gnutar("-c", "-f", archive, *FORMATS[fmt], *COMPRESS[comp], "--numeric-owner", "-C", tree, ".")
    ref = tmp_path / "ref"
    ref.mkdir()
    gnutar("-x", "-f", archive, "--numeric-owner", "--same-permissions", "--same-owner",
           *(["--xattrs", "--xattrs-include=*"] if "pax" in fmt else []), "-C", ref)  # fmt: skip
    out = tmp_path / "out"
    info = build(archive, "-o", out, "--chunk-size", "1MiB")
    # the holes are not stored: 'sparse' keeps three data chunks of its ten, 'all-hole' none
    assert info["blobs"][0]["uncompressed_size"] < 8 << 20
    with mount_erofs(out / "image.boot", tmp_path / "mnt", image_devices(out)) as mnt:
        if "pax" not in fmt:  # GNU format carries no xattrs and whole-second mtimes only
            assert os.listxattr(mnt / "plain") == []
        assert_same_tree(ref, mnt)
        if "pax" in fmt:
            assert os.stat(mnt / "plain").st_mtime_ns % 10**9 == os.stat(tree / "plain").st_mtime_ns % 10**9
            assert os.getxattr(mnt / "plain", "user.note") == b"value \xff binary"
        assert os.stat(mnt / "chr").st_rdev == os.makedev(4095, 1048575)


@pytest.mark.upstream
def test_all_entry_type_tar_from_upstream(tmp_path: Path) -> None:
    """Nydus's own fixture (hard link chains, symlink, nested dirs) builds and mounts as tar extracts it."""
    ref = tmp_path / "ref"
    ref.mkdir()
    gnutar("-x", "-f", ALL_ENTRY_TYPE, "--numeric-owner", "--same-permissions", "-C", ref)
    for p in ref.rglob("*"):  # Linux symlinks are always 0777, whatever the archive says
        if p.is_symlink():
            assert os.lstat(p).st_mode & 0o777 == 0o777
    out = tmp_path / "out"
    build(ALL_ENTRY_TYPE, "-o", out)
    with mount_erofs(out / "image.boot", tmp_path / "mnt", image_devices(out)) as mnt:
        assert_same_tree(ref / "tar", mnt / "tar")  # the archive has no root entry: ours is implicit
        assert os.stat(mnt).st_mtime == 0 and os.stat(mnt).st_mode == stat.S_IFDIR | 0o755
        st = os.stat(mnt / "tar" / "dir1" / "dir3" / "hardlink1.txt")
        assert st.st_nlink == 4


def test_stdin_source_and_repeatable_output(tree: Path, tmp_path: Path) -> None:
    archive = tmp_path / "layer.tgz"
    gnutar("-c", "-z", "-f", archive, "--format=posix", "--sparse", "-C", tree, ".")
    a = build(archive, "-o", tmp_path / "a")
    with open(archive, "rb") as stdin:
        proc = run("build", "-", "-o", tmp_path / "b", "--json", stdin=stdin)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["layers"] == a["layers"]
    assert (tmp_path / "a" / "image.boot").read_bytes() == (tmp_path / "b" / "image.boot").read_bytes()


@pytest.mark.tools("bsdtar")
def test_bsdtar_pax_archive_mounts_like_its_extraction(tree: Path, tmp_path: Path) -> None:
    """libarchive's writer: LIBARCHIVE.xattr.* (base64) next to SCHILY.xattr.*, its own sparse encoding."""
    archive = tmp_path / "layer"
    proc = subprocess.run(["bsdtar", "-c", "-f", str(archive), "--format", "pax", "--xattrs", "--numeric-owner",
                           "-C", str(tree), "."], capture_output=True, text=True)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert b"LIBARCHIVE.xattr.user.note" in archive.read_bytes()
    ref = tmp_path / "ref"
    ref.mkdir()
    proc = subprocess.run(["bsdtar", "-x", "-p", "-f", str(archive), "--xattrs", "--numeric-owner", "-C", str(ref)],
                          capture_output=True, text=True)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    st = os.stat(tree)  # bsdtar leaves the extraction root's own mtime alone; the archive's './' has it
    os.utime(ref, ns=(st.st_atime_ns, st.st_mtime_ns))
    out = tmp_path / "out"
    build(archive, "-o", out)
    with mount_erofs(out / "image.boot", tmp_path / "mnt", image_devices(out)) as mnt:
        assert_same_tree(ref, mnt)
        assert os.getxattr(mnt / "plain", "user.note") == b"value \xff binary"


# name -> (tar member type, tar mtime (int), PAX mtime or None, what the kernel must show as st_mtime_ns)
PRE_1970 = {
    "d": (tarfile.DIRTYPE, -86400, None, -86400 * 10**9),
    "d/int32-min": (tarfile.REGTYPE, -(2**31), None, -(2**31) * 10**9),  # 1901-12-13T20:45:52Z
    "d/int32-min-too": (tarfile.REGTYPE, -(2**31), None, -(2**31) * 10**9),
    "d/link": (tarfile.SYMTYPE, -(2**31), None, -(2**31) * 10**9),
    "d/minus-one": (tarfile.REGTYPE, -1, None, -(10**9)),
    "d/minus-1.5": (tarfile.REGTYPE, 0, "-1.5", -1_500_000_000),
    "d/1600": (tarfile.REGTYPE, 0, "-11676096000.25", -11676096000 * 10**9 - 250_000_000),
}


@pytest.mark.parametrize("fmt", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT], ids=["pax", "gnu"])
def test_pre_1970_mtimes_are_stored(tmp_path: Path, fmt: int) -> None:
    """Members dated before 1970 build (as mkfs.erofs stores them), the kernel shows their exact times, and
    check and unpack take them back.  GNU tar writes such times base-256 in the header, PAX in a record."""
    archive = tmp_path / "old.tar"
    with tarfile.open(archive, "w", format=fmt) as tf:
        for name, (kind, mtime, pax, _) in PRE_1970.items():
            if pax is not None and fmt != tarfile.PAX_FORMAT:
                continue
            ti = tarfile.TarInfo(name)
            ti.type, ti.mtime, ti.mode = kind, mtime, 0o755 if kind == tarfile.DIRTYPE else 0o644
            if kind == tarfile.SYMTYPE:
                ti.linkname = "int32-min"
            if pax is not None:
                ti.pax_headers = {"mtime": pax}
            data = name.encode() if kind == tarfile.REGTYPE else b""
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))
    out = tmp_path / "out"
    build(archive, "-o", out)
    want = {n: ns for n, (_, _, pax, ns) in PRE_1970.items() if pax is None or fmt == tarfile.PAX_FORMAT}
    with mount_erofs(out / "image.boot", tmp_path / "mnt", image_devices(out)) as mnt:
        assert {n: os.lstat(mnt / n).st_mtime_ns for n in want} == want
    proc = run("check", out / "image.boot", "--blob-dir", out / "blobs")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    proc = run("unpack", out / "image.boot", "--blob-dir", out / "blobs", "-o", tmp_path / "unpacked")
    assert proc.returncode == 0, proc.stderr
    on_host = {n: ns for n, ns in want.items() if ns >= -(2**31) * 10**9}  # ext4 clamps times before 1901
    assert {n: os.lstat(tmp_path / "unpacked" / n).st_mtime_ns for n in on_host} == on_host


def test_unrepresentable_mtime_is_a_one_line_error(tmp_path: Path) -> None:
    """Only a time beyond EROFS's signed 64-bit seconds is refused, in one line naming the member."""
    archive = tmp_path / "ancient.tar"
    with tarfile.open(archive, "w", format=tarfile.PAX_FORMAT) as tf:
        ti = tarfile.TarInfo("ancient")
        ti.pax_headers = {"mtime": str(-(2**63) - 1)}
        tf.addfile(ti)
    proc = run("build", archive, "-o", tmp_path / "out")
    assert proc.returncode == 2, proc.stderr
    assert "'ancient'" in proc.stderr and "out of range" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert not (tmp_path / "out").exists()

"""``nydus-erofs unpack`` gives back exactly the tree that was built: content, owners, modes (setuid too),
nanosecond mtimes, xattrs, hard links, symlinks, devices, fifos, sockets, holes — to a directory and to a tar.
And it never writes outside its output, nor leaves a partial one.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import stat
import struct
import subprocess
import tarfile
from pathlib import Path

import pytest

from tests.support import cli
from tests.support.paths import SHARED

pytestmark = pytest.mark.root  # the source tree holds device nodes and other owners

NYDUS = SHARED / "interop" / "nydus"
T_NS = 1_700_000_000_123_456_789


def run(*args: str | os.PathLike[str]) -> subprocess.CompletedProcess[str]:
    return cli.run(*args, timeout=300)


def make_rich_tree(root: Path, *, long_name: bool = True) -> None:
    root.mkdir()
    w = lambda rel, data: (root / rel).write_bytes(data)  # noqa: E731
    (root / "dir" / "sub").mkdir(parents=True)
    (root / "many").mkdir()
    w("empty", b"")
    w("one", b"1")
    w("chunk", os.urandom(64 * 1024))
    w("chunk_plus", os.urandom(64 * 1024 + 1))
    w("multi", b"compressible text\n" * 20000)
    w("dir/copy_of_multi", b"compressible text\n" * 20000)
    with open(root / "holes", "wb") as f:  # data, hole, data, trailing hole
        f.write(b"start")
        f.seek(300_000)
        f.write(b"middle")
        f.truncate(700_000)
    w("dir/sub/deep", b"deep\n")
    for i in range(300):
        w(f"many/entry_{i:04d}_with_a_reasonably_long_name", b"%d" % i)
    w("名前.txt", "日本語\n".encode())
    if long_name:  # mkfs.erofs 1.5 cannot take a 255-byte name
        w("n" * 255, b"long name")
    for name in ("-x", "#", "!a"):
        w(name, name.encode())
    os.link(root / "one", root / "dir" / "hardlink_to_one")
    (root / "rel_link").symlink_to("dir/sub/deep")
    (root / "dangling").symlink_to("/nonexistent/" + "t" * 1000)
    os.mknod(root / "cdev", stat.S_IFCHR | 0o620, os.makedev(1, 3))
    os.mknod(root / "bdev", stat.S_IFBLK | 0o640, os.makedev(259, 70000))
    os.mkfifo(root / "fifo", 0o604)
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(root / "sock"))
    os.chmod(root / "one", 0o4755)
    os.chmod(root / "chunk", 0o2711)
    os.chmod(root / "empty", 0o000)
    os.chmod(root / "dir", 0o1777)
    os.chown(root / "multi", 100000, 200000)
    os.chown(root / "dir/sub", 1234, 5678)
    os.setxattr(root / "multi", "user.mime", b"text/plain")
    os.setxattr(root / "multi", "trusted.bin", bytes(range(256)))
    os.setxattr(root / "dir", "trusted.overlay.opaque", b"y")
    os.setxattr(root / "chunk", "security.capability", b"\x01\x00\x00\x02" + bytes(16))
    os.setxattr(root / "rel_link", "trusted.link", b"on a symlink", follow_symlinks=False)
    for p in sorted(root.rglob("*"), key=lambda p: -len(p.parts)) + [root]:
        os.utime(p, ns=(T_NS, T_NS + len(p.name)), follow_symlinks=False)


def snapshot(root: Path, *, times: bool = True) -> dict[str, tuple]:
    """What a user sees of a tree, path -> (type, mode, uid, gid, size/target/rdev, content digest, mtime,
    xattrs, hard-link group)."""
    out: dict[str, tuple] = {}
    first: dict[int, str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in ["."] + dirnames + filenames if dirpath == str(root) else dirnames + filenames:
            p = Path(dirpath) / name
            rel = str(p.relative_to(root)) if name != "." else "."
            st = os.lstat(p)
            kind = stat.S_IFMT(st.st_mode)
            if stat.S_ISREG(kind):
                body: object = (st.st_size, hashlib.sha256(p.read_bytes()).hexdigest())
            elif stat.S_ISLNK(kind):
                body = os.readlink(p)
            elif stat.S_ISCHR(kind) or stat.S_ISBLK(kind):
                body = (os.major(st.st_rdev), os.minor(st.st_rdev))
            else:
                body = None
            xattrs = tuple(sorted((k, os.getxattr(p, k, follow_symlinks=False))
                                  for k in os.listxattr(p, follow_symlinks=False)))  # fmt: skip
            link = None
            if not stat.S_ISDIR(kind) and st.st_nlink > 1:
                link = first.setdefault(st.st_ino, rel)
            nlink = None if stat.S_ISDIR(kind) else st.st_nlink
            mtime = st.st_mtime_ns if times else None
            out[rel] = (kind, stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, body, mtime, xattrs, link, nlink)
    return out


def assert_same(expected: dict[str, tuple], actual: dict[str, tuple]) -> None:
    assert sorted(expected) == sorted(actual)
    diffs = {k: (expected[k], actual[k]) for k in expected if expected[k] != actual[k]}
    assert not diffs, diffs


def _normalize_links(snap: dict[str, tuple]) -> dict[str, tuple]:
    """Hard-link groups by content of the group, independent of which name came first."""
    groups: dict[str, list[str]] = {}
    for rel, v in snap.items():
        if v[7] is not None:
            groups.setdefault(v[7], []).append(rel)
    canon = {rel: min(g) for g in groups.values() for rel in g}
    return {rel: (*v[:7], canon.get(rel), v[8]) for rel, v in snap.items()}


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("roundtrip")
    src = tmp / "src"
    make_rich_tree(src)
    out = tmp / "image"
    r = run("build", src, "--output-dir", out, "--compressor", "zstd", "--chunk-size", "64k")
    assert r.returncode == 0, r.stderr
    return src, out


def test_unpack_to_directory_is_the_source_tree(built, tmp_path: Path):
    src, image = built
    out = tmp_path / "out"
    r = run("unpack", image / "image.boot", "--blob-dir", image / "blobs", "--output", out)
    assert r.returncode == 0, r.stderr
    expected = _normalize_links(snapshot(src))
    actual = _normalize_links(snapshot(out))
    expected.pop(".")  # the output root's own metadata follows the image root, checked separately
    root = actual.pop(".")
    assert_same(expected, actual)
    assert stat.S_IMODE(os.lstat(src).st_mode) == root[1]
    # holes stay holes
    assert os.stat(out / "holes").st_blocks * 512 < 700_000


def test_unpack_to_empty_existing_directory(built, tmp_path: Path):
    src, image = built
    out = tmp_path / "out"
    out.mkdir()
    r = run("unpack", image / "image.boot", "--blob-dir", image / "blobs", "--output", out)
    assert r.returncode == 0, r.stderr
    assert (out / "dir" / "sub" / "deep").read_bytes() == b"deep\n"


def test_unpack_refuses_non_empty_output(built, tmp_path: Path):
    _, image = built
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious").write_bytes(b"keep me")
    r = run("unpack", image / "image.boot", "--blob-dir", image / "blobs", "--output", out)
    assert r.returncode == 2 and "not an empty directory" in r.stderr
    assert sorted(os.listdir(out)) == ["precious"]


def test_unpack_to_tar(built, tmp_path: Path):
    src, image = built
    out = tmp_path / "image.tar"
    r = run("unpack", image / "image.boot", "--blob-dir", image / "blobs", "--output", out)
    assert r.returncode == 0, r.stderr
    expected = snapshot(src)
    with tarfile.open(out) as tar:
        assert tar.pax_headers is not None
        members = {m.name.removeprefix("./") or ".": m for m in tar.getmembers()}
        # sockets cannot be archived
        assert sorted(members) == sorted(k for k, v in expected.items() if not stat.S_ISSOCK(v[0]))
        links = 0
        for rel, m in members.items():
            kind, mode, uid, gid, body, mtime, xattrs, _, _ = expected[rel]
            assert (m.mode, m.uid, m.gid) == (mode, uid, gid), rel
            sec, ns = divmod(mtime, 10**9)
            assert int(m.mtime) == sec and m.pax_headers.get("mtime", f"{sec}.{0:09d}") == f"{sec}.{ns:09d}", rel
            assert {("SCHILY.xattr." + k, v) for k, v in xattrs} == {
                (k, v.encode("utf-8", "surrogateescape")) for k, v in m.pax_headers.items() if k.startswith("SCHILY")
            }, rel
            if m.islnk():
                links += 1
                assert expected[m.linkname.removeprefix("./")][4] == body
            elif stat.S_ISREG(kind):
                assert m.isreg() and m.size == body[0]  # type: ignore[index]
                assert hashlib.sha256(tar.extractfile(m).read()).hexdigest() == body[1]  # type: ignore[union-attr,index]
            elif stat.S_ISLNK(kind):
                assert m.issym() and m.linkname == body
            elif stat.S_ISCHR(kind) or stat.S_ISBLK(kind):
                assert (m.ischr() if stat.S_ISCHR(kind) else m.isblk()) and (m.devmajor, m.devminor) == body
            elif stat.S_ISFIFO(kind):
                assert m.isfifo()
            else:
                assert m.isdir()
        assert links == 1


def test_unpack_is_verified_and_atomic(built, tmp_path: Path):
    """A damaged chunk stops the unpack with the file and chunk named; no output and no temporary remain."""
    src, image = built
    blobs = tmp_path / "blobs"
    shutil.copytree(image / "blobs", blobs)
    (blob,) = blobs.iterdir()
    data = bytearray(blob.read_bytes())
    data[len(data) // 3] ^= 0xFF
    blob.write_bytes(bytes(data))
    for out in (tmp_path / "out", tmp_path / "out.tar"):
        r = run("unpack", image / "image.boot", "--blob-dir", blobs, "--output", out)
        assert r.returncode == 3, r.stderr
        assert "chunk" in r.stderr and blob.name in r.stderr and len(r.stderr.strip().splitlines()) == 1
        assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blobs"]


# ---- hostile names ----------------------------------------------------------------------------------------------
def _hostile_copy(tmp_path: Path, new_last_name: bytes) -> Path:
    """The upstream bootstrap with its last root entry ("sync_io.rs", 10 bytes) renamed in place."""
    from erofs.reader import Bootstrap

    boot = tmp_path / "hostile.boot"
    data = bytearray((NYDUS / "rafs-v6-2.2.boot").read_bytes())
    with Bootstrap(NYDUS / "rafs-v6-2.2.boot") as bs:
        root = bs.root
        tail = root.offset + root.isize + root.xattr_isize
        n = len(bs.readdir(root))
        nameoff = struct.unpack_from("<H", bs.data, tail + 12 * (n - 1) + 8)[0]
    assert len(new_last_name) <= 10
    data[tail + nameoff : tail + nameoff + 10] = new_last_name.ljust(10, b"\0")
    boot.write_bytes(bytes(data))
    return boot


@pytest.mark.upstream
@pytest.mark.parametrize("name", [b"..", b".", b"a/../../x", b"/etc/x"])
def test_hostile_names_are_refused(tmp_path: Path, name: bytes):
    boot = _hostile_copy(tmp_path, name)
    work = tmp_path / "work"
    work.mkdir()
    for out in (work / "out", work / "out.tar"):
        r = run("unpack", boot, "--blob-dir", NYDUS / "blobs", "--output", out)
        assert r.returncode == 3, (r.stdout, r.stderr)
        assert "not a" in r.stderr and "file name" in r.stderr
        assert os.listdir(work) == []
    assert sorted(os.listdir(tmp_path)) == ["hostile.boot", "work"]


def test_symlink_target_with_nul_is_refused(tmp_path: Path):
    """A bootstrap whose symlink target holds a NUL byte is malformed: one line naming the entry, exit 3, and
    no output (directory or tar) is left behind."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "s").symlink_to("before-MARK-after")
    image = tmp_path / "image"
    assert run("build", src, "--output-dir", image).returncode == 0
    boot = image / "image.boot"
    data = boot.read_bytes()
    assert data.count(b"before-MARK-after") == 1
    boot.write_bytes(data.replace(b"before-MARK-after", b"before\0MARK-after"))
    work = tmp_path / "work"
    work.mkdir()
    for out in (work / "out", work / "out.tar"):
        r = run("unpack", boot, "--blob-dir", image / "blobs", "--output", out)
        assert r.returncode == 3, (r.stdout, r.stderr)
        assert "/s" in r.stderr and "NUL" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert "Traceback" not in r.stderr
        assert os.listdir(work) == []


def test_non_utf8_xattr_names_unpack_faithfully(tmp_path: Path):
    """xattr names that are not UTF-8 come out as the same bytes: in a directory, and in a tar as
    ``SCHILY.xattr.<raw name>`` records, which build back into the same image tree."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(b"data")
    names = {b"user.caf\xe9": b"v\xff", b"trusted.\xff": b"binary \x00 value", b"user.ok": b"plain"}
    for name, value in names.items():
        os.setxattr(src / "f", name, value)
    image = tmp_path / "image"
    r = run("build", src, "--output-dir", image)
    assert r.returncode == 0, r.stderr

    def xattrs(path: Path) -> dict[bytes, bytes]:
        return {os.fsencode(n): os.getxattr(path, os.fsencode(n)) for n in os.listxattr(path)}

    r = run("unpack", image / "image.boot", "--blob-dir", image / "blobs", "--output", tmp_path / "dir")
    assert r.returncode == 0, r.stderr
    assert xattrs(tmp_path / "dir" / "f") == names
    tar_path = tmp_path / "x.tar"
    r = run("unpack", image / "image.boot", "--blob-dir", image / "blobs", "--output", tar_path)
    assert r.returncode == 0, r.stderr
    assert b" SCHILY.xattr.user.caf\xe9=v\xff\n" in tar_path.read_bytes()
    with tarfile.open(tar_path, encoding="utf-8", errors="surrogateescape") as tar:
        pax = tar.getmember("./f").pax_headers
    got = {os.fsencode(k[len("SCHILY.xattr.") :]): v.encode("utf-8", "surrogateescape")
           for k, v in pax.items() if k.startswith("SCHILY.xattr.")}  # fmt: skip
    assert got == names
    again = tmp_path / "again"
    assert run("build", tar_path, "--output-dir", again).returncode == 0
    r = run("unpack", again / "image.boot", "--blob-dir", again / "blobs", "--output", tmp_path / "dir2")
    assert r.returncode == 0, r.stderr
    assert xattrs(tmp_path / "dir2" / "f") == names


# ---- plain EROFS images (mkfs.erofs) ----------------------------------------------------------------------------
@pytest.mark.tools("mkfs.erofs")
@pytest.mark.parametrize("variant", ["flat", "chunked-device", "shared-xattrs"])
def test_unpack_mkfs_erofs_images(tmp_path: Path, variant: str):
    src = tmp_path / "src"
    make_rich_tree(src, long_name=False)
    img = tmp_path / "img"
    args = ["mkfs.erofs", "--quiet", "--preserve-mtime"]
    devices: list[Path] = []
    if variant == "chunked-device":
        devices = [tmp_path / "blob"]
        args += [f"--blobdev={devices[0]}", "--chunksize=4096"]
    if variant == "shared-xattrs":
        args += ["-x1"]
    subprocess.run([*args, str(img), str(src)], check=True, capture_output=True)
    chk = run("check", img, *[a for d in devices for a in ("--device", d)])
    assert chk.returncode == 0, chk.stdout + chk.stderr
    out = tmp_path / "out"
    r = run("unpack", img, *[a for d in devices for a in ("--device", d)], "--output", out)
    assert r.returncode == 0, r.stderr
    # mkfs.erofs 1.5 keeps seconds only for some inodes; compare everything but times
    expected = _normalize_links(snapshot(src, times=False))
    actual = _normalize_links(snapshot(out, times=False))
    expected.pop(".")
    actual.pop(".")
    assert_same(expected, actual)

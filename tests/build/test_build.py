"""``nydus-erofs build DIR``: the kernel mounts what we write and sees exactly the source tree."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from erofs.format import erofs_fs as e
from tests.support.cli import run
from tests.support.fstree import assert_same_tree, image_devices, mount_erofs
from tests.support.rootfs import T0, make_rootfs

pytestmark = pytest.mark.root  # the rootfs fixture makes devices and sets owners


def build(src: Path, out: Path, *args: str) -> dict:
    proc = run("build", src, "--output-dir", out, "--json", *args)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def fsck(out: Path) -> None:
    """erofs-utils' fsck accepts the image and reads all its data (``--extract`` without a target)."""
    devices = [f"--device={d}" for d in image_devices(out)]
    proc = subprocess.run(["fsck.erofs", *devices, "--extract", str(out / "image.boot")], capture_output=True,
                          text=True)  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def rootfs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_rootfs(tmp_path_factory.mktemp("src") / "rootfs")


@pytest.mark.kernel
@pytest.mark.parametrize(("chunk_size", "digester"), [("4KiB", "blake3"), ("1MiB", "sha256"), ("16MiB", "blake3")])
def test_mounted_tree_equals_source(rootfs: Path, tmp_path: Path, chunk_size: str, digester: str) -> None:
    out = tmp_path / "out"
    info = build(rootfs, out, "--chunk-size", chunk_size, "--digester", digester)
    assert len(info["blobs"]) == 1
    fsck(out)
    with mount_erofs(out / "image.boot", tmp_path / "mnt", image_devices(out)) as mnt:
        assert_same_tree(rootfs, mnt)


@pytest.mark.kernel
def test_identical_chunks_are_stored_once(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    payload = os.urandom(130000)
    (src / "dup1").write_bytes(payload)
    alone = build(src, tmp_path / "alone", "--chunk-size", "4KiB")["blobs"][0]
    (src / "dup2").write_bytes(payload)
    (src / "dir").mkdir()
    (src / "dir" / "dup3").write_bytes(payload)
    info = build(src, tmp_path / "out", "--chunk-size", "4KiB")
    assert info["bytes_deduped"] == 2 * 130000
    assert info["blobs"][0]["chunk_count"] == alone["chunk_count"] == 32
    assert info["blobs"][0]["uncompressed_size"] == alone["uncompressed_size"] == (1 + 32) * 4096  # prefix
    with mount_erofs(tmp_path / "out/image.boot", tmp_path / "mnt", image_devices(tmp_path / "out")) as mnt:
        assert_same_tree(src, mnt)


@pytest.mark.kernel
def test_file_over_4gib_with_holes(tmp_path: Path) -> None:
    """A > 4 GiB sparse file: extended inode, holes stored as holes (nothing read or written for them)."""
    src = tmp_path / "src"
    src.mkdir()
    with open(src / "big", "wb") as f:
        f.write(b"head")
        f.seek(3 << 30)
        f.write(os.urandom(5000))
        f.truncate((4 << 30) + 17)
    info = build(src, tmp_path / "out")
    assert info["blobs"][0]["chunk_count"] == 2  # the two chunks holding data; 4094 holes
    with mount_erofs(tmp_path / "out/image.boot", tmp_path / "mnt", image_devices(tmp_path / "out")) as mnt:
        st = os.stat(mnt / "big")
        assert st.st_size == (4 << 30) + 17
        with open(mnt / "big", "rb") as f, open(src / "big", "rb") as g:
            for off in (0, 1 << 20, 3 << 30, (3 << 30) + 4096, (4 << 30) + 1):
                f.seek(off)
                g.seek(off)
                assert f.read(8192) == g.read(8192), off


def test_same_input_gives_byte_identical_output(rootfs: Path, tmp_path: Path) -> None:
    a = build(rootfs, tmp_path / "a")
    b = build(rootfs, tmp_path / "b")
    assert a["blobs"] == b["blobs"]
    assert (tmp_path / "a/image.boot").read_bytes() == (tmp_path / "b/image.boot").read_bytes()
    blob = a["blobs"][0]["id"]
    assert (tmp_path / "a/blobs" / blob).read_bytes() == (tmp_path / "b/blobs" / blob).read_bytes()


def test_blob_id_is_sha256_of_blob(rootfs: Path, tmp_path: Path) -> None:
    import hashlib

    info = build(rootfs, tmp_path / "out")
    for b in info["blobs"]:
        data = (tmp_path / "out/blobs" / b["id"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == b["id"]
        assert len(data) == b["compressed_size"]


@pytest.mark.kernel
def test_inode_formats_compact_where_nothing_is_lost(rootfs: Path, tmp_path: Path) -> None:
    """Entries at the common mtime are compact; big, high-uid and ns-mtime entries are extended."""
    out = tmp_path / "out"
    build(rootfs, out)
    raw = (out / "image.boot").read_bytes()
    sb = e.erofs_super_block.unpack(raw, e.EROFS_SUPER_OFFSET)
    assert (sb.build_time, sb.build_time_nsec) == (T0, 0)
    with mount_erofs(out / "image.boot", tmp_path / "mnt", image_devices(out)) as mnt:

        def version(name: str) -> int:
            nid = os.lstat(mnt / name).st_ino
            return e.erofs_inode_compact.unpack(raw, sb.meta_blkaddr * 4096 + nid * 32).i_format & 1

        assert version("4k") == 0
        assert version("many") == 0
        for name in ("odd", "small", "link-short", "sub"):
            assert version(name) == 1, name


@pytest.mark.kernel
def test_build_then_mount_a_real_tree(tmp_path: Path) -> None:
    """A big real tree of this machine round-trips through the kernel: /usr/share/man (~24k entries, a directory
    of ~18k, thousands of symlinks, every locale's names; ~100 MB).  All of /usr/share (~700 MB) proved no more
    (the generated rootfs has the multi-chunk files, holes and xattrs) and cost minutes of I/O under load."""
    src = Path("/usr/share/man")
    out = tmp_path / "out"
    build(src, out)
    fsck(out)
    with mount_erofs(out / "image.boot", tmp_path / "mnt", image_devices(out)) as mnt:
        assert_same_tree(src, mnt)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--chunk-size", "3000"], "power of two"),
        (["--chunk-size", "32MiB"], "power of two"),
        (["--chunk-size", "lots"], "not a size"),
    ],
)
def test_bad_options_are_one_line_errors(rootfs: Path, tmp_path: Path, args: list[str], message: str) -> None:
    out = tmp_path / "out"
    proc = run("build", rootfs, "-o", out, *args)
    assert proc.returncode != 0
    assert message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert not out.exists()


def test_missing_source_is_a_clear_error(tmp_path: Path) -> None:
    proc = run("build", tmp_path / "nope", "-o", tmp_path / "out")
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert not (tmp_path / "out").exists()


def test_output_that_is_a_file_is_a_clear_error(rootfs: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.write_bytes(b"precious")
    proc = run("build", rootfs, "-o", out)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert out.read_bytes() == b"precious"


def test_pre_1970_mtimes_of_a_directory_source(tmp_path: Path) -> None:
    """Files and directories dated before 1970 keep their exact times (1901-12-13T20:45:52Z, -1.5 s...)."""
    src = tmp_path / "src"
    (src / "old-dir").mkdir(parents=True)
    times = {"old-dir/int32-min": -(2**31) * 10**9, "old-dir/frac": -1_500_000_000, "old-dir/same": -(2**31) * 10**9,
             "old-dir": -86400 * 10**9 + 1, ".": -(2**31) * 10**9}  # fmt: skip
    for rel in times:
        if rel not in ("old-dir", "."):
            (src / rel).write_bytes(rel.encode())
    for rel, ns in times.items():
        os.utime(src / rel, ns=(ns, ns))
    out = tmp_path / "out"
    build(src, out)
    fsck(out)
    with mount_erofs(out / "image.boot", tmp_path / "mnt", image_devices(out)) as mnt:
        assert {rel: os.stat(mnt / rel).st_mtime_ns for rel in times} == times
        assert_same_tree(src, mnt)


def test_non_utf8_xattr_names_are_stored(tmp_path: Path) -> None:
    """An xattr name that is not UTF-8 (set by bytes) is stored as those bytes and reads back as them."""
    src = tmp_path / "src"
    (src / "dir").mkdir(parents=True)
    (src / "file").write_bytes(b"data")
    names = {b"user.caf\xe9": b"latin-1 name", b"user.\xff\xfe": b"\x00\xff binary", b"trusted.plain": b"x"}
    for path in (src / "file", src / "dir"):
        for name, value in names.items():
            os.setxattr(path, name, value)
    out = tmp_path / "out"
    build(src, out)
    fsck(out)
    with mount_erofs(out / "image.boot", tmp_path / "mnt", image_devices(out)) as mnt:
        for rel in ("file", "dir"):
            got = {os.fsencode(n): os.getxattr(mnt / rel, os.fsencode(n)) for n in os.listxattr(mnt / rel)}
            assert got == names, rel
        assert_same_tree(src, mnt)

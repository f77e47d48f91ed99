"""Targeted damage, each reported by ``check`` with the file (and chunk) it concerns.

The upstream image is copied into tmp_path and patched there; a mkfs.erofs image covers the superblock crc.
"""

from __future__ import annotations

import hashlib
import shutil
import struct
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from erofs.reader import Bootstrap, LocalBlobDir
from erofs.reader.check import check_image
from tests.support.cli import run
from tests.support.paths import SHARED

NYDUS = SHARED / "interop" / "nydus"
BOOT = NYDUS / "rafs-v6-2.2.boot"
BLOB_ID = "be7d77eeb719f70884758d1aa800ed0fb09d701aaec469964e9d54325f0d5fef"

pytestmark = pytest.mark.upstream


def _patch(data: bytearray, off: int, fmt: str, value: int | bytes) -> None:
    struct.pack_into(fmt, data, off, value)


def _layout() -> dict[str, int]:
    """Where things are in the pristine upstream bootstrap (located with the reader, then patched as bytes)."""
    with Bootstrap(BOOT) as bs:
        sync = bs.lookup("/sync_io.rs")
        root = bs.root
        # root is FLAT_INLINE: its one dir block is the inline tail right after the inode
        tail = root.offset + root.isize + root.xattr_isize
        names = [d.name for d in bs.readdir(root)]
        nameoff = struct.unpack_from("<H", bs.data, tail + 12 * names.index(b"lib.rs") + 8)[0]
        return {
            "blob_table": bs.ext.s_blob_table_offset,
            "sync_index": (sync.offset + sync.isize + sync.xattr_isize + 7) & ~7,
            "lib_name": tail + nameoff,
        }


def _work(tmp_path: Path) -> tuple[Path, Path]:
    boot = tmp_path / "image.boot"
    shutil.copyfile(BOOT, boot)
    blobs = tmp_path / "blobs"
    blobs.mkdir()
    shutil.copyfile(NYDUS / "blobs" / BLOB_ID, blobs / BLOB_ID)
    return boot, blobs


def _damage_boot(boot: Path, fn: Callable[[bytearray, dict[str, int]], None]) -> None:
    data = bytearray(boot.read_bytes())
    fn(data, _layout())
    boot.write_bytes(bytes(data))


def _problems(boot: Path, blobs: Path | None) -> list[str]:
    """The problems ``check`` finds, but the one every copy of the upstream texture has: its blob file is named
    by an id that is not its sha256 (tests/reader/test_interop_upstream.py checks that one)."""
    report = check_image(boot, LocalBlobDir(blobs) if blobs else None)
    return [str(p) for p in report.problems if not (p.blob == BLOB_ID and p.message.startswith("the blob's sha256"))]


def _one_matching(problems: list[str], *needles: str) -> str:
    hits = [p for p in problems if all(n in p for n in needles)]
    assert hits, f"no problem mentions {needles}: {problems}"
    return hits[0]


def test_pristine_copy_is_clean(tmp_path: Path):
    boot, blobs = _work(tmp_path)
    assert _problems(boot, blobs) == []


# ---- superblock -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("field", "off", "fmt", "value", "needle"),
    [
        ("magic", 0, "<I", 0x12345678, "bad magic"),
        ("root_nid", 14, "<H", 133, "root nid 133 is not a directory"),
        ("extra_devices", 86, "<H", 2, "device table has 2 slots, the blob table 1"),
        ("blkszbits", 12, "B", 30, "unsupported block size"),
        ("feature_incompat", 80, "<I", 0x8000_000C, "unsupported feature_incompat"),
        ("meta_blkaddr", 40, "<I", 0x7FFF, "meta_blkaddr"),
    ],
)
def test_superblock_field(tmp_path: Path, field: str, off: int, fmt: str, value: int, needle: str):
    boot, blobs = _work(tmp_path)
    _damage_boot(boot, lambda d, _: _patch(d, 1024 + off, fmt, value))
    _one_matching(_problems(boot, blobs), needle)


@pytest.mark.tools("mkfs.erofs")
def test_superblock_checksum(tmp_path: Path):
    """mkfs.erofs sets SB_CHKSUM: any change to the first block after the superblock offset is caught."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "a").write_bytes(b"hello")
    img = tmp_path / "plain.img"
    subprocess.run(["mkfs.erofs", "--quiet", str(img), str(src)], check=True, capture_output=True)
    assert check_image(img).ok
    data = bytearray(img.read_bytes())
    data[1024 + 16] ^= 1  # inos: harmless to the tree, but the crc no longer matches
    img.write_bytes(bytes(data))
    _one_matching([str(p) for p in check_image(img).problems], "superblock: checksum")


# ---- blob table -------------------------------------------------------------------------------------------------
def test_blob_table_chunk_count(tmp_path: Path):
    boot, blobs = _work(tmp_path)
    _damage_boot(boot, lambda d, lay: _patch(d, lay["blob_table"] + 72, "<I", 1))
    problems = _problems(boot, blobs)
    _one_matching(problems, "/sync_io.rs", "chunk 1 of blob", "not in the blob (1 chunks)")


def test_blob_table_id(tmp_path: Path):
    boot, blobs = _work(tmp_path)
    other = hashlib.sha256(b"another blob").hexdigest()
    _damage_boot(boot, lambda d, lay: _patch(d, lay["blob_table"], "64s", other.encode()))
    problems = _problems(boot, blobs)
    _one_matching(problems, f"tag '{BLOB_ID}' is not the blob id {other}")
    _one_matching(problems, other, "not found")  # and the blob it names does not exist


def test_blob_table_toc_digest(tmp_path: Path):
    boot, blobs = _work(tmp_path)
    _damage_boot(boot, lambda d, lay: _patch(d, lay["blob_table"] + 136, "32s", bytes(31) + b"\1"))
    _one_matching(_problems(boot, blobs), BLOB_ID, "ToC does not match blob_toc_digest")


# ---- chunk index ------------------------------------------------------------------------------------------------
def test_chunk_index_blkaddr(tmp_path: Path):
    boot, blobs = _work(tmp_path)
    _damage_boot(boot, lambda d, lay: _patch(d, lay["sync_index"] + 4, "<I", 1))  # 20480/4096=5 -> 1
    _one_matching(_problems(boot, None), "/sync_io.rs", "chunk 1 of blob", "uncompressed offset 4096")


def test_chunk_index_ci_out_of_range(tmp_path: Path):
    boot, blobs = _work(tmp_path)
    _damage_boot(boot, lambda d, lay: _patch(d, lay["sync_index"], "<H", 7))
    _one_matching(_problems(boot, blobs), "/sync_io.rs", "chunk 7 of blob", "not in the blob")


def test_chunk_index_blob_out_of_range(tmp_path: Path):
    boot, blobs = _work(tmp_path)
    _damage_boot(boot, lambda d, lay: _patch(d, lay["sync_index"] + 2, "<H", 5))  # device 5: blob index 4
    _one_matching(_problems(boot, blobs), "/sync_io.rs", "blob index 4")


# ---- directories ------------------------------------------------------------------------------------------------
def test_dirent_order(tmp_path: Path):
    boot, blobs = _work(tmp_path)
    _damage_boot(boot, lambda d, lay: _patch(d, lay["lib_name"], "B", ord("z")))  # zib.rs sorts after sync_io.rs
    problems = _problems(boot, blobs)
    _one_matching(problems, "/: directory entries are not in strictly increasing byte order")


def test_dirent_unsafe_name(tmp_path: Path):
    boot, blobs = _work(tmp_path)
    _damage_boot(boot, lambda d, lay: _patch(d, lay["lib_name"] + 3, "B", ord("/")))  # "lib/rs"
    _one_matching(_problems(boot, blobs), "not a valid file name")


# ---- blob content -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("offset", "path", "chunk"), [(10, "/lib.rs", 0), (4828 + 1000, "/sync_io.rs", 1)])
def test_chunk_data_byte(tmp_path: Path, offset: int, path: str, chunk: int):
    boot, blobs = _work(tmp_path)
    blob = blobs / BLOB_ID
    data = bytearray(blob.read_bytes())
    data[offset] ^= 0x80
    blob.write_bytes(bytes(data))
    problems = _problems(boot, blobs)
    assert len(problems) == 1
    _one_matching(problems, path, f"chunk {chunk} of blob {BLOB_ID}")
    r = run("check", boot, "--blob-dir", blobs)
    assert r.returncode == 3 and path in r.stdout and f"chunk {chunk}" in r.stdout


def test_blob_toc_entry(tmp_path: Path):
    """A byte of the ToC itself (inside the blob) no longer matches the bootstrap's blob_toc_digest."""
    boot, blobs = _work(tmp_path)
    blob = blobs / BLOB_ID
    data = bytearray(blob.read_bytes())
    data[len(data) - 512 - 128 * 4 + 100] ^= 1  # inside the first ToC entry
    blob.write_bytes(bytes(data))
    _one_matching(_problems(boot, blobs), BLOB_ID, "ToC does not match blob_toc_digest")


def test_blob_digest_section(tmp_path: Path):
    """The chunk digests inside the blob (blob.digest) are covered by their ToC digest."""
    boot, blobs = _work(tmp_path)
    blob = blobs / BLOB_ID
    data = bytearray(blob.read_bytes())
    data[12954] ^= 1  # first byte of blob.digest (offset from the ToC)
    blob.write_bytes(bytes(data))
    _one_matching(_problems(boot, blobs), BLOB_ID, "blob.digest does not match its digest")


def test_chunk_info_header_magic(tmp_path: Path):
    boot, blobs = _work(tmp_path)
    blob = blobs / BLOB_ID
    data = bytearray(blob.read_bytes())
    data[8346] ^= 1  # first byte of the CCT header (after the 32-byte chunk-info table at 8314)
    blob.write_bytes(bytes(data))
    _one_matching(_problems(boot, blobs), BLOB_ID, "blob.meta.header does not match its digest")

"""Upstream's "one big advertised chunk": when all of a file's chunks are contiguous in one blob, nydus-image
writes ``i_u`` with ``next_pow2(size)`` and a single chunk index, so the kernel sees one extent.  The reader must
map that back to the blob's real chunks by uncompressed offset.  We make such an inode by rewriting one of our
own (uncompressed, so the kernel can read the blob as a device and confirm the bytes)."""

from __future__ import annotations

import os
import struct
from pathlib import Path

import pytest

from erofs.reader import Bootstrap, ImageReader, LocalBlobDir
from erofs.reader.check import check_image
from tests.support.cli import run
from tests.support.kmount import mount_erofs

SIZE = 270_000  # 5 chunks of 64 KiB; next_pow2 = 512 KiB


@pytest.fixture
def big_chunk_image(tmp_path: Path) -> tuple[Path, Path, bytes]:
    src = tmp_path / "src"
    src.mkdir()
    data = os.urandom(SIZE)
    (src / "f").write_bytes(data)
    out = tmp_path / "out"
    r = run("build", src, "--output-dir", out, "--compressor", "none", "--chunk-size", "64k")
    assert r.returncode == 0, r.stderr
    boot = out / "image.boot"
    raw = bytearray(boot.read_bytes())
    with Bootstrap(boot) as bs:
        ino = bs.lookup("/f")
        chunks = bs.file_chunks(ino)
        assert [c.blob_offset for c in chunks] == [4096 + i * 65536 for i in range(5)]  # contiguous after the prefix
        i_u_off = ino.offset + 16  # i_u sits at 16 in compact and extended inodes alike
        assert struct.unpack_from("<I", raw, i_u_off)[0] == ino.i_u
        sb_csum = bool(bs.sb.feature_compat & 1)
    struct.pack_into("<I", raw, i_u_off, 0x20 | (19 - 12))  # 512 KiB chunks: one index covers the file
    assert not sb_csum or ino.offset >= 4096  # a checksummed first block would need its crc redone
    boot.write_bytes(bytes(raw))
    return boot, out / "blobs", data


def test_reader_maps_big_chunk_to_real_chunks(big_chunk_image):
    boot, blobs, data = big_chunk_image
    with Bootstrap(boot) as bs:
        ino = bs.lookup("/f")
        chunks = bs.file_chunks(ino)
        assert [(c.file_offset, c.length, c.ci_index) for c in chunks] == [
            (0, 65536, 0), (65536, 65536, 1), (131072, 65536, 2), (196608, 65536, 3), (262144, SIZE - 262144, 4),
        ]  # fmt: skip
        assert ImageReader(bs, LocalBlobDir(blobs)).read_file(ino) == data
    report = check_image(boot, LocalBlobDir(blobs))
    assert report.ok, [str(p) for p in report.problems]


@pytest.mark.kernel
def test_kernel_agrees(big_chunk_image, tmp_path: Path):
    boot, blobs, data = big_chunk_image
    (blob,) = blobs.iterdir()
    with mount_erofs(boot, tmp_path / "mnt", [blob]) as mp:
        assert (mp / "f").read_bytes() == data

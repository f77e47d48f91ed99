"""The reader library as the daemon uses it: open a bootstrap, list blobs, map a blob's uncompressed range to
chunks, and fetch → verify → decompress them with one ranged read per run of adjacent chunks."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from erofs.errors import BackendError, DigestMismatchError, ImageError, UnsupportedImageError
from erofs.reader import (
    BackendStats,
    BlobBackend,
    BlobMeta,
    Bootstrap,
    ImageReader,
    LocalBlobDir,
    erofs_superblock_csum,
    plan_reads,
    read_chunks,
)
from tests.support.cli import run
from tests.support.paths import SHARED

NYDUS = SHARED / "interop" / "nydus"
BOOT = NYDUS / "rafs-v6-2.2.boot"
BLOB_ID = "be7d77eeb719f70884758d1aa800ed0fb09d701aaec469964e9d54325f0d5fef"


class CountingSource:
    """A real LocalBlobDir that also records every ranged read."""

    def __init__(self, path: Path) -> None:
        self.inner = LocalBlobDir(path)
        self.reads: list[tuple[str, int, int]] = []

    def read(self, blob_id: str, offset: int, length: int) -> bytes:
        self.reads.append((blob_id, offset, length))
        return self.inner.read(blob_id, offset, length)

    def size(self, blob_id: str) -> int:
        return self.inner.size(blob_id)

    @property
    def stats(self) -> BackendStats:
        return self.inner.stats

    def close(self) -> None:
        self.inner.close()


@pytest.mark.upstream
def test_upstream_blob_through_the_daemon_api():
    src = CountingSource(NYDUS / "blobs")
    assert isinstance(src, BlobBackend)
    with Bootstrap(BOOT) as bs:
        (blob,) = bs.blobs
        assert (blob.blob_id, blob.chunk_count, blob.compressor, blob.digester) == (BLOB_ID, 2, "zstd", "blake3")
        assert bs.devices[0].tag == BLOB_ID
        meta = BlobMeta.load(src, blob, bs)
        assert meta.chunk(0) == (0, 4828, 0, 16931) and meta.chunk(1) == (4828, 2974, 20480, 13400)
        # a READ of the blob's uncompressed range [16384, 24576) touches both chunks
        assert meta.chunks_for_range(16384, 8192) == [0, 1]
        assert meta.chunks_for_range(20480, 1) == [1]
        assert meta.chunks_for_range(36864, 4096) == []
        src.reads.clear()
        datas = [bytes(d) for d in read_chunks(src, meta, [0, 1])]
        assert src.reads == [(BLOB_ID, 0, 4828 + 2974)]  # adjacent chunks: one ranged read
        reader = ImageReader(bs, src)
        assert datas == [reader.read_file(bs.lookup("/lib.rs")), reader.read_file(bs.lookup("sync_io.rs"))]
        assert list(plan_reads(meta, [1, 0])) == [(4828, 2974, [1]), (0, 4828, [0])]  # descending: two reads


@pytest.mark.upstream
def test_read_chunks_names_blob_and_chunk_on_damage(tmp_path: Path):
    d = tmp_path / "blobs"
    d.mkdir()
    data = bytearray((NYDUS / "blobs" / BLOB_ID).read_bytes())
    data[5000] ^= 1  # inside chunk 1
    (d / BLOB_ID).write_bytes(bytes(data))
    src = LocalBlobDir(d)
    with Bootstrap(BOOT) as bs:
        meta = BlobMeta.load(src, bs.blobs[0], bs)
        it = read_chunks(src, meta, [0, 1])
        assert len(next(it)) == 16931  # chunk 0 is fine and comes first
        with pytest.raises(ImageError, match=f"blob {BLOB_ID}: chunk 1 ") as e:
            next(it)
        assert isinstance(e.value, DigestMismatchError) or "corrupt zstd" in str(e.value)


def test_local_blob_dir_errors(tmp_path: Path):
    src = LocalBlobDir(tmp_path)
    with pytest.raises(BackendError, match="not found"):
        src.read("a" * 64, 0, 1)
    with pytest.raises(BackendError, match="not a valid file name"):
        src.size("../etc/passwd")
    (tmp_path / "b").write_bytes(b"12345")
    assert src.read("b", 1, 3) == b"234"
    with pytest.raises(BackendError, match="past the end of the blob"):
        src.read("b", 3, 10)


def test_not_an_image(tmp_path: Path):
    p = tmp_path / "x"
    p.write_bytes(b"\0" * 8192)
    with pytest.raises(ImageError, match="bad magic"):
        Bootstrap(p)
    p.write_bytes(b"tiny")
    with pytest.raises(ImageError, match="too small"):
        Bootstrap(p)
    r = run("inspect", p)
    assert r.returncode == 3 and r.stderr.startswith("nydus-erofs: error:") and "Traceback" not in r.stderr


@pytest.mark.tools("mkfs.erofs")
def test_superblock_checksum_matches_mkfs(tmp_path: Path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(b"x" * 5000)
    img = tmp_path / "img"
    subprocess.run(["mkfs.erofs", "--quiet", str(img), str(src)], check=True)
    raw = img.read_bytes()
    stored = int.from_bytes(raw[1028:1032], "little")
    assert stored != 0 and erofs_superblock_csum(raw[:4096]) == stored
    with Bootstrap(img) as bs:
        assert bs.checksum_ok is True


@pytest.mark.tools("mkfs.erofs")
def test_compressed_images_are_refused_clearly(tmp_path: Path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(b"compress me " * 5000)
    img = tmp_path / "img"
    r = subprocess.run(["mkfs.erofs", "--quiet", "-zlz4", str(img), str(src)], capture_output=True)
    if r.returncode != 0:
        pytest.skip("mkfs.erofs has no lz4")
    with pytest.raises(UnsupportedImageError, match="not a Nydus image: compressed EROFS is not supported"):
        Bootstrap(img)
    c = run("check", img)
    assert c.returncode == 2 and c.stderr.strip().endswith("not a Nydus image: compressed EROFS is not supported")

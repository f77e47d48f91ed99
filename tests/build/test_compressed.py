"""Compressed images (lz4_block, zstd) read back identical to their sources (issue 3, item 4).

A two-layer image is built with each compressor and with none.  The uncompressed image, mounted by the kernel,
is the reference.  Each compressed image must give the same tree
  - through ``nydus-erofs unpack`` (the image tools' reader, verifying every chunk digest), and
  - through the kernel, with each blob's uncompressed layout rebuilt *from the blob alone* (its ToC, chunk-info
    table and digests, as a daemon fills its cache file) and given as ``device=``.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path

import pytest

from erofs.reader.backend import LocalBlobDir
from erofs.reader.blob import BlobMeta
from erofs.reader.bootstrap import Bootstrap
from tests.support.cli import run
from tests.support.fstree import assert_same_tree, image_devices
from tests.support.kmount import mount_erofs

CHUNK = 64 << 10

pytestmark = pytest.mark.kernel


def _tar(path: Path, entries: list[tuple[str, bytes | None, dict]]) -> Path:
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tf:
        for name, data, kw in entries:
            ti = tarfile.TarInfo(name)
            ti.mtime = 1_700_000_000
            if data is None:
                ti.type, ti.mode = tarfile.DIRTYPE, 0o755
            else:
                ti.size = len(data)
            for k, v in kw.items():
                setattr(ti, k, v)
            tf.addfile(ti, io.BytesIO(data) if data else None)
    return path


@pytest.fixture(scope="module")
def layers(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    d = tmp_path_factory.mktemp("layers")
    text = b"".join(b"line %d of a very compressible text file\n" % i for i in range(60_000))
    l1 = _tar(d / "l1.tar", [
        ("usr", None, {}), ("usr/text", text, {}), ("usr/random", os.urandom(5 * CHUNK + 33), {}),
        ("usr/mixed", os.urandom(CHUNK) + bytes(3 * CHUNK) + text[:CHUNK], {}),
        ("usr/small", b"tiny\n", {"mode": 0o600, "uid": 7, "gid": 8}), ("etc", None, {}),
        ("etc/conf", b"a=b\n" * 1000, {"pax_headers": {"SCHILY.xattr.user.k": "v"}}),
        ("etc/link", None, {"type": tarfile.SYMTYPE, "linkname": "conf"}),
    ])  # fmt: skip
    l2 = _tar(d / "l2.tar", [
        ("usr/.wh.random", b"", {}), ("etc/.wh..wh..opq", b"", {}), ("etc/fresh", text[: 3 * CHUNK], {}),
        ("usr/text2", text[::-1], {}), ("usr/hl", None, {"type": tarfile.LNKTYPE, "linkname": "usr/text2"}),
    ])  # fmt: skip
    return [l1, l2]


def build(layers: list[Path], out: Path, compressor: str) -> dict:
    proc = run("build", *layers, "-o", out, "--compressor", compressor, "--chunk-size", str(CHUNK), "--json")
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def _uncompressed_layout(out: Path, dest: Path) -> tuple[list[Path], list[tuple[int, int]]]:
    """Each blob's uncompressed (4 KiB aligned) layout, decoded using only the blob's own metadata; and the
    (stored size, size) of every chunk."""
    boot = Bootstrap(out / "image.boot")
    source = LocalBlobDir(out / "blobs")
    files = []
    sizes = []
    try:
        for blob in boot.blobs:
            meta = BlobMeta.load(source, blob)  # no bootstrap: digests from the blob's blob.digest section
            path = dest / blob.blob_id
            with open(path, "wb") as f:
                f.truncate(blob.uncompressed_size)
                for ci in range(meta.chunk_count):
                    c_off, c_size, d_off, d_size = meta.chunk(ci)
                    sizes.append((c_size, d_size))
                    f.seek(d_off)
                    f.write(meta.decode_chunk(ci, source.read(blob.blob_id, c_off, c_size)))
            files.append(path)
    finally:
        boot.close()
    return files, sizes


@pytest.fixture(scope="module")
def reference(layers: list[Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ref") / "out"
    build(layers, out, "none")
    return out


@pytest.mark.parametrize("compressor", ["lz4_block", "zstd"])
def test_compressed_image_reads_back_identical(layers: list[Path], reference: Path, tmp_path: Path,
                                               compressor: str) -> None:  # fmt: skip
    out = tmp_path / "out"
    info = build(layers, out, compressor)
    plain = json.loads(json.dumps(build(layers, tmp_path / "plain", "none")))
    assert [b["uncompressed_size"] for b in info["blobs"]] == [b["uncompressed_size"] for b in plain["blobs"]]
    assert sum(b["compressed_size"] for b in info["blobs"]) < sum(b["compressed_size"] for b in plain["blobs"]) // 2

    boot = Bootstrap(out / "image.boot")
    try:
        table = boot.chunk_table  # the chunks the merged tree uses
    finally:
        boot.close()
    assert any(c.flags & 1 for c in table) and all(bool(c.flags & 1) == (c.compressed_size < c.uncompressed_size)
                                                   for c in table)  # fmt: skip

    unpacked = tmp_path / "unpacked"
    proc = run("unpack", out / "image.boot", "--blob-dir", out / "blobs", "-o", unpacked)
    assert proc.returncode == 0, proc.stderr
    cache = tmp_path / "cache"
    cache.mkdir()
    devices, sizes = _uncompressed_layout(out, cache)
    # random data does not shrink and is stored raw: the 6 chunks of usr/random (whited out later, still in
    # layer 1's blob), 1 of usr/mixed, and the 5-byte usr/small
    assert sum(1 for c, d in sizes if c == d) == 8
    assert sum(1 for c, d in sizes if c < d) == len(sizes) - 8
    with mount_erofs(reference / "image.boot", tmp_path / "ref", image_devices(reference)) as ref:
        assert_same_tree(ref, unpacked)
        with mount_erofs(out / "image.boot", tmp_path / "mnt", devices) as mnt:
            assert_same_tree(ref, mnt)
            assert not (mnt / "usr" / "random").exists() and sorted(os.listdir(mnt / "etc")) == ["fresh"]

"""The byte layout of RAFS v6 images, checked with the independent decoder (tests/support/nydus_decoder.py) against
the published layout (docs/format.md): first on what upstream nydus-image wrote, then on what our
builder writes, so both are held to the same rules.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path

import pytest

from tests.support import nydus_decoder as nd
from tests.support.cli import run
from tests.support.paths import SHARED

NYDUS = SHARED / "interop" / "nydus"
UPSTREAM_BOOT = NYDUS / "rafs-v6-2.2.boot"


def round_up(n: int, a: int = 4096) -> int:
    return -(-n // a) * a


def check_image_layout(boot_path: Path, blob_dir: Path, *, compressor: str, digester: str, chunk_size: int,
                       ours: bool) -> nd.Bootstrap:  # fmt: skip
    """Every §1 rule the decoder can see.  ``ours`` adds the rules our builder promises beyond upstream's."""
    raw = boot_path.read_bytes()
    bt = nd.decode_bootstrap(raw)
    sb, ext = bt.sb, bt.ext
    # §1.1/1.2 superblock
    assert len(raw) % nd.BLOCK == 0
    assert sb["magic"] == nd.EROFS_MAGIC
    assert sb["feature_compat"] & 0x40000000
    assert sb["blkszbits"] == 12 and sb["extslots"] == 0
    assert sb["feature_incompat"] & 0x4 and sb["feature_incompat"] & 0x8
    assert sb["feature_incompat"] & ~0x4C == 0  # chunked file, device table (+ xattr prefixes at most)
    assert sb["root_nid"] != 0 and sb["xattr_blkaddr"] == 0
    assert sb["extra_devices"] == len(bt.blobs) and sb["devt_slotoff"] == 11
    assert 0 in sb["volume_name"]
    # §1.3 extended superblock: one compression flag, one hash flag, chunk size, tables aligned and in bounds
    comp = [n for f, n in nd.COMPRESSION_FLAGS.items() if ext["flags"] & f]
    hashes = [n for f, n in nd.HASH_FLAGS.items() if ext["flags"] & f]
    assert comp == [compressor] and hashes == [digester]
    assert ext["chunk_size"] == chunk_size and chunk_size & (chunk_size - 1) == 0
    spans = []
    for name in ("blob_table", "chunk_table"):
        off, size = ext[f"{name}_offset"], ext[f"{name}_size"]
        assert off % 4096 == 0 and off + size <= len(raw), name
        spans.append((off, off + size))
    spans.sort()
    assert spans[0][1] <= spans[1][0]
    assert ext["blob_table_size"] == 256 * len(bt.blobs) and ext["chunk_table_size"] % 80 == 0
    # §1.4 device table = blob table
    assert [d["tag"] for d in bt.devices] == [b["blob_id"] for b in bt.blobs]
    for d, b in zip(bt.devices, bt.blobs, strict=True):
        assert d["blocks"] == b["uncompressed_size"] // 4096

    digests_seen: dict[tuple[int, int], bytes] = {}
    for i, entry in enumerate(bt.blobs):
        # §1.6 blob table entry
        assert entry["blob_index"] == i and entry["chunk_size"] == chunk_size
        assert nd.COMPRESSION_ALGOS[entry["compression_algo"]] == compressor
        assert nd.DIGEST_ALGOS[entry["digest_algo"]] == digester
        assert entry["features"] & nd.BLOB_ALIGNED and entry["features"] & nd.BLOB_HAS_TOC
        assert entry["ci_uncompressed_size"] == 16 * entry["chunk_count"]
        assert entry["uncompressed_size"] % 4096 == 0 and entry["cipher_algo"] == 0
        blob_raw = (blob_dir / entry["blob_id"]).read_bytes()
        assert entry["compressed_size"] == len(blob_raw)
        if ours:  # §1.8: blob id = sha256 of every byte written
            assert hashlib.sha256(blob_raw).hexdigest() == entry["blob_id"]
        blob = nd.decode_blob(blob_raw, entry)
        # ToC: tar header with a good checksum, size and digest recorded in the blob table
        assert blob.toc_header_ok
        assert entry["blob_toc_size"] == len(blob.toc_bytes) == 128 * len(blob.toc) + 512
        assert hashlib.sha256(blob.toc_bytes).digest() == entry["blob_toc_digest"]
        assert {"image.blob", "blob.meta", "blob.meta.header", "blob.digest"} <= set(blob.toc)
        for name in ("blob.meta", "blob.meta.header", "blob.digest"):
            e = blob.toc[name]
            sect = blob_raw[e["c_off"] : e["c_off"] + e["c_size"]]
            if e["c_size"] == e["d_size"]:
                assert hashlib.sha256(sect).digest() == e["digest"], name
            # each section is followed by its 512-byte tar header (reverse tar)
            hname, hsize, hok = nd.tar_header(blob_raw[e["c_off"] + e["c_size"] : e["c_off"] + e["c_size"] + 512]) \
                if name != "blob.meta" else (b"", 0, True)  # fmt: skip
            if name != "blob.meta":
                expect = b"blob.meta" if name == "blob.meta.header" else name.encode()
                assert hok and hname == expect, (name, hname)
        assert blob.toc["blob.meta"]["c_off"] == entry["ci_offset"]
        assert blob.toc["blob.meta.header"]["d_size"] == 4096
        assert blob.toc["blob.digest"]["d_size"] == 32 * entry["chunk_count"]
        # CCT header directly after the table
        cct = blob.cct
        assert cct["magic"] == nd.CCT_MAGIC and cct["magic2"] == nd.CCT_MAGIC
        assert cct["ci_entries"] == entry["chunk_count"]
        assert (cct["ci_offset"], cct["ci_c_size"], cct["ci_d_size"]) == (
            entry["ci_offset"], entry["ci_compressed_size"], entry["ci_uncompressed_size"],
        )  # fmt: skip
        assert cct["ci_compressor"] == entry["ci_compressor"]
        # chunk infos: compressed data ascending, uncompressed offsets 4K-aligned advancing by round_up_4k
        c_end = d_end = 4096 if ours else 0  # ours start after a one-block zero prefix (§9.1)
        for ci, c in enumerate(blob.chunks):
            assert c["c_off"] >= c_end, ci  # ascending, not overlapping (uncompressed blobs may stay 4K-aligned)
            c_end = c["c_off"] + c["c_size"]
            assert c["d_off"] % 4096 == 0 and c["d_off"] == d_end, ci
            d_end += round_up(c["d_size"])
            assert 1 <= c["d_size"] <= chunk_size and 1 <= c["c_size"] <= chunk_size
            data = nd.chunk_data(blob, entry, ci)
            assert len(data) == c["d_size"]
            assert nd.digest(digester, data) == blob.digests[ci], ci
            if compressor == "none":
                assert c["c_size"] == c["d_size"]
            digests_seen[(i, ci)] = blob.digests[ci]
        assert d_end == entry["uncompressed_size"]
        assert c_end <= entry["ci_offset"]
        hname, hsize, hok = nd.tar_header(blob_raw[entry["ci_offset"] - 512 : entry["ci_offset"]])
        assert hok and hname == b"image.blob" and hsize >= c_end  # the data's tar header precedes the table
        if ours:
            assert len(set(blob.digests)) == len(blob.digests)  # chunks are deduplicated within a blob
        # §1.7 the bootstrap's chunk table agrees with the blob's chunk-info table and digests
        for ct in bt.chunks:
            if ct["blob_index"] != i:
                continue
            c = blob.chunks[ct["index"]]
            assert (ct["c_off"], ct["c_size"], ct["d_off"], ct["d_size"]) == (
                c["c_off"], c["c_size"], c["d_off"], c["d_size"],
            )  # fmt: skip
            assert ct["digest"] == blob.digests[ct["index"]]
            assert bool(ct["flags"] & 1) == (ct["c_size"] != ct["d_size"])
    assert {(c["blob_index"], c["index"]) for c in bt.chunks} == set(digests_seen)
    return bt


# ---- upstream ----------------------------------------------------------------------------------------------------
@pytest.mark.upstream
def test_upstream_image_matches_the_reference():
    bt = check_image_layout(UPSTREAM_BOOT, NYDUS / "blobs", compressor="zstd", digester="blake3",
                            chunk_size=1 << 20, ours=False)  # fmt: skip
    assert bt.sb["meta_blkaddr"] == 2 and bt.sb["root_nid"] == 128
    assert bt.ext["blob_table_offset"] == 4096 and bt.ext["chunk_table_offset"] == 16384
    assert bt.ext["flags"] & nd.FLAG_INLINED_CHUNK_DIGEST
    blobs = {p.name: p.read_bytes() for p in (NYDUS / "blobs").iterdir()}
    for name, size in {"lib.rs": 16931, "sync_io.rs": 13400}.items():
        ino = nd.lookup(bt, name)
        assert ino.extended and ino.layout == 4 and ino.i_u == 0x28  # chunk-based, 8-byte indexes, 1 MiB
        data = nd.read_file(bt, name, blobs)
        assert len(data) == size and data.startswith(b"// Copyright (C) 2020 Alibaba Cloud.")
    # dirents are sorted and include . and ..
    names = [n for n, _, _ in nd.dirents(bt, nd.inode(bt, bt.sb["root_nid"]))]
    assert names == sorted(names) and names[:2] == [b".", b".."]


@pytest.mark.upstream
def test_upstream_toc_tail_decodes():
    """The tail of another upstream blob: its ToC lists image.boot compressed with zstd."""
    tail = next(NYDUS.glob("toc-*")).read_bytes()
    name, size, ok = nd.tar_header(tail[-512:])
    assert (name, ok) == (b"rafs.blob.toc", True) and size % 128 == 0
    entries = [nd.cstr(tail[-512 - size + 128 * i + 8 : -512 - size + 128 * i + 24]) for i in range(size // 128)]
    assert entries == [b"image.blob", b"blob.meta", b"blob.meta.header", b"image.boot"]


# ---- our builder -------------------------------------------------------------------------------------------------
def make_tree(root: Path) -> dict[str, bytes]:
    """Files that exercise chunking: multi-chunk compressible, incompressible, duplicate, empty, sparse, tiny."""
    import random

    rnd = random.Random(42)
    files = {
        "text.txt": b"".join(b"line %06d of a compressible file\n" % i for i in range(9000)),
        "random.bin": rnd.randbytes(150_000),
        "dir/copy.txt": b"".join(b"line %06d of a compressible file\n" % i for i in range(9000)),
        "dir/empty": b"",
        "dir/tiny": b"x",
        "sparse": b"\0" * 200_000 + b"end",
    }
    for rel, data in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
    with open(root / "sparse", "r+b") as f:  # make it really sparse
        f.truncate(0)
        f.seek(200_000)
        f.write(b"end")
    return files


def build(src: Path, out: Path, *opts: str) -> subprocess.CompletedProcess[str]:
    return run("build", src, "--output-dir", out, *opts, timeout=120)


@pytest.mark.parametrize("compressor", ["none", "lz4_block", "zstd"])
@pytest.mark.parametrize("digester", ["blake3", "sha256"])
def test_our_builder_output_matches_the_reference(tmp_path: Path, compressor: str, digester: str):
    src = tmp_path / "src"
    files = make_tree(src)
    out = tmp_path / "out"
    chunk_size = 64 * 1024
    r = build(src, out, "--compressor", compressor, "--digester", digester, "--chunk-size", str(chunk_size))
    assert r.returncode == 0, r.stderr
    bt = check_image_layout(out / "image.boot", out / "blobs", compressor=compressor, digester=digester,
                            chunk_size=chunk_size, ours=True)  # fmt: skip
    assert sorted(os.listdir(out / "blobs")) == sorted(b["blob_id"] for b in bt.blobs)
    blobs = {p.name: p.read_bytes() for p in (out / "blobs").iterdir()}
    for rel, data in files.items():
        assert nd.read_file(bt, rel, blobs) == data, rel
    # dedup: the copy shares the original's chunks
    _, a = nd.chunk_indexes(bt, nd.lookup(bt, "text.txt"))
    _, b = nd.chunk_indexes(bt, nd.lookup(bt, "dir/copy.txt"))
    assert [x[:2] for x in a] == [x[:2] for x in b]
    # holes: the all-zero chunks of the sparse file are 0xFFFFFFFF (or at least read back as zeros above)
    _, s = nd.chunk_indexes(bt, nd.lookup(bt, "sparse"))
    assert len(s) == -(-200_003 // chunk_size)
    # every directory's names are sorted bytewise, '.' and '..' included
    stack = [nd.inode(bt, bt.sb["root_nid"])]
    while stack:
        d = stack.pop()
        ents = nd.dirents(bt, d)
        names = [n for n, _, _ in ents]
        assert names == sorted(names) and {b".", b".."} <= set(names)
        stack += [nd.inode(bt, nid) for n, nid, t in ents if t == 2 and n not in (b".", b"..")]
    if compressor != "none":
        text_chunks = {x[1] for x in a}
        by_ci = nd.decode_blob(blobs[bt.blobs[0]["blob_id"]], bt.blobs[0]).chunks
        assert all(by_ci[ci]["c_size"] < by_ci[ci]["d_size"] for ci in text_chunks)  # compressible: compressed

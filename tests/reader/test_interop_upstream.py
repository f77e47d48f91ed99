"""What upstream nydus-image 2.2 wrote, we read: inspect, check, unpack, and the kernel mounts it.

The fixtures live in ``../shared/interop/nydus/`` beside the repository and are read in place (never copied
into the repo); damaged copies are made in tmp_path.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tarfile
from pathlib import Path

import blake3
import pytest

from tests.support import cli
from tests.support.kmount import mount_erofs
from tests.support.paths import SHARED

NYDUS = SHARED / "interop" / "nydus"
BOOT = NYDUS / "rafs-v6-2.2.boot"
BLOBS = NYDUS / "blobs"
BLOB_ID = "be7d77eeb719f70884758d1aa800ed0fb09d701aaec469964e9d54325f0d5fef"
FILES = {"lib.rs": 16931, "sync_io.rs": 13400}

pytestmark = pytest.mark.upstream


def run(*args: str | os.PathLike[str]) -> subprocess.CompletedProcess[str]:
    return cli.run(*args, timeout=60)


@pytest.fixture
def damaged_blobs(tmp_path: Path) -> Path:
    """A copy of the blob dir whose first chunk (lib.rs, compressed at 0..4828) has one byte flipped."""
    d = tmp_path / "blobs"
    d.mkdir()
    blob = d / BLOB_ID
    shutil.copyfile(BLOBS / BLOB_ID, blob)
    data = bytearray(blob.read_bytes())
    data[2000] ^= 0x55
    blob.write_bytes(bytes(data))
    return d


def test_inspect_shows_the_upstream_blob():
    r = run("inspect", BOOT, "--json")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["format"] == "rafs-v6"
    assert info["chunk_size"] == 1 << 20
    assert (info["compressor"], info["digester"]) == ("zstd", "blake3")
    assert info["inodes"] == 3 and info["files"] == 2
    (blob,) = info["blobs"]
    assert blob["id"] == BLOB_ID
    assert blob["chunk_count"] == 2
    assert blob["compressed_size"] == 14554 and blob["uncompressed_size"] == 36864
    assert info["chunks"]["unique"] == 2 and info["chunks"]["dedup_ratio"] == 1.0
    assert info["chunks"]["compression_ratio"] == pytest.approx((16931 + 13400) / (4828 + 2974), rel=1e-3)

    human = run("inspect", BOOT)
    assert human.returncode == 0 and BLOB_ID in human.stdout and "zstd" in human.stdout


def test_inspect_ls_and_stat():
    r = run("inspect", BOOT, "--ls")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert [ln.split()[-1] for ln in lines] == ["lib.rs", "sync_io.rs"]
    assert lines[0].startswith("-rw-r--r--") and " 16931 " in lines[0]

    r = run("inspect", BOOT, "--stat", "/sync_io.rs", "--json")
    st = json.loads(r.stdout)
    assert st["size"] == 13400 and st["filemode"] == "-rw-r--r--" and st["layout"] == "chunk_based"
    assert st["chunks"] == [{"file_offset": 0, "length": 13400, "blob_index": 0, "ci_index": 1, "blob_offset": 20480}]

    missing = run("inspect", BOOT, "--stat", "/nope")
    assert missing.returncode != 0 and "/nope" in missing.stderr and "Traceback" not in missing.stderr


# the upstream test texture's blob file is named by an id that is not its sha256 (ids of real blobs are: the
# OCI layer digest): `check` verifies both chunks and says that, once
BLOB_SHA256 = "4b16fb83ae9f62d8263323b8569535e66ebf21171cf98fd94db9db27b59755ac"
ID_PROBLEM = f"blob {BLOB_ID}: the blob's sha256 is {BLOB_SHA256}, not its id"


def test_check_verifies_both_chunks_and_the_blob_id():
    r = run("check", BOOT, "--blob-dir", BLOBS, "--json")
    assert r.returncode == 3, r.stdout + r.stderr
    report = json.loads(r.stdout)
    assert [(p["blob"], p["chunk"]) for p in report["problems"]] == [(BLOB_ID, None)]
    assert report["chunks_verified"] == 2 and report["bytes_verified"] == 16931 + 13400

    human = run("check", BOOT, "--blob-dir", BLOBS)
    assert human.returncode == 3 and human.stdout.startswith(ID_PROBLEM) and len(human.stdout.splitlines()) == 1


def test_check_finds_the_blobs_beside_the_bootstrap():
    r = run("check", BOOT, "--json")  # the fixture directory has blobs/ beside the bootstrap
    assert r.returncode == 3, r.stdout + r.stderr  # the texture blob's id problem (above), nothing else
    report = json.loads(r.stdout)
    assert report["chunks_verified"] == 2 and [(p["blob"], p["chunk"]) for p in report["problems"]] == [(BLOB_ID, None)]


def test_check_without_blobs_is_structural_only(tmp_path: Path):
    boot = tmp_path / "image.boot"
    shutil.copyfile(BOOT, boot)
    r = run("check", boot)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "blobs not checked" in r.stdout
    assert "warning: blobs not checked (metadata only): give --blob-dir DIR" in r.stderr


def test_unpack_to_directory(tmp_path: Path):
    out = tmp_path / "out"
    r = run("unpack", BOOT, "--blob-dir", BLOBS, "--output", out)
    assert r.returncode == 0, r.stderr
    assert sorted(os.listdir(out)) == sorted(FILES)
    table = {}
    from erofs.reader import Bootstrap  # the chunk digests the bootstrap records for each file

    with Bootstrap(BOOT) as bs:
        for c in bs.chunk_table:
            table[c.index] = c.digest
    for name, size in FILES.items():
        data = (out / name).read_bytes()
        assert len(data) == size
        assert data.startswith(b"// Copyright (C) 2020 Alibaba Cloud. All rights reserved.")
        assert blake3.blake3(data).digest() in table.values()  # one chunk per file: the file's digest
        st = (out / name).stat()
        assert (st.st_mode & 0o7777, st.st_uid, st.st_gid) == (0o644, 0, 0)
        assert st.st_mtime_ns == 1676819553_628661334 or name != "lib.rs"


def test_unpack_to_tar(tmp_path: Path):
    out = tmp_path / "image.tar"
    r = run("unpack", BOOT, "--blob-dir", BLOBS, "--output", out)
    assert r.returncode == 0, r.stderr
    with tarfile.open(out) as tar:
        members = {m.name: m for m in tar.getmembers()}
        assert {n: members["./" + n].size for n in FILES} == FILES
        assert tar.extractfile("./lib.rs").read().endswith(b"\n")  # type: ignore[union-attr]


def test_damaged_blob_fails_check_naming_file_and_chunk(damaged_blobs: Path):
    r = run("check", BOOT, "--blob-dir", damaged_blobs)
    assert r.returncode == 3
    line, id_line = r.stdout.splitlines()
    assert "/lib.rs" in line and f"chunk 0 of blob {BLOB_ID}" in line
    assert id_line.startswith(f"blob {BLOB_ID}: the blob's sha256 is ")
    assert "sync_io.rs" not in r.stdout  # the other chunk still verifies

    j = json.loads(run("check", BOOT, "--blob-dir", damaged_blobs, "--json").stdout)
    assert not j["ok"] and j["chunks_verified"] == 1
    assert [(p["chunk"], p["blob"]) for p in j["problems"]] == [(0, BLOB_ID), (None, BLOB_ID)]


def test_damaged_blob_fails_unpack_and_leaves_nothing(damaged_blobs: Path, tmp_path: Path):
    out = tmp_path / "out"
    r = run("unpack", BOOT, "--blob-dir", damaged_blobs, "--output", out)
    assert r.returncode == 3
    msg = r.stderr.strip()
    assert len(msg.splitlines()) == 1 and "Traceback" not in msg
    assert "/lib.rs" in msg and "chunk 0" in msg and BLOB_ID in msg
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blobs"]  # no temporary left behind

    r = run("unpack", BOOT, "--blob-dir", damaged_blobs, "--output", tmp_path / "x.tar")
    assert r.returncode == 3 and "/lib.rs" in r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blobs"]


def test_missing_blob_is_a_clear_error(tmp_path: Path):
    (tmp_path / "empty").mkdir()
    r = run("unpack", BOOT, "--blob-dir", tmp_path / "empty", "--output", tmp_path / "out")
    assert r.returncode == 4 and BLOB_ID in r.stderr and "not found" in r.stderr
    c = run("check", BOOT, "--blob-dir", tmp_path / "empty")
    assert c.returncode == 3 and BLOB_ID in c.stdout and "not found" in c.stdout


def test_truncated_toc_is_reported(tmp_path: Path):
    d = tmp_path / "blobs"
    d.mkdir()
    data = (BLOBS / BLOB_ID).read_bytes()
    (d / BLOB_ID).write_bytes(data[:-100])
    r = run("check", BOOT, "--blob-dir", d)
    assert r.returncode == 3 and "ToC" in r.stdout


@pytest.mark.kernel
def test_kernel_mounts_upstream_bootstrap(tmp_path: Path):
    with mount_erofs(BOOT, tmp_path / "mnt") as mp:
        assert sorted(os.listdir(mp)) == sorted(FILES)
        for name, size in FILES.items():
            st = os.lstat(mp / name)
            assert st.st_size == size and st.st_mode == 0o100644

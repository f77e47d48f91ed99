"""``nydus-erofs inspect`` on our own images and on plain EROFS: statistics, listings, single entries."""

from __future__ import annotations

import json
import os
import stat
import subprocess
from pathlib import Path

import pytest

from tests.support import cli

pytestmark = pytest.mark.root  # the source tree holds device nodes


def run(*args: str | os.PathLike[str]) -> subprocess.CompletedProcess[str]:
    return cli.run(*args, timeout=120)


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("inspect")
    src = tmp / "src"
    (src / "d").mkdir(parents=True)
    text = b"the same compressible line\n" * 10000  # 270000 bytes: 5 chunks of 64 KiB
    (src / "a.txt").write_bytes(text)
    (src / "d" / "b.txt").write_bytes(text)  # identical: dedup
    (src / "link").symlink_to("a.txt")
    os.mknod(src / "null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    os.chmod(src / "null", 0o666)
    os.setxattr(src / "a.txt", "user.k", b"v")
    os.utime(src / "a.txt", (1_600_000_000, 1_600_000_000))
    out = tmp / "out"
    r = run("build", src, "--output-dir", out, "--compressor", "zstd", "--chunk-size", "64k")
    assert r.returncode == 0, r.stderr
    return out


def test_json_summary(image: Path):
    r = run("inspect", image / "image.boot", "--json")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["format"] == "rafs-v6"
    assert (info["chunk_size"], info["compressor"], info["digester"]) == (65536, "zstd", "blake3")
    (blob,) = info["blobs"]
    assert blob["id"] == next((image / "blobs").iterdir()).name
    assert blob["chunk_count"] == 5 and blob["compressed_size"] == (image / "blobs" / blob["id"]).stat().st_size
    assert info["inodes"] == 6 and info["files"] == 2 and info["symlinks"] == 1 and info["others"] == 1
    ch = info["chunks"]
    assert (ch["referenced"], ch["unique"], ch["dedup_ratio"]) == (10, 5, 2.0)
    assert ch["compression_ratio"] > 10  # one repeated line compresses very well
    assert "rafs_v6" in info["superblock"]["features"] and "device_table" in info["superblock"]["features"]


def test_human_summary(image: Path):
    r = run("inspect", image / "image.boot")
    assert r.returncode == 0, r.stderr
    assert "dedup ratio 2.0" in r.stdout and "5 chunks" in r.stdout and "zstd" in r.stdout


def test_ls(image: Path):
    r = run("inspect", image / "image.boot", "--ls")
    assert r.returncode == 0, r.stderr
    rows = {ln.split()[-1] if "->" not in ln else ln.split()[-3]: ln for ln in r.stdout.splitlines()}
    assert sorted(rows) == ["a.txt", "d", "link", "null"]
    assert rows["a.txt"].startswith("-rw-r--r--") and " 270000 2020-09-13 12:26 a.txt" in rows["a.txt"]
    assert rows["d"].startswith("drwx")
    assert rows["link"].startswith("lrwxrwxrwx") and rows["link"].endswith("link -> a.txt")
    assert rows["null"].startswith("crw-rw-rw-") and " 1, 3 " in rows["null"]
    sub = run("inspect", image / "image.boot", "--ls", "/d", "--json")
    (entry,) = json.loads(sub.stdout)
    assert entry["path"] == "/d/b.txt" and entry["size"] == 270000


def test_stat(image: Path):
    r = run("inspect", image / "image.boot", "--stat", "/a.txt", "--json")
    assert r.returncode == 0, r.stderr
    st = json.loads(r.stdout)
    assert st["xattrs"] == {"user.k": "v"} and st["mtime"] == 1_600_000_000
    assert [c["file_offset"] for c in st["chunks"]] == [0, 65536, 131072, 196608, 262144]
    assert st["chunks"][-1]["length"] == 270000 - 262144
    other = json.loads(run("inspect", image / "image.boot", "--stat", "d/b.txt", "--json").stdout)
    assert [c["ci_index"] for c in other["chunks"]] == [c["ci_index"] for c in st["chunks"]]
    dev = json.loads(run("inspect", image / "image.boot", "--stat", "/null", "--json").stdout)
    assert dev["rdev"] == [1, 3] and dev["type"] == "c"
    human = run("inspect", image / "image.boot", "--stat", "/link")
    assert "target: a.txt" in human.stdout


@pytest.mark.tools("mkfs.erofs")
def test_plain_erofs_image(tmp_path: Path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(b"data" * 5000)
    img, blob = tmp_path / "img", tmp_path / "blob"
    subprocess.run(["mkfs.erofs", "--quiet", f"--blobdev={blob}", "--chunksize=4096", str(img), str(src)], check=True)
    info = json.loads(run("inspect", img, "--json").stdout)
    assert info["format"] == "erofs" and info["compressor"] is None
    assert info["superblock"]["checksum_ok"] is True
    assert [b["id"] for b in info["blobs"]] == ["device1"]  # mkfs.erofs leaves the tag empty
    assert info["files"] == 1 and info["chunks"]["referenced"] == 5
    c = run("check", img, "--device", blob)
    assert c.returncode == 0 and c.stdout.startswith("OK:")

"""``build``/``convert --prefetch-list``: the bootstrap's prefetch table, as upstream ``--prefetch-policy fs``
writes it, decoded by the independent decoder, shown by ``inspect``, validated by ``check``, and mounted."""

from __future__ import annotations

import gzip
import io
import json
import os
import subprocess
import tarfile
from pathlib import Path

import pytest

from tests.support import nydus_decoder as nd
from tests.support.cli import run
from tests.support.fstree import assert_same_tree, image_devices, mount_erofs
from tests.support.paths import NYDUS

UPSTREAM = NYDUS / "rafs-v6-2.2.boot"

LIST = """/usr/bin
/etc/hostname
/usr/bin/tool
  relative/path
/nowhere
/etc/link
/etc/empty

/srv/data/../x
"""


def cli(*args: str | Path, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return run(*args, input=stdin, timeout=120)


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    src = tmp_path_factory.mktemp("prefetch") / "src"
    (src / "etc").mkdir(parents=True)
    (src / "usr" / "bin").mkdir(parents=True)
    (src / "usr" / "lib").mkdir(parents=True)
    (src / "etc" / "hostname").write_text("nydus\n")
    (src / "etc" / "empty").write_bytes(b"")
    (src / "etc" / "link").symlink_to("hostname")
    (src / "usr" / "bin" / "tool").write_bytes(os.urandom(20000))
    (src / "usr" / "bin" / "sh").write_bytes(os.urandom(9000))
    (src / "usr" / "lib" / "libc.so").write_bytes(os.urandom(30000))
    return src


@pytest.fixture(scope="module")
def built(source: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("prefetch-out") / "out"
    listing = out.parent / "list.txt"
    listing.write_text(LIST)
    r = cli("build", source, "-o", out, "--chunk-size", "4KiB", "--prefetch-list", listing)
    assert r.returncode == 0, r.stderr
    return out, r.stderr


def test_table_is_upstreams_layout(built: tuple[Path, str]) -> None:
    out, _ = built
    bt = nd.decode_bootstrap((out / "image.boot").read_bytes())
    ext = bt.ext
    # right after the blob table, unaligned, size in bytes
    assert ext["prefetch_table_offset"] == ext["blob_table_offset"] + ext["blob_table_size"]
    assert ext["prefetch_table_size"] == 4 * 2
    nids = nd.prefetch_table(bt.raw, ext)
    assert nids == [nd.lookup(bt, "/usr/bin").nid, nd.lookup(bt, "/etc/hostname").nid]
    # the inode area starts at the next block after the table (meta_blkaddr is one block before it)
    table_end = ext["prefetch_table_offset"] + ext["prefetch_table_size"]
    root_off = bt.sb["meta_blkaddr"] * nd.BLOCK + 32 * bt.sb["root_nid"]
    assert root_off == -(-table_end // nd.BLOCK) * nd.BLOCK


def test_skipped_patterns_are_one_line_warnings(built: tuple[Path, str]) -> None:
    _, stderr = built
    lines = stderr.splitlines()
    assert len(lines) == 5, stderr
    assert all(line.startswith("warning: ") for line in lines)
    assert "/usr/bin/tool is covered by an earlier pattern" in lines[0]
    assert "'relative/path' is not an absolute path" in lines[1]
    assert "'/srv/data/../x' is not an absolute path" in lines[2]
    assert "/nowhere is not in the image" in lines[3]
    assert "/etc/link is not a regular file or a directory" in lines[4]
    # /etc/empty: an empty regular file is never matched, as upstream (silently)


def test_inspect_shows_the_table_as_paths(built: tuple[Path, str]) -> None:
    out, _ = built
    r = cli("inspect", out / "image.boot")
    assert r.returncode == 0, r.stderr
    assert "prefetch table: 2 entries" in r.stdout
    text = r.stdout.split("prefetch table: 2 entries\n", 1)[1].splitlines()
    assert text[0].startswith("  /usr/bin  (nid ") and text[0].endswith("directory)")
    assert text[1].startswith("  /etc/hostname  (nid ") and text[1].endswith("file)")
    info = json.loads(cli("inspect", out / "image.boot", "--json").stdout)
    assert [(p["path"], p["kind"]) for p in info["prefetch"]] == [("/usr/bin", "directory"), ("/etc/hostname", "file")]


def test_check_accepts_it(built: tuple[Path, str]) -> None:
    out, _ = built
    r = cli("check", out / "image.boot", "--blob-dir", out / "blobs")
    assert r.returncode == 0, r.stdout + r.stderr


def _patched(out: Path, tmp_path: Path, entry: int, value: int) -> Path:
    raw = bytearray((out / "image.boot").read_bytes())
    ext = nd.ext_superblock(bytes(raw))
    raw[ext["prefetch_table_offset"] + 4 * entry : ext["prefetch_table_offset"] + 4 * entry + 4] = value.to_bytes(
        4, "little"
    )
    bad = tmp_path / "bad.boot"
    bad.write_bytes(raw)
    return bad


def test_check_rejects_bad_entries(built: tuple[Path, str], tmp_path: Path) -> None:
    out, _ = built
    bt = nd.decode_bootstrap((out / "image.boot").read_bytes())
    bad = _patched(out, tmp_path, 1, 999_999)
    r = cli("check", bad)
    assert r.returncode != 0
    assert "prefetch table entry 1: nid 999999 is not an inode of the tree" in r.stdout + r.stderr
    link = nd.lookup(bt, "/etc/link").nid
    r = cli("check", _patched(out, tmp_path, 0, link))
    assert r.returncode != 0
    assert f"prefetch table entry 0: /etc/link (nid {link}) is not a regular file or a directory" in r.stdout


def test_check_rejects_a_table_past_the_end(built: tuple[Path, str], tmp_path: Path) -> None:
    out, _ = built
    raw = bytearray((out / "image.boot").read_bytes())
    raw[1152 + 48 : 1152 + 52] = (len(raw)).to_bytes(4, "little")  # s_prefetch_table_size
    bad = tmp_path / "bad.boot"
    bad.write_bytes(raw)
    r = cli("check", bad)
    assert r.returncode != 0
    assert "prefetch table" in r.stdout and "past the end" in r.stdout
    r = cli("inspect", bad)
    assert r.returncode == 0 and "prefetch table: prefetch table: bytes" in r.stdout


def test_no_list_no_table_and_stdin_list(source: Path, tmp_path: Path) -> None:
    r = cli("build", source, "-o", tmp_path / "plain")
    assert r.returncode == 0, r.stderr
    ext = nd.ext_superblock((tmp_path / "plain" / "image.boot").read_bytes())
    assert (ext["prefetch_table_offset"], ext["prefetch_table_size"]) == (0, 0)
    r = cli("build", source, "-o", tmp_path / "stdin", "--prefetch-list", "-", stdin="/usr/lib/libc.so\n/\n")
    assert r.returncode == 0 and r.stderr == "", r.stderr
    bt = nd.decode_bootstrap((tmp_path / "stdin" / "image.boot").read_bytes())
    assert nd.prefetch_table(bt.raw, bt.ext) == [nd.lookup(bt, "/usr/lib/libc.so").nid, bt.sb["root_nid"]]


def test_missing_list_file_is_a_one_line_error(source: Path, tmp_path: Path) -> None:
    r = cli("build", source, "-o", tmp_path / "out", "--prefetch-list", tmp_path / "nope")
    assert r.returncode != 0
    assert r.stderr.strip().count("\n") == 0 and "No such file" in r.stderr, r.stderr
    assert not (tmp_path / "out").exists()


def test_upstream_fixture_has_no_table() -> None:
    info = json.loads(cli("inspect", UPSTREAM, "--json").stdout)
    assert info["rafs"]["prefetch_table"] == [0, 0]
    assert info["prefetch"] == []


@pytest.mark.kernel
@pytest.mark.root
def test_kernel_mounts_an_image_with_a_table(built: tuple[Path, str], source: Path, tmp_path: Path) -> None:
    out, _ = built
    with mount_erofs(out / "image.boot", tmp_path / "mnt", image_devices(out)) as mnt:
        assert_same_tree(source, mnt)


@pytest.mark.tools("umoci")
def test_convert_writes_the_table(tmp_path: Path) -> None:
    layout = tmp_path / "layout"
    subprocess.run(["umoci", "init", "--layout", layout], check=True)
    subprocess.run(["umoci", "new", "--image", f"{layout}:v1"], check=True)
    bundle = tmp_path / "bundle"
    subprocess.run(["umoci", "unpack", "--image", f"{layout}:v1", bundle], check=True, capture_output=True)
    (bundle / "rootfs" / "app").mkdir()
    (bundle / "rootfs" / "app" / "main").write_bytes(os.urandom(5000))
    subprocess.run(["umoci", "repack", "--image", f"{layout}:v1", bundle], check=True, capture_output=True)
    listing = tmp_path / "list"
    listing.write_text("/app/main\n")
    target = tmp_path / "nydus"
    r = cli("convert", f"oci:{layout}:v1", f"oci:{target}:n", "--prefetch-list", listing)
    assert r.returncode == 0, r.stderr
    (desc,) = json.loads((target / "index.json").read_text())["manifests"]
    manifest = json.loads((target / "blobs" / "sha256" / desc["digest"].split(":")[1]).read_bytes())
    boot_layer = target / "blobs" / "sha256" / manifest["layers"][-1]["digest"].split(":")[1]
    with tarfile.open(fileobj=io.BytesIO(gzip.decompress(boot_layer.read_bytes()))) as tf:
        member = tf.extractfile("image/image.boot")
        assert member is not None
        boot = member.read()
    bt = nd.decode_bootstrap(boot)
    assert nd.prefetch_table(bt.raw, bt.ext) == [nd.lookup(bt, "/app/main").nid]

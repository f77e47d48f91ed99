"""OCI image layouts as SOURCE: tag selection, multi-platform (nested) indexes and ``--platform``, layer media
types (tar, tar+gzip, tar+zstd), and the digest check while streaming."""

from __future__ import annotations

import gzip
import json
import subprocess
from pathlib import Path

import pytest
import zstandard

from tests.support import cli
from tests.support.fstree import image_devices
from tests.support.kmount import mount_erofs
from tests.support.oci import MT_LAYER as MT
from tests.support.oci import Layout, tar_layer


def run(*args: str | Path) -> subprocess.CompletedProcess[str]:
    proc = cli.run("build", *args, "--json")
    assert "Traceback" not in proc.stderr
    return proc


@pytest.fixture()
def layout(tmp_path: Path) -> Layout:
    lay = Layout(tmp_path / "L")
    base = tar_layer({"etc/os": b"base\n", "bin/sh": b"#!shell\n"})
    amd = lay.manifest([(gzip.compress(base), MT + "+gzip"), (tar_layer({"arch": b"amd64\n"}), MT)],
                       platform={"os": "linux", "architecture": "amd64"})  # fmt: skip
    arm = lay.manifest([(zstandard.ZstdCompressor().compress(base), MT + "+zstd"),
                        (zstandard.ZstdCompressor().compress(tar_layer({"arch": b"arm64 v8\n"})), MT + "+zstd")],
                       platform={"os": "linux", "architecture": "arm64", "variant": "v8"})  # fmt: skip
    inner = lay.image_index([amd, arm])
    lay.tag(lay.image_index([inner]), "multi")  # an index nested in an index
    lay.tag(lay.manifest([(base, MT)]), "single")
    return lay


@pytest.mark.kernel
@pytest.mark.parametrize(("platform", "arch"), [(None, b"amd64\n"), ("linux/arm64", b"arm64 v8\n"),
                                                ("linux/arm64/v8", b"arm64 v8\n")])  # fmt: skip
def test_platform_selection(layout: Layout, tmp_path: Path, platform: str | None, arch: bytes) -> None:
    out = tmp_path / "out"
    proc = run(f"oci:{layout.root}:multi", "-o", out, *(["--platform", platform] if platform else []))
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    assert len(info["layers"]) == 2
    with mount_erofs(out / "image.boot", tmp_path / "mnt", image_devices(out)) as mnt:
        assert (mnt / "arch").read_bytes() == arch and (mnt / "etc" / "os").read_bytes() == b"base\n"


def test_same_layer_in_any_compression_is_the_same_data(layout: Layout, tmp_path: Path) -> None:
    """The base layer as tar+gzip (amd64) and tar+zstd (arm64) decodes to the same chunks: one blob id."""
    a = json.loads(run(f"oci:{layout.root}:multi", "-o", tmp_path / "a").stdout)
    b = json.loads(run(f"oci:{layout.root}:multi", "-o", tmp_path / "b", "--platform", "linux/arm64").stdout)
    c = json.loads(run(f"oci:{layout.root}:single", "-o", tmp_path / "c").stdout)
    assert a["layers"][0] == b["layers"][0] == c["layers"][0]


@pytest.mark.parametrize(
    ("ref", "extra", "message"),
    [
        ("multi", ["--platform", "linux/s390x"], "no manifest for platform linux/s390x (has: linux/amd64, "
                                                  "linux/arm64/v8)"),
        ("multi", ["--platform", "linux"], "--platform must be os/arch"),
        ("nope", [], "no image tagged 'nope' (tags: multi, single)"),
        ("", [], "holds 2 images: name one with oci:PATH:TAG"),
    ],
)  # fmt: skip
def test_selection_errors(layout: Layout, tmp_path: Path, ref: str, extra: list[str], message: str) -> None:
    proc = run(f"oci:{layout.root}" + (f":{ref}" if ref else ""), "-o", tmp_path / "out", *extra)
    assert proc.returncode != 0 and len(proc.stderr.strip().splitlines()) == 1
    assert message in proc.stderr, proc.stderr
    assert not (tmp_path / "out").exists()


def test_corrupted_layer_blob_fails_after_streaming(layout: Layout, tmp_path: Path) -> None:
    """A layer blob whose bytes changed (still a valid archive) is caught by its digest; OUT is not created."""
    manifest = json.loads(next(p for p in (layout.root / "blobs" / "sha256").iterdir()
                               if b'"single"' not in p.read_bytes() and p.stat().st_size < 4096
                               and b'"layers"' in p.read_bytes() and b"+gzip" not in p.read_bytes()
                               and b"+zstd" not in p.read_bytes()).read_text())  # fmt: skip
    blob = layout.root / "blobs" / "sha256" / manifest["layers"][0]["digest"].split(":")[1]
    data = bytearray(blob.read_bytes())
    at = data.index(b"base\n")
    data[at : at + 4] = b"evil"
    blob.write_bytes(bytes(data))
    proc = run(f"oci:{layout.root}:single", "-o", tmp_path / "out")
    assert proc.returncode != 0 and "does not match its digest" in proc.stderr
    assert not (tmp_path / "out").exists()

"""``nydus-erofs convert``: an OCI image made by umoci becomes a Nydus image in a real registry, which then
mounts lazily from that registry and equals ``umoci unpack`` of the source."""

from __future__ import annotations

import gzip
import io
import json
import os
import subprocess
import tarfile
from pathlib import Path

import pytest

from cachefilesd_py.backends import make_backend
from tests.support import cli
from tests.support.fstree import assert_same_tree

pytestmark = pytest.mark.tools("umoci", "skopeo")


def run(*args: str | Path) -> str:
    proc = subprocess.run([str(a) for a in args], capture_output=True, text=True)
    assert proc.returncode == 0, f"{args}: {proc.stderr}"
    return proc.stdout


def nydus_erofs(*args: str | Path) -> str:
    proc = cli.run(*args)
    assert proc.returncode == 0, f"{args}: {proc.stderr}"
    return proc.stdout


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A two-layer OCI image: a base, then a layer that deletes, adds and hard-links files."""
    tmp = tmp_path_factory.mktemp("src")
    layout = tmp / "layout"
    run("umoci", "init", "--layout", layout)
    run("umoci", "new", "--image", f"{layout}:v1")
    bundle = tmp / "bundle"
    run("umoci", "unpack", "--image", f"{layout}:v1", bundle)
    rootfs = bundle / "rootfs"
    (rootfs / "etc").mkdir()
    (rootfs / "etc" / "hostname").write_text("nydus\n")
    (rootfs / "usr" / "bin").mkdir(parents=True)
    (rootfs / "usr" / "bin" / "tool").write_bytes(os.urandom(3 << 20))
    os.chmod(rootfs / "usr" / "bin" / "tool", 0o755)
    (rootfs / "gone").write_bytes(b"deleted in layer 2")
    run("umoci", "repack", "--image", f"{layout}:v1", bundle)
    bundle = tmp / "bundle2"
    run("umoci", "unpack", "--image", f"{layout}:v1", bundle)
    rootfs = bundle / "rootfs"
    (rootfs / "gone").unlink()
    (rootfs / "data").mkdir()
    (rootfs / "data" / "big").write_bytes(os.urandom(5 << 20))
    os.link(rootfs / "data" / "big", rootfs / "data" / "big-link")
    os.symlink("../usr/bin/tool", rootfs / "data" / "tool-link")
    run("umoci", "repack", "--image", f"{layout}:v1", bundle)
    return layout


def test_convert_to_oci_layout(source: Path, tmp_path: Path) -> None:
    target = tmp_path / "nydus"
    out = json.loads(nydus_erofs("convert", f"oci:{source}:v1", f"oci:{target}:v1-nydus", "--json"))
    index = json.loads((target / "index.json").read_text())
    (desc,) = index["manifests"]
    assert desc["annotations"]["org.opencontainers.image.ref.name"] == "v1-nydus"
    assert desc["platform"]["os.features"] == ["nydus.remoteimage.v1"]
    manifest = json.loads((target / "blobs" / "sha256" / desc["digest"].split(":")[1]).read_bytes())
    *blobs, boot = manifest["layers"]
    assert len(blobs) == len(out["image"]["blobs"]) == 2  # one blob per source layer with data
    for layer, blob in zip(blobs, out["image"]["blobs"], strict=True):
        assert layer["mediaType"] == "application/vnd.oci.image.layer.nydus.blob.v1"
        assert layer["digest"] == "sha256:" + blob["id"]
        assert layer["annotations"] == {"containerd.io/snapshot/nydus-blob": "true"}
    assert boot["annotations"]["containerd.io/snapshot/nydus-bootstrap"] == "true"
    config = json.loads((target / "blobs" / "sha256" / manifest["config"]["digest"].split(":")[1]).read_bytes())
    assert len(config["rootfs"]["diff_ids"]) == 3
    # every descriptor points at a blob of the right size and digest: skopeo reads the layout back
    run("skopeo", "inspect", f"oci:{target}:v1-nydus")


@pytest.mark.network
@pytest.mark.tools("docker-registry")
@pytest.mark.kernel("erofs", "fanotify")
def test_convert_push_and_mount_lazily_from_the_registry(source: Path, tmp_path: Path,  # noqa: F811
                                                         registry_server) -> None:  # fmt: skip
    ref = f"docker://{registry_server.host}/app:v1-nydus"
    nydus_erofs("convert", f"oci:{source}:v1", ref, "--plain-http", "--compressor", "zstd")
    manifest = json.loads(run("skopeo", "inspect", "--raw", "--tls-verify=false", ref))
    boot_layer = manifest["layers"][-1]
    backend = make_backend("registry", host=registry_server.host, repo="app", plain_http=True)
    try:
        boot_id = boot_layer["digest"].split(":")[1]
        raw = backend.read(boot_id, 0, backend.size(boot_id))
    finally:
        backend.close()
    with tarfile.open(fileobj=io.BytesIO(gzip.decompress(raw))) as tar:
        member = tar.extractfile("image/image.boot")
        assert member is not None
        (tmp_path / "image.boot").write_bytes(member.read())
    expected = tmp_path / "expected"
    run("umoci", "unpack", "--image", f"{source}:v1", expected)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    config = f"host={registry_server.host},repo=app,plain_http=true"
    nydus_erofs("mount", tmp_path / "image.boot", mnt, "--backend", "registry", "--backend-config", config,
                "--cache-dir", tmp_path / "cache", "--mode", "fanotify")  # fmt: skip
    try:
        assert_same_tree(expected / "rootfs", mnt)
    finally:
        nydus_erofs("umount", mnt)


def test_convert_errors_are_one_line(source: Path, tmp_path: Path) -> None:
    for args in (["oci:/nonexistent:v1", f"oci:{tmp_path}/t"], [f"oci:{source}:nosuchtag", f"oci:{tmp_path}/t"],
                 [f"oci:{source}:v1", "ftp://x"]):  # fmt: skip
        proc = cli.run("convert", *args)
        assert proc.returncode != 0 and "Traceback" not in proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_convert_from_a_registry_source(source: Path, tmp_path: Path, registry_server) -> None:  # noqa: F811
    src = f"docker://{registry_server.host}/src:v1"
    run("skopeo", "copy", "--dest-tls-verify=false", f"oci:{source}:v1", src)
    from_registry = json.loads(nydus_erofs("convert", src, f"oci:{tmp_path}/a:n", "--plain-http", "--json"))
    from_layout = json.loads(nydus_erofs("convert", f"oci:{source}:v1", f"oci:{tmp_path}/b:n", "--json"))
    assert from_registry["image"]["blobs"] == from_layout["image"]["blobs"]
    assert from_registry["manifest_digest"] == from_layout["manifest_digest"]  # repeatable, whatever the path

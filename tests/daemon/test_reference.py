"""Nydus images by reference (:mod:`cachefilesd_py.reference`) against a real ``docker-registry``: resolving a
manifest or an index, fetching and checking the bootstrap, and one-line errors for everything else."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest

from cachefilesd_py.imageref import ImageReference, parse_image_reference
from cachefilesd_py.reference import resolve_nydus_image
from erofs.errors import BackendError, ImageError, UsageError
from erofs.reader.bootstrap import Bootstrap
from tests.support.registry import TEST_PASSWORD, TEST_USER, Front, RegistryServer
from tests.support.remote_image import (
    convert_to,
    make_source_layout,
    push_bytes,
    push_json,
    raw_manifest,
    run,
    tar_gz,
)

pytestmark = [pytest.mark.network, pytest.mark.tools("docker-registry", "umoci", "skopeo")]

MT_INDEX = "application/vnd.oci.image.index.v1+json"
MT_MANIFEST = "application/vnd.oci.image.manifest.v1+json"


def test_parse_image_reference() -> None:
    assert parse_image_reference("docker://127.0.0.1:5000/a/b:v1") == ImageReference("127.0.0.1:5000", "a/b", "v1")
    assert parse_image_reference("localhost/app") == ImageReference("localhost", "app", "latest")
    digest = "sha256:" + "a" * 64
    assert parse_image_reference(f"docker://reg.io/app:v1@{digest}") == ImageReference("reg.io", "app", None, digest)
    assert parse_image_reference("alpine:3") == ImageReference("registry-1.docker.io", "library/alpine", "3")
    assert str(parse_image_reference("docker://reg.io/x/y")) == "docker://reg.io/x/y:latest"
    for bad in ("docker://", "docker://reg.io/App:v1", "docker://reg.io/app:bad tag", "docker://reg.io/app@sha256:12",
                "docker://reg.io/../x", "docker://reg.io/app:-x"):  # fmt: skip
        with pytest.raises(UsageError):
            parse_image_reference(bad)


@pytest.fixture(scope="module")
def layout(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_source_layout(tmp_path_factory.mktemp("src"))


@pytest.fixture(scope="module")
def pushed(layout: Path, registry_server: RegistryServer) -> str:
    ref = f"docker://{registry_server.host}/app:v1-nydus"
    convert_to(layout, ref)
    return ref


def test_resolve_fetches_the_bootstrap_and_names_the_blobs(pushed: str, tmp_path: Path,
                                                           registry_server: RegistryServer) -> None:  # fmt: skip
    img = resolve_nydus_image(pushed, tmp_path / "d", plain_http=True)
    manifest = raw_manifest(pushed)
    *blobs, boot = manifest["layers"]
    assert img.bootstrap == tmp_path / "d" / "image.boot"
    assert img.bootstrap_layer_digest == boot["digest"]
    assert img.blob_ids == [b["digest"].removeprefix("sha256:") for b in blobs]
    assert img.backend == "registry"
    assert img.backend_config == {"host": registry_server.host, "repo": "app", "plain_http": True}
    with Bootstrap(img.bootstrap) as bs:
        assert [b.blob_id for b in bs.blobs] == img.blob_ids
    assert sorted(os.listdir(tmp_path / "d")) == ["image.boot"]  # no temporary left
    # the same image by digest: the same manifest digest and bootstrap
    by_digest = resolve_nydus_image(pushed.rsplit(":", 1)[0] + "@" + img.manifest_digest, tmp_path / "e",
                                    plain_http=True)  # fmt: skip
    assert by_digest.manifest_digest == img.manifest_digest
    assert by_digest.bootstrap.read_bytes() == img.bootstrap.read_bytes()
    assert json.loads(json.dumps(img.to_json()))["blob_ids"] == img.blob_ids


def test_an_index_resolves_to_the_nydus_manifest_of_the_platform(pushed: str, layout: Path, tmp_path: Path,
                                                                 registry_server: RegistryServer) -> None:  # fmt: skip
    host = registry_server.host
    run("skopeo", "copy", "--dest-tls-verify=false", f"oci:{layout}:v1", f"docker://{host}/multi:oci")
    oci_body = run("skopeo", "inspect", "--raw", "--tls-verify=false", f"docker://{host}/multi:oci").encode()
    nydus_body = run("skopeo", "inspect", "--raw", "--tls-verify=false", pushed).encode()
    run("skopeo", "copy", "--src-tls-verify=false", "--dest-tls-verify=false", pushed, f"docker://{host}/multi:n")
    os_name, arch = "linux", "amd64" if os.uname().machine == "x86_64" else "arm64"

    def desc(body: bytes, features: list[str] | None) -> dict:
        plat = {"os": os_name, "architecture": arch, **({"os.features": features} if features else {})}
        return {"mediaType": MT_MANIFEST, "digest": "sha256:" + hashlib.sha256(body).hexdigest(), "size": len(body),
                "platform": plat}  # fmt: skip

    index = {"schemaVersion": 2, "mediaType": MT_INDEX,
             "manifests": [desc(oci_body, None), desc(nydus_body, ["nydus.remoteimage.v1"]),
                           {**desc(oci_body, None), "platform": {"os": "linux", "architecture": "s390x"}}]}  # fmt: skip
    push_json(host, "multi", "v1", index, MT_INDEX)
    img = resolve_nydus_image(f"docker://{host}/multi:v1", tmp_path, plain_http=True)
    assert img.blob_ids == resolve_nydus_image(pushed, tmp_path / "p", plain_http=True).blob_ids
    with pytest.raises(UsageError, match=r"no manifest for platform linux/riscv64 \(the index has: linux/"):
        resolve_nydus_image(f"docker://{host}/multi:v1", tmp_path, plain_http=True, platform="linux/riscv64")
    with pytest.raises(UsageError, match="not a Nydus image"):  # the only linux/s390x manifest is plain OCI
        resolve_nydus_image(f"docker://{host}/multi:v1", tmp_path, plain_http=True, platform="linux/s390x")


def test_not_a_nydus_image_and_missing_tags_are_one_line_errors(layout: Path, tmp_path: Path,
                                                                registry_server: RegistryServer) -> None:  # fmt: skip
    host = registry_server.host
    run("skopeo", "copy", "--dest-tls-verify=false", f"oci:{layout}:v1", f"docker://{host}/plain:v1")
    with pytest.raises(UsageError) as e:
        resolve_nydus_image(f"docker://{host}/plain:v1", tmp_path, plain_http=True)
    assert str(e.value) == f"docker://{host}/plain:v1: not a Nydus image (an OCI image with 2 gzip layers)"
    with pytest.raises(BackendError) as e2:
        resolve_nydus_image(f"docker://{host}/plain:nosuchtag", tmp_path, plain_http=True)
    assert str(e2.value) == f"docker://{host}/plain:nosuchtag: no such image (the registry has no manifest nosuchtag)"
    with pytest.raises(BackendError, match="no such image"):
        resolve_nydus_image(f"docker://{host}/nosuchrepo:v1", tmp_path, plain_http=True)
    assert os.listdir(tmp_path) == []


def _nydus_manifest(host: str, tmp: Path, good: dict, boot_layer: bytes, blob_layers: list[dict]) -> dict:
    boot = push_bytes(host, "app", boot_layer, tmp)
    layers = [*blob_layers, {**good["layers"][-1], **boot}]
    return {**good, "layers": layers}


def test_damaged_nydus_images_are_image_errors(pushed: str, tmp_path: Path, registry_server: RegistryServer) -> None:
    host = registry_server.host
    good_image = resolve_nydus_image(pushed, tmp_path / "good", plain_http=True)
    boot = good_image.bootstrap.read_bytes()
    good = raw_manifest(pushed)
    blobs = good["layers"][:-1]
    other = {**blobs[0], **push_bytes(host, "app", os.urandom(100), tmp_path)}
    cases = {
        "blob-missing": (tar_gz({"image/image.boot": boot}), blobs[:1], "bootstrap and manifest disagree"),
        "blob-extra": (tar_gz({"image/image.boot": boot}), [*blobs, other], "is not in the bootstrap"),
        "symlink": (tar_gz({"image/image.boot": "/etc/passwd"}), blobs, "is not a regular file"),
        "escape": (tar_gz({"../image/image.boot": boot, "image/x": b""}), blobs, "no image/image.boot"),
        "not-tar": (b"\x1f\x8b" + b"\0" * 64, blobs, "bootstrap layer:"),
        "not-erofs": (tar_gz({"image/image.boot": b"\0" * 8192}), blobs, "EROFS"),
        "not-blob-type": (tar_gz({"image/image.boot": boot}), [{**blobs[0], "mediaType": "x/y"}, blobs[1]],
                          "media type 'x/y' in a Nydus image"),
    }
    for tag, (layer, blob_layers, message) in cases.items():
        push_json(host, "app", tag, _nydus_manifest(host, tmp_path, good, layer, blob_layers), MT_MANIFEST)
        dest = tmp_path / tag
        with pytest.raises(ImageError, match=message):
            resolve_nydus_image(f"docker://{host}/app:{tag}", dest, plain_http=True)
        assert not dest.exists() or os.listdir(dest) == [], tag  # nothing extracted, no temporary left
    assert not (tmp_path / "image").exists()


def test_basic_auth_from_the_docker_config(pushed: str, layout: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                           auth_registry_server: RegistryServer) -> None:  # fmt: skip
    host = auth_registry_server.host
    creds = f"{TEST_USER}:{TEST_PASSWORD}"
    run("skopeo", "copy", "--src-tls-verify=false", "--dest-tls-verify=false", f"--dest-creds={creds}", pushed,
        f"docker://{host}/app:v1")  # fmt: skip
    with pytest.raises(BackendError, match="needs credentials"):
        resolve_nydus_image(f"docker://{host}/app:v1", tmp_path / "a", plain_http=True,
                            auth_file=tmp_path / "none.json")  # fmt: skip
    img = resolve_nydus_image(f"docker://{host}/app:v1", tmp_path / "o", plain_http=True,
                              auth_file=tmp_path / "none.json", options={"auth": creds})  # fmt: skip
    assert "auth" not in img.backend_config  # used for the manifest and bootstrap, never handed on
    config = tmp_path / "docker" / "config.json"
    config.parent.mkdir()
    config.write_text(json.dumps({"auths": {host: {"auth": base64.b64encode(creds.encode()).decode()}}}))
    img = resolve_nydus_image(f"docker://{host}/app:v1", tmp_path / "b", plain_http=True, auth_file=config)
    assert img.backend_config["docker_config"] == str(config)
    assert TEST_PASSWORD not in json.dumps(img.to_json())
    # a credential helper (docker-credential-<name> get) named by credsStore, found on PATH
    helper_dir = tmp_path / "bin"
    helper_dir.mkdir()
    helper = helper_dir / "docker-credential-nydustest"
    helper.write_text(f'#!/bin/sh\nread host\n[ "$host" = "{host}" ] || exit 1\n'
                      f'echo \'{{"Username":"{TEST_USER}","Secret":"{TEST_PASSWORD}"}}\'\n')  # fmt: skip
    helper.chmod(0o755)
    monkeypatch.setenv("PATH", f"{helper_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "docker"))
    config.write_text(json.dumps({"credsStore": "nydustest"}))
    img = resolve_nydus_image(f"docker://{host}/app:v1", tmp_path / "c", plain_http=True)
    assert "docker_config" not in img.backend_config
    assert img.bootstrap.is_file()


def test_bearer_token_auth(pushed: str, tmp_path: Path, registry_server: RegistryServer) -> None:
    with Front(upstream=registry_server.url, auth="bearer", credentials=(TEST_USER, TEST_PASSWORD)) as front:
        with pytest.raises(BackendError, match="refused the credentials"):
            resolve_nydus_image(f"docker://{front.host}/app:v1-nydus", tmp_path / "a", plain_http=True,
                                auth_file=tmp_path / "none.json")  # fmt: skip
        config = tmp_path / "config.json"
        config.write_text(json.dumps({"auths": {front.host: {"username": TEST_USER, "password": TEST_PASSWORD}}}))
        img = resolve_nydus_image(f"docker://{front.host}/app:v1-nydus", tmp_path / "b", plain_http=True,
                                  auth_file=config)  # fmt: skip
        assert front.tokens_issued >= 1
        assert "repository:app:pull" in front.token_scopes
    assert img.bootstrap.is_file()
    shutil.rmtree(tmp_path / "b")

"""``nydus-erofs mount docker://…``: an OCI image made by umoci, converted into a real registry (htpasswd Basic
auth, or Bearer tokens from a token service in front of it), mounted by reference in one command, lazily
(fanotify mode): the tree equals the source, a small read fetches a small part of the blobs, and an image that
is not Nydus or a tag that is not there is a one-line error."""

from __future__ import annotations

import base64
import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import cli
from tests.support.fstree import assert_same_tree
from tests.support.registry import TEST_PASSWORD, TEST_USER, Front, RegistryServer
from tests.support.remote_image import convert_to, make_source_layout, run, unpack_layout

pytestmark = [pytest.mark.network, pytest.mark.tools("docker-registry", "umoci", "skopeo"),
              pytest.mark.kernel("erofs", "fanotify")]  # fmt: skip

SMALL = "data/small.txt"


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(OCI layout, its unpacked rootfs)."""
    tmp = tmp_path_factory.mktemp("src")
    layout = make_source_layout(tmp)
    return layout, unpack_layout(layout, tmp / "expected")


@pytest.fixture
def docker_env(tmp_path: Path) -> Iterator[dict[str, str]]:
    """An environment whose docker config (DOCKER_CONFIG; skopeo reads it as REGISTRY_AUTH_FILE) holds the
    test user's credentials for every 127.0.0.1 registry of the test, filled in by :func:`login`."""
    config = tmp_path / "docker" / "config.json"
    config.parent.mkdir()
    config.write_text(json.dumps({"auths": {}}))
    yield {**os.environ, "DOCKER_CONFIG": str(config.parent), "REGISTRY_AUTH_FILE": str(config)}


def login(env: dict[str, str], host: str) -> None:
    config = Path(env["REGISTRY_AUTH_FILE"])
    data = json.loads(config.read_text())
    data["auths"][host] = {"auth": base64.b64encode(f"{TEST_USER}:{TEST_PASSWORD}".encode()).decode()}
    config.write_text(json.dumps(data))


def nydus(*args: str | Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return cli.run(*args, env=env)


def mount_ref(ref: str, mnt: Path, cache: Path, env: dict[str, str], *extra: str) -> None:
    mnt.mkdir(exist_ok=True)
    proc = nydus("mount", ref, mnt, "--cache-dir", cache, "--plain-http", "--mode", "fanotify", *extra, env=env)
    assert proc.returncode == 0, proc.stderr
    if not proc.stdout.startswith(f"mounted {ref} on {mnt} (fanotify mode, daemon pid "):
        umount_json(mnt)
        raise AssertionError(proc.stdout)


def umount_json(mnt: Path) -> dict:
    proc = nydus("umount", mnt, "--json")
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def check_lazy_and_whole(ref: str, expected: Path, tmp_path: Path, env: dict[str, str]) -> None:
    """Reading one small file fetches under 2% of the blob bytes; then the whole tree equals the source."""
    cache = tmp_path / "cache"
    mnt = tmp_path / "mnt"
    mount_ref(ref, mnt, cache, env)  # default amplify and readahead
    try:
        assert (mnt / SMALL).read_bytes() == (expected / SMALL).read_bytes()
    finally:
        rec = umount_json(mnt)
    stats = rec["stats"]
    assert stats["blob_bytes"] > 4 << 20
    assert 0 < stats["backend"]["bytes"] < stats["blob_bytes"] * 0.02, stats
    boots = list((cache / "bootstraps").glob("*/image.boot"))
    assert len(boots) == 1 and rec["boot"] == str(boots[0])
    mount_ref(ref, mnt, cache, env)  # the same cache dir: the bootstrap is there already
    try:
        assert_same_tree(expected, mnt)
    finally:
        umount_json(mnt)


def test_mount_by_reference_with_basic_auth(source: tuple[Path, Path], tmp_path: Path, docker_env: dict[str, str],
                                            auth_registry_server: RegistryServer) -> None:  # fmt: skip
    layout, expected = source
    ref = f"docker://{auth_registry_server.host}/app:v1"
    login(docker_env, auth_registry_server.host)
    convert_to(layout, ref, env=docker_env)
    check_lazy_and_whole(ref, expected, tmp_path, docker_env)
    # without the credentials: one line, exit 4 (the registry's refusal), nothing mounted
    (tmp_path / "mnt2").mkdir()
    env = {**docker_env, "DOCKER_CONFIG": str(tmp_path / "nowhere")}
    proc = nydus("mount", ref, tmp_path / "mnt2", "--cache-dir", tmp_path / "c2", "--plain-http", env=env)
    assert proc.returncode == 4 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "needs credentials" in proc.stderr


def test_mount_by_reference_with_bearer_tokens(source: tuple[Path, Path], tmp_path: Path, docker_env: dict[str, str],
                                               registry_server: RegistryServer) -> None:  # fmt: skip
    layout, expected = source
    convert_to(layout, f"docker://{registry_server.host}/team/app:v1")
    with Front(upstream=registry_server.url, auth="bearer", credentials=(TEST_USER, TEST_PASSWORD)) as front:
        login(docker_env, front.host)
        ref = f"docker://{front.host}/team/app:v1"
        check_lazy_and_whole(ref, expected, tmp_path, docker_env)
        assert front.tokens_issued >= 2  # this process for the manifest and bootstrap, the daemon for the blobs
        assert set(front.token_scopes) == {"repository:team/app:pull"}
        assert front.blob_requests() > 1


def test_not_nydus_and_missing_tags_are_one_line_errors(source: tuple[Path, Path], tmp_path: Path,
                                                        registry_server: RegistryServer) -> None:  # fmt: skip
    layout, _ = source
    host = registry_server.host
    run("skopeo", "copy", "--dest-tls-verify=false", f"oci:{layout}:v1", f"docker://{host}/plain:v1")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    cases = [
        (f"docker://{host}/plain:v1", 2, f"{host}/plain:v1: not a Nydus image (an OCI image with 2 gzip layers)"),
        (f"docker://{host}/plain:v2", 4, f"docker://{host}/plain:v2: no such image (the registry has no manifest v2)"),
        (f"docker://{host}/Bad:v1", 2, "expected docker://HOST[:PORT]/REPO[:TAG|@sha256:HEX]"),
    ]  # fmt: skip
    for ref, code, message in cases:
        proc = nydus("mount", ref, mnt, "--cache-dir", tmp_path / "cache", "--plain-http")
        assert proc.returncode == code, proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1 and message in proc.stderr, proc.stderr
    proc = nydus("mount", f"docker://{host}/plain:v1", mnt, "--cache-dir", tmp_path / "cache", "--blob-dir", tmp_path)
    assert proc.returncode == 2 and "served from its registry" in proc.stderr
    assert not os.path.ismount(mnt)


def test_fscache_only_options_are_one_line_errors(tmp_path: Path) -> None:
    (tmp_path / "mnt").mkdir()
    for args, message in ((["--cache-dir", tmp_path / "c", "--domain-id", "d"], "--domain-id goes with --mode fscache"),
                          ([], "--cache-dir is required (except in fscache mode)")):  # fmt: skip
        proc = nydus("mount", "docker://127.0.0.1:1/app:v1", tmp_path / "mnt", *args)
        assert proc.returncode == 2 and proc.stderr.strip() == f"nydus-erofs: error: {message}"

"""Binding images at run time through cachefilesd-py's API (``PUT``/``DELETE /api/v1/images/{fsid}``), on the
host without /dev/cachefiles: the daemon's message handling runs against the fake device of
test_daemon_service (anonymous fds are plain files), the API on a real Unix socket; images come from a local
build and from a real docker-registry.  Malformed requests get 4xx and the daemon keeps serving."""

from __future__ import annotations

import errno
import http.client
import json
import os
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from cachefilesd_py.api import get, request
from cachefilesd_py.daemon import Daemon
from cachefilesd_py.daemon_api import image_routes
from cachefilesd_py.image_store import ImageStore
from fscache.cachefiles import CloseRequest, OpenRequest, ReadRequest
from tests.daemon.test_daemon_service import TIMEOUT, FakeDevice, _anon_fd, _build
from tests.support.registry import RegistryServer
from tests.support.remote_image import convert_to, make_source_layout, run
from tests.support.served_daemon import serving

IMAGES = "/api/v1/images/"
PLAIN_HTTP = {"type": "registry", "config": {"plain_http": True}}


@dataclass
class Served:
    daemon: Daemon
    dev: FakeDevice
    sock: Path
    tmp: Path
    images: Path

    def put(self, fsid: str, body: object) -> tuple[int, dict]:
        return request(self.sock, "PUT", IMAGES + fsid, body)  # type: ignore[arg-type]

    def delete(self, fsid: str) -> tuple[int, dict]:
        return request(self.sock, "DELETE", IMAGES + fsid)


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Served]:
    images = tmp_path / "images"
    images.mkdir()
    dev = FakeDevice()
    daemon = Daemon(dev, ImageStore(images), threads=2, amplify=0)  # type: ignore[arg-type]
    daemon.unbind_wait = 1.0
    sock_path = tmp_path / "api.sock"
    with serving(daemon, sock_path, {"/api/v1/daemon": daemon.info, "/api/v1/images": daemon.images},
                 image_routes(daemon)):  # fmt: skip
        yield Served(daemon, dev, sock_path, tmp_path, images)


@pytest.fixture
def built(tmp_path: Path) -> dict:
    src = tmp_path / "src"
    src.mkdir()
    (src / "a").write_bytes(os.urandom(150_000))
    out = _build(tmp_path / "built", src, "--chunk-size", "64KiB", "--compressor", "lz4_block")
    return {**out, "boot": str(tmp_path / "built" / "image.boot"), "data": (src / "a").read_bytes()}


def _open_read_close(s: Served, fsid: str, blob_id: str, base: int, volume: str | None = None) -> bytes:
    """OPEN the image's bootstrap and blob, READ the blob's first chunk (after its 4 KiB zero prefix), CLOSE both:
    the chunk as cached."""
    vol = f"erofs,{volume or fsid}"
    boot_fd, blob_fd = _anon_fd(s.tmp / f"{fsid}.boot"), _anon_fd(s.tmp / f"{fsid}.blob")
    reads = s.daemon.counters.snapshot()["reads"]
    s.dev.push(OpenRequest(base, base, vol, fsid, boot_fd, 0))
    s.dev.push(OpenRequest(base + 1, base + 1, vol, blob_id, blob_fd, 0))
    s.dev.push(ReadRequest(base + 2, base + 1, 4096, 4096))
    assert s.daemon.counters.wait_for(lambda c: c["reads"] == reads + 1, TIMEOUT)
    assert s.dev.copens[base] > 0 and s.dev.copens[base + 1] > 0, s.dev.copens
    s.dev.push(CloseRequest(base + 3, base))
    s.dev.push(CloseRequest(base + 4, base + 1))
    return (s.tmp / f"{fsid}.blob").read_bytes()[4096:]


def test_bind_a_bootstrap_open_it_unbind_it(served: Served, built: dict) -> None:
    s = served
    status, answer = s.put("one", {"bootstrap": built["boot"], "domain_id": "dom"})
    assert status == 200, answer
    blob = built["blobs"][0]["id"]
    assert answer["changed"] and answer["blobs"] == [blob] and answer["backend"] == "localfs"
    assert answer["domain_id"] == "dom" and answer["source"] == built["boot"]
    assert (s.images / "one" / "image.boot").read_bytes() == Path(built["boot"]).read_bytes()
    assert oct((s.images / "one" / "binding.json").stat().st_mode & 0o777) == "0o600"
    assert get(s.sock, "/api/v1/images") == {"images": [{"fsid": "one", "backend": "localfs", "domain_id": "dom",
                                                         "source": built["boot"], "manifest_digest": None,
                                                         "open_objects": 0}]}  # fmt: skip
    assert s.put("one", {"bootstrap": built["boot"], "domain_id": "dom"})[1]["changed"] is False  # the same again
    chunk = _open_read_close(s, "one", blob, 10, volume="dom")
    assert chunk[:65536] == built["data"][:65536]
    status, answer = s.delete("one")  # waits for the CLOSEs
    assert (status, answer) == (200, {"fsid": "one", "unbound": True})
    assert not (s.images / "one").exists() and "one" not in s.daemon.store.backends()
    fd = _anon_fd(s.tmp / "x")
    s.dev.push(OpenRequest(20, 20, "erofs,one", "one", fd, 0))
    assert s.daemon.counters.wait_for(lambda c: c["opens_failed"] == 1, TIMEOUT)
    assert s.dev.copens[20] == -errno.ENOENT  # unbound: the mount fails cleanly
    assert s.delete("one")[0] == 404
    assert os.listdir(s.images / ".staging") == []


def test_an_image_in_use_is_neither_replaced_nor_unbound(served: Served, built: dict, tmp_path: Path) -> None:
    s = served
    assert s.put("img", {"bootstrap": built["boot"]})[0] == 200
    fd = _anon_fd(tmp_path / "boot.cache")
    s.dev.push(OpenRequest(1, 1, "erofs,img", "img", fd, 0))
    assert s.daemon.counters.wait_for(lambda c: c["opens"] == 1, TIMEOUT)
    status, answer = s.delete("img")
    assert status == 409 and "in use (1 open cache object): umount it first" in answer["message"]
    other = tmp_path / "src2"
    other.mkdir()
    (other / "b").write_bytes(b"other")
    out2 = _build(tmp_path / "built2", other)
    assert s.put("img", {"bootstrap": str(tmp_path / "built2" / "image.boot")})[0] == 409
    assert s.put("img", {"bootstrap": built["boot"]})[0] == 200  # the very same image: fine
    assert s.daemon.store.image("img").blobs.keys() == {b["id"] for b in built["blobs"]}
    s.dev.push(CloseRequest(2, 1))
    assert s.delete("img")[0] == 200
    assert out2["blobs"]


def test_malformed_requests_get_4xx_and_the_daemon_keeps_serving(served: Served, built: dict,
                                                                 tmp_path: Path) -> None:  # fmt: skip
    s = served
    (tmp_path / "not-erofs").write_bytes(b"\0" * 8192)
    boot = built["boot"]
    cases: list[tuple[str, object, int, str]] = [
        ("a", [1, 2], 400, "must be a JSON object"),
        ("a", {}, 400, "exactly one of bootstrap"),
        ("a", {"bootstrap": boot, "reference": "docker://r.io/x:1"}, 400, "exactly one"),
        ("a", {"bootstrap": "relative/image.boot"}, 400, "absolute path"),
        ("a", {"bootstrap": boot, "extra": 1}, 400, "unknown field 'extra'"),
        ("a", {"bootstrap": 7}, 400, "bootstrap must be a string"),
        ("a", {"bootstrap": boot, "backend": {"type": "ftp"}}, 400, "type 'ftp' is not one of"),
        ("a", {"bootstrap": boot, "backend": {"type": "http", "config": {"url": "x"}}}, 400, "expected http://"),
        ("a", {"bootstrap": boot, "backend": {"type": "localfs", "config": {"nope": 1}}}, 400, "bad options"),
        ("a", {"bootstrap": boot, "backend": "localfs"}, 400, '"type": KIND'),
        ("a", {"bootstrap": boot, "platform": "linux/amd64"}, 400, "platform goes with a reference"),
        ("a", {"bootstrap": str(tmp_path / "missing")}, 400, "No such file"),
        ("a", {"bootstrap": str(tmp_path)}, 400, "bootstrap"),
        ("a", {"bootstrap": str(tmp_path / "not-erofs"), "backend": {"type": "localfs",
                                                                    "config": {"dir": str(tmp_path)}}}, 422, ""),
        ("a", {"reference": "oci:/x"}, 400, "must be docker://"),
        ("a", {"reference": "docker://Bad/x"}, 400, "expected docker://"),
        (".staging", {"bootstrap": boot}, 400, "not a valid image name"),
        ("a%20b", {"bootstrap": boot}, 400, "not a valid image name"),
    ]
    for fsid, body, want, message in cases:
        status, answer = s.put(fsid, body)
        assert status == want and message in answer["message"], (body, status, answer)
    # An oversized body gets its 413 whether the client sends it all (curl does: the daemon drains it so the
    # client reads the answer, not EPIPE) or only announces it (answered from the headers).
    for body, want in ((b"{not json", 400), (b"x" * (65 << 10), 413), (b"x" * (900 << 10), 413), (65 << 10, 413),
                       (None, 411)):  # fmt: skip
        conn = _UnixHTTP(s.sock)
        try:
            if isinstance(body, bytes):
                conn.request("PUT", IMAGES + "a", body=body)
            else:
                conn.putrequest("PUT", IMAGES + "a")
                if body is not None:
                    conn.putheader("Content-Length", str(body))
                conn.endheaders()
            resp = conn.getresponse()
            assert resp.status == want and json.loads(resp.read())["message"]
        finally:
            conn.close()
    assert request(s.sock, "POST", IMAGES + "a", {})[0] == 405
    assert request(s.sock, "PUT", "/api/v1/images", {})[0] == 405
    assert request(s.sock, "PUT", IMAGES + "a/b", {})[0] == 404
    assert request(s.sock, "DELETE", IMAGES + "nothing")[0] == 404
    assert request(s.sock, "GET", IMAGES + "nothing")[0] == 404
    assert os.listdir(s.images) in ([], [".staging"]) and not os.listdir(s.images / ".staging")
    assert get(s.sock, "/api/v1/daemon")["state"] == "RUNNING"
    assert s.put("a", {"bootstrap": boot})[0] == 200  # and still binds


class _UnixHTTP(http.client.HTTPConnection):
    def __init__(self, path: Path) -> None:
        super().__init__("localhost", timeout=TIMEOUT)
        self._path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(str(self._path))


@pytest.mark.network
@pytest.mark.tools("docker-registry", "umoci", "skopeo")
def test_bind_two_references_from_two_repositories(served: Served, registry_server: RegistryServer,
                                                   tmp_path_factory: pytest.TempPathFactory) -> None:  # fmt: skip
    s = served
    host = registry_server.host
    for i, repo in enumerate(("team-a/app", "team-b/db")):
        layout = make_source_layout(tmp_path_factory.mktemp(f"src{i}"), seed=i)
        convert_to(layout, f"docker://{host}/{repo}:v1")
    answers = {}
    for fsid, repo in (("a", "team-a/app"), ("b", "team-b/db")):
        status, answers[fsid] = s.put(fsid, {"reference": f"docker://{host}/{repo}:v1", "backend": PLAIN_HTTP})
        assert status == 200, answers[fsid]
        assert answers[fsid]["backend"] == "registry" and answers[fsid]["manifest_digest"].startswith("sha256:")
        binding = json.loads((s.images / fsid / "binding.json").read_text())
        assert binding["backend"] == {"type": "registry", "config": {"host": host, "repo": repo, "plain_http": True}}
    # each image's blobs come from its own repository, through its own backend
    for n, fsid in enumerate("ab"):
        blob = answers[fsid]["blobs"][-1]
        chunk = _open_read_close(s, fsid, blob, 100 + 10 * n)
        assert chunk.strip(b"\0")
    per = s.daemon.backend_metrics()["backends"]
    assert per["a"]["requests"] > 0 and per["b"]["requests"] > 0
    # a fresh store on the same directory (a restarted worker) serves them the same way
    store = ImageStore(s.images)
    try:
        assert store.fsids() == ["a", "b"]
        assert repr(store._backend_for("b")) == f"RegistryBackend({host!r}, 'team-b/db')"
    finally:
        store.close()
    run("skopeo", "copy", "--dest-tls-verify=false", f"oci:{layout}:v1", f"docker://{host}/plain:v1")
    status, answer = s.put("c", {"reference": f"docker://{host}/plain:v1", "backend": PLAIN_HTTP})
    assert status == 400 and "not a Nydus image (an OCI image with 2 gzip layers)" in answer["message"]
    status, answer = s.put("c", {"reference": f"docker://{host}/team-a/app:v9", "backend": PLAIN_HTTP})
    assert status == 404 and "no such image" in answer["message"]
    assert s.delete("a")[0] == 200 and s.delete("b")[0] == 200

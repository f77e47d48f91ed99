"""``nydus-erofs serve DIR``: a read-only blob server, run as users run it, read with http.client, ``curl`` and
the registry and http backends; an image mounted from it equals its source."""

from __future__ import annotations

import hashlib
import http.client
import os
import random
import shutil
import signal
import socket
import subprocess
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from cachefilesd_py.backends import make_backend
from erofs.errors import BackendError
from tests.support.cli import CLI, run
from tests.support.fstree import assert_same_tree

pytestmark = pytest.mark.network

class Served:
    """``nydus-erofs serve root --listen 127.0.0.1:0``; its log lines, its address."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.proc = subprocess.Popen([CLI, "serve", str(root), "--listen", "127.0.0.1:0"], stderr=subprocess.PIPE,
                                     stdin=subprocess.DEVNULL, text=True)  # fmt: skip
        assert self.proc.stderr is not None
        first = self.proc.stderr.readline()  # written once listening
        assert first.startswith(f"nydus-erofs serve: serving {root} on http://127.0.0.1:"), first
        self.url = first.split(" on ")[-1].strip()
        self.host = self.url.removeprefix("http://")
        self.port = int(self.host.rsplit(":", 1)[1])

    def request(self, method: str, target: str, headers: dict[str, str] | None = None) -> tuple[int, dict, bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        try:
            conn.putrequest(method, target, skip_accept_encoding=True)
            for k, v in (headers or {}).items():
                conn.putheader(k, v)
            conn.endheaders()
            resp = conn.getresponse()
            return resp.status, dict(resp.getheaders()), resp.read()
        finally:
            conn.close()

    def stop(self, sig: int = signal.SIGTERM) -> tuple[int, list[str]]:
        """Stop it with ``sig``; (exit code, the log lines after the first)."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        _, err = self.proc.communicate(timeout=30)
        return self.proc.returncode, err.splitlines()


@pytest.fixture
def tree(tmp_path: Path) -> tuple[Path, dict[str, bytes]]:
    root = tmp_path / "srv"
    (root / "blobs").mkdir(parents=True)
    rnd = random.Random(4)
    data = rnd.randbytes(300_000)
    blob_id = hashlib.sha256(data).hexdigest()
    (root / "blobs" / blob_id).write_bytes(data)
    (root / "image.boot").write_bytes(b"boot" * 1000)
    (root / "inside").symlink_to("image.boot")
    (tmp_path / "secret").write_text("outside the served directory\n")
    (root / "outside").symlink_to("../secret")
    (root / "etc-link").symlink_to("/etc")
    (root / "sub").mkdir()
    return root, {"blob_id": blob_id.encode(), "blob": data, "boot": b"boot" * 1000}


@pytest.fixture
def served(tree: tuple[Path, dict[str, bytes]]) -> Iterator[Served]:
    s = Served(tree[0])
    try:
        yield s
    finally:
        s.stop()


def test_range_head_etag_404_416(served: Served, tree: tuple[Path, dict[str, bytes]]) -> None:
    _, t = tree
    blob_id, blob = t["blob_id"].decode(), t["blob"]
    status, h, body = served.request("GET", f"/blobs/{blob_id}", {"Range": "bytes=1000-1999"})
    assert status == 206 and body == blob[1000:2000]
    assert h["Content-Range"] == f"bytes 1000-1999/{len(blob)}" and h["Content-Length"] == "1000"
    assert h["ETag"] == f'"sha256:{blob_id}"' and h["Docker-Content-Digest"] == f"sha256:{blob_id}"
    assert served.request("GET", f"/blobs/{blob_id}", {"Range": "bytes=-10"})[2] == blob[-10:]
    assert served.request("GET", f"/blobs/{blob_id}", {"Range": f"bytes={len(blob) - 5}-"})[2] == blob[-5:]
    status, h, body = served.request("GET", f"/blobs/{blob_id}", {"Range": "bytes=0-99999999"})
    assert status == 206 and body == blob and h["Content-Range"] == f"bytes 0-{len(blob) - 1}/{len(blob)}"
    status, h, body = served.request("GET", f"/blobs/{blob_id}", {"Range": f"bytes={len(blob)}-"})
    assert status == 416 and h["Content-Range"] == f"bytes */{len(blob)}" and body == b""
    status, _, body = served.request("GET", f"/blobs/{blob_id}", {"Range": "bytes=0-1,5-9"})  # several: all of it
    assert status == 200 and body == blob
    status, h, body = served.request("HEAD", f"/blobs/{blob_id}")
    assert status == 200 and body == b"" and h["Content-Length"] == str(len(blob)) and h["Accept-Ranges"] == "bytes"
    status, h, body = served.request("GET", "/image.boot")
    assert status == 200 and body == t["boot"]
    etag = h["ETag"]
    assert etag.startswith('"') and "sha256" not in etag  # size and mtime
    assert served.request("GET", "/image.boot", {"If-None-Match": etag})[0] == 304
    assert served.request("GET", "/inside")[2] == t["boot"]  # a symlink inside the directory is followed
    for missing in ("/nothing", f"/blobs/{'0' * 64}", "/sub", "/", "/blobs"):
        assert served.request("GET", missing)[0] == 404, missing
    for method in ("POST", "PUT", "DELETE"):
        status, h, _ = served.request(method, "/image.boot")
        assert status == 405 and h["Allow"] == "GET, HEAD"


def test_registry_paths(served: Served, tree: tuple[Path, dict[str, bytes]]) -> None:
    _, t = tree
    blob_id, blob = t["blob_id"].decode(), t["blob"]
    assert served.request("GET", "/v2/")[0] == 200
    for repo in ("x", "library/ubuntu", "a/b/c"):
        status, _, body = served.request("GET", f"/v2/{repo}/blobs/sha256:{blob_id}", {"Range": "bytes=7-9"})
        assert status == 206 and body == blob[7:10]
    assert served.request("GET", f"/v2/x/manifests/sha256:{blob_id}")[0] == 404
    assert served.request("GET", f"/v2/x/blobs/sha256:{blob_id[:-1]}")[0] == 404
    with make_backend("registry", host=served.host, repo="any/repo", plain_http=True, docker_config=False) as b:
        assert b.size(blob_id) == len(blob)
        assert b.read(blob_id, 0, len(blob)) == blob  # whole: digest verified
        assert b.read(blob_id, 12345, 6789) == blob[12345 : 12345 + 6789]
    with make_backend("http", url=f"{served.url}/blobs") as b:
        assert b.read(blob_id, 5, 5) == blob[5:10]
        with pytest.raises(BackendError, match="HTTP 404"):
            b.size(hashlib.sha256(b"no").hexdigest())


@pytest.mark.parametrize(
    "target",
    ["/../secret", "/%2e%2e/secret", "/%2E%2E%2Fsecret", "/sub/../../secret", "/blobs/..%2f..%2fsecret", "/outside",
     "/etc-link/passwd", "//etc/passwd", "/./image.boot", "/%2Fetc%2Fpasswd", "/v2/x/blobs/../../../secret"],
)  # fmt: skip
def test_nothing_outside_the_directory(served: Served, target: str) -> None:
    status, _, body = served.request("GET", target)
    assert status == 404 and b"outside" not in body and b"root:" not in body


@pytest.mark.parametrize("target", ["/image.boot%00", "http://127.0.0.1/image.boot", "/%ff%fe"])
def test_bad_targets_are_400(served: Served, target: str) -> None:
    assert served.request("GET", target)[0] == 400


@pytest.mark.tools("curl")
def test_curl_reads_a_range(served: Served, tree: tuple[Path, dict[str, bytes]]) -> None:
    curl = shutil.which("curl")
    assert curl is not None
    _, t = tree
    blob_id, blob = t["blob_id"].decode(), t["blob"]
    out = subprocess.run([curl, "-sSf", "-r", "4096-12287", f"{served.url}/v2/r/blobs/sha256:{blob_id}"],
                         capture_output=True, timeout=30)  # fmt: skip
    assert out.returncode == 0 and out.stdout == blob[4096:12288], out.stderr
    out = subprocess.run([curl, "-sS", "-o", "/dev/null", "-w", "%{http_code}", "--path-as-is",
                          f"{served.url}/../secret"], capture_output=True, text=True, timeout=30)  # fmt: skip
    assert out.stdout == "404"


def test_threads_one_log_line_each_and_clean_stop(tree: tuple[Path, dict[str, bytes]]) -> None:
    _, t = tree
    blob_id = t["blob_id"].decode()
    s = Served(tree[0])
    try:
        idle = socket.create_connection(("127.0.0.1", s.port))  # a client that sends nothing holds one thread
        with ThreadPoolExecutor(8) as ex:
            results = list(ex.map(lambda i: s.request("GET", f"/blobs/{blob_id}", {"Range": f"bytes={i}-{i}"}),
                                  range(40)))  # fmt: skip
        assert [body for _, _, body in results] == [t["blob"][i : i + 1] for i in range(40)]
        idle.close()
    finally:
        code, lines = s.stop(signal.SIGINT)
    assert code == 0, lines
    assert lines[-1] == "nydus-erofs serve: stopped"
    requests = [line for line in lines if '"GET /blobs/' in line]
    assert len(requests) == 40 and all(line.endswith(" 206 1") for line in requests), lines
    s = Served(tree[0])
    assert s.stop(signal.SIGTERM) == (0, ["nydus-erofs serve: stopped"])


def test_a_stop_lets_the_request_being_answered_finish(tree: tuple[Path, dict[str, bytes]]) -> None:
    """SIGTERM while a slow client is still taking an 8 MiB file: the client gets all of it, and its log line comes
    before "stopped" (the process used to exit mid-body)."""
    root, _ = tree
    data = random.Random(5).randbytes(8 << 20)  # more than the socket buffers hold
    (root / "big").write_bytes(data)
    s = Served(root)
    try:
        with socket.socket() as c:
            c.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # a slow client: the server blocks on its window
            c.connect(("127.0.0.1", s.port))
            c.sendall(b"GET /big HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            got = c.recv(64)
            assert got.startswith(b"HTTP/1.1 200"), got
            s.proc.send_signal(signal.SIGTERM)
            while chunk := c.recv(1 << 20):
                got += chunk
        _, err = s.proc.communicate(timeout=30)
    finally:
        if s.proc.poll() is None:
            s.proc.kill()
            s.proc.wait()
    whole = got.endswith(data)
    assert whole, f"the client got {len(got)} bytes, not the whole file"
    lines = err.splitlines()
    assert s.proc.returncode == 0 and lines[-1] == "nydus-erofs serve: stopped", lines
    assert len(lines) == 2 and lines[0].endswith(f" 200 {8 << 20}"), lines


def test_bad_options_one_line(tmp_path: Path) -> None:
    for args, msg in [([str(tmp_path / "none")], "not a directory"),
                      ([str(tmp_path), "--listen", "nope"], "ADDR:PORT")]:  # fmt: skip
        r = run("serve", *args, timeout=30)
        assert r.returncode == 2 and r.stderr.count("\n") == 1 and msg in r.stderr, r.stderr
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        r = run("serve", tmp_path, "--listen", f"127.0.0.1:{port}", timeout=30)
        assert r.returncode == 2 and r.stderr.count("\n") == 1 and "in use" in r.stderr, r.stderr


# --- a Nydus image mounted from it with the registry backend ----------------------------------------------------


@pytest.mark.kernel("erofs", "fanotify")
@pytest.mark.root
def test_registry_backend_mounts_an_image_from_it(tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "d").mkdir(parents=True)
    rnd = random.Random(8)
    (src / "d" / "big.bin").write_bytes(rnd.randbytes(5 << 20))
    for i in range(30):
        (src / f"f{i}.txt").write_bytes(rnd.randbytes(rnd.randrange(0, 50_000)))
    (src / "d" / "link").symlink_to("../f1.txt")
    out = tmp_path / "out"
    r = run("build", src, "--output-dir", out, "--compressor", "lz4_block")
    assert r.returncode == 0, r.stderr
    served = Served(out / "blobs")  # blobs at the top of the served directory
    mp = tmp_path / "mnt"
    mp.mkdir()
    env = {**os.environ, "NYDUS_EROFS_RUN_DIR": str(tmp_path / "run")}
    try:
        r = run("mount", out / "image.boot", mp, "--cache-dir", tmp_path / "cache", "--mode", "fanotify",
                "--backend", "registry", "--backend-config",
                f"host={served.host},repo=x,plain_http=true,docker_config=false", env=env, timeout=120)  # fmt: skip
        assert r.returncode == 0, r.stderr
        assert_same_tree(src, mp)
        r = run("umount", mp, env=env, timeout=60)
        assert r.returncode == 0, r.stderr
    finally:
        if os.path.ismount(mp):
            subprocess.run([CLI, "umount", str(mp)], capture_output=True, env=env, timeout=60)
            if os.path.ismount(mp):
                subprocess.run(["umount", "-l", str(mp)], check=False)
        code, lines = served.stop()
    assert code == 0
    assert any("/v2/x/blobs/sha256:" in line and '" 206 ' in line for line in lines), lines

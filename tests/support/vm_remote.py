"""An image whose blob the test VM fetches over the network from servers on the host.

The host side, :func:`serve_for_vm` (tests/kernel_test/test_vm_suite.py), builds an image with
``nydus-erofs build``, serves its blob from a plain HTTP server (:class:`tests.support.registry.Front`) and from a
real docker-registry (pushed, Basic auth), both on the host's 127.0.0.1, and describes all that in a JSON file
(:class:`Served`) whose path it puts in ``$NYDUS_EROFS_VM_REMOTE``.  The VM boots with ``run-vm --net``, where the
host's 127.0.0.1 is ``$VM_HOST``; tests/vm/test_remote_backends.py reads the description with :func:`load`.
Everything the guest needs from the host (bootstrap, source tree, the source's snapshot) is under the host's temp
dir, which the guest sees over 9p.
"""

from __future__ import annotations

import base64
import json
import os
import pickle
import shutil
import struct
import subprocess
import sys
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from cachefilesd_py.backends.registry import push_blob
from tests.support.fstree import snapshot
from tests.support.machine import unavailable
from tests.support.registry import TEST_PASSWORD, TEST_USER, Front, RegistryServer, registry_binary
from tests.support.remote_image import convert_to, make_source_layout, unpack_layout
from tests.support.rootfs import T0, make_rootfs

ENV = "NYDUS_EROFS_VM_REMOTE"
REPO = "vm/remote"
MiB = 1 << 20
BIG_MIB = 16  # the file ``big``: BIG_MIB distinct 1 MiB chunks, so a partial read is a small part of the blob
NYDUS_EROFS = Path(sys.executable).parent / "nydus-erofs"


@dataclass(frozen=True)
class Served:
    """What the host serves to the VM (host paths, visible in the guest over the 9p root; ports on the host's
    127.0.0.1, which is ``$VM_HOST`` in the guest)."""

    image_dir: str  # image.boot (the blobs/ beside it are what the servers serve; the guest never reads them)
    source: str  # the tree the image was built from
    snapshot: str  # pickled tests.support.fstree.snapshot(source), taken on the host
    blob_id: str
    blob_size: int
    http_port: int | None = None  # GET http://HOST:PORT/<blob id>
    registry_port: int | None = None  # docker-registry, /v2/REPO/blobs/sha256:<blob id>
    registry_repo: str = REPO
    registry_auth: str = ""  # user:pass
    # Nydus images converted into the registry (one repository each), for tests/vm/test_bind_api.py:
    # name -> {"repo": …, "tag": …, "snapshot": the pickled snapshot of its source tree}
    nydus_images: dict[str, dict[str, str]] = field(default_factory=dict)
    missing: dict[str, str] = field(default_factory=dict)  # backend -> why the host does not serve it

    def expected_snapshot(self, path: str | None = None) -> dict[bytes, tuple]:
        with open(path or self.snapshot, "rb") as f:
            return pickle.load(f)  # written by serve_for_vm on the host, from our own snapshot()

    def require(self, *what: str) -> None:
        """Skip (fail under ``CI``) unless the host serves each of ``what`` (a backend, or "nydus" images)."""
        for name in what:
            if name in self.missing:
                unavailable(self.missing[name])


def load() -> Served | None:
    """The description :func:`serve_for_vm` wrote, or None when ``$NYDUS_EROFS_VM_REMOTE`` is unset."""
    path = os.environ.get(ENV)
    if not path:
        return None
    return Served(**json.loads(Path(path).read_text()))


def _source(root: Path) -> Path:
    """tests/support/rootfs.py's tree (a small directory, for TCG) plus ``big``."""

    make_rootfs(root, entries=150)
    body = os.urandom(MiB)
    with open(root / "big", "wb") as f:
        for i in range(BIG_MIB):  # every chunk differs: no dedup, the blob holds all of them
            f.write(struct.pack("<Q", i) + body[8:])
    os.utime(root, ns=(T0 * 10**9, T0 * 10**9))
    return root


def _build(source: Path, out: Path) -> dict[str, Any]:
    cmd = [str(NYDUS_EROFS), "build", str(source), "--output-dir", str(out), "--json",
           "--compressor", "zstd", "--chunk-size", "1MiB"]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=300)
    if done.returncode != 0:
        raise RuntimeError(f"nydus-erofs build failed: {done.stderr.strip()}")
    return json.loads(done.stdout)


NYDUS_REPOS = {"a": "vm/nydus-a", "b": "vm/nydus-b"}


def _convert_nydus_images(tmp: Path, registry: str, auth: str, served: dict[str, Any]) -> None:
    """Two images made by umoci, ``nydus-erofs convert``-ed into two repositories of the registry (with its
    credentials from a docker config that skopeo reads); or why not, in ``missing["nydus"]``."""
    if shutil.which("umoci") is None or shutil.which("skopeo") is None:
        served["missing"]["nydus"] = "umoci and skopeo make the Nydus images (setup.sh installs them)"
        return
    config = tmp / "docker-config.json"
    config.write_text(json.dumps({"auths": {registry: {"auth": base64.b64encode(auth.encode()).decode()}}}))
    env = {**os.environ, "REGISTRY_AUTH_FILE": str(config)}
    for name, repo in NYDUS_REPOS.items():
        work = tmp / f"nydus-{name}"
        work.mkdir()
        layout = make_source_layout(work, seed=ord(name))
        expected = unpack_layout(layout, work / "expected")
        snap = work / "snapshot.pickle"
        snap.write_bytes(pickle.dumps(snapshot(expected)))
        convert_to(layout, f"docker://{registry}/{repo}:v1", env=env)
        served["nydus_images"][name] = {"repo": repo, "tag": "v1", "snapshot": str(snap)}


@contextmanager
def serve_for_vm(tmp: Path) -> Iterator[dict[str, str]]:
    """Build the image under ``tmp``, serve its blob over HTTP and from a registry on 127.0.0.1, and yield the
    environment to give run-vm (``$NYDUS_EROFS_VM_REMOTE``); the servers stop on exit.  A registry that is not
    installed is recorded in ``missing`` (the guest test fails in CI, skips elsewhere)."""
    source = _source(tmp / "source")
    image = tmp / "image"
    out = _build(source, image)
    (blob,) = out["blobs"]
    blob_path = image / "blobs" / blob["id"]
    snap = tmp / "snapshot.pickle"
    snap.write_bytes(pickle.dumps(snapshot(source)))
    served: dict[str, Any] = {"image_dir": str(image), "source": str(source), "snapshot": str(snap),
                              "blob_id": blob["id"], "blob_size": blob_path.stat().st_size, "missing": {},
                              "nydus_images": {}}  # fmt: skip
    with ExitStack() as stack:
        front = stack.enter_context(Front(directory=image / "blobs"))
        served["http_port"] = int(front.host.rsplit(":", 1)[1])
        if registry_binary() is None:
            served["missing"]["registry"] = "docker-registry is not installed (setup.sh installs it)"
        else:
            registry = stack.enter_context(RegistryServer(tmp / "registry", htpasswd=True))
            auth = f"{TEST_USER}:{TEST_PASSWORD}"
            digest = push_blob(registry.host, REPO, blob_path, plain_http=True, docker_config=False, auth=auth)
            assert digest == f"sha256:{blob['id']}", digest
            served.update(registry_port=registry.port, registry_auth=auth)
            _convert_nydus_images(tmp, registry.host, auth, served)
        description = tmp / "served.json"
        description.write_text(json.dumps(asdict(Served(**served))))
        yield {ENV: str(description)}

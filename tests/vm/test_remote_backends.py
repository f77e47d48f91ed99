"""cachefilesd-py's network backends behind the kernel's fscache path: blobs fetched from the host.

tests/kernel_test/test_vm_suite.py builds an image on the host, serves its blob from a plain HTTP server and a real
docker-registry on the host's 127.0.0.1, and boots the VM with ``run-vm --net`` (the host is ``$VM_HOST`` here)
and ``$NYDUS_EROFS_VM_REMOTE`` naming what it serves (tests/support/vm_remote.py).  Each test runs its own daemon
(``--backend http`` / ``--backend registry``), mounts by fsid, reads part of a large file (only a small part
of the blob crosses the network), then the whole tree, which must equal the source.  Without the host's servers
these tests fail in CI and skip elsewhere.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.fstree import assert_same_snapshot, snapshot
from tests.support.vm_remote import BIG_MIB, Served
from tests.vm.test_daemon import DaemonProc, MiB, mounted, scratch

pytestmark = [pytest.mark.kernel("cachefiles"), pytest.mark.network]

PIECE_AT, PIECE_LEN = 10 * MiB + 12345, 100_000


def _backend_args(backend: str, remote: Served) -> list[str]:
    host = os.environ["VM_HOST"]
    if backend == "http":
        return ["--backend", "http", "--url", f"http://{host}:{remote.http_port}"]
    return ["--backend", "registry", "--host", f"{host}:{remote.registry_port}", "--repo", remote.registry_repo,
            "--plain-http", "--auth", remote.registry_auth]  # fmt: skip


@pytest.fixture(params=["http", "registry"])
def remote_daemon(request: pytest.FixtureRequest, served: Served) -> Iterator[tuple[str, DaemonProc]]:
    """A daemon whose one backend is the host's server; the image's blobs/ is not there, only its bootstrap."""
    backend: str = request.param
    served.require(backend)
    base = scratch() / f"remote-{backend}"
    d = DaemonProc(base, *_backend_args(backend, served))
    image = d.images / backend
    image.mkdir(parents=True, exist_ok=True)
    boot = image / "image.boot"
    boot.unlink(missing_ok=True)
    boot.symlink_to(Path(served.image_dir) / "image.boot")
    d.start()
    try:
        yield backend, d
    finally:
        rc = d.stop()
        assert rc == 0, d.log_text()


def test_blob_from_the_host_serves_a_partial_read_then_the_whole_tree(
    remote_daemon: tuple[str, DaemonProc], served: Served
) -> None:
    fsid, daemon = remote_daemon
    with mounted(fsid) as mnt:
        with open(mnt / "big", "rb", buffering=0) as f:
            f.seek(PIECE_AT)
            piece = f.read(PIECE_LEN)
        partial = daemon.backend_bytes("shared")
        with open(Path(served.source) / "big", "rb") as src:
            src.seek(PIECE_AT)
            assert piece == src.read(PIECE_LEN)
        print(f"{fsid}: {PIECE_LEN} bytes of a {served.blob_size}-byte blob fetched {partial} backend bytes")
        assert served.blob_size > BIG_MIB * MiB
        assert 0 < partial <= 3 * MiB  # the chunk, at most ~1 MiB of amplification, and the blob's metadata
        assert_same_snapshot(served.expected_snapshot(), snapshot(mnt))
    backend = daemon.api("/api/v1/metrics/backend")
    total = backend["backends"]["shared"]["bytes"]
    print(f"{fsid}: the whole tree fetched {total} backend bytes in {backend['requests']} requests")
    assert BIG_MIB * MiB <= total <= 2 * served.blob_size
    assert backend["errors"] == 0
    pipeline = daemon.api("/api/v1/metrics/blobcache")["pipeline"]
    assert pipeline["chunks_written"] > BIG_MIB and pipeline["digest_failures"] == 0

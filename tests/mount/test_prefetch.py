"""Prefetch on a fanotify mount with the registry backend: once the prefetch reports done, the registry is
stopped; what the prefetch table lists reads back, an unlisted file never read fails with EIO (the prefetch
fetched what the table said and nothing it did not); with ``prefetch_all`` the whole tree reads back."""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cachefilesd_py.mount.prefetch import read_prefetch_progress
from cachefilesd_py.mount.service import mount_image
from cachefilesd_py.mount.spec import MountSpec
from tests.mount.test_fanotify_mount import Mounts, _in_thread
from tests.support.cli import run
from tests.support.fstree import assert_same_tree
from tests.support.poll import wait_for
from tests.support.registry import RegistryServer, push_test_blob

CHUNK = 64 << 10
REPO = "prefetch/app"
pytestmark = [pytest.mark.kernel("erofs", "fanotify"), pytest.mark.network, pytest.mark.tools("docker-registry")]

LISTED = ["/app/bin/main", "/app/lib/liba.so", "/app/lib/libb.so", "/etc/config"]
UNLISTED = ["/data/never", "/data/other"]


@pytest.fixture
def registry(tmp_path: Path) -> Iterator[RegistryServer]:
    with RegistryServer(tmp_path / "registry") as reg:
        yield reg


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Files of a few chunks each (64 KiB chunks), the table naming /app/bin/main, /app/lib and /etc/config."""
    root = tmp_path_factory.mktemp("prefetch")
    src = root / "src"
    sizes = {"/app/bin/main": 200_000, "/app/lib/liba.so": 70_000, "/app/lib/libb.so": 130_000,
             "/etc/config": 66_000, "/data/never": 150_000, "/data/other": 90_000}  # fmt: skip
    for path, size in sizes.items():
        (src / path[1:]).parent.mkdir(parents=True, exist_ok=True)
        (src / path[1:]).write_bytes(os.urandom(size))
    listing = root / "list.txt"
    listing.write_text("/app/bin/main\n/app/lib\n/etc/config\n")
    out = root / "out"
    r = run("build", src, "-o", out, "--chunk-size", "64KiB", "--compressor", "zstd", "--prefetch-list", listing,
            timeout=120)  # fmt: skip
    assert r.returncode == 0, r.stderr
    return src, out


def _mount(mounts: Mounts, registry: RegistryServer, out: Path, name: str, **kw: Any) -> Path:
    for blob in (out / "blobs").iterdir():
        assert push_test_blob(registry, REPO, blob.read_bytes(), mounts.tmp) == blob.name
    mp = mounts.tmp / f"mnt-{name}"
    mp.mkdir()
    config = {"host": registry.host, "repo": REPO, "plain_http": True}
    # amplify one chunk, no readahead: what is in the cache is what the prefetch (or a read) asked for
    mount_image(MountSpec(str(out / "image.boot"), str(mp), str(mounts.tmp / f"cache-{name}"), mode="fanotify",
                          backend="registry", backend_config=config, amplify=CHUNK, readahead=0, **kw))  # fmt: skip
    mounts.active.append(mp)
    return mp


def _done(mp: Path) -> dict[str, Any]:
    return wait_for(lambda: (p := read_prefetch_progress(mp)) and p["state"] == "done" and p, "prefetch done", 60)


def _eio(path: Path) -> int:
    try:
        path.read_bytes()
    except OSError as e:
        return e.errno or 0
    return 0


def test_table_files_are_prefetched_and_nothing_else(mounts: Mounts, registry: RegistryServer,
                                                      image: tuple[Path, Path]) -> None:  # fmt: skip
    src, out = image
    mp = _mount(mounts, registry, out, "table")
    progress = _done(mp)
    assert progress["files_done"] == progress["files"] == 4 and progress["errors"] == 0
    registry.stop()
    for path in LISTED:
        assert _in_thread(lambda p=path: (mp / p[1:]).read_bytes()) == (src / path[1:]).read_bytes(), path
    assert _in_thread(lambda: _eio(mp / "data" / "never")) == errno.EIO
    stats = mounts.umount(mp)["stats"]
    pf = stats["prefetch"]
    assert (pf["state"], pf["files_done"], pf["all_blobs"]) == ("done", 4, False)
    listed_bytes = sum((src / p[1:]).stat().st_size for p in LISTED)
    assert listed_bytes <= pf["bytes"] < listed_bytes + len(LISTED) * 4096  # whole chunks, page padded
    assert stats["events"]["denied"] >= 1


def test_prefetch_all_then_the_whole_tree_reads_without_the_registry(mounts: Mounts, registry: RegistryServer,
                                                                    image: tuple[Path, Path]) -> None:  # fmt: skip
    src, out = image
    mp = _mount(mounts, registry, out, "all", prefetch_all=True)
    progress = _done(mp)
    assert progress["all_blobs"] and progress["errors"] == 0
    registry.stop()
    _in_thread(lambda: assert_same_tree(src, mp))
    stats = mounts.umount(mp)["stats"]
    assert stats["events"]["denied"] == 0
    assert all(b["missing"] == 0 for b in stats["blobs"].values())


def test_no_prefetch_fetches_nothing(mounts: Mounts, registry: RegistryServer, image: tuple[Path, Path]) -> None:
    _, out = image
    mp = _mount(mounts, registry, out, "off", prefetch=False)
    stats = mounts.umount(mp)["stats"]
    assert "prefetch" not in stats
    assert stats["pipeline"]["chunks_fetched"] == 0

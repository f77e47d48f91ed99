"""Fixtures of the daemon tests."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from cachefilesd_py.daemon import Daemon
from cachefilesd_py.daemon_api import daemon_routes
from cachefilesd_py.image_store import ImageStore
from tests.daemon.test_daemon_service import FakeDevice, _build
from tests.support.served_daemon import serving


@dataclass
class ApiServed:
    """cachefilesd-py serving image ``img`` (two files, 64 KiB chunks) from a fake device, with its whole API."""

    daemon: Daemon
    dev: FakeDevice
    sock: Path
    tmp: Path
    out: dict


@pytest.fixture
def api_served(tmp_path: Path) -> Iterator[ApiServed]:
    src = tmp_path / "src"
    src.mkdir()
    for name in ("a", "b"):
        (src / name).write_bytes(os.urandom(200_000))
    out = _build(tmp_path / "images" / "img", src, "--chunk-size", "64KiB", "--compressor", "lz4_block")
    dev = FakeDevice()
    daemon = Daemon(dev, ImageStore(tmp_path / "images"), threads=2, amplify=0)  # type: ignore[arg-type]
    sock_dir = tmp_path / "sock"
    sock_dir.mkdir(mode=0o755)
    with serving(daemon, sock_dir / "api.sock", *daemon_routes(daemon, tmp_path / "cache", 0, None)):
        yield ApiServed(daemon, dev, sock_dir / "api.sock", tmp_path, out)

"""Fixtures of the CLI tests: a small tree and a fresh image of it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.support.cli import run


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    src = tmp_path_factory.mktemp("hostile-src") / "src"
    (src / "d").mkdir(parents=True)
    (src / "d" / "f").write_bytes(b"hello\n")
    (src / "big").write_bytes(os.urandom(100_000))
    (src / "link").symlink_to("d/f")
    return src


@pytest.fixture
def image(source: Path, tmp_path: Path) -> Path:
    """A fresh image of ``source`` (OUT with image.boot and blobs/), uncompressed, 4 KiB chunks."""
    out = tmp_path / "image"
    r = run("build", source, "-o", out, "--chunk-size", "4KiB", timeout=60)
    assert r.returncode == 0, r.stderr
    return out

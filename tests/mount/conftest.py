"""Fixtures of the mount tests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from cachefilesd_py.mount.record import RUN_DIR_ENV
from tests.mount.test_fanotify_mount import Mounts


@pytest.fixture
def mounts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Mounts]:
    """Mounts made through the library, each in this test's own run dir; all unmounted after the test."""
    monkeypatch.setenv(RUN_DIR_ENV, str(tmp_path / "run"))
    m = Mounts(tmp_path)
    try:
        yield m
    finally:
        m.cleanup()

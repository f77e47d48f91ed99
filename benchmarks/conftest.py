"""Fixtures of the benchmarks (the ``comparison`` collector is the repository's, in the root conftest.py)."""

from __future__ import annotations

import pytest

from benchmarks.mkfs_erofs import Mkfs, mkfs_erofs


@pytest.fixture(scope="session")
def mkfs() -> Mkfs:
    """The ``mkfs.erofs`` to compare with (benchmarks/mkfs_erofs.py says which); skips when there is none."""
    found = mkfs_erofs()
    if found is None:
        pytest.skip("no mkfs.erofs: install erofs-utils, or name one in $NYDUS_EROFS_MKFS")
    return found

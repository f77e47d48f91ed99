"""Every test here is a ``benchmark``; the suite's one skip hook (tests/conftest.py) serves this folder too.

The ``comparison`` collector is the repository's, in the root conftest.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks.mkfs_erofs import Mkfs, mkfs_erofs
from tests.conftest import pytest_runtest_setup  # noqa: F401 - the one skip hook, for this folder too

HERE = Path(__file__).resolve().parent


@pytest.hookimpl(tryfirst=True)  # before ``-m`` selects
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if HERE in item.path.parents:
            item.add_marker(pytest.mark.benchmark)


@pytest.fixture(scope="session")
def mkfs() -> Mkfs:
    """The ``mkfs.erofs`` to compare with (benchmarks/mkfs_erofs.py says which); skips when there is none."""
    found = mkfs_erofs()
    if found is None:
        pytest.skip("no mkfs.erofs: install erofs-utils, or name one in $NYDUS_EROFS_MKFS")
    return found

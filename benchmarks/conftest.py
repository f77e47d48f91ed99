"""Every test here is a ``benchmark``; the suite's one skip hook (tests/conftest.py) serves this folder too."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import pytest_runtest_setup  # noqa: F401 - the one skip hook, for this folder too

HERE = Path(__file__).resolve().parent


@pytest.hookimpl(tryfirst=True)  # before ``-m`` selects
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if HERE in item.path.parents:
            item.add_marker(pytest.mark.benchmark)

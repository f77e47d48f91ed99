"""Collection rules, the one skip hook and the shared fixtures of the whole suite.

``tests/vm`` holds tests that need the fscache-capable test kernel: on the host they are not collected at
all; ``tests/kernel_test/test_vm_suite.py`` boots the VM (kernel-test/run-vm, which sets NYDUS_EROFS_IN_VM=1)
and runs that folder there, so the one ``pytest`` command covers them without a skip on the host.

A test says what it needs with markers (registered in pyproject.toml): ``root``, ``kernel`` (file-backed
EROFS; ``kernel("fanotify")`` pre-content events, ``kernel("cachefiles")`` the fscache VM), ``vm``, ``network``,
``tools(...)``, ``upstream``; ``benchmark`` marks what only measures.  :func:`pytest_runtest_setup` probes
the machine (once per capability, :mod:`tests.support.machine`) and skips a test whose needs are not met,
saying what is missing — except under ``CI``, where every test must run: there it fails instead.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from tests.support.machine import missing_for
from tests.support.registry import RegistryServer

collect_ignore = [] if os.environ.get("NYDUS_EROFS_IN_VM") == "1" else ["vm"]


def pytest_runtest_setup(item: pytest.Item) -> None:
    missing = missing_for(item)
    if not missing:
        return
    why = "; ".join(missing)
    if os.environ.get("CI"):
        pytest.fail(f"CI must run this test, but: {why}")
    pytest.skip(why)


@pytest.fixture(scope="module")
def registry_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RegistryServer]:
    """An anonymous docker-registry on 127.0.0.1 for the test module (mark the test ``network``,
    ``tools("docker-registry")``)."""
    with RegistryServer(tmp_path_factory.mktemp("registry")) as reg:
        yield reg


@pytest.fixture(scope="module")
def auth_registry_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RegistryServer]:
    """A docker-registry demanding htpasswd Basic auth (TEST_USER / TEST_PASSWORD)."""
    with RegistryServer(tmp_path_factory.mktemp("registry-auth"), htpasswd=True) as reg:
        yield reg

"""Collection rules, the one skip hook and the shared fixtures of the whole suite.

``tests/vm`` holds tests that need a test VM's kernel: on the host they are not collected at all;
``tests/kernel_test/test_vm_suite.py`` boots the VM (kernel-test/run-vm, which sets NYDUS_EROFS_IN_VM=1) on each
test kernel (our 6.12, Debian 12's 6.1) and runs that folder there, so the one ``pytest`` command covers them.

A test says what it needs with markers (registered in pyproject.toml): ``root``, ``kernel`` (file-backed
EROFS; ``kernel("fanotify")`` pre-content events, ``kernel("cachefiles")`` fscache on-demand, ``kernel("loop")``,
``kernel("nbd")`` block devices), ``vm`` (``vm("debian-6.1")``: that kernel), ``network``, ``tools(...)``,
``upstream``; ``benchmark`` marks what only measures.  :func:`pytest_runtest_setup` probes the machine (once per
capability, :mod:`tests.support.machine`) and skips a test whose needs are not met, saying what is missing —
except under ``CI``, where every test must run: there it fails instead (in the VM, a kernel feature still skips).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.cli import run, use_fork_server
from tests.support.kmount import MNT_DETACH, is_mounted, umount
from tests.support.machine import in_vm, missing_for, missing_kernel_features, unavailable
from tests.support.registry import RegistryServer
from tests.support.zygote import Zygote

collect_ignore = [] if os.environ.get("NYDUS_EROFS_IN_VM") == "1" else ["vm"]


def pytest_runtest_setup(item: pytest.Item) -> None:
    missing = missing_for(item)
    if not missing:
        return
    # In the VM each kernel runs the modes it supports: a feature its kernel lacks skips even in CI (the host's
    # tests/kernel_test/test_vm_suite.py checks which skips each kernel may have).
    kernel_only = in_vm() and set(missing) <= set(missing_kernel_features(item))
    unavailable("; ".join(missing), even_in_ci=kernel_only)


@pytest.fixture(scope="session", autouse=True)
def cli_fork_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Zygote | None]:
    """Under ``pytest -n`` (the quick loop) :func:`tests.support.cli.run` forks the programs from a process that
    has imported them (:mod:`tests.support.zygote`), saving each run the interpreter's start and the imports;
    the full run, as CI runs it, starts every program from its installed script."""
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        yield None
        return
    server = Zygote(tmp_path_factory.getbasetemp() / "cli.sock")
    use_fork_server(server)
    try:
        yield server
    finally:
        use_fork_server(None)
        server.stop()


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


@pytest.fixture
def run_env(tmp_path: Path) -> dict[str, str]:
    """The environment for a ``nydus-erofs`` run whose runtime records stay in this test's own folder."""
    return dict(os.environ, NYDUS_EROFS_RUN_DIR=str(tmp_path / "run"))


@pytest.fixture
def mountpoint(tmp_path: Path, run_env: dict[str, str]) -> Iterator[Path]:
    """An empty mountpoint for ``nydus-erofs mount … env=run_env``, left unmounted (and its daemon stopped)
    whatever the test did."""
    mp = tmp_path / "mnt"
    mp.mkdir()
    try:
        yield mp
    finally:
        if is_mounted(mp):  # a failing test must not leave its mount (and daemon) behind
            run("umount", mp, env=run_env)
        if is_mounted(mp):
            with contextlib.suppress(OSError):
                umount(mp, MNT_DETACH)

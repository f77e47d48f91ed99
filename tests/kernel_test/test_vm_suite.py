"""Runs tests/vm inside the test VM (kernel-test/run-vm) on each test kernel, so the one `pytest` command covers
them: our 6.12 kernel (everything built in, fscache on-demand) and Debian 12's stock 6.1 kernel (modules in an
initramfs; no file-backed EROFS, no cachefiles on-demand: its tests of those skip, the loop and nbd ones run).

The guest's benchmark comparisons (the root conftest.py's ``comparison``) are relayed into this run's summary.
The VM gets a network (run-vm --net) and, while it runs, the host serves an image's blob over HTTP and from a
docker-registry (tests/support/vm_remote.py) for tests/vm/test_remote_backends.py."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
RUN_VM = REPO / "kernel-test" / "run-vm"
sys.path.insert(0, str(REPO / "kernel-test"))

import run_vm  # noqa: E402

from tests.support.vm_remote import serve_for_vm  # noqa: E402

# Boot included. The whole folder shares one boot; under TCG, Python runs some 20 times slower than on the host.
VM_SUITE_TIMEOUT_S = int(os.environ.get("NYDUS_EROFS_VM_SUITE_TIMEOUT", "1800"))


# Debian's 6.1 lacks these kernel features: the tests that need them skip there, even in CI — nothing else may.
DEBIAN_MISSING = re.compile(r"has no cachefiles on-demand|cannot mount a file-backed EROFS|no fanotify pre-content")
KERNELS = [
    pytest.param(None, id="6.12"),
    pytest.param("debian-6.1", id="debian-6.1", marks=pytest.mark.vm("debian-6.1")),
]


@pytest.mark.vm
@pytest.mark.network
@pytest.mark.timeout(VM_SUITE_TIMEOUT_S + 300)  # run-vm's own limit, then the servers' start and stop
@pytest.mark.parametrize("kernel", KERNELS)
def test_vm_suite_passes_in_the_vm(tmp_path: Path, comparison: Any, kernel: str | None) -> None:
    assert run_vm.hidden_in_guest(tmp_path.resolve()) is None, f"{tmp_path} is hidden in the guest"
    chosen = ["--kernel", kernel] if kernel else []
    cmd = [str(RUN_VM), *chosen, "--net", "--timeout", str(VM_SUITE_TIMEOUT_S), "--",
           sys.executable, "-m", "pytest", "tests/vm", "-q", "-rfEs", "--color=no", "--durations=5",
           # The root is read-only in the guest: no .pytest_cache. No VM test uses hypothesis, whose pytest
           # plugin imports all of hypothesis at the session's end (tens of seconds under TCG).
           "-p", "no:cacheprovider", "-p", "no:hypothesispytest"]
    with serve_for_vm(tmp_path) as served:  # the servers stop when the VM is done
        done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, stdin=subprocess.DEVNULL,
                              env={**os.environ, **served}, timeout=VM_SUITE_TIMEOUT_S + 120)
    report = f"$ {' '.join(cmd)}\n--- stdout ---\n{done.stdout}\n--- stderr ---\n{done.stderr}"
    # the guest's benchmark comparisons, in the host's summary
    comparison.relay(done.stdout, prefix=f"VM {kernel or '6.12'}: ")
    assert done.returncode == 0, report
    summary = done.stdout.strip().splitlines()[-1]
    assert re.search(r"\d+ passed", summary), report
    if os.environ.get("CI"):
        skips = [line for line in done.stdout.splitlines() if line.startswith("SKIPPED")]
        allowed = DEBIAN_MISSING if kernel == "debian-6.1" else None
        unexpected = [line for line in skips if allowed is None or not allowed.search(line)]
        assert not unexpected, "VM tests must run in CI, not skip:\n" + report

"""Tests in tests/vm run inside the test VM only (kernel-test/run-vm sets NYDUS_EROFS_IN_VM=1).

On the host they are not collected (tests/conftest.py); tests/kernel_test/test_vm_suite.py boots the VM once and
runs this folder there. In the guest:
- the root file system is the host's, read-only; write only under $VM_SCRATCH (ext4) — pytest's ``tmp_path``
  is there too, because run-vm points TMPDIR at $VM_SCRATCH/tmp;
- you are root, with /dev/cachefiles (one opener at a time, system-wide), fanotify, EROFS (file-backed and
  fscache on-demand), loop devices, overlayfs.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.support.machine import unavailable
from tests.support.vm_remote import ENV, Served, load


@pytest.fixture
def vm_scratch() -> Path:
    """The guest's writable ext4 scratch folder (fresh for each VM boot, shared by all tests of that boot)."""
    return Path(os.environ["VM_SCRATCH"])


@pytest.fixture(scope="module")
def served() -> Served:
    """What the host serves to the VM (tests/support/vm_remote.py): fails in CI, skips elsewhere, when missing."""
    remote = load()
    if remote is None:
        unavailable(f"no servers on the host (${ENV} unset): run tests/kernel_test/test_vm_suite.py")
    if "VM_HOST" not in os.environ:
        unavailable("the VM has no network: run-vm --net")
    return remote

"""Kernel-mounted fuzzed bootstraps in the test VM (:mod:`tests.support.mount_fuzz`): the guest's own kernel
(built for these tests), with fewer cases than on the host (the guest is slower)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.mount_fuzz import build_image, fuzz_mounts
from tests.support.rootfs import make_rootfs


@pytest.mark.kernel("erofs-file-backed")  # the cases are mounted file-backed (Debian's 6.1 cannot)
def test_fuzzed_bootstraps_mount_and_walk_cleanly_in_the_vm(tmp_path: Path) -> None:
    image = build_image(make_rootfs(tmp_path / "root"), tmp_path / "image")
    outcomes = fuzz_mounts(image, tmp_path, cases=60, seed=23)
    assert outcomes["walked"], outcomes

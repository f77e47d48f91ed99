"""Kernel-mounted fuzzed bootstraps on the host (:mod:`tests.support.mount_fuzz`): 300 seeded cases of bit flips
in a small image's superblock, inodes, dirents and chunk indexes, mounted with mount(2) (six with
``nydus-erofs mount --mode full`` too) and walked: a clean failure or a clean walk each, no hang, no oops, nothing
left mounted.  ``MOUNT_FUZZ_CASES``, ``MOUNT_FUZZ_SEED``: a longer or another local run.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.support.mount_fuzz import build_image, fuzz_mounts
from tests.support.rootfs import make_rootfs

CASES = int(os.environ.get("MOUNT_FUZZ_CASES", "300"))
SEED = int(os.environ.get("MOUNT_FUZZ_SEED", "19"))
SHARDS = 4
# 300 entries in the big directory: still a directory of several blocks, and a walk of a tenth of the cost of the
# default 3000 (the walks were most of the test's time); the flips land more often in the other structures
ENTRIES = 300

pytestmark = pytest.mark.kernel("erofs")


@pytest.mark.parametrize("shard", range(SHARDS))  # the same cases as one run, in pieces (a failure names its piece)
def test_fuzzed_bootstraps_mount_and_walk_cleanly(tmp_path: Path, shard: int) -> None:
    image = build_image(make_rootfs(tmp_path / "root", entries=ENTRIES), tmp_path / "image")
    outcomes = fuzz_mounts(image, tmp_path, cases=CASES, seed=SEED, cli_cases=6, shard=(shard, SHARDS))
    assert outcomes["walked"] and outcomes["mount refused"], outcomes

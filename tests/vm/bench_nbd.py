"""Benchmark in the test VM: a cold sequential read of a 256 MiB file through ``--mode nbd`` (every byte fetched,
verified and written into the cache file by the daemon, then sent over the NBD socket) against the same read
with ``--mode full`` (the blob is in its cache file before the mount; the kernel reads it file-backed, or over a
loop device where the kernel has no file-backed mounts: "direct").  Absolute numbers mean little under TCG:
compare the two (printed in the run's summary, which tests/kernel_test/test_vm_suite.py relays to the host's).
Only the read is timed; the page cache is dropped before it, and each nbd round mounts with a fresh cache dir.
"""

from __future__ import annotations

import os
import shutil
import struct
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest

from tests.vm.test_block_modes import mounted
from tests.vm.test_daemon import MiB, build, scratch

pytestmark = [pytest.mark.kernel("loop", "nbd"), pytest.mark.benchmark]

GROUP = "nbd vs direct: cold sequential read, 256 MiB"
SIZE_MIB = 256
_times: dict[str, float] = {}


@pytest.fixture(scope="module")
def image256() -> Path:
    """The image dir of one file ``big``: 256 distinct 1 MiB chunks, stored uncompressed."""
    base = scratch() / "bench-nbd"
    shutil.rmtree(base, ignore_errors=True)
    (base / "src").mkdir(parents=True)
    body = os.urandom(MiB)
    with open(base / "src" / "big", "wb") as f:
        for i in range(SIZE_MIB):
            f.write(struct.pack("<Q", i) + body[8:])
    build(base / "image", base / "src")
    shutil.rmtree(base / "src")  # the scratch disk holds the blob and the cache files
    return base / "image"


def _drop_caches() -> None:
    Path("/proc/sys/vm/drop_caches").write_text("3")


def _read(path: Path) -> int:
    """Read ``path`` sequentially in 1 MiB pieces (not hashed: under TCG that would dominate); the bytes read."""
    buf = bytearray(MiB)
    got = 0
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            got += n
    return got


@pytest.fixture
def stack() -> Iterator[ExitStack]:
    with ExitStack() as s:
        yield s


def _cold_read(benchmark, stack: ExitStack, image: Path, name: str, mode: str) -> dict[str, Any]:  # noqa: ANN001
    """Mount (a fresh cache dir), drop the page cache, time the read (one round); the mount's record."""
    got: dict[str, Any] = {}

    def setup() -> None:
        got["mp"], got["rec"] = stack.enter_context(mounted(image, name, mode))
        _drop_caches()

    def run() -> None:
        assert _read(got["mp"] / "big") == SIZE_MIB * MiB

    benchmark.pedantic(run, setup=setup, rounds=1, iterations=1)
    return got["rec"]


@pytest.mark.benchmark(group=GROUP)
def test_cold_read_direct(benchmark, stack: ExitStack, image256: Path) -> None:  # noqa: ANN001 - fixture
    rec = _cold_read(benchmark, stack, image256, "bench-direct", "full")
    _times["direct"] = benchmark.stats.stats.mean
    benchmark.extra_info.update(source=rec["source"], mib_per_s=round(SIZE_MIB / _times["direct"], 2))


@pytest.mark.benchmark(group=GROUP)
def test_cold_read_over_nbd(benchmark, stack: ExitStack, image256: Path,  # noqa: ANN001 - fixture
                            comparison: Callable[[str], None]) -> None:  # fmt: skip
    _cold_read(benchmark, stack, image256, "bench-nbd", "nbd")
    nbd = benchmark.stats.stats.mean
    benchmark.extra_info.update(mib_per_s=round(SIZE_MIB / nbd, 2))
    stack.close()  # umount: the daemon's final stats
    if "direct" in _times:
        direct = _times["direct"]
        benchmark.extra_info["nbd_over_direct"] = round(nbd / direct, 2)
        comparison(f"nbd 256 MiB cold sequential read: over nbd (fetched, verified, served by the daemon) "
                   f"{nbd:.2f} s ({SIZE_MIB / nbd:.1f} MiB/s), direct (--mode full, the blob local) {direct:.2f} s "
                   f"({SIZE_MIB / direct:.1f} MiB/s) -> nbd/direct {nbd / direct:.1f}x")  # fmt: skip

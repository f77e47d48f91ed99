"""Benchmark in the test VM: a cold sequential read of a 64 MiB file through cachefilesd-py (every byte fetched,
verified and written into the cache by the daemon) against the same read once cached (the kernel reads the
cache file; the daemon sees no READ).  Absolute numbers mean little under TCG: compare the two (printed in the
run's summary, which tests/test_vm_suite.py relays to the host's).  Each round covers mount + read + umount;
the page cache is dropped before the warm read.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.vm.test_daemon import DaemonProc, MiB, large_image, link_image, mounted, scratch, sha256_file

pytestmark = [pytest.mark.kernel("cachefiles"), pytest.mark.benchmark]

GROUP = "cachefilesd-py sequential read, 64 MiB"
_times: dict[str, float] = {}


@pytest.fixture(scope="module")
def bench_daemon() -> Iterator[DaemonProc]:
    d = DaemonProc(scratch() / "bench", "--no-supervisor", "--json-logs").start()  # the one-process mode
    try:
        yield d
    finally:
        assert d.stop() == 0, d.log_text()


def _drop_caches() -> None:
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3")
    except OSError:
        pass


def _read(fsid: str, size: int) -> None:
    """Mount, read the file sequentially in 1 MiB pieces (not hashed: under TCG that would dominate), umount."""
    buf = bytearray(MiB)
    got = 0
    with mounted(fsid) as mnt, open(mnt / "big", "rb", buffering=0) as f:
        while n := f.readinto(buf):
            got += n
    assert got == size


@pytest.mark.benchmark(group=GROUP)
def test_cold_read_through_the_daemon(benchmark, bench_daemon: DaemonProc) -> None:  # noqa: ANN001 - fixture
    image, digest = large_image()
    size = (image.parent / "src" / "big").stat().st_size
    fsids = (f"bench-cold-{i}" for i in itertools.count())
    before = bench_daemon.api("/api/v1/metrics/blobcache")

    used: list[str] = []

    def setup() -> tuple[tuple[str, int], dict[str, object]]:
        fsid = next(fsids)  # a new fsid is a new fscache volume: nothing of it is cached yet
        link_image(bench_daemon.images, fsid, image)
        used.append(fsid)
        _drop_caches()
        return (fsid, size), {}

    benchmark.pedantic(_read, setup=setup, rounds=1, iterations=1)
    with mounted(used[-1]) as mnt:  # what was read is right (the daemon checked every chunk's digest, too)
        assert sha256_file(mnt / "big") == digest
    after = bench_daemon.api("/api/v1/metrics/blobcache")
    assert after["bytes_written"] - before["bytes_written"] >= size
    _times["cold"] = benchmark.stats.stats.mean
    benchmark.extra_info.update(
        bytes=size,
        mib_per_s=round(size / MiB / benchmark.stats.stats.mean, 2),
        daemon_reads=after["reads"] - before["reads"],
        backend_bytes=bench_daemon.api("/api/v1/metrics/backend")["bytes"],
    )


@pytest.mark.benchmark(group=GROUP)
def test_warm_read_from_the_cache(benchmark, bench_daemon: DaemonProc,  # noqa: ANN001 - fixture
                                  comparison: Callable[[str], None]) -> None:  # fmt: skip
    image, digest = large_image()
    size = (image.parent / "src" / "big").stat().st_size
    link_image(bench_daemon.images, "bench-warm", image)
    _read("bench-warm", size)  # fill the cache
    with mounted("bench-warm") as mnt:
        assert sha256_file(mnt / "big") == digest
    before = bench_daemon.api("/api/v1/metrics/blobcache")

    benchmark.pedantic(_read, args=("bench-warm", size), setup=_drop_caches, rounds=2, iterations=1)
    after = bench_daemon.api("/api/v1/metrics/blobcache")
    assert after["reads"] == before["reads"], "a cached read still asked the daemon for data"
    warm = benchmark.stats.stats.mean
    benchmark.extra_info.update(bytes=size, mib_per_s=round(size / MiB / warm, 2))
    if "cold" in _times:
        benchmark.extra_info["cold_over_warm"] = round(_times["cold"] / warm, 2)
        comparison(f"cachefilesd-py 64 MiB sequential read: cold (through the daemon) {_times['cold']:.2f} s, "
                   f"warm (from the cache file) {warm:.2f} s -> cold/warm {_times['cold'] / warm:.1f}x")  # fmt: skip

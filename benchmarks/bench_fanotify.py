"""Lazy reads through the fanotify front end vs the same file mounted directly (no daemon).

A 256 MiB file (each MiB half random, half text: lz4_block stores it in ~half) is built into an uncompressed
and an lz4_block image.  *Direct*: the uncompressed image mounted file-backed with its blob as ``device=``,
so the kernel reads the blob itself.  *fanotify*: ``nydus-erofs mount`` over an empty cache dir (the daemon
is a separate process, as in production): every readahead window of the reader is an event; missing chunks
are read from the blob (one ``preadv`` per span into a reused page-aligned buffer), blake3-verified where they
lie (lz4_block: decompressed into another reused buffer first) and written through the event fd.

*Copy loop*: the reference the issue gives for scale, measured in the same rounds (uncompressed case): one
thread answering each event by copying the holes of its range from the blob into the cache file (pread,
pwrite through the event fd), with no digests, no readahead and no daemon process; the mount's readahead
window is 1 MiB as for ours.  It bounds what any copy-into-a-cache-file design reaches on this machine.

Cold runs drop the page cache first (blob included).  Warm runs read the file a second time (page cache).
``warm_cache`` is a remount over the filled cache with the page cache dropped: no fetch, events only.
Targets (issue 17): cold >= 0.8x direct (uncompressed, digests on), >= 0.7x (lz4_block); warm = direct.  The
ratios (direct time / our time, higher is better) go to ``extra_info`` and are printed in the run's summary;
they are reported, not asserted, because the machine is shared and timings swing.  So is the daemon's CPU time
per cold read (user + system, all its threads): it swings far less with the load than wall time does.

Where a cold read's time goes: py-spy of the daemon at 500 Hz over two cold reads, the busy samples of its fill
and readahead threads (they overlap: 2 cores, shared with other work).  Before the pooled buffers (uncompressed):
the blob's ``pread`` 32%, the ``pwrite`` into the cache file (the kernel allocating and filling its page cache)
32%, the chunk map's ``fdatasync`` every 64 MiB 21% (a thread of its own, but its writeback competes with the
blob's reads for the disk), blake3 14%.  After (``preadv`` into reused buffers), at a far higher load: the
blob's ``preadv`` 62% (the blob is cold: disk), ``pwrite`` 29%, ``fdatasync`` 4.5%, blake3 2.8%; lz4_block:
``preadv`` 52%, ``pwrite`` 26%, ``fdatasync`` 6%, answering fanotify 6%, blake3 5.6%, lz4 (into a reused
buffer through liblz4) 2.7%.  Python bookkeeping is a few percent; fresh anonymous pages (first touch ~1 GB/s
here against ~26 GB/s reused) no longer show.  What is left is the kernel's: the disk read of the blob and
the cache file's page cache.

Since the chunk map's flush waits for the writes to pause (issue 17, the fillspeed branch's measurements, 2-core
machine at load average 9-12, two nested VMs running): the official run above, alternating the old and the new
flush, twice: uncompressed 0.23x/0.33x (median of pairs) -> 0.49x/0.51x, the daemon's CPU per cold read
0.37/0.32 s -> 0.26/0.26 s, ours against the copy loop of the same rounds 0.70x/0.69x -> 1.10x/0.83x; lz4_block
0.43x/0.48x -> 0.47x/0.62x.  ``perf record`` of the daemon (uncompressed, whole daemon, CPU time): the ``pwrite``
into the cache file 22% (ext4's delayed-allocation ``write_begin`` 13%: buffer heads, block reservation; the
copy 7%), blake3 17.5%, the blob's ``preadv`` 12% (the copy to user space 9%), the Python interpreter ~20%,
context switches 7%, the ``fdatasync`` under 1% (it now runs after the read).  The reader's side (its
``wchan`` sampled every 0.5 ms): 75-80% of a cold read's wall time is spent blocked in
``fanotify_handle_event``, waiting for an answer; ~97% of the 274 events find their range filled already by
the readahead and are answered in a median of 40-120 us (event read to allow), the few that wait for a fill
take ~0.14 s together, and the rest is the event thread getting a CPU (and the GIL) on a loaded machine: each
1 MiB window is a round trip to a process that must be scheduled.  Measured and not kept: ``O_DIRECT`` reads
of the blob (2.4-3.4x slower than buffered here: the disk's 8 MiB readahead is what makes the direct mount fast;
three threads of buffered 1 MiB ``preadv`` read the cold blob as fast as the direct mount does); 8 MiB mount
readahead windows (274 -> 87 events, but each blocks the reader for a ~3 MiB fill: slower in 6 pairs of 6);
4 MiB readahead pieces (fills 264 -> 95, no difference within the noise); a lower priority for the readahead
threads, a shorter GIL switch interval (no difference within the noise).  Not tried: ``copy_file_range`` (ext4
has no reflink: an in-kernel copy as costly as the ``pwrite``, and the blob could change between the verifying
read and the copy), a C fill loop (its ceiling is the interpreter's ~20%, and the default digester, blake3,
has no C library on the machine to call from it).
"""

from __future__ import annotations

import os
import random
import select
import shutil
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from cachefilesd_py.mount.record import RUN_DIR_ENV
from cachefilesd_py.mount.service import mount_image, umount_image
from cachefilesd_py.mount.spec import MountSpec
from fscache.fanotify import FanotifyGroup
from fscache.mount import is_mounted, mount_erofs_file_backed, set_mount_readahead, umount

CLI = [str(Path(sys.executable).with_name("nydus-erofs"))]
SIZE = 256 << 20
ROUNDS = 6

pytestmark = [pytest.mark.root, pytest.mark.kernel("erofs", "fanotify")]  # root: drop_caches


def _drop_caches() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of process ``pid`` so far (all its threads)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _read(path: Path) -> float:
    fd = os.open(path, os.O_RDONLY)
    try:
        t0 = time.perf_counter()
        n = 0
        while chunk := os.read(fd, 1 << 20):
            n += len(chunk)
        dt = time.perf_counter() - t0
    finally:
        os.close(fd)
    assert n == SIZE
    return dt


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("bench-fanotify")
    src = base / "src"
    src.mkdir()
    rnd = random.Random(1)
    with open(src / "big.bin", "wb") as f:
        for i in range(SIZE >> 20):
            f.write(rnd.randbytes(1 << 19) + ((b"nydus erofs lazy %d " % i) * 40000)[: 1 << 19])
    out = {}
    for comp in ("none", "lz4_block"):
        out[comp] = base / comp
        subprocess.run([*CLI, "build", str(src), "-o", str(out[comp]), "--compressor", comp], check=True,
                       capture_output=True)  # fmt: skip
    (src / "big.bin").unlink()
    return out


class Direct:
    """The uncompressed image mounted directly (the kernel reads the blob itself): the yardstick."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.mnt = out.parent / "mnt-direct"
        self.mnt.mkdir(exist_ok=True)
        (self.blob,) = (out / "blobs").iterdir()
        self.cold: list[float] = []
        self.warm: list[float] = []

    def measure(self) -> None:
        _drop_caches()
        mount_erofs_file_backed(self.out / "image.boot", self.mnt, [self.blob])
        try:
            self.cold.append(_read(self.mnt / "big.bin"))
            self.warm.append(_read(self.mnt / "big.bin"))
        finally:
            umount(self.mnt)


class CopyLoop:
    """The issue's reference: a fresh sparse cache file per round, marked, mounted, and one thread copying each
    event's holes from the blob (no digests) before allowing it."""

    def __init__(self, out: Path, tmp: Path) -> None:
        self.out = out
        (self.blob,) = (out / "blobs").iterdir()
        self.mnt = tmp / "mnt-copy-loop"
        self.cache = tmp / "copy-loop.cache"
        self.mnt.mkdir(exist_ok=True)
        self.cold: list[float] = []

    def _serve(self, group: FanotifyGroup, blob_fd: int, stop: threading.Event) -> None:
        poller = select.poll()
        poller.register(group.fileno(), select.POLLIN)
        while not stop.is_set():
            if not poller.poll(50):
                continue
            for ev in group.read_events():
                if ev.fd < 0:
                    continue
                for off, length in ev.holes():
                    ev.write(off, os.pread(blob_fd, length, off))
                group.allow(ev)

    def measure(self) -> None:
        self.cache.unlink(missing_ok=True)
        with open(self.cache, "wb") as f:
            f.truncate(-(-os.path.getsize(self.blob) // 4096) * 4096)
        blob_fd = os.open(self.blob, os.O_RDONLY)
        group = FanotifyGroup(pre_content=True)
        stop = threading.Event()
        server = threading.Thread(target=self._serve, args=(group, blob_fd, stop))
        try:
            group.mark(self.cache)
            server.start()
            mount_erofs_file_backed(self.out / "image.boot", self.mnt, [self.cache])
            try:
                set_mount_readahead(self.mnt, 1024)
                _drop_caches()
                self.cold.append(_read(self.mnt / "big.bin"))
            finally:
                umount(self.mnt)
        finally:
            stop.set()
            if server.is_alive():
                server.join()
            group.close()
            os.close(blob_fd)
            self.cache.unlink(missing_ok=True)


class LazyMount:
    """Fresh ``nydus-erofs mount`` (daemon process) per round, over an empty or a kept cache dir."""

    def __init__(self, out: Path, tmp: Path, keep_cache: bool = False) -> None:
        self.out = out
        self.mnt = tmp / f"mnt-{out.name}"
        self.cache = tmp / f"cache-{out.name}"
        self.keep_cache = keep_cache
        self.mnt.mkdir(exist_ok=True)
        self.stats: list[dict[str, Any]] = []
        self.pid = 0  # the process serving the mount (the worker, under a supervisor)

    def setup(self) -> None:
        self.teardown()
        if not self.keep_cache:
            shutil.rmtree(self.cache, ignore_errors=True)
        rec = mount_image(MountSpec(str(self.out / "image.boot"), str(self.mnt), str(self.cache), mode="fanotify",
                                    backend_config={"dir": str(self.out / "blobs")}))  # fmt: skip
        self.pid = rec.get("worker_pid") or rec["pid"]
        _drop_caches()

    def teardown(self) -> None:
        if is_mounted(self.mnt, None):
            self.stats.append(umount_image(self.mnt).get("stats", {}))


@pytest.fixture
def run_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    monkeypatch.setenv(RUN_DIR_ENV, str(tmp_path / "run"))
    yield tmp_path / "run"


@pytest.mark.parametrize("compressor", ["none", "lz4_block"])
def test_cold_read_vs_direct(benchmark: Any, images: dict[str, Path], compressor: str, tmp_path: Path,
                             run_dir: Path, comparison: Callable[[str], None]) -> None:  # fmt: skip
    """Each round: a direct cold read, (uncompressed) the reference copy loop's cold read, then a cold read
    through a fresh lazy mount (same moment, same load)."""
    direct = Direct(images["none"])
    copy_loop = CopyLoop(images["none"], tmp_path) if compressor == "none" else None
    lazy = LazyMount(images[compressor], tmp_path)
    times: list[float] = []
    cpu: list[float] = []

    def setup() -> None:
        direct.measure()
        if copy_loop is not None:
            copy_loop.measure()
        lazy.setup()

    def read() -> None:
        before = _cpu_seconds(lazy.pid)
        times.append(_read(lazy.mnt / "big.bin"))
        cpu.append(_cpu_seconds(lazy.pid) - before)

    try:
        benchmark.pedantic(read, setup=setup, rounds=ROUNDS, iterations=1)
        warm = min(_read(lazy.mnt / "big.bin") for _ in range(ROUNDS))
    finally:
        lazy.teardown()
    cold, d_cold, d_warm = min(times), min(direct.cold), min(direct.warm)
    median_ratio = statistics.median(d / t for d, t in zip(direct.cold, times, strict=True))
    last = lazy.stats[-1]
    target = 0.8 if compressor == "none" else 0.7
    daemon_cpu = statistics.median(cpu)
    benchmark.extra_info.update(
        compressor=compressor,
        cold_s=round(cold, 4),
        direct_cold_s=round(d_cold, 4),
        cold_ratio=round(d_cold / cold, 3),
        cold_ratio_median_of_pairs=round(median_ratio, 3),
        cold_target=target,
        warm_s=round(warm, 4),
        direct_warm_s=round(d_warm, 4),
        warm_ratio=round(d_warm / warm, 3),
        daemon_cpu_s_median=round(daemon_cpu, 3),
        load_average=os.getloadavg()[0],
        events=last["events"],
        fetched_bytes=last["pipeline"]["bytes_fetched"],
        dedup_hits=last["pipeline"]["dedup_hits"],
    )
    comparison(f"fanotify {compressor}: cold {cold:.3f} s vs direct {d_cold:.3f} s -> {d_cold / cold:.2f}x (median of "
               f"pairs {median_ratio:.2f}x, target {target}x); warm {warm:.4f} s vs {d_warm:.4f} s -> "
               f"{d_warm / warm:.2f}x; {last['events']['events']} events; daemon CPU {daemon_cpu:.2f} s per cold read "
               f"(median); load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")  # fmt: skip
    if copy_loop is not None:
        c_cold = min(copy_loop.cold)
        c_median = statistics.median(d / t for d, t in zip(direct.cold, copy_loop.cold, strict=True))
        benchmark.extra_info.update(
            copy_loop_cold_s=round(c_cold, 4),
            copy_loop_cold_ratio=round(d_cold / c_cold, 3),
            copy_loop_cold_ratio_median_of_pairs=round(c_median, 3),
            vs_copy_loop_median_of_pairs=round(
                statistics.median(c / t for c, t in zip(copy_loop.cold, times, strict=True)), 3
            ),
        )
        comparison(f"fanotify {compressor}: reference copy loop (no digests): cold {c_cold:.3f} s -> "
                   f"{d_cold / c_cold:.2f}x direct (median of pairs {c_median:.2f}x); ours vs the loop (median of "
                   f"pairs) {benchmark.extra_info['vs_copy_loop_median_of_pairs']:.2f}x")  # fmt: skip
    assert last["events"]["denied"] == 0 and last["pipeline"]["digest_failures"] == 0
    assert last["pipeline"]["bytes_fetched"] >= os.path.getsize(next((images[compressor] / "blobs").iterdir())) // 2


def test_warm_cache_remount_vs_direct(benchmark: Any, images: dict[str, Path], tmp_path: Path,
                                      run_dir: Path, comparison: Callable[[str], None]) -> None:  # fmt: skip
    """Remount over a filled cache, page cache dropped: the complete cache file is not even marked."""
    direct = Direct(images["none"])
    lazy = LazyMount(images["lz4_block"], tmp_path, keep_cache=True)
    lazy.setup()
    try:
        _read(lazy.mnt / "big.bin")  # fill the cache
    finally:
        lazy.teardown()
    times: list[float] = []

    def setup() -> None:
        direct.measure()
        lazy.setup()

    try:
        benchmark.pedantic(lambda: times.append(_read(lazy.mnt / "big.bin")), setup=setup, rounds=ROUNDS)
    finally:
        lazy.teardown()
    t, d = min(times), min(direct.cold)
    benchmark.extra_info.update(warm_cache_s=round(t, 4), direct_cold_s=round(d, 4), ratio=round(d / t, 3))
    comparison(f"fanotify warm cache remount: {t:.3f} s vs direct cold {d:.3f} s -> {d / t:.2f}x")
    assert all(s["pipeline"]["chunks_fetched"] == 0 and s["events"]["events"] == 0 for s in lazy.stats[1:])

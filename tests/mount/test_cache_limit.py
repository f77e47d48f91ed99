"""``--cache-size-limit`` (issue 15, item 3): a fanotify mount's cache stays under its limit, and reads stay right.

- a 100 MiB image mounted with a 32 MiB limit reads back identical to its source, file by file, four readers at
  once, while a sampling thread watches the cache dir's allocated bytes: never above the limit plus one chunk per
  fill worker; a file kept open and re-read while the others evict it reads right every time; a worker killed
  midway leaves the cache under the limit once its successor has served the rest;
- the LRU policy itself: least recently used first, never a pinned chunk, never one read within the grace;
- eviction on real cache files (no mount): a victim is absent in the page map and on disk in the chunk map, and a
  hole in the file; a pinned range stays; a reopened cache finds exactly the chunks that stayed; what a killed
  daemon wrote but never recorded is punched out when the limit starts (it would take room, counting for nothing);
- the option on the command line: a bad size is a one-line usage error; full mode refuses an image over the limit;
  in fscache mode it is cachefilesd-py's; the snapshotter takes it for its mounts.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from cachefilesd_py.backends import make_backend
from cachefilesd_py.blob_handles import open_image
from cachefilesd_py.mount.cachefile import prepare_cache_files
from cachefilesd_py.mount.evict import CacheLimit, LruPolicy
from cachefilesd_py.pipeline import BlobHandle, Pipeline
from tests.mount.test_fanotify_mount import Mounts, _kill_worker, _new_worker, build
from tests.support.cli import run

LIMIT = 32 << 20
CHUNK = 1 << 20
PREFIX = 4096  # the blob's zero block: chunk i of a one-file blob is at PREFIX + i * CHUNK
WORKERS = 4
NFILES, FILE_SIZE = 25, 4 << 20  # 100 MiB: three times the limit


@pytest.fixture(scope="module")
def big_image(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, dict[str, str]]]:
    """A 100 MiB image of random files (uncompressed: the build stays a few seconds), and their sha256."""
    tmp = tmp_path_factory.mktemp("big")
    src = tmp / "src"
    src.mkdir()
    rnd = random.Random(15)
    digests = {}
    for i in range(NFILES):
        data = rnd.randbytes(FILE_SIZE)
        (src / f"f{i:02d}.bin").write_bytes(data)
        digests[f"f{i:02d}.bin"] = hashlib.sha256(data).hexdigest()
    build([src], tmp / "out", "none", "1MiB")
    yield tmp / "out", digests


def _allocated(cache: Path) -> int:
    return sum(p.stat().st_blocks * 512 for p in cache.iterdir() if p.is_file())


def _sha_uncached(path: Path) -> str:
    """sha256 of the file as the mount reads it now: its page cache dropped first, so the read reaches the
    cache files (and whatever eviction did to them)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        h = hashlib.sha256()
        while chunk := os.read(fd, 1 << 20):
            h.update(chunk)
        return h.hexdigest()
    finally:
        os.close(fd)


@pytest.mark.root
@pytest.mark.kernel("erofs", "fanotify")
def test_a_100mib_image_reads_right_under_a_32mib_cache_limit(big_image: tuple[Path, dict[str, str]],
                                                               mounts: Mounts, tmp_path: Path) -> None:  # fmt: skip
    out, digests = big_image
    cache = tmp_path / "cache"
    mp, rec = mounts.mount(out, "limit", cache=cache, cache_size_limit=LIMIT, workers=WORKERS, prefetch=False)
    done = threading.Event()
    peak = [0]

    def sample() -> None:  # the cache dir's allocated bytes, every 5 ms while the reads go on
        while not done.wait(0.005):
            peak[0] = max(peak[0], _allocated(cache))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    held_name = "f00.bin"
    held = os.open(mp / held_name, os.O_RDONLY)  # open across every eviction below, re-read after each batch
    held_reads = []
    try:
        names = sorted(digests)
        with ThreadPoolExecutor(4) as pool:
            for batch in range(0, len(names), 5):  # 20 MiB a batch
                part = names[batch : batch + 5]
                got = dict(zip(part, pool.map(lambda n: _sha_uncached(mp / n), part), strict=True))
                for name, digest in got.items():
                    assert digest == digests[name], f"{name} read wrong under eviction"
                os.posix_fadvise(held, 0, 0, os.POSIX_FADV_DONTNEED)
                h = hashlib.sha256(os.pread(held, FILE_SIZE, 0))
                held_reads.append(h.hexdigest() == digests[held_name])
    finally:
        os.close(held)
        done.set()
        sampler.join()
    assert all(held_reads) and len(held_reads) == NFILES // 5, f"the open file read wrong after eviction: {held_reads}"
    overhead = 64 << 10  # the chunk map
    assert peak[0] <= LIMIT + WORKERS * CHUNK + overhead, f"cache took {peak[0]} bytes, limit {LIMIT}"
    assert peak[0] >= LIMIT // 2, f"the sampler saw the cache at {peak[0]} bytes at most: did it run?"
    stats = mounts.umount(mp)["stats"]
    limit = stats["cache_limit"]
    assert limit["limit"] == LIMIT and limit["used"] <= LIMIT
    # 100 MiB read through a 32 MiB cache: at least the difference was evicted
    assert limit["evictions"] > 0 and limit["bytes_evicted"] >= NFILES * FILE_SIZE - LIMIT, limit
    assert stats["pipeline"]["digest_failures"] == 0
    assert _allocated(cache) <= LIMIT + overhead
    print(f"peak {peak[0] / 2**20:.1f} MiB, {limit}")


@pytest.mark.root
@pytest.mark.kernel("erofs", "fanotify")
def test_the_limit_holds_across_a_worker_restart(big_image: tuple[Path, dict[str, str]], mounts: Mounts,
                                                 tmp_path: Path) -> None:  # fmt: skip
    out, digests = big_image
    cache = tmp_path / "cache"
    mp, rec = mounts.mount(out, "restart", cache=cache, cache_size_limit=LIMIT, workers=WORKERS, prefetch=False)
    names = sorted(digests)
    for name in names[:15]:  # 60 MiB written, some of it never recorded when the worker dies
        assert _sha_uncached(mp / name) == digests[name], name
    _new_worker(mp, _kill_worker(rec))
    for name in [*names[15:], *names[:5]]:
        assert _sha_uncached(mp / name) == digests[name], name
    assert _allocated(cache) <= LIMIT + WORKERS * CHUNK + (64 << 10)
    assert mounts.umount(mp)["stats"]["cache_limit"]["evictions"] > 0


def test_lru_policy_evicts_the_least_recently_used_never_a_pinned_or_young_chunk() -> None:
    now = [100.0]
    p = LruPolicy(4, grace=1.0, clock=lambda: now[0])
    for key in "abcd":
        p.add(key, 1)
    assert p.used == 4 and p.choose(0) == ([], True)
    assert p.choose(1) == ([], False), "everything was written within the grace"
    now[0] += 5
    p.touch("a")  # read again: the most recently used now
    assert p.choose(1) == ([("b", 1)], True)
    p.pin("b")
    assert p.choose(2) == ([("c", 1), ("d", 1)], True), "a pinned chunk is skipped"
    p.take([("c", 1)])
    assert p.evicting("c") and p.used == 3 and p.punching == 1 and not p.room(1), "a chunk being punched counts"
    p.done([("c", 1)])
    assert p.room(1) and p.evictions == 1 and p.bytes_evicted == 1
    p.unpin("b")
    p.add("e", 1)
    assert p.choose(1) == ([("b", 1)], True), "least recently used first: b, then d; a was read, e is young"
    assert p.ripe_in() == 0.0
    p.discard("b")  # its write failed
    p.discard("d")
    assert p.used == 2 and p.ripe_in() == 1.0  # a: read at 105, now 105
    warm = LruPolicy(2, grace=1.0, clock=lambda: now[0])
    warm.add("x", 1)
    warm.add("old", 2, cold=True)  # found in the cache at start: the first to go, grace or not
    assert warm.choose(0) == ([("old", 2)], True)


@contextlib.contextmanager
def _one_blob(tmp_path: Path, seed: int, chunks: int) -> Iterator[tuple[bytes, BlobHandle]]:
    """A one-file image of ``chunks`` random 1 MiB chunks: its data and its blob's handle (localfs)."""
    src = tmp_path / "src"
    src.mkdir()
    data = random.Random(seed).randbytes(chunks * CHUNK)
    (src / "f.bin").write_bytes(data)
    out = tmp_path / "out"
    build([src], out, "none", "1MiB")
    backend = make_backend("localfs", dir=out / "blobs")
    try:
        (handle,) = open_image(out / "image.boot", backend)
        yield data, handle
    finally:
        backend.close()


def test_eviction_forgets_the_chunk_in_both_maps_and_punches_it(tmp_path: Path) -> None:
    with _one_blob(tmp_path, 7, 8) as (data, handle):
        (cf,) = prepare_cache_files(tmp_path / "cache", [handle])
        limit = CacheLimit([cf], 3 * CHUNK, grace=0.0)
        with Pipeline(amplify=0, workers=1) as pipeline:

            def fill(i: int) -> None:
                pipeline.fill(handle, PREFIX + i * CHUNK, CHUNK, limit.writer(cf, cf.pwrite), cf.present)

            def cached() -> list[int]:
                return [i for i in range(8) if cf.known(PREFIX + i * CHUNK, CHUNK)]

            for i in range(3):
                fill(i)
            cf.flush()  # chunks 0-2 recorded on disk
            assert cached() == [0, 1, 2] and limit.evictions == 0
            with limit.pinned(cf, PREFIX, CHUNK):  # a fill serving chunk 0: it stays, 1 and 2 go
                fill(3)
                fill(4)
                assert cached() == [0, 3, 4]
            assert not cf.chunks.has(1) and not cf.chunks.persisted(1) and cf.chunks.persisted(0)
            assert all(off + n <= PREFIX + CHUNK or off >= PREFIX + 3 * CHUNK for off, n in cf.data_extents()), \
                "1 and 2 are holes"  # fmt: skip
            fill(5)  # 0 was touched when its fill ended: 3 is the least recently used now
            assert cached() == [0, 4, 5] and limit.evictions == 3 and limit.bytes_evicted == 3 * CHUNK
            assert limit.used == 3 * CHUNK and limit.allocated() <= 3 * CHUNK + 4096
            for i in cached():
                assert os.pread(cf.fd, CHUNK, PREFIX + i * CHUNK) == data[i * CHUNK : (i + 1) * CHUNK]
        cf.close()
        (cf,) = prepare_cache_files(tmp_path / "cache", [handle])  # what a restart finds
        try:
            assert [i for i in range(8) if cf.chunks.has(i)] == [0, 4, 5]
        finally:
            cf.close()


def test_data_written_but_never_recorded_is_punched_out_under_a_limit(tmp_path: Path) -> None:
    with _one_blob(tmp_path, 8, 4) as (data, handle):
        (cf,) = prepare_cache_files(tmp_path / "cache", [handle])
        with Pipeline(amplify=0, workers=1) as pipeline:
            pipeline.fill(handle, PREFIX, CHUNK, cf.pwrite, cf.present)
        cf.close()  # chunk 0 recorded
        fd = os.open(cf.path, os.O_RDWR)
        try:  # a daemon killed before it recorded chunks 2 and 3
            os.pwrite(fd, data[2 * CHUNK :], PREFIX + 2 * CHUNK)
        finally:
            os.close(fd)
        (cf,) = prepare_cache_files(tmp_path / "cache", [handle])
        try:
            assert os.fstat(cf.fd).st_blocks * 512 >= 3 * CHUNK
            limit = CacheLimit([cf], 8 * CHUNK)
            assert cf.data_extents() == [(PREFIX, CHUNK)] and limit.used == CHUNK
            assert os.fstat(cf.fd).st_blocks * 512 <= CHUNK + 4096
        finally:
            cf.close()


def test_cache_size_limit_on_the_command_line(big_image: tuple[Path, dict[str, str]], tmp_path: Path) -> None:
    out, _ = big_image
    mp = tmp_path / "mnt"
    mp.mkdir()
    proc = run("mount", out / "image.boot", mp, "--cache-dir", tmp_path / "c", "--cache-size-limit", "32QiB")
    assert proc.returncode == 2 and "--cache-size-limit" in proc.stderr and "Traceback" not in proc.stderr
    full = ["--mode", "full", "--cache-size-limit", "32MiB"]
    proc = run("mount", out / "image.boot", mp, "--cache-dir", tmp_path / "c", *full)
    assert proc.returncode == 2, proc.stderr
    assert "full mode keeps the whole image (100.0 MiB) in the cache" in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and not os.path.ismount(mp)
    proc = run("mount", out / "image.boot", mp, "--mode", "fscache", "--cache-size-limit", "32MiB")
    assert proc.returncode == 2 and "cachefilesd-py's in fscache mode" in proc.stderr, proc.stderr
    proc = run("snapshotter", "--address", tmp_path / "sn.sock", "--root", tmp_path / "sn",
               "--cache-size-limit", "lots")  # fmt: skip
    assert proc.returncode == 2 and "--cache-size-limit" in proc.stderr and "Traceback" not in proc.stderr

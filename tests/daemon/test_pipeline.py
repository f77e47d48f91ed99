"""cachefilesd_py.pipeline: fetch → verify → decompress → write over builder images and a real localfs backend."""

from __future__ import annotations

import json
import random
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from cachefilesd_py.backends import make_backend
from cachefilesd_py.blob_handles import open_image
from cachefilesd_py.pipeline import PAGE_SIZE, BlobHandle, Pipeline
from erofs.errors import BackendError, DigestMismatchError
from erofs.reader.backend import LocalBlobDir
from erofs.reader.bootstrap import Bootstrap
from tests.support.cli import run

CHUNK = 64 * 1024
TIMEOUT = 30.0


def _tree(root: Path) -> Path:
    rnd = random.Random(7)
    root.mkdir()
    (root / "small.txt").write_bytes(b"small file\n")
    (root / "random.bin").write_bytes(rnd.randbytes(5 * CHUNK + 1234))
    (root / "text.txt").write_bytes(b"".join(b"line %d of some text\n" % i for i in range(40_000)))
    (root / "mixed.bin").write_bytes(b"".join(rnd.randbytes(3000) + bytes(20_000) for _ in range(12)))
    (root / "exact.bin").write_bytes(rnd.randbytes(2 * CHUNK))
    return root


def build_image(src: Path, out: Path, compressor: str, chunk_size: str = "64KiB") -> dict:
    proc = run("build", src, "--output-dir", out, "--json", "--compressor", compressor, "--chunk-size", chunk_size)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _tree(tmp_path_factory.mktemp("pipeline") / "src")


@pytest.fixture(scope="module", params=["none", "lz4_block", "zstd"])
def image(request: pytest.FixtureRequest, source: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp(f"img-{request.param}")
    build_image(source, out, request.param)
    return out


@pytest.fixture
def backend(image: Path) -> Iterator[LocalBlobDir]:
    b = make_backend("localfs", dir=image / "blobs")
    assert isinstance(b, LocalBlobDir)
    try:
        yield b
    finally:
        b.close()


class Dest:
    """A cache file in memory: records every write."""

    def __init__(self, size: int) -> None:
        self.buf = bytearray(size)
        self.writes: list[tuple[int, int]] = []
        self.filled: set[int] = set()
        self.lock = threading.Lock()

    def write(self, off: int, data: memoryview) -> None:
        assert off % PAGE_SIZE == 0 and data.nbytes % PAGE_SIZE == 0, (off, data.nbytes)
        with self.lock:
            self.buf[off : off + data.nbytes] = data
            self.writes.append((off, data.nbytes))
            self.filled.add(off)

    def present(self, d_off: int, d_size: int) -> bool:
        with self.lock:
            return d_off in self.filled


def _expected_layout(image: Path, source: Path) -> list[tuple[int, bytes]]:
    """(uncompressed blob offset, bytes) of every file chunk, from the bootstrap and the source tree."""
    out = []
    with Bootstrap(image / "image.boot") as bs:
        for path, _, ino in bs.walk():
            if not ino.is_reg:
                continue
            rel = path.decode().lstrip("/") if isinstance(path, bytes) else str(path).lstrip("/")
            data = (source / rel).read_bytes()
            for fc in bs.file_chunks(ino):
                if fc.blob_offset is not None and fc.blob_index >= 0:
                    out.append((fc.blob_offset, data[fc.file_offset : fc.file_offset + fc.length]))
    return out


def test_open_image_handles(image: Path, backend: LocalBlobDir) -> None:
    handles = open_image(image / "image.boot", backend)
    assert len(handles) == 1
    h = handles[0]
    assert (image / "blobs" / h.blob_id).is_file()
    assert h.uncompressed_size % PAGE_SIZE == 0 and h.meta.chunk_count > 10


def test_fill_whole_blob_matches_source(image: Path, source: Path, backend: LocalBlobDir) -> None:
    (h,) = open_image(image / "image.boot", backend)
    dest = Dest(h.uncompressed_size)
    backend.stats.reset()
    with Pipeline() as p:
        n = p.fill(h, 0, h.uncompressed_size, dest.write)
        assert n == sum(size for _, size in dest.writes)
        snap = p.stats.snapshot()
    assert snap["chunks_written"] == h.meta.chunk_count == snap["chunks_fetched"]
    assert snap["digest_failures"] == 0
    for off, data in _expected_layout(image, source):
        assert dest.buf[off : off + len(data)] == data
    # one ranged read per contiguous span: far fewer backend requests than chunks
    assert backend.stats.requests <= -(-h.meta.size // (32 << 20)) + 1


def _chunks_by_d_off(h: BlobHandle) -> list[tuple[int, int, int]]:
    """(d_off, d_size, ci) of every chunk, in uncompressed order."""
    return sorted((h.meta.chunk(ci)[2], h.meta.chunk(ci)[3], ci) for ci in range(h.meta.chunk_count))


def test_ranges_at_chunk_edges(image: Path, backend: LocalBlobDir) -> None:
    (h,) = open_image(image / "image.boot", backend)
    chunks = _chunks_by_d_off(h)
    (a_off, a_size, _), (b_off, b_size, _) = chunks[3], chunks[4]
    with Pipeline(amplify=0) as p:
        # the last byte of one chunk and the first of the next: both chunks, whole
        dest = Dest(h.uncompressed_size)
        p.fill(h, b_off - 1, 2, dest.write)
        assert sorted(dest.writes) == [(a_off, -(-a_size // PAGE_SIZE) * PAGE_SIZE),
                                       (b_off, -(-b_size // PAGE_SIZE) * PAGE_SIZE)]  # fmt: skip
        # exactly one chunk
        dest = Dest(h.uncompressed_size)
        p.fill(h, b_off, b_size, dest.write)
        assert [w[0] for w in dest.writes] == [b_off]
        # one byte in the middle of a chunk
        dest = Dest(h.uncompressed_size)
        p.fill(h, a_off + a_size // 2, 1, dest.write)
        assert [w[0] for w in dest.writes] == [a_off]
        # nothing, and past the end
        dest = Dest(h.uncompressed_size)
        assert p.fill(h, 0, 0, dest.write) == 0
        assert p.fill(h, h.uncompressed_size + PAGE_SIZE, 4096, dest.write) == 0
        assert dest.writes == []


def test_amplification_bound(image: Path, backend: LocalBlobDir) -> None:
    (h,) = open_image(image / "image.boot", backend)
    chunks = _chunks_by_d_off(h)
    start = 2
    amplify = 4 * CHUNK
    with Pipeline(amplify=amplify) as p:
        dest = Dest(h.uncompressed_size)
        p.fill(h, chunks[start][0], 10, dest.write)
        offs = [w[0] for w in dest.writes]
        assert offs[0] == chunks[start][0]
        # the following chunks in uncompressed order, as many as fit in `amplify` bytes
        total, want = 0, []
        for d_off, d_size, _ in chunks[start:]:
            if total + d_size > amplify:
                break
            want.append(d_off)
            total += d_size
        assert sorted(offs) == want and len(want) >= 3
        assert sum(d_size for d_off, d_size, _ in chunks if d_off in want) <= amplify
        assert p.stats.chunks_amplified == len(want) - 1
        # a requested range larger than `amplify` is still fetched whole, with no extra chunk
        dest = Dest(h.uncompressed_size)
        big_end = chunks[start + 6][0] + 1
        p.fill(h, chunks[start][0], big_end - chunks[start][0], dest.write)
        assert sorted(w[0] for w in dest.writes) == [c[0] for c in chunks[start : start + 7]]


def test_present_chunks_are_skipped(image: Path, backend: LocalBlobDir) -> None:
    (h,) = open_image(image / "image.boot", backend)
    chunks = _chunks_by_d_off(h)
    dest = Dest(h.uncompressed_size)
    for d_off, _, _ in chunks[::2]:
        dest.filled.add(d_off)
    backend.stats.reset()
    with Pipeline(amplify=0) as p:
        p.fill(h, 0, h.uncompressed_size, dest.write, dest.present)
        assert sorted(w[0] for w in dest.writes) == [c[0] for c in chunks[1::2]]
        assert p.stats.chunks_present == len(chunks[::2])
        # gaps up to plan_reads' MAX_READ_GAP are read over rather than split into two requests
        assert p.stats.chunks_fetched == len(chunks[1::2])
        assert backend.stats.bytes < sum(h.meta.chunk(ci)[1] for _, _, ci in chunks)
        # everything present now: a second fill fetches and writes nothing
        backend.stats.reset()
        assert p.fill(h, 0, h.uncompressed_size, dest.write, dest.present) == 0
        assert backend.stats.requests == 0


class GatedBackend(LocalBlobDir):
    """A localfs backend whose reads wait for ``go`` (to hold a fetch in flight while others pile up)."""

    def __init__(self, *args: object, **kw: object) -> None:
        super().__init__(*args, **kw)  # type: ignore[arg-type]
        self.entered = threading.Event()
        self.go = threading.Event()
        self.go.set()  # open until a test closes it

    def read(self, blob_id: str, offset: int, length: int) -> bytes:
        self.entered.set()
        assert self.go.wait(TIMEOUT), "gate never opened"
        return super().read(blob_id, offset, length)

    def read_into(self, blob_id: str, offset: int, buf: memoryview) -> None:  # the pipeline's read
        self.entered.set()
        assert self.go.wait(TIMEOUT), "gate never opened"
        super().read_into(blob_id, offset, buf)


@pytest.mark.parametrize("with_present", [True, False])
def test_concurrent_fills_fetch_each_chunk_once(image: Path, with_present: bool) -> None:
    backend = GatedBackend(image / "blobs")
    try:
        (h,) = open_image(image / "image.boot", backend)
        chunks = _chunks_by_d_off(h)
        lo, hi = chunks[1][0], chunks[4][0] + 1
        readers = 5
        dests = [Dest(h.uncompressed_size) for _ in range(readers)]
        shared = Dest(h.uncompressed_size)
        backend.stats.reset()
        backend.go.clear()
        backend.entered.clear()
        errors: list[BaseException] = []
        with Pipeline(amplify=0) as p:

            def run(i: int) -> None:
                try:
                    d = shared if with_present else dests[i]
                    p.fill(h, lo, hi - lo, d.write, d.present if with_present else None)
                except BaseException as e:  # noqa: BLE001
                    errors.append(e)

            first = threading.Thread(target=run, args=(0,))
            first.start()
            assert backend.entered.wait(TIMEOUT)
            others = [threading.Thread(target=run, args=(i,)) for i in range(1, readers)]
            for t in others:
                t.start()
            assert p.stats.wait_for(lambda s: s.dedup_hits == 4 * (readers - 1), TIMEOUT)
            backend.go.set()
            for t in [first, *others]:
                t.join(TIMEOUT)
                assert not t.is_alive()
            assert not errors, errors
            snap = p.stats.snapshot()
        assert snap["chunks_fetched"] == 4
        # one ranged read (compressed chunks of one file are contiguous)
        assert backend.stats.requests == 1
        want = bytes(shared.buf[lo:hi]) if with_present else bytes(dests[0].buf[lo:hi])
        if with_present:
            assert len(shared.writes) == 4  # written once, by the fill that fetched
        else:  # separate destinations: every fill ends with its range written
            for d in dests:
                assert bytes(d.buf[lo:hi]) == want and len(d.writes) == 4
        assert any(want)
    finally:
        backend.close()


def test_pieces_are_whole_chunks_covering_the_range(image: Path, backend: LocalBlobDir) -> None:
    (h,) = open_image(image / "image.boot", backend)
    chunks = _chunks_by_d_off(h)
    with Pipeline() as p:
        # a range starting and ending inside chunks, cut in pieces of at least 2 chunks' worth
        lo, hi = chunks[1][0] + 100, chunks[9][0] + 5
        pieces = p.pieces(h, lo, hi - lo, 2 * CHUNK)
        starts = {d_off for d_off, _, _ in chunks}
        ends = {d_off + d_size for d_off, d_size, _ in chunks}
        assert pieces[0][0] == chunks[1][0] and pieces[-1][0] + pieces[-1][1] == chunks[9][0] + chunks[9][1]
        for (a, n), (b, _) in zip(pieces, pieces[1:], strict=False):
            assert a + n <= b  # disjoint, in order: no chunk in two pieces
        for a, n in pieces:
            assert a in starts and a + n in ends
        assert all(n >= 2 * CHUNK for _, n in pieces[:-1])
        # every chunk meeting the range is in exactly one piece
        covered = [d_off for d_off, d_size, _ in chunks if any(a <= d_off < a + n for a, n in pieces)]
        assert covered == [d_off for d_off, d_size, _ in chunks if d_off < hi and d_off + d_size > lo]
        assert p.pieces(h, lo, 0, CHUNK) == []


class HeldBackend(LocalBlobDir):
    """A localfs backend that holds every read covering stored offset ``held`` until ``release`` is set."""

    def __init__(self, *args: object, **kw: object) -> None:
        super().__init__(*args, **kw)  # type: ignore[arg-type]
        self.held = -1
        self.entered = threading.Event()
        self.release = threading.Event()

    def read(self, blob_id: str, offset: int, length: int) -> bytes:
        if offset <= self.held < offset + length:
            self.entered.set()
            assert self.release.wait(TIMEOUT), "never released"
        return super().read(blob_id, offset, length)

    def read_into(self, blob_id: str, offset: int, buf: memoryview) -> None:  # the pipeline's read
        if offset <= self.held < offset + buf.nbytes:
            self.entered.set()
            assert self.release.wait(TIMEOUT), "never released"
        super().read_into(blob_id, offset, buf)


def test_fill_without_wait_leaves_inflight_chunks_to_their_owner(image: Path) -> None:
    backend = HeldBackend(image / "blobs")
    try:
        (h,) = open_image(image / "image.boot", backend)
        chunks = _chunks_by_d_off(h)
        (d2, _, ci2), (d3, _, _), (d4, s4, _) = chunks[2:5]
        backend.held = h.meta.chunk(ci2)[0]
        dest = Dest(h.uncompressed_size)
        with Pipeline(amplify=0) as p:
            owner = p.submit(h, d2, 1, dest.write, dest.present)  # holds chunk 2 in flight
            assert backend.entered.wait(TIMEOUT)
            # a readahead of chunks 2..4 fetches 3 and 4 and returns while chunk 2 is still in flight
            written = p.fill(h, d2, d4 + s4 - d2, dest.write, dest.present, wait=False)
            assert not owner.done()
            assert sorted(w[0] for w in dest.writes) == [d3, d4] and written == sum(n for _, n in dest.writes)
            assert p.stats.dedup_hits == 0
            backend.release.set()
            assert owner.result(TIMEOUT) > 0
        assert sorted(w[0] for w in dest.writes) == [d2, d3, d4] and p.stats.chunks_fetched == 3
    finally:
        backend.release.set()
        backend.close()


def _corrupt_chunk(image: Path, tmp_path: Path, pick: int) -> tuple[Path, int]:
    """Copy the image's blob dir with one byte of chunk ``pick`` (in uncompressed order) flipped."""
    blobs = tmp_path / "blobs"
    shutil.copytree(image / "blobs", blobs)
    b = make_backend("localfs", dir=blobs)
    try:
        (h,) = open_image(image / "image.boot", b)
        _, _, ci = _chunks_by_d_off(h)[pick]
        c_off, c_size, _, _ = h.meta.chunk(ci)
    finally:
        b.close()
    path = blobs / h.blob_id
    raw = bytearray(path.read_bytes())
    raw[c_off + c_size // 2] ^= 0x5A
    path.write_bytes(raw)
    return blobs, ci


def test_corrupted_chunk_is_not_written(image: Path, tmp_path: Path) -> None:
    blobs, bad = _corrupt_chunk(image, tmp_path, 5)
    backend = make_backend("localfs", dir=blobs)
    try:
        (h,) = open_image(image / "image.boot", backend)
        chunks = _chunks_by_d_off(h)
        lo, hi = chunks[4][0], chunks[6][0] + 1
        with Pipeline(amplify=0) as p:
            dest = Dest(h.uncompressed_size)
            with pytest.raises((DigestMismatchError, ValueError)) as info:  # zstd/lz4 may fail to decode first
                p.fill(h, lo, hi - lo, dest.write)
            assert "chunk" in str(info.value) and h.blob_id in str(info.value)
            # the neighbours were written, the damaged chunk never
            assert sorted(w[0] for w in dest.writes) == [chunks[4][0], chunks[6][0]]
            assert p.stats.digest_failures + p.stats.decode_failures == 1
            mine = p.stats.per_blob()[h.blob_id]  # the blob's own counters say the same
            assert mine.get("digest_failures", 0) + mine.get("decode_failures", 0) == 1 and mine["chunks_written"] == 2
            # the same chunk as an amplification extra: logged, not raised, not written
            dest = Dest(h.uncompressed_size)
            p.amplify = 3 * CHUNK
            p.fill(h, chunks[4][0], 1, dest.write)
            assert sorted(w[0] for w in dest.writes) == [chunks[4][0], chunks[6][0]]
    finally:
        backend.close()


def test_missing_blob_raises_backend_error(image: Path, tmp_path: Path) -> None:
    backend = make_backend("localfs", dir=image / "blobs")
    try:
        (h,) = open_image(image / "image.boot", backend)
    finally:
        backend.close()
    empty = tmp_path / "empty"
    empty.mkdir()
    h2 = BlobHandle(h.blob_id, h.meta, make_backend("localfs", dir=empty))
    dest = Dest(h.uncompressed_size)
    with Pipeline() as p:
        with pytest.raises(BackendError):
            p.fill(h2, 4096, 4096, dest.write)  # the first chunk (after the blob's zero prefix)
        assert dest.writes == [] and p.stats.fetch_failures >= 1
        # the failure did not leave the chunk claimed: a later fill with a good backend succeeds
        backend = make_backend("localfs", dir=image / "blobs")
        try:
            assert p.fill(BlobHandle(h.blob_id, h.meta, backend), 4096, 4096, dest.write) > 0
        finally:
            backend.close()


def test_submit_runs_on_workers(image: Path, backend: LocalBlobDir) -> None:
    (h,) = open_image(image / "image.boot", backend)
    dest = Dest(h.uncompressed_size)
    with Pipeline(workers=2) as p:
        futs = [p.submit(h, off, 4096, dest.write, dest.present) for off in range(0, h.uncompressed_size, 3 * CHUNK)]
        assert sum(f.result(TIMEOUT) for f in futs) > 0
    with pytest.raises(RuntimeError):
        p.fill(h, 0, 1, dest.write)

"""The prefetch planner and runner (:mod:`cachefilesd_py.prefetch`) over a real image and the localfs backend:
table order, directories expanded, pieces merged up to the merge size, only the listed files' chunks written
(each verified through the pipeline), the bandwidth cap, and stop."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from cachefilesd_py.backends import make_backend
from cachefilesd_py.blob_handles import open_image
from cachefilesd_py.pipeline import BlobHandle, Pipeline
from cachefilesd_py.prefetch import Prefetcher, PrefetchTarget, plan_prefetch
from erofs.reader import Bootstrap
from tests.support.cli import run

CHUNK = 64 << 10
SIZES = {"/z/first": 200_000, "/a/lib/one": 70_000, "/a/lib/two": 130_000, "/b/unlisted": 150_000}


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("plan")
    for path, size in SIZES.items():
        (root / "src" / path[1:]).parent.mkdir(parents=True, exist_ok=True)
        (root / "src" / path[1:]).write_bytes(os.urandom(size))
    r = run("build", root / "src", "-o", root / "out", "--chunk-size", "64KiB", "--prefetch-list", "-",
            input="/z/first\n/a/lib\n", timeout=60)  # fmt: skip
    assert r.returncode == 0, r.stderr
    return root / "out"


class Dest:
    """A blob's destination in memory: what the pipeline wrote, by offset."""

    def __init__(self, handle: BlobHandle) -> None:
        self.handle = handle
        self.data = bytearray(handle.uncompressed_size)
        self.have: set[int] = set()

    def write(self, d_off: int, data: memoryview) -> None:
        self.data[d_off : d_off + data.nbytes] = data
        self.have.add(d_off)

    def present(self, d_off: int, d_size: int) -> bool:
        return d_off in self.have

    def target(self) -> PrefetchTarget:
        return PrefetchTarget(self.handle, self.write, self.present)


@pytest.fixture
def parts(image: Path) -> Iterator[tuple[Bootstrap, dict[str, Dest], Pipeline]]:
    backend = make_backend("localfs", dir=str(image / "blobs"))
    bs = Bootstrap(image / "image.boot")
    pipeline = Pipeline(amplify=0, workers=2)
    try:
        yield bs, {h.blob_id: Dest(h) for h in open_image(image / "image.boot", backend)}, pipeline
    finally:
        pipeline.close()
        bs.close()
        backend.close()


def _chunk_offsets(bs: Bootstrap, path: str) -> set[int]:
    return {c.blob_offset for c in bs.file_chunks(bs.lookup(path)) if c.blob_offset is not None}


def test_plan_is_table_order_directories_expanded_pieces_merged(parts: tuple[Bootstrap, dict[str, Dest], Pipeline]
                                                                ) -> None:  # fmt: skip
    bs, dests, pipeline = parts
    handles = {k: d.handle for k, d in dests.items()}
    items, nfiles = plan_prefetch(bs, handles, pipeline, merge=1 << 20)
    assert nfiles == 3
    # one piece a file (its chunks are contiguous), /z/first before the files under /a/lib, as the table says
    firsts = [min(_chunk_offsets(bs, p)) for p in ("/z/first", "/a/lib/one", "/a/lib/two")]
    assert [(i.offset, i.file, i.last) for i in items] == [(firsts[0], 0, True), (firsts[1], 1, True),
                                                            (firsts[2], 2, True)]  # fmt: skip
    assert [i.length for i in items] == [SIZES["/z/first"], SIZES["/a/lib/one"], SIZES["/a/lib/two"]]
    small, _ = plan_prefetch(bs, handles, pipeline, merge=CHUNK)  # at most one 64 KiB chunk a piece
    assert len(small) == 4 + 2 + 2 and all(i.length <= CHUNK for i in small)
    everything, _ = plan_prefetch(bs, handles, pipeline, merge=1 << 20, everything=True)
    assert everything[:3] == items and all(i.file == -1 for i in everything[3:])


def test_prefetch_writes_the_listed_files_verified_and_nothing_else(parts: tuple[Bootstrap, dict[str, Dest],
                                                                                 Pipeline]) -> None:  # fmt: skip
    bs, dests, pipeline = parts
    items, nfiles = plan_prefetch(bs, {k: d.handle for k, d in dests.items()}, pipeline, merge=CHUNK)
    seen: list[dict] = []
    p = Prefetcher(items, nfiles, {k: d.target() for k, d in dests.items()}, pipeline, on_progress=seen.append)
    p.start()
    assert p.wait(60)
    stats = p.stats()
    assert (stats["state"], stats["files_done"], stats["errors"]) == ("done", 3, 0)
    (dest,) = dests.values()
    listed = set().union(*(_chunk_offsets(bs, f) for f in ("/z/first", "/a/lib/one", "/a/lib/two")))
    assert dest.have == listed and not dest.have & _chunk_offsets(bs, "/b/unlisted")
    src = image_src(bs)
    for path in ("/z/first", "/a/lib/one", "/a/lib/two"):
        got = b"".join(bytes(dest.data[c.blob_offset : c.blob_offset + c.length])
                       for c in bs.file_chunks(bs.lookup(path)) if c.blob_offset is not None)  # fmt: skip
        assert got == src[path]
    assert seen[-1]["state"] == "done"


def image_src(bs: Bootstrap) -> dict[str, bytes]:
    root = Path(bs.path).parent.parent / "src"
    return {p: (root / p[1:]).read_bytes() for p in SIZES}


def test_bandwidth_cap_and_stop(parts: tuple[Bootstrap, dict[str, Dest], Pipeline]) -> None:
    bs, dests, pipeline = parts
    items, nfiles = plan_prefetch(bs, {k: d.handle for k, d in dests.items()}, pipeline, merge=CHUNK)
    rate = 1 << 20  # 1 MiB/s: the 400 KB of the table take at least 0.38 s
    p = Prefetcher(items, nfiles, {k: d.target() for k, d in dests.items()}, pipeline, bandwidth=rate)
    p.start()
    assert p.wait(60)
    stats = p.stats()
    assert stats["state"] == "done" and stats["seconds"] >= stats["bytes_fetched"] / rate
    # at 1 byte/s the first piece is followed by a wait that only stop() ends
    slow = Prefetcher(items, nfiles, {k: Dest(d.handle).target() for k, d in dests.items()}, pipeline, bandwidth=1)
    slow.start()
    slow.stop()
    stats = slow.stats()
    assert stats["state"] == "stopped" and stats["pieces_done"] < stats["pieces"]

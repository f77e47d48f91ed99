"""The chunk map beside a cache file: what it records survives a restart only once flushed after an fdatasync;
a due flush waits for the writes to pause, but never past its bounds; a map that is not the blob's (another key,
another chunk count, damage) starts afresh."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from cachefilesd_py.mount import chunkmap
from cachefilesd_py.mount.chunkmap import HEADER_SIZE, ChunkMap

KEY = bytes(range(32))


def _data(tmp_path: Path) -> int:
    return os.open(tmp_path / "cache", os.O_RDWR | os.O_CREAT, 0o600)


def test_marks_count_after_a_restart_only_once_flushed(tmp_path: Path) -> None:
    fd = _data(tmp_path)
    try:
        m = ChunkMap(tmp_path / "cache.map", KEY, 10)
        assert m.fresh and m.count() == 0
        m.mark(3, 4096)
        m.mark(4, 4096)
        assert m.has(3) and not m.persisted(3)  # in memory only: a daemon dying now forgets it
        m.close()  # no data fd: nothing made durable, nothing recorded
        again = ChunkMap(tmp_path / "cache.map", KEY, 10)
        assert not again.fresh and again.count() == 0
        again.mark(3, 4096)
        assert again.flush(fd) == []
        assert again.persisted(3)
        again.unmark(3)  # a chunk found gone is forgotten on disk at once
        assert not again.persisted(3)
        again.mark(7, 4096)
        again.close(fd)
        assert ChunkMap(tmp_path / "cache.map", KEY, 10).marks == bytearray(b"\0" * 7 + b"\1" + b"\0" * 2)
    finally:
        os.close(fd)


def test_a_due_flush_waits_for_a_pause_only_within_its_bounds(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(chunkmap, "FLUSH_QUIET", 3600.0)  # the writes never pause here
    monkeypatch.setattr(chunkmap, "FLUSH_MAX_DELAY", 3600.0)
    monkeypatch.setattr(chunkmap, "FLUSH_MAX_BYTES", 3 * 4096)
    for hurried in (False, True):
        m = ChunkMap(tmp_path / "cache.map", KEY, 10)
        try:
            m.mark(0, 4096)
            waiter = threading.Thread(target=m.await_flush)
            waiter.start()
            m.mark(1, 4096)
            assert waiter.is_alive()  # a burst of writes under the byte bound: the flush waits
            if hurried:
                m.hurry()  # closing: the flush runs now
            else:
                m.mark(2, 4096)  # the bound: the flush runs, burst or not
            waiter.join(timeout=60)
            assert not waiter.is_alive()
        finally:
            m.close()


@pytest.mark.parametrize("change", ["key", "count", "magic"])
def test_a_map_that_is_not_the_blobs_starts_afresh_or_is_refused(tmp_path: Path, change: str) -> None:
    fd = _data(tmp_path)
    try:
        m = ChunkMap(tmp_path / "cache.map", KEY, 10)
        m.mark(1, 4096)
        m.close(fd)
    finally:
        os.close(fd)
    key, count = (bytes(32), 10) if change == "key" else (KEY, 11) if change == "count" else (KEY, 10)
    if change == "magic":
        with open(tmp_path / "cache.map", "r+b") as f:
            f.write(b"XXXX")
    with pytest.raises(ValueError):  # another daemon serves the cache file: never reset under it
        ChunkMap(tmp_path / "cache.map", key, count, reset=False)
    fresh = ChunkMap(tmp_path / "cache.map", key, count)
    assert fresh.fresh and fresh.count() == 0
    assert (tmp_path / "cache.map").stat().st_size == HEADER_SIZE + count
    fresh.close()

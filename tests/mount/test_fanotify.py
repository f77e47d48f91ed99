"""fscache.fanotify against the running kernel: pre-content events on sparse files and file-backed EROFS."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from fscache.errors import CommandError, FscacheError, UnsupportedFilesystemError
from fscache.fanotify import (
    FAN_DENY,
    FAN_DENY_ERRNO,
    FAN_EVENT_INFO_TYPE_RANGE,
    FAN_PRE_ACCESS,
    FANOTIFY_METADATA_VERSION,
    FanotifyGroup,
    PreAccessEvent,
    find_holes,
    parse_events,
)
from tests.support.kmount import MS_RDONLY, mount, umount

TIMEOUT = 10.0


@pytest.fixture
def group() -> Iterator[FanotifyGroup]:
    g = FanotifyGroup()
    try:
        yield g
    finally:
        g.close()


def _sparse(path: Path, size: int) -> Path:
    with open(path, "wb") as f:
        f.truncate(size)
    return path


class Listener:
    """Serves a group from a thread; ``handler(group, event)`` must answer each event."""

    def __init__(self, group: FanotifyGroup, handler: Callable[[FanotifyGroup, PreAccessEvent], None]) -> None:
        self.group = group
        self.handler = handler
        self.events: list[PreAccessEvent] = []
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                if not self.group.poll(0.05):
                    continue
                for ev in self.group.read_events():
                    self.events.append(PreAccessEvent(ev.fd, ev.pid, ev.mask, ev.offset, ev.count))
                    self.handler(self.group, ev)
        except BaseException as e:  # reported by stop()
            self.error = e

    def __enter__(self) -> Listener:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(TIMEOUT)
        assert not self._thread.is_alive(), "listener thread did not stop"
        if self.error is not None:
            raise self.error


def _in_thread(fn: Callable[[], bytes]) -> Callable[[], bytes]:
    """Run ``fn`` in a thread now; the returned callable joins and returns its result or raises its error."""
    box: dict[str, object] = {}

    def run() -> None:
        try:
            box["value"] = fn()
        except BaseException as e:
            box["error"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()

    def result() -> bytes:
        t.join(TIMEOUT)
        assert not t.is_alive(), "reader still blocked"
        if "error" in box:
            raise box["error"]  # type: ignore[misc]
        return box["value"]  # type: ignore[return-value]

    return result


def _pread(path: Path, length: int, offset: int) -> bytes:
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.pread(fd, length, offset)
    finally:
        os.close(fd)


def _pattern(size: int) -> bytes:
    """Deterministic bytes whose period (251) is not a divisor of the page size."""
    return (bytes(range(251)) * (size // 251 + 1))[:size]


# --- pure parsing -------------------------------------------------------------------------------------------


def test_constants_match_uapi() -> None:
    assert FAN_PRE_ACCESS == 0x00100000
    assert FAN_EVENT_INFO_TYPE_RANGE == 6
    assert FAN_DENY_ERRNO(errno.EIO) == FAN_DENY | (5 << 24) == 0x05000002


def _meta(event_len: int, mask: int, fd: int, pid: int) -> bytes:
    hdr = event_len.to_bytes(4, "little") + bytes([FANOTIFY_METADATA_VERSION, 0]) + (24).to_bytes(2, "little")
    return hdr + mask.to_bytes(8, "little") + fd.to_bytes(4, "little", signed=True) + pid.to_bytes(4, "little")


@pytest.mark.skipif(sys.byteorder != "little", reason="hand-built little-endian buffer")
def test_parse_events_with_and_without_range() -> None:
    rng = bytes([FAN_EVENT_INFO_TYPE_RANGE, 0]) + (24).to_bytes(2, "little") + bytes(4)
    rng += (8192).to_bytes(8, "little") + (4096).to_bytes(8, "little")
    buf = _meta(48, FAN_PRE_ACCESS, 7, 42) + rng + _meta(24, FAN_PRE_ACCESS, 8, 43)
    a, b = parse_events(buf)
    assert (a.fd, a.pid, a.mask, a.offset, a.count, a.end) == (7, 42, FAN_PRE_ACCESS, 8192, 4096, 12288)
    assert (b.fd, b.pid, b.offset, b.count, b.end) == (8, 43, None, None, None)
    with pytest.raises(FscacheError):
        parse_events(buf[:30])


# --- real kernel: sparse files ------------------------------------------------------------------------------


def _fill_from(source: bytes) -> Callable[[FanotifyGroup, PreAccessEvent], None]:
    def handler(group: FanotifyGroup, ev: PreAccessEvent) -> None:
        if ev.offset is not None and ev.count:
            ev.write(ev.offset, source[ev.offset : ev.offset + ev.count])
        group.allow(ev)

    return handler


@pytest.mark.kernel("fanotify")
def test_fill_then_allow(group: FanotifyGroup, tmp_path: Path) -> None:
    size = 256 * 1024
    source = _pattern(size)
    path = _sparse(tmp_path / "blob", size)
    group.mark(path)
    with Listener(group, _fill_from(source)) as lis:
        data = _in_thread(lambda: _pread(path, 1000, 70_000))()
    assert data == source[70_000:71_000]
    assert lis.events, "no pre-content event for a read of a marked file"
    ev = lis.events[0]
    assert ev.mask & FAN_PRE_ACCESS and ev.pid == os.getpid()
    assert ev.offset is not None and ev.end is not None
    assert ev.offset <= 70_000 and ev.end >= 71_000


@pytest.mark.kernel("fanotify")
def test_deny_with_eio(group: FanotifyGroup, tmp_path: Path) -> None:
    path = _sparse(tmp_path / "blob", 64 * 1024)
    group.mark(path)
    with Listener(group, lambda g, ev: g.deny(ev, errno.EIO)) as lis:
        result = _in_thread(lambda: _pread(path, 100, 0))
        with pytest.raises(OSError) as info:
            result()
    assert info.value.errno == errno.EIO
    assert len(lis.events) == 1


@pytest.mark.kernel("fanotify")
def test_deny_with_refused_errno_falls_back_to_eperm(group: FanotifyGroup, tmp_path: Path) -> None:
    path = _sparse(tmp_path / "blob", 8192)
    group.mark(path)
    with Listener(group, lambda g, ev: g.deny(ev, errno.ENOENT)):  # not an errno the kernel passes on
        result = _in_thread(lambda: _pread(path, 100, 0))
        with pytest.raises(PermissionError):
            result()


@pytest.mark.kernel("fanotify")
def test_mark_directory_is_refused(group: FanotifyGroup, tmp_path: Path) -> None:
    try:
        group.mark(tmp_path)
    except CommandError as e:
        assert "not a regular file" in str(e)
    else:  # some kernels accept pre-content marks on directories
        group.unmark(tmp_path)


@pytest.mark.kernel("fanotify")
def test_unmarked_file_raises_no_event(group: FanotifyGroup, tmp_path: Path) -> None:
    marked = _sparse(tmp_path / "marked", 8192)
    other = tmp_path / "other"
    other.write_bytes(b"plain" * 100)
    group.mark(marked)
    assert _pread(other, 5, 0) == b"plain"
    assert not group.poll(0.1)


def _fill_holes_from(source: bytes) -> Callable[[FanotifyGroup, PreAccessEvent], None]:
    def handler(group: FanotifyGroup, ev: PreAccessEvent) -> None:
        for off, length in ev.holes():
            ev.write(off, source[off : off + length])
        group.allow(ev)

    return handler


def test_find_holes(tmp_path: Path) -> None:
    path = _sparse(tmp_path / "f", 64 * 1024)
    fd = os.open(path, os.O_RDWR)
    try:
        assert find_holes(fd, 0, 65536) == [(0, 65536)]
        os.pwrite(fd, b"x" * 4096, 16384)
        assert find_holes(fd, 0, 65536) == [(0, 16384), (20480, 45056)]
        assert find_holes(fd, 16384, 4096) == []
        assert find_holes(fd, 60000, 100000) == [(60000, 5536)]
    finally:
        os.close(fd)


@pytest.mark.kernel("fanotify")
def test_writes_via_event_fd_or_premark_fd_raise_no_event(group: FanotifyGroup, tmp_path: Path) -> None:
    size = 64 * 1024
    path = _sparse(tmp_path / "blob", size)
    early = os.open(path, os.O_RDWR)  # opened before the mark: not watched
    try:
        group.mark(path)
        os.pwrite(early, b"early".ljust(4096, b"."), 0)
        assert not group.poll(0.1)
        with Listener(group, _fill_holes_from(b"\xab" * size)) as lis:
            assert _in_thread(lambda: _pread(path, 5, 0))() == b"early"
            assert _in_thread(lambda: _pread(path, 4, 32768))() == b"\xab" * 4
        # an event per read even over data already present; the listener's own writes through the
        # event fd raised none
        assert [(e.offset, e.count) for e in lis.events] == [(0, 4096), (32768, 4096)]
    finally:
        os.close(early)


@pytest.mark.kernel("fanotify")
def test_concurrent_events(group: FanotifyGroup, tmp_path: Path) -> None:
    """Hold every event until all readers are blocked, then answer them all."""
    readers = 6
    stride = 64 * 1024
    source = _pattern(readers * stride)
    path = _sparse(tmp_path / "blob", len(source))
    group.mark(path)
    held: list[PreAccessEvent] = []
    all_pending = threading.Event()

    def handler(g: FanotifyGroup, ev: PreAccessEvent) -> None:
        held.append(ev)
        if len(held) == readers:
            all_pending.set()
            for e in held:
                _fill_from(source)(g, e)

    with Listener(group, handler):
        results = [
            _in_thread(lambda i=i: _pread(path, 512, i * stride + 100)) for i in range(readers)
        ]
        assert all_pending.wait(TIMEOUT), f"only {len(held)} of {readers} events pending at once"
        for i, res in enumerate(results):
            assert res() == source[i * stride + 100 : i * stride + 612]
    assert len({e.offset for e in held}) == readers


@pytest.mark.kernel("fanotify")
def test_mark_on_tmpfs_is_refused(group: FanotifyGroup) -> None:
    shm = Path("/dev/shm")
    if not shm.is_dir() or subprocess.run(["stat", "-f", "-c", "%T", shm], capture_output=True, text=True
                                          ).stdout.strip() != "tmpfs":
        pytest.skip("no tmpfs at /dev/shm")
    path = shm / f"fscache-test-{os.getpid()}"
    path.write_bytes(b"")
    try:
        with pytest.raises(UnsupportedFilesystemError) as info:
            group.mark(path)
        assert "tmpfs" in str(info.value) and "\n" not in str(info.value)
        assert isinstance(info.value, OSError) and info.value.errno == errno.EOPNOTSUPP
    finally:
        path.unlink()


@pytest.mark.kernel("fanotify")
def test_mark_missing_file(group: FanotifyGroup, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        group.mark(tmp_path / "nope")


# --- real kernel: file-backed EROFS with a marked blob device -----------------------------------------------

@pytest.fixture
def erofs_blob_image(tmp_path: Path) -> tuple[Path, Path, Path]:
    """(source dir, image, blob): a chunked image whose data lives in a separate blob device."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "small.txt").write_bytes(b"hello, lazy world\n")
    (src / "medium.bin").write_bytes(_pattern(300_000))
    (src / "large.bin").write_bytes(os.urandom(1_500_000))
    img, blob = tmp_path / "image.erofs", tmp_path / "blob.erofs"
    subprocess.run(
        ["mkfs.erofs", f"--blobdev={blob}", "--chunksize=4096", str(img), str(src)],
        check=True, capture_output=True,
    )
    return src, img, blob


@pytest.mark.kernel("erofs", "fanotify")
@pytest.mark.tools("mkfs.erofs")
def test_file_backed_erofs_served_lazily(
    group: FanotifyGroup, tmp_path: Path, erofs_blob_image: tuple[Path, Path, Path],
    record_property: Callable[[str, object], None],
) -> None:
    src, img, blob = erofs_blob_image
    saved = blob.read_bytes()
    blob.unlink()
    _sparse(blob, len(saved))
    group.mark(blob)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    per_file: dict[str, list[tuple[int | None, int | None]]] = {}
    with Listener(group, _fill_from(saved)) as lis:
        mount(img, mnt, "erofs", MS_RDONLY, f"device={blob}")
        try:
            assert lis.events == [], "mount itself should not read the blob"
            for name in ("small.txt", "medium.bin", "large.bin"):
                before = len(lis.events)
                data = _in_thread(lambda n=name: (mnt / n).read_bytes())()
                assert data == (src / name).read_bytes(), name
                per_file[name] = [(e.offset, e.count) for e in lis.events[before:]]
                # a second read is served from the page cache or the filled file: no new event
                assert (mnt / name).read_bytes() == data
        finally:
            umount(mnt, detach_if_busy=False)
    for name, evs in per_file.items():
        record_property(f"events_{name}", evs)
        assert evs, f"reading {name} raised no event"
        assert all(c is not None and c > 0 and off is not None and off % 4096 == 0 for off, c in evs)
    # large.bin (1.5 MB) is served in readahead windows, not page by page
    assert len(per_file["large.bin"]) < 1_500_000 // 4096 // 4
    sizes = sorted({c for _, evs in per_file.items() for _, c in evs if c is not None})
    print("events per file:", {k: len(v) for k, v in per_file.items()}, "range sizes:", sizes)


@pytest.mark.kernel("erofs", "fanotify")
@pytest.mark.tools("mkfs.erofs")
def test_file_backed_erofs_deny_gives_eio(
    group: FanotifyGroup, tmp_path: Path, erofs_blob_image: tuple[Path, Path, Path]
) -> None:
    src, img, blob = erofs_blob_image
    size = blob.stat().st_size
    blob.unlink()
    _sparse(blob, size)
    group.mark(blob)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    with Listener(group, lambda g, ev: g.deny(ev, errno.EIO)) as lis:
        mount(img, mnt, "erofs", MS_RDONLY, f"device={blob}")
        try:
            result = _in_thread(lambda: (mnt / "medium.bin").read_bytes())
            with pytest.raises(OSError) as info:
                result()
            assert info.value.errno == errno.EIO
            assert lis.events
        finally:
            umount(mnt, detach_if_busy=False)

"""fscache.cachefiles against the VM kernel (6.12, CONFIG_CACHEFILES_ONDEMAND): EROFS mounted by fsid.

Runs inside the test VM only (``VM_SCRATCH`` is an ext4 scratch dir there). The device can have one opener,
so the tests that need a fresh device come first and the rest share one bound session served by a thread.
"""

from __future__ import annotations

import errno
import os
import platform
import shutil
import subprocess
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from fscache.cachefiles import (
    CACHEFILES_IOC_READ_COMPLETE,
    CACHEFILES_MSG_MAX_SIZE,
    CachefilesDevice,
    CloseRequest,
    Message,
    OpenRequest,
    ReadRequest,
    read_complete,
    write_range,
)
from fscache.errors import (
    CommandError,
    DeviceBusyError,
    FscacheError,
    PreContentUnsupportedError,
    UnsupportedFilesystemError,
)
from fscache.fanotify import FanotifyGroup
from tests.support.kmount import MS_RDONLY, mount, umount

pytestmark = pytest.mark.kernel("cachefiles")

TIMEOUT = 30.0


def _scratch() -> Path:
    return Path(os.environ["VM_SCRATCH"])


def _mkfs(name: str, files: dict[str, bytes], blobdev: bool = False) -> tuple[Path, Path, Path | None]:
    """Build ``name``: (source dir, image, blob or None) under VM_SCRATCH/images."""
    if shutil.which("mkfs.erofs") is None:
        pytest.skip("mkfs.erofs not installed")
    base = _scratch() / "images" / name
    shutil.rmtree(base, ignore_errors=True)
    src = base / "src"
    src.mkdir(parents=True)
    for rel, data in files.items():
        (src / rel).write_bytes(data)
    img = base / "image.erofs"
    blob = base / "blob.erofs" if blobdev else None
    cmd = ["mkfs.erofs"]
    if blob is not None:
        cmd += [f"--blobdev={blob}", "--chunksize=4096"]
    subprocess.run([*cmd, str(img), str(src)], check=True, capture_output=True)
    return src, img, blob


def _files() -> dict[str, bytes]:
    return {
        "hello.txt": b"hello from fscache\n",
        "pattern.bin": bytes((i * 13 + (i >> 12)) & 0xFF for i in range(200_000)),
        "random.bin": os.urandom(700_000),
    }


class Server:
    """A minimal on-demand daemon on a thread, built on the public fscache.cachefiles API.

    ``sources`` maps a cookie key (fsid or ``device=`` name) to the file to serve; an unknown key gets
    ``copen -ENOENT``; keys in ``no_data`` get their READs completed without writing.
    """

    def __init__(self, device: CachefilesDevice) -> None:
        self.device = device
        self.sources: dict[str, Path] = {}
        self.no_data: set[str] = set()
        self.messages: list[Message] = []
        self.error: BaseException | None = None
        self._objects: dict[int, tuple[int, str]] = {}
        self._lock = threading.Condition()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(TIMEOUT)
        for fd, _ in self._objects.values():
            os.close(fd)
        self._objects.clear()
        if self.error is not None:
            raise self.error

    def wait_for(self, predicate: Callable[[list[Message]], bool]) -> bool:
        """Wait until ``predicate(messages handled so far)`` holds."""
        with self._lock:
            return self._lock.wait_for(lambda: predicate(list(self.messages)), TIMEOUT)

    def opens(self) -> list[OpenRequest]:
        with self._lock:
            return [m for m in self.messages if isinstance(m, OpenRequest)]

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                if not self.device.poll(0.05):
                    continue
                while (msg := self.device.read_message()) is not None:
                    self._handle(msg)
                    with self._lock:
                        self.messages.append(msg)
                        self._lock.notify_all()
        except BaseException as e:  # reported by stop()
            self.error = e

    def _handle(self, msg: Message) -> None:
        if isinstance(msg, OpenRequest):
            path = self.sources.get(msg.cookie_key)
            if path is None:
                self.device.copen(msg.msg_id, -errno.ENOENT)
                os.close(msg.fd)
                return
            self._objects[msg.object_id] = (msg.fd, msg.cookie_key)
            self.device.copen(msg.msg_id, path.stat().st_size)
        elif isinstance(msg, ReadRequest):
            fd, key = self._objects[msg.object_id]
            if key not in self.no_data:
                with open(self.sources[key], "rb") as f:
                    f.seek(msg.offset)
                    data = f.read(msg.length)  # past EOF: short, write_range zero-pads to pages
                half = len(data) // 2
                write_range(fd, msg.offset, [data[:half], memoryview(data)[half:]])
            read_complete(fd, msg.msg_id)
        elif isinstance(msg, CloseRequest):
            entry = self._objects.pop(msg.object_id, None)
            if entry is not None:
                os.close(entry[0])


# --- fresh device each: must run before the shared session below ------------------------------------------


def test_constants() -> None:
    if platform.machine() in ("x86_64", "aarch64", "i686", "riscv64"):
        assert CACHEFILES_IOC_READ_COMPLETE == 0x40049801
    assert CACHEFILES_MSG_MAX_SIZE == 1024


def test_bind_on_tmpfs_is_refused() -> None:
    tmpfs = _scratch() / "tmpfs"
    tmpfs.mkdir(exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "none", str(tmpfs)], check=True)
    try:
        with CachefilesDevice.open() as dev:
            with pytest.raises(UnsupportedFilesystemError) as info:
                dev.bind(tmpfs, tag="tmpfs-test")
        msg = str(info.value)
        assert "tmpfs" in msg and "ext4" in msg and "\n" not in msg
        assert info.value.errno == errno.EOPNOTSUPP and isinstance(info.value, OSError)
    finally:
        subprocess.run(["umount", str(tmpfs)], check=True)


def test_bind_without_dir_is_einval() -> None:
    """EINVAL is what a kernel without on-demand mode answers to 'bind ondemand'; here: no 'dir' yet."""
    with CachefilesDevice.open() as dev:
        with pytest.raises(CommandError) as info:
            dev.command("bind ondemand")
        assert info.value.errno == errno.EINVAL


def test_read_before_bind_is_drained() -> None:
    with CachefilesDevice.open() as dev:
        assert dev.read_message() is None


def test_fanotify_pre_content_refused_before_6_14() -> None:
    """The VM kernel (6.12) predates pre-content events: the binding says so in one line."""
    if tuple(int(x) for x in platform.release().split(".")[:2]) >= (6, 14):
        pytest.skip("kernel has fanotify pre-content events")
    target = _scratch() / "fanotify-target"
    target.write_bytes(b"")
    try:
        with FanotifyGroup() as group:
            group.mark(target)
    except PreContentUnsupportedError as e:
        assert "6.14" in str(e) and "\n" not in str(e) and e.errno == errno.EINVAL
    else:
        pytest.fail("FAN_PRE_ACCESS mark accepted by a kernel older than 6.14")


# --- one bound session, served from a thread ----------------------------------------------------------------


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    cache = _scratch() / "cache"
    shutil.rmtree(cache, ignore_errors=True)  # same-size cache files from an earlier run would be reused
    cache.mkdir()
    dev = CachefilesDevice.open()
    try:
        dev.bind(cache, tag="nydus-erofs-test")
        srv = Server(dev)
        srv.start()
        try:
            yield srv
        finally:
            srv.stop()
    finally:
        dev.close()


def test_second_open_is_busy(server: Server) -> None:
    with pytest.raises(DeviceBusyError) as info:
        CachefilesDevice.open()
    assert str(info.value) == "another cache daemon (cachefilesd?) holds /dev/cachefiles"
    assert info.value.errno == errno.EBUSY and isinstance(info.value, FscacheError)


def test_restore_after_bind(server: Server) -> None:
    server.device.restore()


def _mnt(name: str) -> Path:
    mnt = _scratch() / "mnt" / name
    mnt.mkdir(parents=True, exist_ok=True)
    return mnt


def _compare(src: Path, mnt: Path) -> None:
    names = sorted(p.name for p in src.iterdir())
    assert sorted(p.name for p in mnt.iterdir()) == names
    for name in names:
        assert (mnt / name).read_bytes() == (src / name).read_bytes(), name


def test_mount_bootstrap_by_fsid(server: Server) -> None:
    src, img, _ = _mkfs("single", _files())
    server.sources["single"] = img
    mnt = _mnt("single")
    mount("none", mnt, "erofs", MS_RDONLY, "fsid=single")
    try:
        _compare(src, mnt)
    finally:
        umount(mnt, detach_if_busy=False)
    (op,) = [o for o in server.opens() if o.cookie_key == "single"]
    assert op.volume_key == "erofs,single" and op.volume == "single" and op.flags == 0
    reads = [m for m in server.messages if isinstance(m, ReadRequest) and m.object_id == op.object_id]
    assert reads and all(r.offset % 4096 == 0 and r.length % 4096 == 0 for r in reads)
    print(f"fsid mount: image {img.stat().st_size} bytes, {len(reads)} READs, lengths",
          sorted({r.length for r in reads}))


def test_mount_with_blob_device(server: Server) -> None:
    src, img, blob = _mkfs("multi", _files(), blobdev=True)
    assert blob is not None
    server.sources["multi"] = img
    server.sources["multiblob"] = blob
    mnt = _mnt("multi")
    mount("none", mnt, "erofs", MS_RDONLY, "fsid=multi,device=multiblob")
    try:
        _compare(src, mnt)
    finally:
        umount(mnt, detach_if_busy=False)
    keys = {o.cookie_key: o for o in server.opens() if o.volume == "multi"}
    assert set(keys) == {"multi", "multiblob"}
    ids = {o.object_id for o in keys.values()}
    assert server.wait_for(lambda ms: ids <= {m.object_id for m in ms if isinstance(m, CloseRequest)}), \
        "no CLOSE for the image and blob objects after umount"
    blob_reads = [m for m in server.messages if isinstance(m, ReadRequest)
                  and m.object_id == keys["multiblob"].object_id]
    assert blob_reads
    print(f"blob device: {blob.stat().st_size} bytes, {len(blob_reads)} READs, lengths",
          sorted({r.length for r in blob_reads}))


def test_copen_enoent_fails_the_mount(server: Server) -> None:
    """On 6.12 the failed OPEN fails the cookie; the mount then fails reading the superblock, with EIO or
    ENOBUFS depending on how far the cookie lookup got (the -ENOENT itself is not passed on)."""
    mnt = _mnt("unknown")
    with pytest.raises(OSError) as info:
        mount("none", mnt, "erofs", MS_RDONLY, "fsid=unknown-image")
    assert info.value.errno in (errno.EIO, errno.ENOBUFS, errno.ENOENT)
    print(f"copen -ENOENT: mount failed with {errno.errorcode[info.value.errno]}")
    assert any(o.cookie_key == "unknown-image" for o in server.opens())


def test_complete_without_data_gives_eio(server: Server) -> None:
    src, img, blob = _mkfs("empty", _files(), blobdev=True)
    assert blob is not None
    server.sources["empty"] = img
    server.sources["emptyblob"] = blob
    server.no_data.add("emptyblob")
    mnt = _mnt("empty")
    mount("none", mnt, "erofs", MS_RDONLY, "fsid=empty,device=emptyblob")
    try:
        assert sorted(p.name for p in mnt.iterdir()) == sorted(_files())  # metadata is in the bootstrap
        with pytest.raises(OSError) as info:
            (mnt / "random.bin").read_bytes()
        assert info.value.errno == errno.EIO
    finally:
        umount(mnt, detach_if_busy=False)


def test_write_range_rejects_unaligned_offset(server: Server) -> None:
    with pytest.raises(ValueError):
        write_range(0, 100, b"x")

"""A blob cache file is trusted only as far as the digests that filled it (issue 19, findings 1, 2 and 10).

- an image whose bootstrap names another image's blob id, with its own content, fills its own cache file: the
  victim, on the same cache dir, reads its own bytes (fanotify and full modes, one after and beside the other);
- a cache write failing with ENOSPC (a small loop-mounted ext4) leaves nothing that counts as data: the read
  fails with EIO, and once space is freed a remount reads every file right (never zeros);
- root punching a hole in a complete cache file under a mount: the daemon notices and fetches the range again.
"""

from __future__ import annotations

import errno
import os
import random
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from fscache.fd import punch_hole
from tests.mount.test_fanotify_mount import TIMEOUT, Mounts, _in_thread, build
from tests.support.poll import wait_for

pytestmark = pytest.mark.kernel("erofs", "fanotify")


def _tree(root: Path, seed: int, sizes: dict[str, int]) -> dict[str, bytes]:
    rnd = random.Random(seed)
    files = {name: rnd.randbytes(size) for name, size in sizes.items()}
    root.mkdir(parents=True)
    for name, data in files.items():
        (root / name).write_bytes(data)
    return files


def _only_blob(out: Path) -> str:
    (blob,) = (out / "blobs").iterdir()
    return blob.name


def _impostor(tmp: Path, victim_blob: str, sizes: dict[str, int]) -> tuple[Path, dict[str, bytes]]:
    """An image of its own content (its own chunk digests) whose bootstrap and blob file name ``victim_blob``."""
    files = _tree(tmp / "impostor-src", 99, sizes)
    built = tmp / "impostor-built"
    build([tmp / "impostor-src"], built, "none", "64KiB")
    own = _only_blob(built)
    out = tmp / "impostor"
    (out / "blobs").mkdir(parents=True)
    boot = (built / "image.boot").read_bytes()
    assert boot.count(own.encode()) >= 1
    (out / "image.boot").write_bytes(boot.replace(own.encode(), victim_blob.encode()))
    (out / "blobs" / victim_blob).write_bytes((built / "blobs" / own).read_bytes())
    return out, files


SIZES = {"a.bin": 700_000, "b.bin": 300_000}


@pytest.mark.parametrize("mode", ["fanotify", "full"])
def test_an_image_naming_another_images_blob_id_does_not_poison_its_cache(mounts: Mounts, tmp_path: Path,
                                                                          mode: str) -> None:  # fmt: skip
    victim_files = _tree(tmp_path / "victim-src", 1, SIZES)
    victim = tmp_path / "victim"
    build([tmp_path / "victim-src"], victim, "none", "64KiB")
    impostor, impostor_files = _impostor(tmp_path, _only_blob(victim), SIZES)
    cache = tmp_path / "shared-cache"

    bad, _ = mounts.mount(impostor, "impostor", mode=mode, cache=cache)
    for name, data in impostor_files.items():  # the impostor reads its own content, filling the cache dir
        assert _in_thread(lambda n=name: (bad / n).read_bytes()) == data
    good, _ = mounts.mount(victim, "victim", mode=mode, cache=cache)  # beside it
    for name, data in victim_files.items():
        assert _in_thread(lambda n=name: (good / n).read_bytes()) == data, f"{name}: the impostor's bytes"
    mounts.umount(good)
    mounts.umount(bad)
    again, _ = mounts.mount(victim, "victim-again", mode=mode, cache=cache)  # after it, on the warm cache
    for name, data in victim_files.items():
        assert _in_thread(lambda n=name: (again / n).read_bytes()) == data, name
    mounts.umount(again)


# -- ENOSPC -------------------------------------------------------------------------------------------------------
@pytest.fixture
def small_ext4(tmp_path: Path) -> Iterator[Path]:
    """A 32 MiB ext4 (1 KiB blocks: a write failing with ENOSPC there leaves allocated zero blocks) on a loop
    device, mounted at tmp/small (the cache dir's filesystem)."""
    img = tmp_path / "small.ext4"
    with open(img, "wb") as f:
        f.truncate(32 << 20)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-m", "0", "-b", "1024", str(img)], check=True, capture_output=True)
    dev = subprocess.run(["losetup", "-f", "--show", str(img)], check=True, capture_output=True,
                         text=True).stdout.strip()  # fmt: skip
    mnt = tmp_path / "small"
    mnt.mkdir()
    try:
        subprocess.run(["mount", dev, str(mnt)], check=True, capture_output=True)
        try:
            yield mnt
        finally:
            subprocess.run(["umount", str(mnt)], check=True)
    finally:
        subprocess.run(["losetup", "-d", dev], check=True)


def _read_pages(path: Path) -> bytes:
    """The file read a page at a time without readahead: each read raises an event of its own page only."""

    def read() -> bytes:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
            out = bytearray()
            while page := os.pread(fd, 4096, len(out)):
                out += page
            return bytes(out)
        finally:
            os.close(fd)

    return _in_thread(read)


def _read_or_eio(path: Path) -> bytes | None:
    try:
        return _in_thread(path.read_bytes)
    except OSError as e:
        assert e.errno == errno.EIO, e
        return None


@pytest.mark.root
@pytest.mark.parametrize("mode", ["fanotify", "full"])
def test_enospc_in_the_cache_never_leaves_zeros_that_count_as_data(small_ext4: Path, mounts: Mounts, tmp_path: Path,
                                                                   mode: str) -> None:  # fmt: skip
    files = _tree(tmp_path / "src", 7, {f"part-{i}.bin": (3 << 20) + 4096 * i + 5 for i in range(6)})
    out = tmp_path / "out"
    build([tmp_path / "src"], out, "none", "1MiB")
    cache = small_ext4 / "cache"
    cache.mkdir()
    filler = small_ext4 / "filler"
    st = os.statvfs(small_ext4)
    free = st.f_bavail * st.f_frsize
    with open(filler, "wb") as f:  # leave ~8 MiB for an 18 MiB image
        f.write(os.urandom(max(free - (8 << 20), 0)))
        os.fsync(f.fileno())
    if mode == "full":  # everything is fetched before mounting: the mount fails, nothing is mounted
        with pytest.raises(OSError) as failed:
            mounts.mount(out, "full-enospc", mode=mode, cache=cache)
        assert failed.value.errno == errno.ENOSPC, failed.value
    else:
        mp, _ = mounts.mount(out, "enospc", mode=mode, cache=cache, readahead=0)
        got = {name: _read_or_eio(mp / name) for name in files}
        assert any(v is None for v in got.values()), "the cache filesystem never ran out of space"
        for name, data in got.items():  # what reads is right; the rest is EIO, never zeros
            assert data is None or data == files[name], name
        mounts.umount(mp)
    filler.unlink()
    # what the failed writes left must not count as data: read a page at a time (each page its own event; no
    # readahead, which would rewrite whole chunks first), then in full mode
    mp, _ = mounts.mount(out, "after", cache=cache, readahead=0)
    for name, data in files.items():
        assert _read_pages(mp / name) == data, f"{name} after ENOSPC and a remount"
    mounts.umount(mp)
    mp, _ = mounts.mount(out, "after-full", mode="full", cache=cache)
    for name, data in files.items():
        assert _in_thread(lambda n=name: (mp / n).read_bytes()) == data, name
    mounts.umount(mp)


# -- a complete cache file changed under the mount ----------------------------------------------------------------
@pytest.mark.root
def test_a_hole_punched_in_a_complete_cache_file_is_fetched_again(mounts: Mounts, tmp_path: Path) -> None:
    files = _tree(tmp_path / "src", 3, {"f.bin": 3 << 20})
    out = tmp_path / "out"
    build([tmp_path / "src"], out, "none", "64KiB")
    cache = tmp_path / "cache"
    mp, rec = mounts.mount(out, "punch", cache=cache)
    log = Path(rec["log"])
    assert _in_thread(lambda: (mp / "f.bin").read_bytes()) == files["f.bin"]
    wait_for(lambda: "cache file complete, unmarked" in log.read_text(), "the cache file is complete", TIMEOUT)
    (cache_file,) = (p for p in cache.iterdir() if not p.name.endswith(".map"))
    fd = os.open(cache_file, os.O_RDWR)
    try:  # root, on the node, under the mount: half a chunk in the middle of the file
        punch_hole(fd, (1 << 20) + (16 << 10), 32 << 10)
    finally:
        os.close(fd)
    wait_for(lambda: "changed under the mount: 1 chunks gone" in log.read_text(), "the daemon noticed", TIMEOUT)
    with open(mp / "f.bin", "rb") as f:  # the mount's own page cache of it goes: the next read reaches the cache
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    assert _in_thread(lambda: (mp / "f.bin").read_bytes()) == files["f.bin"], "zeros where the hole is"
    stats = mounts.umount(mp)["stats"]
    assert stats["events"]["changed_under_us"] >= 1 and stats["events"]["filled"] >= 1

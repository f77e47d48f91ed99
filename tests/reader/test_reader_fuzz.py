"""Mutation fuzzing of the reader with hypothesis: damaged bootstraps and blobs end in a NydusErofsError or a
correct result — never another exception, never a hang (per-example deadline), never unbounded memory
(tracemalloc peak per example).

Seeds: the upstream image and its blob, a mkfs.erofs image (shared xattrs, multi-block directories, symlinks,
devices), and our builder's output when the builder is available.  Examples are bounded and derandomized so
the whole module stays well under 30 s.
"""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import tempfile
import tracemalloc
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from erofs.errors import BackendError, NydusErofsError
from erofs.reader import Bootstrap, ImageReader
from erofs.reader.blob import BlobMeta, read_chunks
from erofs.reader.check import check_image
from erofs.reader.unpack import unpack_to_dir, unpack_to_tar
from tests.support.cli import CLI
from tests.support.paths import SHARED

NYDUS = SHARED / "interop" / "nydus"
BOOT = NYDUS / "rafs-v6-2.2.boot"
BLOB_ID = "be7d77eeb719f70884758d1aa800ed0fb09d701aaec469964e9d54325f0d5fef"
MEM_LIMIT = 64 << 20  # peak Python allocation per example
# FUZZ_EXAMPLES=5000 pytest tests/reader/test_reader_fuzz.py: a long, randomized local run
_LONG = int(os.environ.get("FUZZ_EXAMPLES", "0"))
FUZZ = settings(
    max_examples=_LONG or 150,
    deadline=3000,
    derandomize=not _LONG,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

pytestmark = pytest.mark.upstream


class MemBlobs:
    """A blob backend over in-memory blobs (ranged reads past the end are BackendErrors, like a real backend)."""

    def __init__(self, blobs: dict[str, bytes]) -> None:
        self.blobs = blobs

    def _get(self, blob_id: str) -> bytes:
        try:
            return self.blobs[blob_id]
        except KeyError:
            raise BackendError(f"blob {blob_id}: not found") from None

    def read(self, blob_id: str, offset: int, length: int) -> bytes:
        data = self._get(blob_id)
        if offset < 0 or length < 0 or offset + length > len(data):
            raise BackendError(f"blob {blob_id}: range {offset}+{length} is past its end ({len(data)})")
        return data[offset : offset + length]

    def size(self, blob_id: str) -> int:
        return len(self._get(blob_id))


def exercise(boot: bytes, blobs: dict[str, bytes]) -> None:
    """Everything a user can make the reader do with an image; only NydusErofsError may escape the inner calls,
    and check_image must not raise at all."""
    source = MemBlobs(blobs)
    try:
        bs = Bootstrap.from_bytes(boot, verify_checksum=False)
    except NydusErofsError:
        return
    # check never raises on a damaged image: it reports
    check_image(bs, source)
    reader = ImageReader(bs, source)
    try:
        for _path, _dirent, ino in bs.walk():
            bs.xattrs(ino)
            if ino.is_symlink:
                bs.readlink(ino)
            elif ino.is_dir:
                bs.readdir(ino)
            elif ino.is_reg:
                total = 0
                for _off, data, n in reader.iter_file(ino):
                    assert data is None or len(data) == n
                    total += n
                    if total > 64 << 20:
                        break  # a huge sparse file: enough
    except NydusErofsError:
        pass
    for i in range(len(bs.blobs)):
        try:
            meta = BlobMeta.load(source, bs.blobs[i], bs)
            for _ in read_chunks(source, meta, range(meta.chunk_count)):
                pass
            meta.chunks_for_range(0, 1 << 30)
        except NydusErofsError:
            pass


def unpack_confined(bs: Bootstrap, reader: ImageReader) -> None:
    """Unpacking a damaged image ends in a clean error (or succeeds) and writes nothing beside its output."""
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp) / "work"
        work.mkdir()
        for out in (work / "out", work / "out.tar"):
            try:
                (unpack_to_tar if out.suffix == ".tar" else unpack_to_dir)(reader, out)
            except (NydusErofsError, OSError):
                assert not out.exists()
            assert [p.name for p in work.iterdir()] in ([], [out.name]), list(work.iterdir())
            shutil.rmtree(out, ignore_errors=True) if out.is_dir() else out.unlink(missing_ok=True)
        assert [p.name for p in Path(tmp).iterdir()] == ["work"]


def run_bounded(boot: bytes, blobs: dict[str, bytes]) -> None:
    tracemalloc.start()
    try:
        exercise(boot, blobs)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < MEM_LIMIT, f"peak allocation {peak} bytes"


# ---- seeds ------------------------------------------------------------------------------------------------------
def _upstream() -> tuple[bytes, dict[str, bytes]]:
    return BOOT.read_bytes(), {BLOB_ID: (NYDUS / "blobs" / BLOB_ID).read_bytes()}


_SEEDS: dict[str, tuple[bytes, dict[str, bytes]]] = {}


@pytest.fixture(scope="module")
def seeds(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[bytes, dict[str, bytes]]]:
    """Seed images, built once; hypothesis tests read them from _SEEDS (a fixture argument would be part of every
    failing example's repr)."""
    if _SEEDS:
        return _SEEDS
    out = _SEEDS
    out["upstream"] = _upstream()
    tmp = tmp_path_factory.mktemp("fuzzseeds")
    src = tmp / "src"
    (src / "d" / "many").mkdir(parents=True)
    (src / "f").write_bytes(b"content " * 3000)
    (src / "d" / "g").write_bytes(bytes(range(256)) * 40)
    (src / "link").symlink_to("d/g")
    for i in range(150):
        (src / "d" / "many" / f"entry-with-a-longish-name-{i:04d}").write_bytes(b"")
    for name in ("f", "d/g"):
        subprocess.run(["setfattr", "-n", "user.k", "-v", "shared-value", str(src / name)], check=False)
    if shutil.which("mkfs.erofs"):
        img = tmp / "plain.img"
        r = subprocess.run(["mkfs.erofs", "--quiet", "-x1", str(img), str(src)], capture_output=True)
        if r.returncode == 0:
            out["mkfs"] = (img.read_bytes(), {})
    built = tmp / "built"
    r = subprocess.run(
        [CLI, "build", str(src), "--output-dir", str(built), "--compressor", "lz4_block", "--chunk-size", "4096"],
        capture_output=True,
    )
    if r.returncode == 0:
        blobs = {p.name: p.read_bytes() for p in (built / "blobs").iterdir()}
        out["ours"] = ((built / "image.boot").read_bytes(), blobs)
    return out


def test_seeds_are_clean(seeds):
    for name, (boot, blobs) in seeds.items():
        report = check_image(Bootstrap.from_bytes(boot), MemBlobs(blobs))
        # the upstream texture's blob is named by an id that is not its sha256 (test_interop_upstream.py)
        problems = [str(p) for p in report.problems if not p.message.startswith("the blob's sha256 is ")]
        assert problems == [] and (report.ok or name == "upstream"), (name, problems)
        run_bounded(boot, blobs)


# ---- mutations --------------------------------------------------------------------------------------------------
_INTERESTING = [0, 1, 0x7F, 0x80, 0xFF, 0xFFFF, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF, 4096, 4095, 1 << 20]

mutation = st.one_of(
    st.tuples(st.just("byte"), st.integers(0, 1 << 20), st.integers(0, 255)),
    st.tuples(st.just("u32"), st.integers(0, 1 << 20), st.sampled_from(_INTERESTING)),
    st.tuples(st.just("u16"), st.integers(0, 1 << 20), st.sampled_from(_INTERESTING)),
)


def mutate(data: bytes, muts: list[tuple[str, int, int]], hot: tuple[int, int] | None, use_hot: list[bool]) -> bytes:
    buf = bytearray(data)
    for (kind, pos, value), in_hot in zip(muts, use_hot, strict=False):
        if hot is not None and in_hot:
            lo, hi = hot
            pos = lo + pos % max(1, min(hi, len(buf)) - lo)
        else:
            pos %= len(buf)
        if kind == "byte":
            buf[pos] = value
        elif kind == "u16" and pos + 2 <= len(buf):
            struct.pack_into("<H", buf, pos, value & 0xFFFF)
        elif kind == "u32" and pos + 4 <= len(buf):
            struct.pack_into("<I", buf, pos, value & 0xFFFFFFFF)
    return bytes(buf)


# regions where a mutation is most likely to matter: superblock + ext sb + device table, blob table, metadata
_BOOT_HOT = [(1024, 1536), (4096, 4352), (8192, 16384), (16384, 16544)]


@pytest.mark.usefixtures("seeds")
@FUZZ
@given(
    which=st.sampled_from(["upstream", "mkfs", "ours"]),
    muts=st.lists(mutation, min_size=1, max_size=6),
    hot=st.sampled_from(_BOOT_HOT + [None]),
    use_hot=st.lists(st.booleans(), min_size=6, max_size=6),
)
def test_mutated_bootstrap(which, muts, hot, use_hot):
    boot, blobs = _SEEDS.get(which) or _upstream()
    run_bounded(mutate(boot, muts, hot, use_hot), blobs)


@FUZZ
@given(
    muts=st.lists(mutation, min_size=1, max_size=4),
    tail=st.booleans(),
    use_hot=st.lists(st.booleans(), min_size=4, max_size=4),
)
def test_mutated_upstream_blob(muts, tail, use_hot):
    boot, blobs = _upstream()
    blob = blobs[BLOB_ID]
    # the metadata tail (chunk-info table, CCT header, digests, ToC) or anywhere
    mutated = mutate(blob, muts, (7802, len(blob)) if tail else None, use_hot)
    run_bounded(boot, {BLOB_ID: mutated})


@FUZZ
@given(cut=st.integers(0, 20480), extra=st.binary(max_size=64), blob_cut=st.integers(0, 14554))
def test_truncated_or_extended(cut, extra, blob_cut):
    boot, blobs = _upstream()
    run_bounded(boot[:cut] + extra, blobs)
    run_bounded(boot, {BLOB_ID: blobs[BLOB_ID][:blob_cut]})


@pytest.mark.usefixtures("seeds")  # (not only when another test built them first: `pytest -n` splits the module)
@FUZZ
@given(muts=st.lists(mutation, min_size=1, max_size=4), use_hot=st.lists(st.booleans(), min_size=4, max_size=4))
def test_mutated_own_blob(muts, use_hot):
    assert "ours" in _SEEDS, "nydus-erofs build failed on the seed tree"
    boot, blobs = _SEEDS["ours"]
    (bid, blob), *_ = blobs.items()
    run_bounded(boot, {**blobs, bid: mutate(blob, muts, (max(0, len(blob) - 8192), len(blob)), use_hot)})


@pytest.mark.usefixtures("seeds")
@settings(FUZZ, max_examples=_LONG or 30)
@given(
    which=st.sampled_from(["upstream", "ours"]),
    muts=st.lists(mutation, min_size=1, max_size=4),
    hot=st.sampled_from(_BOOT_HOT),
    use_hot=st.lists(st.booleans(), min_size=4, max_size=4),
)
def test_unpack_of_mutated_bootstrap_stays_confined(which, muts, hot, use_hot):
    boot, blobs = _SEEDS.get(which) or _upstream()
    try:
        bs = Bootstrap.from_bytes(mutate(boot, muts, hot, use_hot))
    except NydusErofsError:
        return
    unpack_confined(bs, ImageReader(bs, MemBlobs(blobs)))

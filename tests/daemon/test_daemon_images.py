"""cachefilesd_py.image_store: the image store (fsid → bootstrap, blob id → image and backend) and key parsing.

Host-side: no kernel needed.  Images are built with ``nydus-erofs build``.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from cachefilesd_py.backends import BlobBackend, make_backend
from cachefilesd_py.image_store import ImageStore, UnknownImageError, check_name, parse_volume_key
from cachefilesd_py.pipeline import Pipeline
from erofs.errors import DigestMismatchError, ImageError
from tests.support.cli import run


def build(out: Path, *sources: Path, compressor: str = "zstd") -> dict:
    proc = run("build", *sources, "-o", out, "--json", "--compressor", compressor, "--chunk-size", "64KiB")
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, dict], dict[str, bytes]]:
    """IMAGES with ``one`` (a single layer) and ``two`` (the same base layer + another)."""
    root = tmp_path_factory.mktemp("store")
    base, top = root / "src" / "base", root / "src" / "top"
    base.mkdir(parents=True)
    top.mkdir(parents=True)
    files = {"base.bin": os.urandom(300_000), "top.bin": os.urandom(200_000)}
    (base / "base.bin").write_bytes(files["base.bin"])
    (top / "top.bin").write_bytes(files["top.bin"])
    imgs = root / "images"
    out = {"one": build(imgs / "one", base), "two": build(imgs / "two", base, top)}
    (imgs / "not-an-image").mkdir()
    return imgs, out, files


def test_volume_keys() -> None:
    assert parse_volume_key("erofs,img1") == "img1"
    assert parse_volume_key("erofs,domain,with,commas") == "domain,with,commas"
    for bad in ("img1", "erofs,", "ext4,img", ""):
        with pytest.raises(UnknownImageError):
            parse_volume_key(bad)


@pytest.mark.parametrize("name", ["..", ".", "a/b", "", "x" * 256, "sp ace", "nul\0"])
def test_names_that_are_not_directory_names_are_refused(name: str) -> None:
    with pytest.raises(UnknownImageError):
        check_name(name)


def test_fsid_lookup(images: tuple[Path, dict, dict]) -> None:
    imgs, out, _ = images
    store = ImageStore(imgs)
    assert store.fsids() == ["one", "two"]
    assert store.has_image("one") and not store.has_image("not-an-image") and not store.has_image("../one")
    img = store.image("two")
    assert img.size == (imgs / "two" / "image.boot").stat().st_size
    assert sorted(img.blobs) == sorted(b["id"] for b in out["two"]["blobs"])
    assert store.image("two") is img  # cached
    with pytest.raises(UnknownImageError, match="no image 'nope'"):
        store.image("nope")
    with pytest.raises(UnknownImageError):
        store.image("../two")
    store.close()


def test_blob_lookup_prefers_the_volume_and_finds_any_image(images: tuple[Path, dict, dict]) -> None:
    imgs, out, _ = images
    store = ImageStore(imgs)
    base_id = out["one"]["blobs"][0]["id"]
    top = out["two"]["blobs"][1]
    assert out["two"]["blobs"][0]["id"] == base_id  # the same layer gives the same blob
    assert store.blob(base_id, prefer=["two"]).image.fsid == "two"
    assert store.blob(base_id).image.fsid in ("one", "two")
    entry = store.blob(top["id"], prefer=["one"])  # not in "one": found in "two" anyway (failover re-OPEN)
    assert entry.image.fsid == "two" and entry.size == top["uncompressed_size"]
    with pytest.raises(UnknownImageError, match="has blob"):
        store.blob("0" * 64)
    store.close()


def test_blob_metadata_is_fetched_on_first_use(images: tuple[Path, dict, dict]) -> None:
    imgs, out, files = images
    store = ImageStore(imgs)
    entry = store.blob(out["one"]["blobs"][0]["id"], prefer=["one"])
    backend = store.backends()["one"]
    assert not entry.loaded and backend.stats.bytes == 0  # OPEN costs no fetch
    handle = entry.handle()
    assert entry.loaded and entry.handle() is handle and backend.stats.bytes > 0
    assert handle.uncompressed_size == entry.size
    store.close()


def test_shared_backend_serves_every_image(images: tuple[Path, dict, dict], tmp_path: Path) -> None:
    imgs, out, _ = images
    blob_dir = tmp_path / "blobs"
    blob_dir.mkdir()
    for fsid in ("one", "two"):
        for b in (imgs / fsid / "blobs").iterdir():
            (blob_dir / b.name).write_bytes(b.read_bytes())
    shared = make_backend("localfs", dir=blob_dir)
    store = ImageStore(imgs, shared)
    entry = store.blob(out["two"]["blobs"][1]["id"])
    assert entry.backend is shared and store.backends() == {"shared": shared}
    entry.handle()
    assert shared.stats.bytes > 0
    store.close()


def test_a_rebuilt_image_is_reloaded(images: tuple[Path, dict, dict], tmp_path: Path) -> None:
    imgs = tmp_path / "images"
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(b"first")
    first = build(imgs / "img", src)
    store = ImageStore(imgs)
    old = store.image("img")
    (src / "f").write_bytes(b"second version, another blob")
    second = build(tmp_path / "new", src)
    os.replace(tmp_path / "new" / "image.boot", imgs / "img" / "image.boot")
    assert first["blobs"][0]["id"] != second["blobs"][0]["id"]
    new = store.image("img")
    assert new is not old and second["blobs"][0]["id"] in new.blobs
    store.close()


def test_a_broken_bootstrap_is_an_image_error(tmp_path: Path) -> None:
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "image.boot").write_bytes(b"\0" * 8192)
    with pytest.raises(ImageError, match="image 'bad'"):
        ImageStore(tmp_path).image("bad")


@pytest.mark.network
def test_http_backend_serves_every_image(images: tuple[Path, dict, dict]) -> None:
    """``--backend http --url``: blobs fetched by ranged GETs, verified and decompressed by the pipeline."""
    from cachefilesd_py.pipeline import Pipeline
    from tests.support.registry import Front

    imgs, out, files = images
    with Front(directory=imgs / "two" / "blobs") as front:
        backend = make_backend("http", url=front.url)
        store = ImageStore(imgs, backend)
        entry = store.blob(out["two"]["blobs"][1]["id"], prefer=["one"])
        data = bytearray(-(-entry.size // 4096) * 4096)

        def write(off: int, piece: memoryview) -> None:
            data[off : off + piece.nbytes] = piece

        with Pipeline() as pipeline:
            pipeline.fill(entry.handle(), 0, entry.size, write)
        assert files["top.bin"] in data
        assert backend.stats.requests > 0 and backend.stats.errors == 0
        store.close()


def _one_damaged(images: tuple[Path, dict, dict], tmp_path: Path) -> tuple[Path, str, dict[str, bytes]]:
    """A copy of the store in which image one's copy of the shared base layer is damaged (its first chunk)."""
    src, out, files = images
    imgs = tmp_path / "images"
    for fsid in ("one", "two"):
        shutil.copytree(src / fsid, imgs / fsid)
    base_id = out["one"]["blobs"][0]["id"]
    damaged = imgs / "one" / "blobs" / base_id
    raw = bytearray(damaged.read_bytes())
    raw[4096 + 100] ^= 0xFF  # inside the first chunk's data (after the zero prefix): its digest no longer matches
    damaged.write_bytes(raw)
    return imgs, base_id, files


def _read_blob(entry_fill: Callable[..., int], size: int) -> bytes:
    """The whole uncompressed layout of a blob, filled through ``BlobEntry.fill`` as the worker fills a cache file."""
    data = bytearray(-(-size // 4096) * 4096)
    written: set[int] = set()

    def write(off: int, piece: memoryview) -> None:
        data[off : off + piece.nbytes] = piece
        written.add(off)

    with Pipeline(amplify=0) as pipeline:
        entry_fill(pipeline, 0, size, write, lambda d_off, _size: d_off in written)
    return bytes(data)


def test_a_damaged_copy_of_a_shared_blob_does_not_fail_the_other_images(
    images: tuple[Path, dict, dict], tmp_path: Path
) -> None:
    """Two images list the same layer, each with its own copy; the copy of ``one`` is damaged."""
    imgs, base_id, files = _one_damaged(images, tmp_path)

    store = ImageStore(imgs)
    first = store.blob(base_id, prefer=["one"])  # the kernel opened the blob for image one first
    assert first.image.fsid == "one"
    with Pipeline(amplify=0) as pipeline, pytest.raises(DigestMismatchError):
        pipeline.fill(first.handle(), 0, first.size, lambda off, piece: None)  # that copy is damaged

    entry = store.blob(base_id, prefer=["two"])  # image two's own copy, not the one bound first
    assert entry.image.fsid == "two"
    assert files["base.bin"] in _read_blob(entry.fill, entry.size)
    # and image one is served too: what its copy cannot deliver comes from image two's copy
    assert files["base.bin"] in _read_blob(first.fill, first.size)
    store.close()


def test_an_image_naming_a_blob_id_with_other_content_is_not_a_copy_of_it(
    images: tuple[Path, dict, dict], tmp_path: Path
) -> None:
    """An impostor image names the base layer's blob id, with content (and digests) of its own; image one's copy
    of the base is damaged: its reads fail (EIO), they are never served the impostor's verified bytes."""
    imgs, base_id, files = _one_damaged(images, tmp_path)
    src = tmp_path / "impostor-src"
    src.mkdir()
    (src / "base.bin").write_bytes(os.urandom(300_000))
    own = build(tmp_path / "impostor-built", src)["blobs"][0]["id"]
    imp = imgs / "impostor"
    (imp / "blobs").mkdir(parents=True)
    boot = (tmp_path / "impostor-built" / "image.boot").read_bytes()
    (imp / "image.boot").write_bytes(boot.replace(own.encode(), base_id.encode()))
    shutil.copyfile(tmp_path / "impostor-built" / "blobs" / own, imp / "blobs" / base_id)
    shutil.rmtree(imgs / "two")  # the only sound copy left is the impostor's

    store = ImageStore(imgs)
    assert store.blob(base_id, prefer=["impostor"]).image.fsid == "impostor"
    first = store.blob(base_id, prefer=["one"])
    with pytest.raises(DigestMismatchError):
        _read_blob(first.fill, first.size)
    store.close()


def _localfs(blob_dir: Path) -> BlobBackend:
    return make_backend("localfs", dir=blob_dir)


class _Held:
    """A localfs backend whose chunk reads wait until the test lets them through (``held.set()``)."""

    def __init__(self, blob_dir: Path) -> None:
        self.inner = make_backend("localfs", dir=blob_dir)
        self.stats = self.inner.stats
        self.entered = threading.Event()
        self.held = threading.Event()
        self.armed = False

    def read(self, blob_id: str, offset: int, length: int) -> bytes:
        if self.armed:
            self.entered.set()
            assert self.held.wait(60), "the test never released the read"
        return self.inner.read(blob_id, offset, length)

    def size(self, blob_id: str) -> int:
        return self.inner.size(blob_id)

    def close(self) -> None:
        self.inner.close()


def test_a_fetch_from_a_damaged_copy_does_not_fail_a_concurrent_read_of_a_sound_copy(
    images: tuple[Path, dict, dict], tmp_path: Path
) -> None:
    """Image two's read waits for the chunks image one is already fetching; one's copy fails its digest."""
    imgs, base_id, files = _one_damaged(images, tmp_path)
    held = _Held(imgs / "one" / "blobs")
    store = ImageStore(imgs, backend_factory=lambda d: held if d.parent.name == "one" else _localfs(d))
    one, two = store.blob(base_id, prefer=["one"]), store.blob(base_id, prefer=["two"])
    one_handle, two_handle = one.handle(), two.handle()  # metadata: before the gate closes
    data = bytearray(-(-two.size // 4096) * 4096)

    def write(off: int, piece: memoryview) -> None:
        data[off : off + piece.nbytes] = piece

    held.armed = True
    with Pipeline(amplify=0, workers=2) as pipeline:
        first = pipeline.submit(one_handle, 0, one.size, lambda off, piece: None)
        assert held.entered.wait(60)  # one owns every chunk of the blob now
        second = pipeline.submit(two_handle, 0, two.size, write)
        assert pipeline.stats.wait_for(lambda s: s.dedup_hits > 0, 60)  # two waits for one's fetches
        held.held.set()
        with pytest.raises(DigestMismatchError):
            first.result(60)
        second.result(60)
    assert files["base.bin"] in data
    store.close()

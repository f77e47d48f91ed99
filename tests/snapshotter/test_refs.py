"""Image references as containerd names them, layer chain IDs (the snapshot keys containerd looks for), the
layers containerd's own unpack cannot apply, and the bootstrap layer it unpacks without labels."""

from __future__ import annotations

import hashlib
import io
import shutil
import tarfile
from pathlib import Path

import pytest

from cachefilesd_py.snapshotter.nydus import split_image_ref, unlabelled_bootstrap, unpack_chain_id, untarrable_layer
from cachefilesd_py.snapshotter.pull import chain_ids
from erofs.errors import UsageError
from tests.support.mount_fuzz import build_image


@pytest.mark.parametrize(("ref", "expected"), [
    ("busybox", ("registry-1.docker.io", "library/busybox", "latest")),
    ("docker.io/library/busybox:1.36", ("registry-1.docker.io", "library/busybox", "1.36")),
    ("user/app:v1", ("registry-1.docker.io", "user/app", "v1")),
    ("127.0.0.1:5000/test/app:v1-nydus", ("127.0.0.1:5000", "test/app", "v1-nydus")),
    ("localhost/app", ("localhost", "app", "latest")),
    ("registry.example.com:443/a/b/c@sha256:" + "0" * 64, ("registry.example.com:443", "a/b/c", "sha256:" + "0" * 64)),
])  # fmt: skip
def test_split_image_ref(ref: str, expected: tuple[str, str, str]) -> None:
    assert split_image_ref(ref) == expected


def test_split_image_ref_without_repository() -> None:
    with pytest.raises(UsageError):
        split_image_ref("registry.example.com/:v1")


def test_chain_ids() -> None:
    a, b, c = ("sha256:" + x * 64 for x in "abc")
    ab = "sha256:" + hashlib.sha256(f"{a} {b}".encode()).hexdigest()
    abc = "sha256:" + hashlib.sha256(f"{ab} {c}".encode()).hexdigest()
    assert chain_ids([a, b, c]) == [a, ab, abc]
    assert chain_ids([]) == []


def test_unpack_chain_id() -> None:
    chain = "sha256:" + "ab" * 32
    assert unpack_chain_id(f"default/7/extract-123-AbC_ {chain}") == chain
    assert unpack_chain_id(f"extract-1 {chain}") == chain
    assert unpack_chain_id(f"default/8/ctr-snapshot {chain}") == ""
    assert unpack_chain_id("default/9/extract-1 sha256:short") == ""


def test_untarrable_layer(tmp_path: Path) -> None:
    """What containerd's differ would fail to apply as a tar: a Nydus data blob (here zstd data); not a tar, an
    empty one (the end-of-archive block), an empty file or a missing one."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        info = tarfile.TarInfo("etc/hello.txt")
        info.size = 6
        tar.addfile(info, io.BytesIO(b"hello\n"))
    cases = {"tar": (buf.getvalue(), False), "end": (bytes(1024), False), "empty": (b"", False),
             "blob": (bytes.fromhex("28b52ffd") + bytes(range(256)) * 4, True), "short": (b"\x28\xb5\x2f\xfd", True)}
    for name, (data, untarrable) in cases.items():
        (tmp_path / name).write_bytes(data)
        assert untarrable_layer(tmp_path / name) is untarrable, name
    assert untarrable_layer(tmp_path / "missing") is False


def test_our_blob_is_an_empty_tar_and_its_bootstrap_tree_is_known(tmp_path: Path) -> None:
    """A data blob we write reads, front to back, as an empty tar archive (what lets containerd's differ apply
    it); the tree containerd unpacks the bootstrap layer to is known by its content, and nothing else is."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(bytes(range(256)) * 64)
    out = build_image(src, tmp_path / "out")
    (blob,) = (out / "blobs").iterdir()
    with tarfile.open(blob) as tar:
        assert tar.getmembers() == []
    assert untarrable_layer(blob) is False
    fs = tmp_path / "fs"
    (fs / "image").mkdir(parents=True)
    shutil.copy(out / "image.boot", fs / "image" / "image.boot")
    assert unlabelled_bootstrap(fs)
    (fs / "image" / "other").write_text("x")  # more than the bootstrap: an ordinary layer
    assert not unlabelled_bootstrap(fs)
    (fs / "image" / "other").unlink()
    (fs / "image" / "image.boot").write_bytes(bytes(8192))  # not an EROFS image
    assert not unlabelled_bootstrap(fs)
    assert not unlabelled_bootstrap(tmp_path / "missing")

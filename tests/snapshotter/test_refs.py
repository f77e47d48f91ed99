"""Image references as containerd names them, and layer chain IDs (the snapshot keys containerd looks for)."""

from __future__ import annotations

import hashlib

import pytest

from cachefilesd_py.snapshotter.nydus import split_image_ref
from cachefilesd_py.snapshotter.pull import chain_ids
from erofs.errors import UsageError


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

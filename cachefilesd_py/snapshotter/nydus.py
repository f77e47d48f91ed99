"""Nydus layers as containerd hands them to the snapshotter: which layer is which, where its bootstrap comes
from, and where its blobs are read from when the image is mounted.

containerd passes a layer descriptor's ``containerd.io/snapshot/*`` annotations to the snapshotter as labels, so a
Nydus image's manifest says itself which layers are data blobs (:data:`LABEL_NYDUS_BLOB`) and which one holds the
bootstrap (:data:`LABEL_NYDUS_BOOTSTRAP`); the CRI plugin (``disable_snapshot_annotations = false``) and
``nydus-erofs pull`` add where the image lives (:data:`LABEL_IMAGE_REF`) and the layer's digest
(:data:`LABEL_LAYER_DIGEST`), which is all it takes to fetch the bootstrap and read the blobs from the registry.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import tarfile
from pathlib import Path
from typing import Any

from erofs.build.convert import ANN_NYDUS_BLOB, ANN_NYDUS_BOOTSTRAP, BOOTSTRAP_MEMBER
from erofs.errors import BackendError, UsageError

from ..backends.registry import RegistryBackend
from .store import NYDUS_BLOB, NYDUS_BOOTSTRAP

__all__ = [
    "LABEL_IMAGE_REF", "LABEL_LAYER_DIGEST", "LABEL_MANIFEST_DIGEST", "LABEL_NYDUS_BLOB", "LABEL_NYDUS_BOOTSTRAP",
    "LABEL_TARGET", "BackendSpec", "fetch_bootstrap", "layer_role", "split_image_ref", "take_unpacked_bootstrap",
]  # fmt: skip

#: the chain ID containerd asks for: a snapshotter that has it answers AlreadyExists and the layer is skipped
LABEL_TARGET = "containerd.io/snapshot.ref"
LABEL_IMAGE_REF = "containerd.io/snapshot/cri.image-ref"
LABEL_LAYER_DIGEST = "containerd.io/snapshot/cri.layer-digest"
LABEL_MANIFEST_DIGEST = "containerd.io/snapshot/cri.manifest-digest"
LABEL_NYDUS_BLOB = ANN_NYDUS_BLOB
LABEL_NYDUS_BOOTSTRAP = ANN_NYDUS_BOOTSTRAP

DOCKER_HUB = "registry-1.docker.io"
BACKEND_FILE = "backend.json"
BOOT_FILE = "image.boot"


def layer_role(labels: dict[str, str]) -> str:
    """:data:`~.store.NYDUS_BLOB`, :data:`~.store.NYDUS_BOOTSTRAP`, or "" (an ordinary layer)."""
    if labels.get(LABEL_NYDUS_BLOB, "").lower() == "true":
        return NYDUS_BLOB
    if labels.get(LABEL_NYDUS_BOOTSTRAP, "").lower() == "true":
        return NYDUS_BOOTSTRAP
    return ""


def split_image_ref(ref: str) -> tuple[str, str, str]:
    """``(host, repository, tag or digest)`` of an image reference, as containerd names images
    (``docker.io/library/x:tag``; a first component without a dot, colon or ``localhost`` is Docker Hub's)."""
    name, digest = ref, ""
    if "@" in ref:
        name, _, digest = ref.partition("@")
    first, sep, rest = name.partition("/")
    if not sep or not ("." in first or ":" in first or first == "localhost"):
        first, rest = "docker.io", name if sep else f"library/{name}"
    tag = ""
    if ":" in rest.rsplit("/", 1)[-1]:
        rest, _, tag = rest.rpartition(":")
    if not rest:
        raise UsageError(f"image reference {ref!r} has no repository")
    host = DOCKER_HUB if first == "docker.io" else first
    return host, rest, digest or tag or "latest"


class BackendSpec:
    """Where a bootstrap snapshot's blobs are read from (a registry, or containerd's content store), kept beside
    the bootstrap in ``backend.json`` so a restarted snapshotter mounts it the same way."""

    def __init__(self, kind: str, config: dict[str, Any]) -> None:
        self.kind, self.config = kind, config

    @classmethod
    def registry(cls, image_ref: str, plain_http: bool) -> BackendSpec:
        host, repo, _ = split_image_ref(image_ref)
        return cls("registry", {"host": host, "repo": repo, "plain_http": plain_http})

    def save(self, snap_dir: Path) -> None:
        tmp = snap_dir / f".{BACKEND_FILE}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # may hold credentials one day
        with os.fdopen(fd, "w") as f:
            json.dump({"kind": self.kind, "config": self.config}, f)
        os.replace(tmp, snap_dir / BACKEND_FILE)

    @classmethod
    def load(cls, snap_dir: Path) -> BackendSpec:
        value = json.loads((snap_dir / BACKEND_FILE).read_text())
        return cls(value["kind"], value["config"])


def _bootstrap_from_tar(layer: bytes, dest: Path) -> None:
    data = gzip.decompress(layer) if layer[:2] == b"\x1f\x8b" else layer
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
        try:
            member = tar.getmember(BOOTSTRAP_MEMBER)
        except KeyError:
            raise BackendError(f"the bootstrap layer has no {BOOTSTRAP_MEMBER}") from None
        src = tar.extractfile(member)
        if src is None:
            raise BackendError(f"the bootstrap layer's {BOOTSTRAP_MEMBER} is not a regular file")
        tmp = dest.with_name(f".{dest.name}.tmp")
        with open(tmp, "wb") as out:
            while chunk := src.read(1 << 20):
                out.write(chunk)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, dest)


def fetch_bootstrap(backend: BackendSpec, layer_digest: str, dest: Path) -> None:
    """Fetch the bootstrap layer ``layer_digest`` (verified) and write its ``image/image.boot`` to ``dest``."""
    algo, _, hexdigest = layer_digest.partition(":")
    if algo != "sha256" or len(hexdigest) != 64:
        raise UsageError(f"layer digest {layer_digest!r} is not a sha256 digest")
    be = RegistryBackend(**backend.config)
    try:
        size = be.size(hexdigest)
        layer = be.read(hexdigest, 0, size)
    finally:
        be.close()
    if hashlib.sha256(layer).hexdigest() != hexdigest:
        raise BackendError(f"bootstrap layer {layer_digest}: content does not match its digest")
    _bootstrap_from_tar(layer, dest)


def take_unpacked_bootstrap(fs_dir: Path, dest: Path) -> bool:
    """When containerd's differ unpacked a bootstrap layer into ``fs_dir`` (a plain ``ctr image pull``), move its
    ``image/image.boot`` to ``dest``; False when there is none."""
    src = fs_dir / BOOTSTRAP_MEMBER
    if not src.is_file() or src.is_symlink():
        return False
    os.replace(src, dest)
    return True

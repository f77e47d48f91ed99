"""Nydus layers as containerd hands them to the snapshotter: which layer is which, where its bootstrap comes
from, and where its blobs are read from when the image is mounted.

containerd passes a layer descriptor's ``containerd.io/snapshot/*`` annotations to the snapshotter as labels, so a
Nydus image's manifest says itself which layers are data blobs (:data:`LABEL_NYDUS_BLOB`) and which one holds the
bootstrap (:data:`LABEL_NYDUS_BOOTSTRAP`); the CRI plugin (``disable_snapshot_annotations = false``) and
``nydus-erofs pull`` add where the image lives (:data:`LABEL_IMAGE_REF`) and the layer's digest
(:data:`LABEL_LAYER_DIGEST`), which is all it takes to fetch the bootstrap and read the blobs from the registry.
"""

from __future__ import annotations

import json
import os
import re
import tarfile
from pathlib import Path

from erofs.errors import ImageError
from erofs.imagespec import ANN_NYDUS_BLOB, ANN_NYDUS_BOOTSTRAP, BOOTSTRAP_MEMBER
from erofs.reader.bootstrap import Bootstrap

from ..backends.config import BackendSpec, parse_backend_spec
from ..imageref import parse_image_reference
from ..reference import fetch_bootstrap_layer
from .store import NYDUS_BLOB, NYDUS_BOOTSTRAP

__all__ = [
    "LABEL_IMAGE_REF", "LABEL_LAYER_DIGEST", "LABEL_MANIFEST_DIGEST", "LABEL_NYDUS_BLOB", "LABEL_NYDUS_BOOTSTRAP",
    "LABEL_TARGET", "fetch_bootstrap", "layer_role", "load_backend", "missing_blob", "registry_backend",
    "save_backend", "split_image_ref", "take_unpacked_bootstrap", "unlabelled_bootstrap", "unpack_chain_id",
    "untarrable_layer",
]  # fmt: skip

#: the chain ID containerd asks for: a snapshotter that has it answers AlreadyExists and the layer is skipped
LABEL_TARGET = "containerd.io/snapshot.ref"
LABEL_IMAGE_REF = "containerd.io/snapshot/cri.image-ref"
LABEL_LAYER_DIGEST = "containerd.io/snapshot/cri.layer-digest"
LABEL_MANIFEST_DIGEST = "containerd.io/snapshot/cri.manifest-digest"
LABEL_NYDUS_BLOB = ANN_NYDUS_BLOB
LABEL_NYDUS_BOOTSTRAP = ANN_NYDUS_BOOTSTRAP

#: the last component of the key containerd's unpack prepares a layer under: ``extract-<unique> <chain ID>``
UNPACK_KEY = re.compile(r"(?:^|/)extract-[^/ ]* (sha256:[0-9a-f]{64})$")

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
    parsed = parse_image_reference(ref)
    return parsed.host, parsed.repo, parsed.reference


def registry_backend(image_ref: str, plain_http: bool) -> BackendSpec:
    """The registry backend of the image ``image_ref``: its blobs are read from the repository it is in."""
    host, repo, _ = split_image_ref(image_ref)
    return BackendSpec("registry", {"host": host, "repo": repo, "plain_http": plain_http})


def save_backend(backend: BackendSpec, snap_dir: Path) -> None:
    """Keep where a bootstrap snapshot's blobs are read from (a registry, or containerd's content store) beside
    the bootstrap, in ``backend.json``, so a restarted snapshotter mounts it the same way."""
    tmp = snap_dir / f".{BACKEND_FILE}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # may hold credentials one day
    with os.fdopen(fd, "w") as f:
        json.dump(backend.to_json(), f)
    os.replace(tmp, snap_dir / BACKEND_FILE)


def load_backend(snap_dir: Path) -> BackendSpec:
    """What :func:`save_backend` kept (the file of an older snapshotter, ``{"kind": …, "config": …}``, too)."""
    value = json.loads((snap_dir / BACKEND_FILE).read_text())
    if isinstance(value, dict) and "kind" in value and "type" not in value:
        value = {"type": value.pop("kind"), **value}
    return parse_backend_spec(value, str(snap_dir / BACKEND_FILE))


def fetch_bootstrap(backend: BackendSpec, layer_digest: str, dest: Path) -> None:
    """Fetch the bootstrap layer ``layer_digest`` from the registry ``backend`` names and write its
    ``image/image.boot`` to ``dest``."""
    config = backend.config
    fetch_bootstrap_layer(config["host"], config["repo"], layer_digest, dest, config)


def take_unpacked_bootstrap(fs_dir: Path, dest: Path) -> bool:
    """When containerd's differ unpacked a bootstrap layer into ``fs_dir`` (a plain ``ctr image pull``), move its
    ``image/image.boot`` to ``dest``; False when there is none."""
    src = fs_dir / BOOTSTRAP_MEMBER
    if not src.is_file() or src.is_symlink():
        return False
    os.replace(src, dest)
    return True


def unlabelled_bootstrap(fs_dir: Path) -> bool:
    """Whether containerd's differ unpacked a Nydus bootstrap layer into ``fs_dir`` though its snapshot came without
    labels (containerd 1.6's ``ctr image pull``): the tree is ``image/image.boot`` alone, and that is a RAFS v6
    bootstrap."""
    boot = fs_dir / BOOTSTRAP_MEMBER
    try:
        if [p.name for p in fs_dir.iterdir()] != [boot.parent.name] or list(boot.parent.iterdir()) != [boot]:
            return False
        if boot.is_symlink() or not boot.is_file():
            return False
        with Bootstrap(boot) as bs:
            return bs.is_rafs
    except (OSError, ImageError):
        return False


def missing_blob(boot: Path, blobs_dir: Path) -> str:
    """The first blob the bootstrap ``boot`` names that ``blobs_dir`` (containerd's content store) does not have,
    or ""."""
    with Bootstrap(boot) as bs:
        ids = [b.blob_id for b in bs.blobs]
    return next((i for i in ids if not (blobs_dir / i).is_file()), "")


def unpack_chain_id(key: str) -> str:
    """The chain ID in a key of containerd's unpack (namespaced by its metadata, ``<ns>/<n>/extract-… <chain
    ID>``), or ""."""
    m = UNPACK_KEY.search(key)
    return m.group(1) if m else ""


def untarrable_layer(blob: Path) -> bool:
    """Whether ``blob`` (a first layer in containerd's content store, whose digest is its diff ID: stored
    uncompressed, applied as it is) is not a tar archive, as a Nydus data blob is not: containerd's differ cannot
    apply it.  False when it is missing, empty, or starts like a tar (a header or the end-of-archive block)."""
    try:
        with open(blob, "rb") as f:
            block = f.read(tarfile.BLOCKSIZE)
    except FileNotFoundError:
        return False
    if len(block) < tarfile.BLOCKSIZE:
        return len(block) > 0
    try:
        tarfile.TarInfo.frombuf(block, "utf-8", "surrogateescape")
    except tarfile.EOFHeaderError:
        return False
    except tarfile.HeaderError:
        return True
    return False

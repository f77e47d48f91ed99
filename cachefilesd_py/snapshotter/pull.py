"""``nydus-erofs pull``: put a Nydus image into containerd without downloading its blob layers.

What it does, through containerd's own API (so containerd's metadata, leases and garbage collector see it all):

1. fetch the manifest (the index's entry for the platform) and the config from the registry
   (:class:`cachefilesd_py.reference.RemoteImage`);
2. under a lease, write them into containerd's content store, the manifest labelled with what it refers to and
   the config with the top snapshot (``containerd.io/gc.ref.snapshot.<snapshotter>``), so the GC keeps them;
3. prepare one snapshot per layer, keyed by the chain IDs of the config's ``diff_ids`` and labelled as containerd's
   CRI plugin labels them (image ref, layer and manifest digest, the layer's ``containerd.io/snapshot/*``
   annotations): the snapshotter answers each with ``ALREADY_EXISTS`` without downloading the layer, and
   containerd records the committed chain, so the image counts as unpacked and ``ctr run`` starts it;
4. create (or update) the image.

An image that is not Nydus is pulled by ``ctr image pull`` (containerd downloads and unpacks it).
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import os
import secrets
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf import field_mask_pb2

from erofs.errors import BackendError, NydusErofsError, UsageError

from ..imageref import DOCKER_HUB
from ..reference import RemoteImage, bootstrap_layers, json_object
from .nydus import (
    LABEL_IMAGE_REF,
    LABEL_LAYER_DIGEST,
    LABEL_MANIFEST_DIGEST,
    LABEL_TARGET,
    split_image_ref,
)
from .proto import (
    content_pb2,
    content_pb2_grpc,
    images_pb2,
    images_pb2_grpc,
    leases_pb2,
    leases_pb2_grpc,
    snapshots_pb2,
    snapshots_pb2_grpc,
    types_pb2,
)

__all__ = ["PullError", "PullResult", "chain_ids", "pull"]

SNAPSHOT_LABEL_PREFIX = "containerd.io/snapshot/"
GC_SNAPSHOT = "containerd.io/gc.ref.snapshot."
GC_CONTENT = "containerd.io/gc.ref.content."
LEASE_EXPIRE = "containerd.io/gc.expire"
MAX_DOCUMENT = 4 << 20  # a manifest or config larger than this is not one


class PullError(NydusErofsError):
    exit_code = 5


@dataclass(frozen=True)
class PullResult:
    name: str
    nydus: bool
    manifest_digest: str = ""
    chain_id: str = ""
    layers: int = 0


def chain_ids(diff_ids: list[str]) -> list[str]:
    """The chain ID of each layer: the first's diff ID, then sha256 of "<parent chain ID> <diff ID>"."""
    out: list[str] = []
    for d in diff_ids:
        out.append(d if not out else "sha256:" + hashlib.sha256(f"{out[-1]} {d}".encode()).hexdigest())
    return out


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


# -- containerd -----------------------------------------------------------------------------------------------------
class _Containerd:
    """Stubs on containerd's socket; every call in ``namespace`` (and ``lease``, once set)."""

    def __init__(self, address: str, namespace: str) -> None:
        try:  # no socket, or nobody listening: say so now, not after gRPC's 10 s of retries
            with socket.socket(socket.AF_UNIX) as probe:
                probe.settimeout(10)
                probe.connect(address)
        except OSError as e:
            raise UsageError(f"cannot reach containerd at {address}: {e.strerror or e}") from None
        self.channel = grpc.insecure_channel(f"unix:{address}")
        try:
            grpc.channel_ready_future(self.channel).result(timeout=10)
        except grpc.FutureTimeoutError:
            self.channel.close()
            raise UsageError(f"cannot reach containerd at {address}") from None
        self.namespace, self.lease = namespace, ""
        self.content = content_pb2_grpc.ContentStub(self.channel)
        self.images = images_pb2_grpc.ImagesStub(self.channel)
        self.leases = leases_pb2_grpc.LeasesStub(self.channel)
        self.snapshots = snapshots_pb2_grpc.SnapshotsStub(self.channel)

    @property
    def md(self) -> list[tuple[str, str]]:
        md = [("containerd-namespace", self.namespace)]
        return md + [("containerd-lease", self.lease)] if self.lease else md

    def write(self, data: bytes, digest: str, labels: dict[str, str]) -> None:
        """Put ``data`` in the content store (already there: fine) and set ``labels`` on it."""

        def requests() -> Iterator[content_pb2.WriteContentRequest]:
            ref = f"nydus-erofs-pull-{digest}"
            yield content_pb2.WriteContentRequest(action=content_pb2.WRITE, ref=ref, total=len(data), expected=digest,
                                                  offset=0, data=data)  # fmt: skip
            yield content_pb2.WriteContentRequest(action=content_pb2.COMMIT, ref=ref, total=len(data),
                                                  expected=digest, offset=len(data), labels=labels)  # fmt: skip

        try:
            for _ in self.content.Write(requests(), metadata=self.md):
                pass
        except grpc.RpcError as e:
            if e.code() != grpc.StatusCode.ALREADY_EXISTS:
                raise
        if labels:
            info = content_pb2.Info(digest=digest, labels=labels)
            mask = field_mask_pb2.FieldMask(paths=[f"labels.{k}" for k in labels])
            self.content.Update(content_pb2.UpdateRequest(info=info, update_mask=mask), metadata=self.md)

    def close(self) -> None:
        self.channel.close()


def _rpc_error(e: grpc.RpcError, what: str) -> PullError:
    return PullError(f"{what}: {e.details() or e.code().name}")  # type: ignore[attr-defined]


@dataclass(frozen=True)
class _Image:
    """What the registry has for a reference: the document it names (``top``: an index or the manifest), the
    manifest for the platform, its parsed layers, and the config (None when the image is not Nydus)."""

    top: bytes
    top_type: str
    manifest: bytes
    manifest_type: str
    layers: list[dict[str, Any]]
    config_digest: str = ""
    config: bytes = b""


def _fetch(ref: str, plain_http: bool, platform: str | None) -> _Image:
    with RemoteImage(ref, platform=platform, plain_http=plain_http) as remote:
        docs = remote.documents()
        layers = docs.manifest.get("layers")
        config_desc = docs.manifest.get("config")
        if not isinstance(layers, list) or not all(isinstance(x, dict) and "digest" in x for x in layers) or \
                not isinstance(config_desc, dict):  # fmt: skip
            raise BackendError(f"manifest {ref}: not an image manifest (no config or layers)")
        image = _Image(docs.top, docs.top_type, docs.manifest_body, docs.media_type, layers)
        if not bootstrap_layers(docs.manifest):
            return image
        remote.resolve()  # a Nydus image as it should be: its bootstrap the last layer, the others blobs
        if not isinstance(config_desc.get("size"), int) or config_desc["size"] > MAX_DOCUMENT:
            raise BackendError(f"manifest {ref}: no config size, or larger than {MAX_DOCUMENT} bytes")
        config = io.BytesIO()
        remote.fetch_blob(config_desc, config, "config")
        return dataclasses.replace(image, config_digest=str(config_desc["digest"]), config=config.getvalue())


def pull(ref: str, address: str, *, snapshotter: str = "nydus-erofs", namespace: str = "default",
         plain_http: bool = False, platform: str | None = None) -> PullResult:  # fmt: skip
    """Pull ``ref`` into the containerd at ``address`` (see the module docstring)."""
    host, repo, tag = split_image_ref(ref)
    sep = "@" if tag.startswith("sha256:") else ":"
    image_ref = f"{host}/{repo}{sep}{tag}"
    name = f"docker.io/{repo}{sep}{tag}" if host == DOCKER_HUB else image_ref  # containerd's name for it
    image = _fetch(image_ref, plain_http, platform)
    if not image.config:
        return _plain_pull(name, address, snapshotter, namespace, plain_http, platform)
    diff_ids = (json_object(image.config, "config").get("rootfs") or {}).get("diff_ids") or []
    if len(diff_ids) != len(image.layers):
        raise PullError(f"{ref}: the config has {len(diff_ids)} diff_ids for {len(image.layers)} layers")
    chains = chain_ids(diff_ids)
    cd = _Containerd(address, namespace)
    try:
        expire = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + 3600))
        lease = cd.leases.Create(leases_pb2.CreateRequest(id=f"nydus-erofs-pull-{secrets.token_hex(8)}",
                                                          labels={LEASE_EXPIRE: expire}), metadata=cd.md)  # fmt: skip
        cd.lease = lease.lease.id
        try:
            _store(cd, image, image_ref, name, snapshotter, chains)
        finally:
            cd.lease, lease_id = "", cd.lease
            cd.leases.Delete(leases_pb2.DeleteRequest(id=lease_id), metadata=cd.md)
    except grpc.RpcError as e:
        raise _rpc_error(e, f"pull {ref}") from None
    finally:
        cd.close()
    return PullResult(name, True, _digest(image.manifest), chains[-1], len(image.layers))


def _store(cd: _Containerd, image: _Image, image_ref: str, name: str, snapshotter: str, chains: list[str]) -> None:
    """Content (config, manifest, index), then the layer snapshots, then the image: each refers to the next by a
    GC label, and the lease keeps them all until the image does."""
    manifest_digest = _digest(image.manifest)
    cd.write(image.config, image.config_digest, {GC_SNAPSHOT + snapshotter: chains[-1]})
    refs = {GC_CONTENT + "config": image.config_digest}
    refs.update({f"{GC_CONTENT}l.{i}": lay["digest"] for i, lay in enumerate(image.layers)})
    cd.write(image.manifest, manifest_digest, refs)
    target = types_pb2.Descriptor(media_type=image.manifest_type, digest=manifest_digest, size=len(image.manifest))
    if image.top is not image.manifest:
        cd.write(image.top, _digest(image.top), {f"{GC_CONTENT}m.0": manifest_digest})
        target = types_pb2.Descriptor(media_type=image.top_type, digest=_digest(image.top), size=len(image.top))
    for i, lay in enumerate(image.layers):
        annotations = lay.get("annotations") or {}
        labels = {k: v for k, v in annotations.items() if k.startswith(SNAPSHOT_LABEL_PREFIX)}
        labels.update({LABEL_TARGET: chains[i], LABEL_IMAGE_REF: image_ref, LABEL_LAYER_DIGEST: lay["digest"],
                       LABEL_MANIFEST_DIGEST: manifest_digest})  # fmt: skip
        _prepare_layer(cd, snapshotter, chains[i], chains[i - 1] if i else "", labels)
    _put_image(cd, name, target)


def _prepare_layer(cd: _Containerd, snapshotter: str, chain: str, parent: str, labels: dict[str, str]) -> None:
    """Ask for the layer's snapshot; a Nydus snapshotter answers ALREADY_EXISTS (committed without download)."""
    try:
        cd.snapshots.Stat(snapshots_pb2.StatSnapshotRequest(snapshotter=snapshotter, key=chain), metadata=cd.md)
        return  # there already
    except grpc.RpcError as e:
        if e.code() != grpc.StatusCode.NOT_FOUND:
            raise
    key = f"extract-{secrets.token_hex(8)} {chain}"
    req = snapshots_pb2.PrepareSnapshotRequest(snapshotter=snapshotter, key=key, parent=parent, labels=labels)
    try:
        cd.snapshots.Prepare(req, metadata=cd.md)
    except grpc.RpcError as e:
        if e.code() == grpc.StatusCode.ALREADY_EXISTS:
            return
        raise
    cd.snapshots.Remove(snapshots_pb2.RemoveSnapshotRequest(snapshotter=snapshotter, key=key), metadata=cd.md)
    raise PullError(f"snapshotter {snapshotter!r} would unpack layer {labels[LABEL_LAYER_DIGEST]}: it does not run "
                    "Nydus images lazily (use nydus-erofs snapshotter)")  # fmt: skip


def _put_image(cd: _Containerd, name: str, target: types_pb2.Descriptor) -> None:
    image = images_pb2.Image(name=name, target=target)
    try:
        cd.images.Create(images_pb2.CreateImageRequest(image=image), metadata=cd.md)
    except grpc.RpcError as e:
        if e.code() != grpc.StatusCode.ALREADY_EXISTS:
            raise
        mask = field_mask_pb2.FieldMask(paths=["target"])
        cd.images.Update(images_pb2.UpdateImageRequest(image=image, update_mask=mask), metadata=cd.md)


def _plain_pull(name: str, address: str, snapshotter: str, namespace: str, plain_http: bool,
                platform: str | None) -> PullResult:  # fmt: skip
    cmd = ["ctr", "--address", address, "--namespace", namespace, "images", "pull", "--snapshotter", snapshotter]
    cmd += ["--plain-http"] if plain_http else []
    cmd += ["--platform", platform] if platform else []
    try:
        proc = subprocess.run([*cmd, name], stdin=subprocess.DEVNULL, capture_output=True, text=True,
                              env={**os.environ, "NO_COLOR": "1"})  # fmt: skip
    except FileNotFoundError:
        raise UsageError("not a Nydus image, and ctr (to pull it) is not installed") from None
    if proc.returncode != 0:
        lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
        raise PullError(f"ctr images pull {name}: {lines[-1] if lines else 'failed'}")
    return PullResult(name, False)

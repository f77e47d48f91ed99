"""Nydus images by reference: ``docker://HOST[:PORT]/REPO[:TAG|@sha256:HEX]`` → the image's bootstrap on disk and
the backend its blobs are read from.

:func:`resolve_nydus_image` is the one call: it resolves the manifest (an index → the manifest of the wanted
platform, preferring a Nydus one), finds the bootstrap layer (the layer annotated
``containerd.io/snapshot/nydus-bootstrap``, as ``nydus-erofs convert`` and nydusify write it) and the blob
layers (media type ``application/vnd.oci.image.layer.nydus.blob.v1``), fetches the bootstrap layer with its
digest verified, extracts only ``image/image.boot`` from it (size-bounded, written beside the destination and
renamed into place), and checks that the bootstrap's blob table names exactly the manifest's blob layers.  The
blobs are then served lazily from the same repository by the ``registry`` backend, whose options are
:attr:`NydusImage.backend_config` (no secrets: the backend reads credentials itself, from the docker config
and its credential helpers).  :class:`RemoteImage` is the same in two steps (resolve, then fetch), for callers
that name the destination after the manifest digest.

Errors are one line, prefixed with the reference: a malformed reference or an image that is not Nydus is a
:class:`~erofs.errors.UsageError` (exit 2), a damaged image an :class:`~erofs.errors.ImageError` (exit 3), a
missing tag or an unreachable registry a :class:`~erofs.errors.BackendError` (exit 4).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cachefilesd_py.backends.registry import ManifestNotFoundError, RegistryBackend
from cachefilesd_py.imageref import DIGEST, ImageReference, parse_image_reference
from erofs.errors import BackendError, ImageError, NydusErofsError, SourceError, UsageError
from erofs.imagespec import (
    ANN_NYDUS_BOOTSTRAP,
    DEFAULT_PLATFORM,
    MAX_BOOTSTRAP,
    MT_DOCKER_LIST,
    MT_DOCKER_MANIFEST,
    MT_INDEX,
    MT_MANIFEST,
    MT_NYDUS_BLOB,
    NYDUS_OS_FEATURE,
    extract_bootstrap,
    parse_platform,
)
from erofs.paths import BOOTSTRAP_NAME
from erofs.reader.bootstrap import Bootstrap

__all__ = [
    "BOOTSTRAPS_DIR",
    "ImageDocuments",
    "ImageNotFoundError",
    "NydusImage",
    "NydusManifest",
    "RemoteImage",
    "bootstrap_layers",
    "cached_nydus_image",
    "fetch_bootstrap_layer",
    "json_object",
    "resolve_nydus_image",
]

MT_DOCKER_SCHEMA1 = "application/vnd.docker.distribution.manifest.v1+json"
MT_DOCKER_SCHEMA1_SIGNED = "application/vnd.docker.distribution.manifest.v1+prettyjws"
ACCEPT = (MT_MANIFEST, MT_INDEX, MT_DOCKER_MANIFEST, MT_DOCKER_LIST)
_FETCH_PIECE = 8 << 20  # bytes per ranged GET of the bootstrap layer


class ImageNotFoundError(BackendError):
    """The registry has no such image (no manifest by that tag or digest, or no such repository)."""


@dataclass(frozen=True)
class ImageDocuments:
    """The documents a reference names, each as the registry served it: ``top`` (an index, or the manifest
    itself) and the manifest of the wanted platform (``manifest``, parsed, and ``manifest_body``)."""

    top: bytes = field(repr=False)
    top_type: str
    manifest_body: bytes = field(repr=False)
    manifest: Mapping[str, Any] = field(repr=False)
    media_type: str
    digest: str  # sha256:<hex> of manifest_body


@dataclass(frozen=True)
class NydusManifest:
    """A resolved Nydus image manifest: its digest, the bootstrap layer's descriptor, the blob layers' ids."""

    digest: str  # sha256:<hex> of the manifest
    manifest: Mapping[str, Any] = field(repr=False)
    bootstrap_layer: Mapping[str, Any]
    blob_ids: tuple[str, ...]


@dataclass(frozen=True)
class NydusImage:
    """What :func:`resolve_nydus_image` made: the bootstrap on disk and where its blobs come from.

    ``backend``/``backend_config`` are :func:`cachefilesd_py.backends.make_backend`'s kind and options (the
    ``registry`` backend: ``host``, ``repo``, ``plain_http``, ``insecure``, ``docker_config``); they hold no
    secret, the backend finds the credentials itself.
    """

    reference: str
    bootstrap: Path
    backend: str
    backend_config: dict[str, Any]
    manifest_digest: str
    bootstrap_layer_digest: str
    blob_ids: list[str]

    def to_json(self) -> dict[str, Any]:
        return {
            "reference": self.reference,
            "bootstrap": str(self.bootstrap),
            "backend": self.backend,
            "backend_config": dict(self.backend_config),
            "manifest_digest": self.manifest_digest,
            "bootstrap_layer_digest": self.bootstrap_layer_digest,
            "blob_ids": list(self.blob_ids),
        }


def json_object(data: bytes, what: str) -> dict[str, Any]:
    """``data`` (a manifest, an image config...) as a JSON object; ImageError when it is none."""
    try:
        value = json.loads(data)
    except ValueError as e:
        raise ImageError(f"{what}: not valid JSON: {e}") from None
    if not isinstance(value, dict):
        raise ImageError(f"{what}: not a JSON object")
    return value


def _layer_kind(media_type: str) -> str:
    if media_type.endswith(("+gzip", ".gzip")):
        return "gzip"
    if media_type.endswith("+zstd"):
        return "zstd"
    if media_type.endswith((".tar", ".v1.tar", "rootfs.diff.tar")):
        return "uncompressed"
    return media_type or "untyped"


def describe_manifest(manifest: Mapping[str, Any], media_type: str) -> str:
    """What a manifest that is not a Nydus image is, in a few words: "an OCI image with 3 gzip layers"."""
    if media_type in (MT_DOCKER_SCHEMA1, MT_DOCKER_SCHEMA1_SIGNED) or manifest.get("schemaVersion") == 1:
        return "a Docker schema 1 image"
    what = "a Docker image" if media_type == MT_DOCKER_MANIFEST else "an OCI image"
    config = manifest.get("config") if isinstance(manifest.get("config"), dict) else {}
    config_type = str(config.get("mediaType", ""))
    if config_type and "image.config" not in config_type and "container.image" not in config_type:
        what = f"an OCI artifact ({config_type})"
    layers = [x for x in manifest.get("layers") or [] if isinstance(x, dict)]
    if not layers:
        return f"{what} without layers"
    counts: dict[str, int] = {}
    for layer in layers:
        kind = _layer_kind(str(layer.get("mediaType", "")))
        counts[kind] = counts.get(kind, 0) + 1
    parts = [f"{n} {kind}" for kind, n in counts.items()]
    listed = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    return f"{what} with {listed} layer{'s' if len(layers) > 1 else ''}"


def bootstrap_layers(manifest: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    """The layers of ``manifest`` annotated as a Nydus bootstrap (none: the image is not a Nydus one)."""
    layers = manifest.get("layers")
    if not isinstance(layers, list):
        return []
    return [x for x in layers
            if isinstance(x, dict) and (x.get("annotations") or {}).get(ANN_NYDUS_BOOTSTRAP) == "true"]  # fmt: skip


def _descriptor_digest(desc: Mapping[str, Any], what: str) -> str:
    digest = desc.get("digest")
    if not isinstance(digest, str) or not DIGEST.fullmatch(digest):
        raise ImageError(f"{what}: digest {digest!r} is not sha256:<64 hex digits>")
    return digest


def _descriptor_size(desc: Mapping[str, Any], what: str) -> int:
    size = desc.get("size")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise ImageError(f"{what}: size {size!r} is not a byte count")
    return size


def _platform_matches(entry: Mapping[str, Any], want: tuple[str, str, str | None]) -> bool:
    p = entry.get("platform")
    if not isinstance(p, dict):
        return False
    os_name, arch, variant = want
    if p.get("os") != os_name or p.get("architecture") != arch:
        return False
    return variant is None or p.get("variant") in (variant, None if variant == "v8" else variant)


def _platform_name(entry: Mapping[str, Any]) -> str:
    p = entry.get("platform") if isinstance(entry.get("platform"), dict) else {}
    parts = [str(p.get("os", "?")), str(p.get("architecture", "?"))] + ([str(p["variant"])] if p.get("variant") else [])
    return "/".join(parts)


class RemoteImage:
    """One Nydus image in a registry: :meth:`resolve` its manifest, then :meth:`fetch_bootstrap`.

    ``platform``: ``os/arch[/variant]`` picked from an index (default: this machine's); ``plain_http``: http
    instead of https; ``insecure``: no TLS verification; ``auth_file``: a docker config to take credentials from
    (default ``$DOCKER_CONFIG/config.json`` or ``~/.docker/config.json``, with its credential helpers);
    ``options``: more registry backend options for these requests (``auth``, ``timeout``...), which are not
    copied into :attr:`backend_config`.
    """

    def __init__(self, ref: str | ImageReference, *, platform: str | None = None, plain_http: bool = False,
                 insecure: bool = False, auth_file: str | os.PathLike[str] | None = None,
                 options: Mapping[str, Any] | None = None) -> None:  # fmt: skip
        self.ref = ref if isinstance(ref, ImageReference) else parse_image_reference(ref)
        try:
            self.platform = parse_platform(platform or DEFAULT_PLATFORM)
        except SourceError as e:
            raise UsageError(str(e)) from None
        self.backend_config: dict[str, Any] = {"host": self.ref.host, "repo": self.ref.repo}
        if plain_http:
            self.backend_config["plain_http"] = True
        if insecure:
            self.backend_config["insecure"] = True
        if auth_file is not None:
            self.backend_config["docker_config"] = os.path.abspath(auth_file)
        with self._errors():
            # digests are checked here, as a whole (an ImageError), not per read by the backend
            extra = {k: v for k, v in (options or {}).items() if k not in ("host", "repo", "verify_digest")}
            self._backend = RegistryBackend(**{**extra, **self.backend_config}, verify_digest=False)
        self._documents: ImageDocuments | None = None
        self._resolved: NydusManifest | None = None

    def close(self) -> None:
        self._backend.close()

    def __enter__(self) -> RemoteImage:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def _errors(self) -> Iterator[None]:
        """Every error of this image as one line prefixed with the reference, its exit code kept."""
        try:
            yield
        except ManifestNotFoundError:
            raise ImageNotFoundError(
                f"{self.ref}: no such image (the registry has no manifest {self.ref.reference})"
            ) from None
        except NydusErofsError as e:
            raise type(e)(f"{self.ref}: {e}") from None

    # -- manifest -----------------------------------------------------------------------------------------------
    def _get_manifest(self, reference: str,
                      expect: Mapping[str, Any] | None = None) -> tuple[dict[str, Any], str, str, bytes]:  # fmt: skip
        """(manifest, its media type, its digest, its body) of ``reference``; a digest reference is checked."""
        body, content_type = self._backend.manifest(reference, ACCEPT)
        digest = "sha256:" + hashlib.sha256(body).hexdigest()
        if DIGEST.fullmatch(reference) and digest != reference:
            raise ImageError(f"manifest {reference[:19]}…: the registry sent content hashing to {digest[:19]}…")
        if expect is not None and len(body) != expect.get("size"):
            raise ImageError(f"manifest {reference[:19]}…: {len(body)} bytes, its descriptor says {expect.get('size')}")
        manifest = json_object(body, f"manifest {reference}")
        return manifest, str(manifest.get("mediaType") or content_type), digest, body

    def _select(self, index: Mapping[str, Any]) -> Mapping[str, Any]:
        entries = [m for m in index.get("manifests") or [] if isinstance(m, dict)]
        matching = [m for m in entries if _platform_matches(m, self.platform)]
        if not matching:
            have = ", ".join(sorted({_platform_name(m) for m in entries})) or "nothing"
            raise UsageError(f"no manifest for platform {'/'.join(p for p in self.platform if p)} (the index has: "
                             f"{have})")  # fmt: skip
        nydus = [m for m in matching if NYDUS_OS_FEATURE in (m.get("platform", {}).get("os.features") or [])]
        return (nydus or matching)[0]

    def documents(self) -> ImageDocuments:
        """The manifest of the platform (through the index when the reference names one), fetched once."""
        if self._documents is not None:
            return self._documents
        with self._errors():
            manifest, media_type, digest, body = self._get_manifest(self.ref.reference)
            top, top_type = body, media_type
            if media_type in (MT_INDEX, MT_DOCKER_LIST) or "manifests" in manifest:
                desc = self._select(manifest)
                manifest, media_type, digest, body = self._get_manifest(_descriptor_digest(desc, "index entry"), desc)
            self._documents = ImageDocuments(top, top_type, body, manifest, media_type, digest)
        return self._documents

    def resolve(self) -> NydusManifest:
        """The Nydus manifest (fetched once); UsageError when the reference names something else."""
        if self._resolved is not None:
            return self._resolved
        docs = self.documents()
        with self._errors():
            self._resolved = self._nydus(docs.manifest, docs.media_type, docs.digest)
        return self._resolved

    def _nydus(self, manifest: Mapping[str, Any], media_type: str, digest: str) -> NydusManifest:
        layers = manifest.get("layers")
        if not isinstance(layers, list) or not all(isinstance(x, dict) for x in layers):
            layers = []
        boots = bootstrap_layers(manifest)
        if not boots:
            raise UsageError(f"not a Nydus image ({describe_manifest(manifest, media_type)})")
        if len(boots) > 1 or boots[0] is not layers[-1]:
            raise ImageError("the bootstrap layer must be the manifest's only and last nydus-bootstrap layer")
        blobs = []
        for i, layer in enumerate(layers[:-1]):
            if layer.get("mediaType") != MT_NYDUS_BLOB:
                raise ImageError(f"layer {i}: media type {layer.get('mediaType')!r} in a Nydus image "
                                 f"(expected {MT_NYDUS_BLOB})")  # fmt: skip
            blobs.append(_descriptor_digest(layer, f"layer {i}").removeprefix("sha256:"))
        boot = boots[0]
        _descriptor_digest(boot, "bootstrap layer")
        if _descriptor_size(boot, "bootstrap layer") > MAX_BOOTSTRAP:
            raise ImageError(f"bootstrap layer of {boot['size']} bytes: over the limit of {MAX_BOOTSTRAP}")
        return NydusManifest(digest, manifest, boot, tuple(blobs))

    def image(self, bootstrap: Path) -> NydusImage:
        """The :class:`NydusImage` of this image with its bootstrap at ``bootstrap``."""
        resolved = self.resolve()
        return NydusImage(
            reference=str(self.ref),
            bootstrap=bootstrap,
            backend="registry",
            backend_config=dict(self.backend_config),
            manifest_digest=resolved.digest,
            bootstrap_layer_digest=str(resolved.bootstrap_layer["digest"]),
            blob_ids=list(resolved.blob_ids),
        )

    # -- bootstrap ----------------------------------------------------------------------------------------------
    def fetch_bootstrap(self, dest: str | os.PathLike[str]) -> Path:
        """Fetch the bootstrap layer (digest verified), extract its ``image/image.boot`` to ``dest`` (atomically:
        a temporary file beside it, renamed once checked) and check its blob table against the manifest."""
        resolved = self.resolve()
        with self._errors():
            return _write_bootstrap(self._backend, resolved.bootstrap_layer, Path(dest), resolved.blob_ids)

    def fetch_blob(self, desc: Mapping[str, Any], out: Any, what: str) -> None:
        """Write the blob ``desc`` names (``digest``, ``size``) to ``out``, its digest verified."""
        with self._errors():
            _fetch_blob(self._backend, desc, out, what)


def _fetch_blob(backend: RegistryBackend, desc: Mapping[str, Any], out: Any, what: str) -> None:
    digest, size = _descriptor_digest(desc, what), _descriptor_size(desc, what)
    blob_id = digest.removeprefix("sha256:")
    sha = hashlib.sha256()
    offset = 0
    while offset < size:
        piece = backend.read(blob_id, offset, min(_FETCH_PIECE, size - offset))
        sha.update(piece)
        out.write(piece)
        offset += len(piece)
    if sha.hexdigest() != blob_id:
        raise ImageError(f"{what} {digest[:19]}…: the registry sent content hashing to "
                         f"sha256:{sha.hexdigest()[:12]}…")  # fmt: skip


def _write_bootstrap(backend: RegistryBackend, layer_desc: Mapping[str, Any], dest: Path,
                     blob_ids: tuple[str, ...] | None) -> Path:  # fmt: skip
    """Fetch the bootstrap layer (digest verified), extract its ``image/image.boot`` to ``dest`` (atomically:
    a temporary file beside it, renamed once checked); with ``blob_ids``, check its blob table against them."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, layer_tmp = tempfile.mkstemp(prefix=".layer-", dir=dest.parent)
    boot_tmp = None
    try:
        with os.fdopen(fd, "w+b") as layer:
            _fetch_blob(backend, layer_desc, layer, "bootstrap layer")
            layer.seek(0)
            fd2, boot_tmp = tempfile.mkstemp(prefix=f".{dest.name}-", dir=dest.parent)
            with os.fdopen(fd2, "wb") as out:
                extract_bootstrap(layer, out)
                out.flush()
                os.fsync(out.fileno())  # whole on disk before it is renamed into place
        if blob_ids is not None:
            _check_blob_table(Path(boot_tmp), blob_ids)
        os.chmod(boot_tmp, 0o644)
        os.replace(boot_tmp, dest)
        boot_tmp = None
    finally:
        os.unlink(layer_tmp)
        if boot_tmp is not None:
            os.unlink(boot_tmp)
    return dest


def fetch_bootstrap_layer(host: str, repo: str, layer_digest: str, dest: str | os.PathLike[str],
                          options: Mapping[str, Any] | None = None) -> Path:  # fmt: skip
    """Fetch the bootstrap layer ``layer_digest`` of repository ``repo`` at ``host`` and put its
    ``image/image.boot`` at ``dest``, as :meth:`RemoteImage.fetch_bootstrap` does (digest verified, streamed,
    size-bounded, atomic) for a caller that knows the layer but not the manifest (so no blob-table check).
    ``options``: more registry backend options (``plain_http``, ``insecure``...)."""
    if not DIGEST.fullmatch(layer_digest):
        raise UsageError(f"layer digest {layer_digest!r} is not sha256:<64 hex digits>")
    extra = {k: v for k, v in (options or {}).items() if k not in ("host", "repo", "verify_digest")}
    try:
        with RegistryBackend(host, repo, **extra, verify_digest=False) as backend:
            size = backend.size(layer_digest.removeprefix("sha256:"))
            if size > MAX_BOOTSTRAP:
                raise ImageError(f"bootstrap layer of {size} bytes: over the limit of {MAX_BOOTSTRAP}")
            return _write_bootstrap(backend, {"digest": layer_digest, "size": size}, Path(dest), None)
    except NydusErofsError as e:
        raise type(e)(f"{host}/{repo}: {e}") from None


def _check_blob_table(boot: Path, blob_ids: tuple[str, ...]) -> None:
    """The bootstrap's blob table must name exactly the manifest's blob layers."""
    with Bootstrap(boot) as bs:
        table = [b.blob_id for b in bs.blobs]
    if set(table) != set(blob_ids):
        missing = sorted(set(table) - set(blob_ids))
        extra = sorted(set(blob_ids) - set(table))
        why = (f"blob {missing[0][:16]}… of the bootstrap is no layer of the manifest" if missing
               else f"blob layer {extra[0][:16]}… is not in the bootstrap's blob table")  # fmt: skip
        raise ImageError(f"bootstrap and manifest disagree: {why}")


def resolve_nydus_image(ref: str, dest_dir: str | os.PathLike[str], *, platform: str | None = None,
                        plain_http: bool = False, insecure: bool = False,
                        auth_file: str | os.PathLike[str] | None = None,
                        options: Mapping[str, Any] | None = None) -> NydusImage:  # fmt: skip
    """Resolve the Nydus image ``ref`` (``docker://HOST[:PORT]/REPO[:TAG|@sha256:HEX]``) and put its bootstrap
    at ``dest_dir/image.boot``; returns what to mount it with (:class:`NydusImage`).  Options as for
    :class:`RemoteImage`."""
    with RemoteImage(ref, platform=platform, plain_http=plain_http, insecure=insecure, auth_file=auth_file,
                     options=options) as img:  # fmt: skip
        return img.image(img.fetch_bootstrap(Path(dest_dir) / BOOTSTRAP_NAME))


BOOTSTRAPS_DIR = "bootstraps"  # CACHE/bootstraps/<manifest digest hex>/image.boot: images by reference


def cached_nydus_image(ref: str, cache_dir: str | os.PathLike[str], *, platform: str | None = None,
                       plain_http: bool = False, insecure: bool = False,
                       auth_file: str | os.PathLike[str] | None = None) -> NydusImage:  # fmt: skip
    """:func:`resolve_nydus_image` into ``cache_dir/bootstraps/<manifest digest hex>/image.boot`` (two images
    never share a bootstrap file); the manifest is always resolved, the bootstrap fetched only when that file
    is not there yet (it is only ever put there whole and checked)."""
    with RemoteImage(ref, platform=platform, plain_http=plain_http, insecure=insecure, auth_file=auth_file) as img:
        resolved = img.resolve()
        boot = Path(cache_dir) / BOOTSTRAPS_DIR / resolved.digest.removeprefix("sha256:") / BOOTSTRAP_NAME
        if not boot.is_file():
            img.fetch_bootstrap(boot)
        return img.image(boot)

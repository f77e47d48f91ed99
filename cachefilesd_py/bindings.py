"""Images bound at run time through the daemon's API: ``PUT /api/v1/images/{fsid}`` and ``DELETE``.

A bind request is a JSON object (at most :data:`MAX_BODY` bytes)::

    {"bootstrap": "/abs/path/image.boot"            # or "reference": "docker://HOST[:PORT]/REPO[:TAG|@sha256:…]"
     "backend": {"type": "registry", "config": {…}}, # optional; the backend config shape (below)
     "domain_id": "shared",                          # optional: the domain_id the image is mounted with
     "platform": "linux/amd64"}                      # optional, references only: picked from an index

The **backend config shape**, the same for ``cachefilesd-py --backend-config``, ``nydus-erofs mount
--backend-config`` and this API: ``{"type": KIND, "config": {OPTIONS}}`` where KIND is ``localfs``, ``http`` or
``registry`` and OPTIONS are :func:`cachefilesd_py.backends.make_backend`'s for that kind (``{"dir": …}``;
``{"url": …}``; ``{"host": …, "repo": …, "plain_http": true, "docker_config": …}``, plus network options such as
``timeout``).  For a ``reference`` the backend is the reference's repository; a ``registry`` config given with it
adds options (``plain_http``, ``insecure``, ``docker_config``, timeouts), used for the manifest too.  For a
``bootstrap`` without a backend the daemon's own (``--backend``) serves the blobs, else the ``blobs/`` directory
beside the bootstrap.

A bound image is a directory of the images dir like any other, ``IMAGES/<fsid>/image.boot`` (a copy, or the
fetched bootstrap), with ``IMAGES/<fsid>/binding.json`` (mode 0600) saying which backend serves its blobs, so
it survives worker restarts.  :func:`stage` prepares it under ``IMAGES/.staging/`` and checks it (a Nydus
bootstrap, the backend options valid); :class:`~cachefilesd_py.image_store.ImageStore` renames it into place.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cachefilesd_py.backends.config import BackendSpec, parse_backend_spec
from cachefilesd_py.blob_handles import blob_order
from cachefilesd_py.imageref import is_image_reference
from cachefilesd_py.reference import resolve_nydus_image
from erofs.errors import BackendError, ImageError, UsageError
from erofs.imagespec import MAX_BOOTSTRAP
from erofs.paths import BLOBS_DIR, BOOTSTRAP_NAME
from erofs.reader.bootstrap import Bootstrap

__all__ = [
    "BINDING_NAME",
    "MAX_BODY",
    "STAGING_DIR",
    "BindRequest",
    "Binding",
    "parse_bind_request",
    "read_binding",
    "stage",
]

MAX_BODY = 64 << 10  # bytes of a bind request
BINDING_NAME = "binding.json"
STAGING_DIR = ".staging"  # IMAGES/.staging/<random>/: a binding being prepared (no image.boot at its top)
_FIELDS = {"bootstrap", "reference", "backend", "domain_id", "platform"}


@dataclass(frozen=True)
class BindRequest:
    fsid: str
    bootstrap: str | None = None
    reference: str | None = None
    backend: BackendSpec | None = None
    domain_id: str | None = None
    platform: str | None = None


def parse_bind_request(fsid: str, body: bytes) -> BindRequest:
    """The bind request in ``body``; UsageError (HTTP 400) for anything malformed."""
    if len(body) > MAX_BODY:
        raise UsageError(f"request body over {MAX_BODY} bytes")
    try:
        value = json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise UsageError(f"request body is not valid JSON: {e}") from None
    if not isinstance(value, dict):
        raise UsageError("request body must be a JSON object")
    unknown = sorted(set(value) - _FIELDS)
    if unknown:
        raise UsageError(f"unknown field {unknown[0]!r} (expected: {', '.join(sorted(_FIELDS))})")
    for key in ("bootstrap", "reference", "domain_id", "platform"):
        if value.get(key) is not None and not isinstance(value[key], str):
            raise UsageError(f"{key} must be a string")
    if (value.get("bootstrap") is None) == (value.get("reference") is None):
        raise UsageError("give exactly one of bootstrap (a path) and reference (docker://...)")
    boot, ref = value.get("bootstrap"), value.get("reference")
    if boot is not None and not os.path.isabs(boot):
        raise UsageError(f"bootstrap {boot!r} must be an absolute path")
    if ref is not None and not is_image_reference(ref):
        raise UsageError(f"reference {ref!r} must be docker://HOST[:PORT]/REPO[:TAG|@sha256:HEX]")
    if value.get("platform") is not None and ref is None:
        raise UsageError("platform goes with a reference")
    backend = parse_backend_spec(value["backend"]) if value.get("backend") is not None else None
    if ref is not None and backend is not None and backend.type != "registry":
        raise UsageError(f"a reference is served by the registry backend, not {backend.type}")
    return BindRequest(fsid, boot, ref, backend, value.get("domain_id"), value.get("platform"))


@dataclass(frozen=True)
class Binding:
    """What ``IMAGES/<fsid>/binding.json`` records: the backend of the image's blobs (None: the daemon's),
    the domain it is mounted in, and where it came from."""

    backend: BackendSpec | None
    domain_id: str | None = None
    source: str | None = None  # the bootstrap path or the reference it was bound from
    manifest_digest: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"backend": self.backend.to_json() if self.backend else None, "domain_id": self.domain_id,
                "source": self.source, "manifest_digest": self.manifest_digest}  # fmt: skip

    def public(self) -> dict[str, Any]:
        """For the API's answers: the backend's type and where from, never its options (credentials)."""
        return {"backend": self.backend.type if self.backend else None, "domain_id": self.domain_id,
                "source": self.source, "manifest_digest": self.manifest_digest}  # fmt: skip


def read_binding(image_dir: Path) -> Binding | None:
    """The binding of an image directory, None for an image put there by hand; ImageError when garbled."""
    path = image_dir / BINDING_NAME
    try:
        value = json.loads(path.read_bytes())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise ImageError(f"{path}: {getattr(e, 'strerror', None) or e}") from None
    try:
        backend = parse_backend_spec(value["backend"]) if value.get("backend") is not None else None
        return Binding(backend, value.get("domain_id"), value.get("source"), value.get("manifest_digest"))
    except (UsageError, AttributeError, KeyError) as e:
        raise ImageError(f"{path}: {e}") from None


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _copy_bootstrap(src: str, dest: Path) -> None:
    try:
        with open(src, "rb") as f:
            st = os.fstat(f.fileno())
            if not os.path.isfile(src) or st.st_size > MAX_BOOTSTRAP:
                raise UsageError(f"bootstrap {src}: not a regular file of at most {MAX_BOOTSTRAP} bytes")
            with open(dest, "xb") as out:
                shutil.copyfileobj(f, out, 1 << 20)
    except OSError as e:
        raise UsageError(f"bootstrap {src}: {e.strerror or e}") from None


def stage(req: BindRequest, images_dir: Path, *, default_backend: bool) -> Path:
    """A checked image directory for ``req`` under ``IMAGES/.staging/`` (the caller renames it into place or
    removes it): the bootstrap (copied, or fetched for a reference) and its binding.

    ``default_backend``: whether the daemon has a backend of its own for images bound without one."""
    staging = images_dir / STAGING_DIR
    staging.mkdir(mode=0o700, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f"{req.fsid}-", dir=staging))
    try:
        boot = work / BOOTSTRAP_NAME
        backend = req.backend
        manifest_digest = None
        if req.reference is not None:
            opts = dict(backend.config) if backend else {}
            image = resolve_nydus_image(req.reference, work, platform=req.platform,
                                        plain_http=bool(opts.get("plain_http")), insecure=bool(opts.get("insecure")),
                                        auth_file=opts.get("docker_config") or None, options=opts)  # fmt: skip
            backend = BackendSpec("registry", {**opts, **image.backend_config})
            manifest_digest = image.manifest_digest
        else:
            assert req.bootstrap is not None
            _copy_bootstrap(req.bootstrap, boot)
            beside = Path(req.bootstrap).parent / BLOBS_DIR
            if backend is None and not default_backend:
                if not beside.is_dir():
                    raise UsageError(f"no backend given, the daemon has none, and there is no {beside}")
                backend = BackendSpec("localfs", {"dir": str(beside)})
        with Bootstrap(boot) as bs:
            blob_order(bs)
        if backend is not None:
            try:
                backend.check()
            except BackendError as e:
                raise UsageError(str(e)) from None
        binding = Binding(backend, req.domain_id, req.reference or req.bootstrap, manifest_digest)
        _write_private(work / BINDING_NAME, json.dumps(binding.to_json(), sort_keys=True).encode())
        os.chmod(boot, 0o644)
        return work
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise

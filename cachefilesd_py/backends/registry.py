"""Blobs from an OCI distribution registry: ``GET /v2/<repo>/blobs/sha256:<id>`` with Range, size by HEAD,
redirects followed (and remembered per blob), anonymous/Basic/Bearer auth; plus streaming push helpers."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any
from urllib.parse import urljoin, urlsplit

from erofs.errors import BackendError

from .auth import Credentials, RegistryAuth, docker_credentials, parse_auth
from .deadline import PermanentFailure
from .http import HttpBackend
from .retry import RetryPolicy, describe, is_temp_failure
from .transport import Response, Transport, status_failure

_REDIRECTS = (301, 302, 303, 307, 308)
MAX_REDIRECTS = 5
MAX_MANIFEST = 4 << 20  # bytes: manifests and indexes are small JSON documents
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"


class ManifestNotFoundError(BackendError):
    """The registry has no manifest by that tag or digest (HTTP 404)."""


@dataclass(frozen=True)
class RegistryOptions:
    """Which registry and repository, and who we are to it: the one list of registry options, taken by
    :class:`RegistryClient` and (as keywords) by :class:`RegistryBackend`, the push helpers and
    ``make_backend("registry", ...)``.

    ``host``: ``name[:port]`` or a URL (its scheme is used unless ``scheme`` says otherwise); ``scheme``
    (``https``), ``plain_http`` (``http`` whatever the rest says).  Credentials: ``auth`` (``user:pass`` or its
    base64; the ``IMAGE_PULL_AUTH`` environment variable overrides it), or ``username``/``password``, or a static
    bearer ``token``, else ``docker_config`` (a path; default ``$DOCKER_CONFIG`` or ``~/.docker/config.json``;
    ``False`` to skip).  Made normalised (``host`` is ``name[:port]``, ``scheme`` http or https, ``repo`` without
    edge slashes); a bad scheme or repository name is a :class:`BackendError` here, before any request.
    """

    host: str
    repo: str
    scheme: str | None = None
    plain_http: bool = False
    auth: str | None = field(default=None, repr=False)
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    token: str | None = field(default=None, repr=False)
    docker_config: str | os.PathLike[str] | bool | None = None

    def __post_init__(self) -> None:
        host, scheme = self.host, self.scheme
        if "://" in host:
            parts = urlsplit(host)
            scheme = scheme or parts.scheme
            host = parts.netloc
        scheme = "http" if self.plain_http else (scheme or "https")
        if scheme not in ("http", "https"):
            raise BackendError(f"registry scheme {scheme!r} is not http or https")
        repo = self.repo
        if not repo or repo.startswith("/") or ".." in repo.split("/") or any(c in repo for c in "?#% "):
            raise BackendError(f"registry repository name {repo!r} is not valid")
        object.__setattr__(self, "host", host.rstrip("/"))
        object.__setattr__(self, "scheme", scheme)
        object.__setattr__(self, "repo", repo.strip("/"))

    @classmethod
    def split(cls, host: str, repo: str, options: Mapping[str, Any]) -> tuple[RegistryOptions, dict[str, Any]]:
        """These options taken out of keyword ``options``, and the rest (for the transport: timeouts, TLS...)."""
        names = {f.name for f in fields(cls)}
        mine = {k: v for k, v in options.items() if k in names}
        return cls(host, repo, **mine), {k: v for k, v in options.items() if k not in names}

    @property
    def base(self) -> str:
        """``scheme://host[:port]``."""
        return f"{self.scheme}://{self.host}"

    def url(self, path: str) -> str:
        """The URL of ``path`` under the repository (``blobs/...``, ``manifests/...``)."""
        return f"{self.base}/v2/{self.repo}/{path}"

    def credentials(self) -> Credentials | None:
        """``username``/``password``, else ``IMAGE_PULL_AUTH`` or ``auth``, else the docker config's for the
        host (None: anonymous)."""
        auth = os.environ.get("IMAGE_PULL_AUTH") or self.auth
        try:
            if self.username is not None:
                return Credentials(self.username, self.password or "")
            if auth:
                return parse_auth(auth)
            if self.docker_config is not False:
                path = None if self.docker_config in (None, True) else self.docker_config
                return docker_credentials(self.host, path)  # type: ignore[arg-type]
        except PermanentFailure as e:
            raise BackendError(f"registry {self.host}: {e}") from None
        return None


class RegistryClient:
    """Authenticated requests to one registry and repository; thread-safe.  Used by the backend and the push
    helpers; ``transport`` defaults to a new :class:`Transport` of its own."""

    def __init__(self, options: RegistryOptions, transport: Transport | None = None) -> None:
        self.options = options
        self.base, self.host, self.repo = options.base, options.host, options.repo
        creds = options.credentials()
        self.transport = transport if transport is not None else Transport()
        self.auth = RegistryAuth(self.transport, creds, options.token)

    def url(self, path: str) -> str:
        return self.options.url(path)

    def request(
        self,
        method: str,
        url: str,
        headers: Mapping[str, str] | None = None,
        body: bytes | None = None,
        *,
        scope: str | None = None,
    ) -> Response:
        """One request to the registry with auth; a 401 is answered (token fetch) and retried once."""
        scope = scope or f"repository:{self.repo}:pull"
        sent = self.auth.header(scope)
        resp = self.transport.request(method, url, {**(headers or {}), **sent}, body)
        if resp.status != 401:
            return resp
        challenge = resp.header("WWW-Authenticate")
        resp.text()
        self.auth.challenged(challenge, scope, sent)
        sent = self.auth.header(scope)
        resp = self.transport.request(method, url, {**(headers or {}), **sent}, body)
        if resp.status == 401:
            resp.text()
            raise PermanentFailure(f"registry {self.host} refused access to {self.repo} (HTTP 401)")
        return resp

    def same_origin(self, url: str) -> bool:
        return url.startswith(self.base + "/")


class RegistryBackend(HttpBackend):
    """Blobs of ``repo`` on the registry at ``host``: ``read``/``size``/``close`` like every backend.

    ``options``: the rest of :class:`RegistryOptions` (scheme, credentials) and :class:`HttpBackend`'s (timeouts,
    retries, pool, TLS, ``verify_digest``).
    """

    def __init__(self, host: str, repo: str, **options: Any) -> None:
        registry, network = RegistryOptions.split(host, repo, options)
        super().__init__(registry.url("blobs"), **network)
        self.client = RegistryClient(registry, self.transport)
        self._redirects: dict[str, str] = {}

    def __repr__(self) -> str:
        return f"RegistryBackend({self.client.host!r}, {self.client.repo!r})"

    def _request(self, blob_id: str, method: str, headers: Mapping[str, str]) -> Response:
        with self._lock:
            cached = self._redirects.get(blob_id)
        if cached is not None and method == "GET":  # pre-signed URLs are usually good for GET only
            resp = self.transport.request(method, cached, headers)
            if 400 <= resp.status < 500 or resp.status in _REDIRECTS:
                # expired pre-signed URL (401/403) or gone: forget it and ask the registry again
                resp.text()
                with self._lock:
                    if self._redirects.get(blob_id) == cached:
                        del self._redirects[blob_id]
            else:
                return resp
        url = self.client.url(f"blobs/sha256:{blob_id}")
        resp = self.client.request(method, url, headers)
        hops = 0
        while resp.status in _REDIRECTS:
            location = resp.header("Location")
            resp.text()
            if not location:
                raise PermanentFailure(f"HTTP {resp.status} without Location for {url}")
            hops += 1
            if hops > MAX_REDIRECTS:
                raise PermanentFailure(f"more than {MAX_REDIRECTS} redirects for {url}")
            url = urljoin(url, location)
            if self.client.same_origin(url):
                resp = self.client.request(method, url, headers)
            else:  # never send registry credentials to a blob store
                resp = self.transport.request(method, url, headers)
        if hops and method == "GET" and 200 <= resp.status < 300:
            with self._lock:
                self._redirects[blob_id] = url
        return resp

    def manifest(self, reference: str, accept: Sequence[str], limit: int = MAX_MANIFEST) -> tuple[bytes, str]:
        """``GET manifests/<reference>`` (a tag or ``sha256:<hex>``) asking for the media types ``accept``:
        (the body, exactly as served, at most ``limit`` bytes; its ``Content-Type``).  Retried like blob reads;
        a 404 is a BackendError saying the manifest is unknown."""
        url = self.client.url(f"manifests/{reference}")

        def get() -> tuple[bytes, str]:
            resp = self.client.request("GET", url, {"Accept": ", ".join(accept)})
            if resp.status == 404:
                resp.text()
                where = f"{self.client.host}/{self.client.repo}"
                raise ManifestNotFoundError(f"{where}: no manifest {reference} (HTTP 404)")
            if resp.status != 200:
                raise status_failure(resp, f"for {url}")
            content_type = (resp.header("Content-Type") or "").split(";")[0].strip()
            return resp.read_upto(limit), content_type

        return _push_retry(self.retry_policy, f"registry {self.client.host}", get)


def _push_retry(policy: RetryPolicy, what: str, fn: Callable[[], str]) -> str:
    attempt = 0
    while True:
        try:
            return fn()
        except Exception as exc:
            if not is_temp_failure(exc) or attempt + 1 >= policy.attempts:
                if isinstance(exc, BackendError):
                    raise
                raise BackendError(f"{what}: {describe(exc)}") from exc
            policy.sleep(policy.delay(attempt, getattr(exc, "retry_after", None)))
            attempt += 1


def _open_client(registry: str, repo: str, options: dict[str, Any]) -> tuple[RegistryBackend, RegistryClient]:
    backend = RegistryBackend(registry, repo, **options)
    return backend, backend.client


def _upload(client: RegistryClient, path: str | os.PathLike[str], chunk_size: int) -> str:
    scope = f"repository:{client.repo}:pull,push"
    resp = client.request("POST", client.url("blobs/uploads/"), {"Content-Length": "0"}, scope=scope)
    if resp.status != 202:
        raise status_failure(resp, "starting an upload")
    location = urljoin(resp.url, resp.header("Location") or "")
    resp.text()
    sha = hashlib.sha256()
    offset = 0
    with open(path, "rb") as f:
        while chunk := f.read(chunk_size):
            sha.update(chunk)
            headers = {
                "Content-Type": "application/octet-stream",
                "Content-Range": f"{offset}-{offset + len(chunk) - 1}",
            }
            resp = client.request("PATCH", location, headers, chunk, scope=scope)
            if resp.status != 202:
                raise status_failure(resp, f"uploading bytes {offset}-{offset + len(chunk) - 1}")
            location = urljoin(resp.url, resp.header("Location") or location)
            resp.text()
            offset += len(chunk)
    digest = f"sha256:{sha.hexdigest()}"
    sep = "&" if "?" in location else "?"
    resp = client.request("PUT", f"{location}{sep}digest={digest}", {"Content-Length": "0"}, b"", scope=scope)
    if resp.status != 201:
        raise status_failure(resp, "completing the upload")
    resp.text()
    return digest


def push_blob(
    registry: str, repo: str, path: str | os.PathLike[str], *, chunk_size: int = 8 << 20, **options: Any
) -> str:
    """Upload the file at ``path`` as a blob of ``repo`` (chunked PATCHes hashed on the fly; at most
    ``chunk_size`` bytes in memory); returns its digest ``sha256:<hex>``.  ``options`` as for
    :class:`RegistryBackend` (``plain_http``, credentials, retries)."""
    try:
        with open(path, "rb"):
            pass
    except OSError as e:
        raise BackendError(f"push {path}: {e.strerror}") from None
    backend, client = _open_client(registry, repo, options)
    try:
        return _push_retry(
            backend.retry_policy,
            f"push {path} to {client.host}/{client.repo}",
            lambda: _upload(client, path, chunk_size),
        )
    finally:
        backend.close()


def push_manifest(
    registry: str,
    repo: str,
    reference: str,
    manifest: bytes | Mapping[str, Any],
    *,
    media_type: str = OCI_MANIFEST,
    **options: Any,
) -> str:
    """PUT a manifest under ``reference`` (tag or digest); returns its digest ``sha256:<hex>``."""
    body = manifest if isinstance(manifest, bytes) else json.dumps(manifest, separators=(",", ":")).encode()
    backend, client = _open_client(registry, repo, options)

    def put() -> str:
        resp = client.request(
            "PUT",
            client.url(f"manifests/{reference}"),
            {"Content-Type": media_type},
            body,
            scope=f"repository:{client.repo}:pull,push",
        )
        if resp.status not in (200, 201):
            raise status_failure(resp, f"putting manifest {reference}")
        resp.text()
        return f"sha256:{hashlib.sha256(body).hexdigest()}"

    try:
        return _push_retry(backend.retry_policy, f"push manifest {reference} to {client.host}/{client.repo}", put)
    finally:
        backend.close()


def image_manifest(
    config: tuple[str, int],
    layers: list[tuple[str, int, str]],
    config_media_type: str = "application/vnd.oci.image.config.v1+json",
) -> dict[str, Any]:
    """An OCI image manifest from ``(digest, size)`` of the config and ``(digest, size, media_type)`` per layer."""
    return {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": config_media_type, "digest": config[0], "size": config[1]},
        "layers": [{"mediaType": t, "digest": d, "size": s} for d, s, t in layers],
    }


__all__ = [
    "ManifestNotFoundError",
    "RegistryBackend",
    "RegistryClient",
    "RegistryOptions",
    "image_manifest",
    "push_blob",
    "push_manifest",
]

"""Blobs from an OCI distribution registry: ``GET /v2/<repo>/blobs/sha256:<id>`` with Range, size by HEAD,
redirects followed (and remembered per blob), anonymous/Basic/Bearer auth; plus streaming push helpers."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import urljoin, urlsplit

from erofs.errors import BackendError

from .auth import Credentials, RegistryAuth, docker_credentials, parse_auth
from .http import HttpBackend
from .retry import PermanentFailure, RetryPolicy, describe, is_temp_failure
from .transport import Response, Transport, status_failure

_REDIRECTS = (301, 302, 303, 307, 308)
MAX_REDIRECTS = 5
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"


def _registry_origin(host: str, scheme: str | None, plain_http: bool) -> tuple[str, str]:
    """(base URL, host[:port]) from ``host`` (``name[:port]`` or a URL) and the scheme options."""
    if "://" in host:
        parts = urlsplit(host)
        scheme = scheme or parts.scheme
        host = parts.netloc
    scheme = "http" if plain_http else (scheme or "https")
    if scheme not in ("http", "https"):
        raise BackendError(f"registry scheme {scheme!r} is not http or https")
    host = host.rstrip("/")
    return f"{scheme}://{host}", host


def _check_repo(repo: str) -> str:
    if not repo or repo.startswith("/") or ".." in repo.split("/") or any(c in repo for c in "?#% "):
        raise BackendError(f"registry repository name {repo!r} is not valid")
    return repo.strip("/")


class RegistryClient:
    """Authenticated requests to one registry and repository; thread-safe.  Used by the backend and the push
    helpers."""

    def __init__(
        self,
        host: str,
        repo: str,
        *,
        scheme: str | None = None,
        plain_http: bool = False,
        auth: str | None = None,
        username: str | None = None,
        password: str | None = None,
        token: str | None = None,
        docker_config: str | os.PathLike[str] | bool | None = None,
        transport: Transport | None = None,
    ) -> None:
        self.base, self.host = _registry_origin(host, scheme, plain_http)
        self.repo = _check_repo(repo)
        auth = os.environ.get("IMAGE_PULL_AUTH") or auth
        creds: Credentials | None = None
        try:
            if username is not None:
                creds = Credentials(username, password or "")
            elif auth:
                creds = parse_auth(auth)
            elif docker_config is not False:
                path = None if docker_config in (None, True) else docker_config
                creds = docker_credentials(self.host, path)  # type: ignore[arg-type]
        except PermanentFailure as e:
            raise BackendError(f"registry {self.host}: {e}") from None
        self.transport = transport if transport is not None else Transport()
        self.auth = RegistryAuth(self.transport, creds, token)

    def url(self, path: str) -> str:
        return f"{self.base}/v2/{self.repo}/{path}"

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

    Options: ``scheme`` (``https``), ``plain_http``; credentials ``auth`` (``user:pass`` or its base64; the
    ``IMAGE_PULL_AUTH`` environment variable overrides it), or ``username``/``password``, or a static bearer
    ``token``, else ``docker_config`` (a path; default ``$DOCKER_CONFIG`` or ``~/.docker/config.json``;
    ``False`` to skip); plus :class:`HttpBackend`'s timeouts, retries, TLS and ``verify_digest`` options.
    """

    def __init__(
        self,
        host: str,
        repo: str,
        *,
        scheme: str | None = None,
        plain_http: bool = False,
        auth: str | None = None,
        username: str | None = None,
        password: str | None = None,
        token: str | None = None,
        docker_config: str | os.PathLike[str] | bool | None = None,
        **network: Any,
    ) -> None:
        """``network``: :class:`HttpBackend`'s options (timeouts, retries, pool, TLS, ``verify_digest``)."""
        base, _ = _registry_origin(host, scheme, plain_http)
        super().__init__(f"{base}/v2/{_check_repo(repo)}/blobs", **network)
        self.client = RegistryClient(
            host,
            repo,
            scheme=scheme,
            plain_http=plain_http,
            auth=auth,
            username=username,
            password=password,
            token=token,
            docker_config=docker_config,
            transport=self.transport,
        )
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


__all__ = ["RegistryBackend", "RegistryClient", "image_manifest", "push_blob", "push_manifest"]

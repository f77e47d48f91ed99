"""Blobs as objects of an S3-compatible store (AWS S3, MinIO, Ceph RGW...): ranged ``GET``s of
``<prefix><blob id>``, size by ``HEAD``, requests signed with botocore's SigV4 signer.

botocore is an optional dependency (``pip install 'nydus-erofs[s3]'``), imported by this module only; without it
making an ``s3`` backend is a one-line :class:`~erofs.errors.BackendError`.
"""

from __future__ import annotations

import os
import re
import xml.etree.ElementTree as ET
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any
from urllib.parse import quote, unquote, urlsplit

from erofs.errors import BackendError

from .deadline import PermanentFailure
from .http import HttpBackend, check_url
from .retry import RETRY_STATUSES, TempFailure, parse_retry_after
from .transport import Response

try:  # the optional extra: only this module needs it
    from botocore.auth import S3SigV4Auth
    from botocore.awsrequest import AWSRequest
    from botocore.credentials import (
        ConfigProvider,
        CredentialResolver,
        Credentials,
        EnvProvider,
        SharedCredentialProvider,
    )
    from botocore.exceptions import BotoCoreError

    BOTOCORE_MISSING: str | None = None
except ImportError as _e:  # pragma: no cover - depends on the installation
    BOTOCORE_MISSING = f"backend s3 needs botocore ({_e.msg}): pip install 'nydus-erofs[s3]'"

DEFAULT_REGION = "us-east-1"
#: S3 error codes worth another try, whatever their status (throttling, timeouts, server trouble).
RETRY_CODES = frozenset(
    {"SlowDown", "Throttling", "ThrottlingException", "RequestTimeout", "InternalError", "ServiceUnavailable"}
)
ADDRESSING_STYLES = ("auto", "path", "virtual")
_BUCKET = re.compile(r"[A-Za-z0-9._-]{1,255}")
_DNS_BUCKET = re.compile(r"[a-z0-9][a-z0-9-]{1,61}[a-z0-9]")


@dataclass(frozen=True)
class S3Options:
    """Which bucket, and who we are to it: the one list of s3 options, taken (as keywords) by :class:`S3Backend`
    and ``make_backend("s3", ...)``.

    - ``bucket`` (required); ``prefix``: prepended to the blob id to make the object key (``blobs/`` gives
      ``blobs/<id>``); ``region`` (default ``$AWS_REGION``, ``$AWS_DEFAULT_REGION``, else ``us-east-1``);
    - ``endpoint``: the store's URL (``http://127.0.0.1:9000``; a bare ``host[:port]`` means https), default
      ``https://s3.<region>.amazonaws.com``; ``addressing_style``: ``path`` (``<endpoint>/<bucket>/<key>``),
      ``virtual`` (``<scheme>://<bucket>.<endpoint host>/<key>``) or ``auto`` (virtual on AWS for a DNS-safe
      bucket name, path for any other endpoint);
    - credentials: ``access_key_id`` + ``secret_access_key`` (+ ``session_token``), else ``$AWS_ACCESS_KEY_ID``,
      ``$AWS_SECRET_ACCESS_KEY`` (+ ``$AWS_SESSION_TOKEN``), else the ``profile`` (default ``$AWS_PROFILE`` or
      ``default``) of ``~/.aws/credentials`` (``$AWS_SHARED_CREDENTIALS_FILE``) or ``~/.aws/config``
      (``$AWS_CONFIG_FILE``); a ``profile`` given here skips the environment's keys; ``anonymous=true`` sends
      unsigned requests (public buckets).  No credentials found is a BackendError here, before any request.
    """

    bucket: str | None = None
    prefix: str = ""
    region: str | None = None
    endpoint: str | None = None
    addressing_style: str = "auto"
    profile: str | None = None
    access_key_id: str | None = None
    secret_access_key: str | None = field(default=None, repr=False)
    session_token: str | None = field(default=None, repr=False)
    anonymous: bool = False

    def __post_init__(self) -> None:
        if not self.bucket:
            raise BackendError("backend s3 needs bucket=...")
        if not _BUCKET.fullmatch(self.bucket):
            raise BackendError(f"s3 bucket name {self.bucket!r} is not valid")
        if "\0" in self.prefix:
            raise BackendError("s3 prefix has a NUL byte")
        if self.addressing_style not in ADDRESSING_STYLES:
            raise BackendError(
                f"s3 addressing_style {self.addressing_style!r}: expected one of {', '.join(ADDRESSING_STYLES)}"
            )
        region = self.region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
        object.__setattr__(self, "region", region or DEFAULT_REGION)

    @classmethod
    def split(cls, options: Mapping[str, Any]) -> tuple[S3Options, dict[str, Any]]:
        """These options taken out of keyword ``options``, and the rest (for :class:`HttpBackend`)."""
        names = {f.name for f in fields(cls)}
        mine = {k: v for k, v in options.items() if k in names}
        return cls(**mine), {k: v for k, v in options.items() if k not in names}

    @property
    def endpoint_url(self) -> str:
        if not self.endpoint:
            return f"https://s3.{self.region}.amazonaws.com"
        url = self.endpoint if "://" in self.endpoint else f"https://{self.endpoint}"
        return check_url(url, "s3 endpoint")

    @property
    def virtual(self) -> bool:
        if self.addressing_style != "auto":
            return self.addressing_style == "virtual"
        return not self.endpoint and bool(_DNS_BUCKET.fullmatch(self.bucket or ""))

    @property
    def base(self) -> str:
        """The URL objects' keys are appended to (after a ``/``)."""
        endpoint = self.endpoint_url
        if not self.virtual:
            return f"{endpoint}/{self.bucket}"
        parts = urlsplit(endpoint)
        return f"{parts.scheme}://{self.bucket}.{parts.netloc}{parts.path}"

    def credentials(self) -> Credentials | None:
        """The credentials to sign with (None: ``anonymous``)."""
        if self.anonymous:
            return None
        if self.access_key_id or self.secret_access_key:
            if not (self.access_key_id and self.secret_access_key):
                raise BackendError("s3: access_key_id and secret_access_key go together")
            return Credentials(self.access_key_id, self.secret_access_key, self.session_token)
        profile = self.profile or os.environ.get("AWS_PROFILE") or "default"
        home = os.path.expanduser
        creds_file = home(os.environ.get("AWS_SHARED_CREDENTIALS_FILE", "~/.aws/credentials"))
        config_file = home(os.environ.get("AWS_CONFIG_FILE", "~/.aws/config"))
        providers = [] if self.profile else [EnvProvider()]
        providers += [SharedCredentialProvider(creds_file, profile), ConfigProvider(config_file, profile)]
        try:
            found = CredentialResolver(providers).load_credentials()
        except BotoCoreError as e:
            raise BackendError(f"s3 credentials: {e}") from None
        if found is None:
            raise BackendError(
                f"s3: no credentials (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, profile {profile!r} of {creds_file}, "
                "access_key_id=/secret_access_key=, or anonymous=true)"
            )
        return found


def _s3_error(body: str) -> tuple[str, str]:
    """(code, message) of an S3 XML error body, or empty strings."""
    if not body.lstrip().startswith("<"):
        return "", ""
    try:
        root = ET.fromstring(body)
    except ET.ParseError:
        return "", ""
    return (root.findtext("Code") or "").strip(), (root.findtext("Message") or "").strip()


class S3Backend(HttpBackend):
    """Blobs as objects ``<prefix><blob id>`` of ``bucket``: ``read``/``size``/``close`` like every backend.

    ``options``: the rest of :class:`S3Options` (endpoint, region, prefix, addressing style, credentials) and
    :class:`HttpBackend`'s (timeouts, retries, pool, TLS, proxy, ``verify_digest``).  5xx answers and S3's
    throttling and timeout error codes are retried under the backend's retry policy.
    """

    def __init__(self, **options: Any) -> None:
        if BOTOCORE_MISSING is not None:
            raise BackendError(BOTOCORE_MISSING)
        s3, network = S3Options.split(options)
        super().__init__(s3.base, **network)
        self.s3 = s3
        self._base_path = urlsplit(self.url).path
        self._credentials = s3.credentials()

    def __repr__(self) -> str:
        return f"S3Backend({self.url!r}, prefix={self.s3.prefix!r})"

    def key(self, blob_id: str) -> str:
        """The object key of a blob."""
        return f"{self.s3.prefix}{blob_id}"

    def _request(self, blob_id: str, method: str, headers: Mapping[str, str]) -> Response:
        url = f"{self.url}/{quote(self.key(blob_id), safe='/~')}"
        hdrs = {**self.headers, **headers}
        if self._credentials is not None:
            request = AWSRequest(method=method, url=url, headers=hdrs)
            S3SigV4Auth(self._credentials.get_frozen_credentials(), "s3", self.s3.region).add_auth(request)
            hdrs = dict(request.headers.items())
        return self.transport.request(method, url, hdrs)

    def _failure(self, resp: Response) -> Exception:
        """One line naming the bucket, the key, the status and S3's error code; 5xx, 408, 429 and the
        throttling/timeout codes (:data:`RETRY_CODES`) are temporary."""
        key = unquote(urlsplit(resp.url).path).removeprefix(self._base_path).removeprefix("/")
        code, message = _s3_error(resp.text())
        detail = f": {code} {message}".rstrip() if code else ""
        text = f"s3 bucket {self.s3.bucket} key {key}: HTTP {resp.status} {resp.reason}{detail}".replace("\n", " ")
        if code in RETRY_CODES or resp.status >= 500 or resp.status in RETRY_STATUSES:
            return TempFailure(text, parse_retry_after(resp.header("Retry-After")))
        return PermanentFailure(text)


__all__ = ["BOTOCORE_MISSING", "S3Backend", "S3Options"]

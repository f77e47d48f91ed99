"""Blobs at ``<base URL>/<blob_id>`` on a plain HTTP(S) server, fetched with ``Range`` requests."""

from __future__ import annotations

import re
import threading
from collections.abc import Callable, Mapping
from dataclasses import fields
from typing import Any

from erofs.errors import BackendError
from erofs.reader.backend import BackendStats, check_blob_id

from .deadline import PermanentFailure
from .retry import RetryPolicy, retry
from .transport import (
    Response,
    Transport,
    TransportOptions,
    check_digest,
    http_url_parts,
    parse_content_range,
    range_body,
    status_failure,
)

MAX_DISCARD = 16 << 20
_NETWORK = frozenset(f.name for f in fields(TransportOptions))


def check_url(url: str, name: str = "url") -> str:
    """``url`` without trailing slashes, if it is an absolute http(s) URL with a host; else a one-line
    BackendError naming it (``name``: the option it came from)."""
    if http_url_parts(url) is None:
        raise BackendError(f"{name} {url!r}: expected http://HOST[:PORT][/PATH] or https://...")
    return url.rstrip("/")


class HttpBackend:
    """Ranged GETs of ``<url>/<blob_id>``; size by HEAD (falling back to a one-byte ranged GET).

    206 answers must cover exactly the range asked; a 200 (server ignoring Range) is read through, skipping at
    most ``max_discard`` bytes.  Connect errors, timeouts, truncated bodies, 408/429/502/503/504 are retried up to
    ``retry_limit`` times with exponential backoff (``backoff`` doubling, capped at ``max_backoff``), honouring
    ``Retry-After``.  A whole-blob read is checked against the blob id (sha256) unless ``verify_digest=False``.
    ``network``: the fields of :class:`.transport.TransportOptions` (timeouts, pool, TLS).  A ``url`` that is not
    an absolute http(s) URL with a host is a BackendError here, before any request.
    """

    def __init__(
        self,
        url: str,
        *,
        retry_limit: int = 3,
        backoff: float = 0.2,
        max_backoff: float = 10.0,
        headers: Mapping[str, str] | None = None,
        max_discard: int = MAX_DISCARD,
        verify_digest: bool = True,
        sleep: Callable[[float], None] | None = None,
        **network: Any,
    ) -> None:
        self.url = check_url(url)
        self.stats = BackendStats()
        self.retry_policy = RetryPolicy(attempts=retry_limit + 1, backoff=backoff, max_backoff=max_backoff)
        if sleep is not None:
            self.retry_policy.sleep = sleep
        self.headers = dict(headers or {})
        self.max_discard = max_discard
        self.verify_digest = verify_digest
        unknown = next((k for k in network if k not in _NETWORK), None)
        if unknown is not None:  # as Python words it for a keyword missing from a signature
            raise TypeError(f"HttpBackend.__init__() got an unexpected keyword argument {unknown!r}")
        self.transport = Transport(TransportOptions(**network), stats=self.stats)
        self._sizes: dict[str, int] = {}
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"HttpBackend({self.url!r})"

    def _request(self, blob_id: str, method: str, headers: Mapping[str, str]) -> Response:
        """Hook for subclasses (auth, redirects): a response for the blob's URL."""
        return self.transport.request(method, f"{self.url}/{blob_id}", {**self.headers, **headers})

    def _failure(self, resp: Response) -> Exception:
        """Hook for subclasses (their error bodies): the exception for an unexpected status."""
        return status_failure(resp, f"for {resp.url}")

    def _known_size(self, blob_id: str) -> int | None:
        with self._lock:
            return self._sizes.get(blob_id)

    def _learn_size(self, blob_id: str, size: int | None) -> None:
        if size is not None:
            with self._lock:
                self._sizes[blob_id] = size

    def read(self, blob_id: str, offset: int, length: int) -> bytes:
        """Exactly ``length`` bytes at ``offset``, or BackendError (a range past the end included)."""
        try:
            check_blob_id(blob_id)
            if offset < 0 or length < 0:
                raise BackendError(f"blob {blob_id}: invalid range {offset}+{length}")
            known = self._known_size(blob_id)
            if known is not None and offset + length > known:
                raise BackendError(
                    f"blob {blob_id}: range {offset}+{length} is past the end of the blob (size {known})"
                )
        except Exception:
            self.stats.add(errors=1)
            raise
        if length == 0:
            return b""
        with self.stats.timed():
            return self._read(blob_id, offset, length)

    @retry
    def _read(self, blob_id: str, offset: int, length: int) -> bytes:
        resp = self._request(blob_id, "GET", {"Range": f"bytes={offset}-{offset + length - 1}"})
        if resp.status == 416:
            m = re.search(r"/(\d+)\s*$", resp.header("Content-Range") or "")
            total = int(m.group(1)) if m else None
            resp.close()
            self._learn_size(blob_id, total)
            size = f" (size {total})" if total is not None else ""
            raise PermanentFailure(f"range {offset}+{length} is past the end of the blob{size}")
        if resp.status not in (200, 206):
            raise self._failure(resp)
        data, total = range_body(resp, offset, length, stats=self.stats, max_discard=self.max_discard)
        self._learn_size(blob_id, total)
        if self.verify_digest and offset == 0 and total == length:
            check_digest(blob_id, data)
        return data

    def size(self, blob_id: str) -> int:
        """The blob's size in bytes (asked once, then remembered: blobs are immutable)."""
        try:
            check_blob_id(blob_id)
        except Exception:
            self.stats.add(errors=1)
            raise
        known = self._known_size(blob_id)
        if known is not None:
            return known
        with self.stats.timed():
            size = self._size(blob_id)
        self._learn_size(blob_id, size)
        return size

    @retry
    def _size(self, blob_id: str) -> int:
        resp = self._request(blob_id, "HEAD", {})
        if resp.status == 200 and resp.content_length is not None:
            n = resp.content_length
            resp.release()
            return n
        if resp.status not in (200, 405, 501):
            raise self._failure(resp)
        resp.release()
        # HEAD not supported or without a length: ask for the first byte and read the total from Content-Range
        resp = self._request(blob_id, "GET", {"Range": "bytes=0-0"})
        if resp.status == 206:
            total = parse_content_range(resp.header("Content-Range"))[2]
            resp.release()
            if total is not None:
                return total
        elif resp.status == 200 and resp.content_length is not None:
            n = resp.content_length
            resp.close()
            return n
        elif resp.status == 416:  # empty blob
            resp.close()
            return 0
        elif resp.status != 200:
            raise self._failure(resp)
        resp.close()
        raise PermanentFailure(f"server at {resp.url} tells no size")

    def close(self) -> None:
        self.transport.close()

    def __enter__(self) -> HttpBackend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

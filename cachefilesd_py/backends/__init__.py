"""Blob backends: where the daemon fetches chunk ranges of data blobs from.

Every backend has ``read(blob_id, offset, length) -> bytes`` (exactly ``length`` bytes, or
:class:`~erofs.errors.BackendError` — a range reaching past the end of the blob is an error too),
``size(blob_id) -> int``, ``close()`` and a :class:`BackendStats` ``stats``.  All are safe to call from many
threads at once.  :func:`make_backend` builds one by kind: ``localfs``, ``http`` or ``registry``.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

from erofs.errors import BackendError
from erofs.reader.source import BackendStats, LocalBlobDir

from .retry import RetryPolicy, is_temp_failure, retry


@runtime_checkable
class BlobBackend(Protocol):
    """Ranged reads of blobs by id (the same protocol as :class:`erofs.reader.source.BlobSource`, plus
    ``close`` and ``stats``)."""

    stats: BackendStats

    def read(self, blob_id: str, offset: int, length: int) -> bytes: ...

    def size(self, blob_id: str) -> int: ...

    def close(self) -> None: ...


KINDS = ("localfs", "http", "registry")


def make_backend(kind: str, **options: Any) -> BlobBackend:
    """A backend by kind.

    - ``localfs``: ``dir``, ``alt_dirs=()``, ``max_open=64``.
    - ``http``: ``url`` (base; blobs at ``<url>/<blob_id>``), ``headers``, and the common network options.
    - ``registry``: ``host`` (``name[:port]`` or a URL), ``repo``, ``scheme="https"``, ``plain_http``,
      ``auth`` (``user:pass`` or base64), ``username``/``password``, ``token``, ``docker_config`` (the fields of
      :class:`.registry.RegistryOptions`, which says what each means), and the common network options.

    Common network options: ``timeout=30``, ``connect_timeout=5``, ``retry_limit=3`` (retries after the first
    try), ``backoff=0.2``, ``max_backoff=10`` (seconds), ``max_discard=16 MiB`` (how far to skip into a body
    when a server ignores Range), ``pool_size=8``, ``insecure`` (no TLS verification), ``ca_file``,
    ``verify_digest=True`` (whole-blob reads must hash to the blob id), ``sleep`` (for tests).
    """
    options = {k.replace("-", "_"): v for k, v in options.items()}
    try:
        if kind == "localfs":
            if "blob_dir" in options:
                options["dir"] = options.pop("blob_dir")
            return LocalBlobDir(**options, strict_ids=True)
        if kind == "http":
            from .http import HttpBackend

            return HttpBackend(**options)
        if kind == "registry":
            from .registry import RegistryBackend

            return RegistryBackend(**options)
    except TypeError as e:
        raise BackendError(f"backend {kind}: bad options: {e}") from None
    raise BackendError(f"unknown backend kind {kind!r} (expected one of: {', '.join(KINDS)})")


__all__ = [
    "KINDS",
    "BackendError",
    "BackendStats",
    "BlobBackend",
    "RetryPolicy",
    "is_temp_failure",
    "make_backend",
    "retry",
]

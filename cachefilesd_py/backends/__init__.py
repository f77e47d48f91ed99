"""Blob backends: where the daemon fetches chunk ranges of data blobs from.

Every backend implements :class:`~erofs.reader.backend.BlobBackend` (defined there, below both the reader and
the daemon): ``read(blob_id, offset, length)``, ``size(blob_id)``, ``close()`` and ``stats``.
:func:`make_backend` builds one by kind: ``localfs`` (:class:`~erofs.reader.backend.LocalBlobDir`), ``http``,
``registry`` or ``s3``; the network ones can go through an HTTP proxy first (:mod:`.proxy`).
"""

from __future__ import annotations

import types
import typing
from typing import Any

from erofs.errors import BackendError
from erofs.reader.backend import BackendStats, BlobBackend, LocalBlobDir

KINDS = ("localfs", "http", "registry", "s3")


def make_backend(kind: str, **options: Any) -> BlobBackend:
    """A backend by kind.

    - ``localfs``: ``dir``, ``alt_dirs=()``, ``max_open=64``.
    - ``http``: ``url`` (base; blobs at ``<url>/<blob_id>``), ``headers``, and the common network options.
    - ``registry``: ``host`` (``name[:port]`` or a URL), ``repo``, ``scheme="https"``, ``plain_http``,
      ``auth`` (``user:pass`` or base64), ``username``/``password``, ``token``, ``docker_config`` (the fields of
      :class:`.registry.RegistryOptions`, which says what each means), and the common network options.
    - ``s3``: ``bucket``, ``prefix``, ``region``, ``endpoint``, ``addressing_style`` (path, virtual, auto),
      ``profile``, ``access_key_id``/``secret_access_key``/``session_token``, ``anonymous`` (the fields of
      :class:`.s3.S3Options`, which says what each means; needs botocore), and the common network options.

    Common network options: ``timeout=30``, ``connect_timeout=5``, ``pool_size=8``, ``insecure``, ``ca_file``,
    ``proxy`` (``http://HOST:PORT``), ``proxy_fallback=True``, ``proxy_timeout=5``, ``proxy_check_interval=5`` (the
    fields of :class:`.transport.TransportOptions`, which says what each means; :mod:`.proxy` how the proxy and
    its fallback work); ``retry_limit=3`` (retries after
    the first try), ``backoff=0.2``, ``max_backoff=10`` (seconds), ``max_discard=16 MiB`` (how far to skip into a
    body when a server ignores Range), ``verify_digest=True`` (whole-blob reads must hash to the blob id),
    ``sleep`` (for tests).
    """
    options = {k.replace("-", "_"): v for k, v in options.items()}
    try:
        options = _typed(kind, options)
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
        if kind == "s3":
            from .s3 import S3Backend

            return S3Backend(**options)
    except TypeError as e:
        raise BackendError(f"backend {kind}: bad options: {e}") from None
    raise BackendError(f"unknown backend kind {kind!r} (expected one of: {', '.join(KINDS)})")


_BOOL_WORDS = {"true": True, "yes": True, "on": True, "false": False, "no": False, "off": False}


def _option_types(kind: str) -> dict[str, Any]:
    """Each option's annotated type, for ``kind``'s constructor(s)."""
    if kind == "localfs":
        return typing.get_type_hints(LocalBlobDir.__init__)
    from .http import HttpBackend
    from .transport import TransportOptions

    hints = typing.get_type_hints(HttpBackend.__init__)
    hints.update(typing.get_type_hints(TransportOptions))
    if kind == "registry":
        from .registry import RegistryOptions

        hints.update(typing.get_type_hints(RegistryOptions))
    if kind == "s3":
        from .s3 import S3Options

        hints.update(typing.get_type_hints(S3Options))
    return hints


def _classes(hint: Any) -> tuple[type, ...] | None:
    """The classes a value of type ``hint`` may be an instance of (an int passes for a float), or None when
    that cannot be told by isinstance."""
    members = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    out: list[type] = []
    for m in members:
        c = typing.get_origin(m) or m
        if not isinstance(c, type):
            return None
        out.append(c)
    if float in out:
        out.append(int)
    return tuple(out)


def _typed(kind: str, options: dict[str, Any]) -> dict[str, Any]:
    """Options given as text (``--backend-config key=value``) converted to the bool, int or float their
    parameter takes; other values are left as they are.  A bad value is a one-line BackendError."""
    if kind not in KINDS:
        return options
    hints = _option_types(kind)
    out = dict(options)
    for key, value in options.items():
        if key not in hints:
            continue
        if not isinstance(value, str):  # e.g. from a JSON --backend-config: must be of the parameter's type
            classes = _classes(hints[key])
            if classes is not None and not isinstance(value, classes):
                names = " or ".join(sorted({"null" if c is type(None) else c.__name__ for c in classes}))
                raise BackendError(f"backend {kind}: option {key}: expected {names}, got {value!r}")
            continue
        types = set(typing.get_args(hints[key])) or {hints[key]}
        types.discard(type(None))
        if bool in types and value.lower() in _BOOL_WORDS:
            out[key] = _BOOL_WORDS[value.lower()]
        elif str in types:
            continue
        elif types <= {bool}:
            raise BackendError(f"backend {kind}: option {key}: expected true or false, got {value!r}")
        elif types <= {int}:
            try:
                out[key] = int(value, 0)
            except ValueError:
                raise BackendError(f"backend {kind}: option {key}: expected an integer, got {value!r}") from None
        elif types <= {int, float}:
            try:
                out[key] = float(value)
            except ValueError:
                raise BackendError(f"backend {kind}: option {key}: expected a number, got {value!r}") from None
    return out


__all__ = [
    "KINDS",
    "BackendError",
    "BackendStats",
    "BlobBackend",
    "make_backend",
]

"""An HTTP forward proxy in front of a backend's origin, with fallback: how Dragonfly's ``dfdaemon`` serves
Nydus blobs (a local proxy that fetches from peers), the role upstream nydusd's ``proxy`` backend option plays.

Every HTTP backend (``http``, ``registry``, ``s3``) takes these network options (fields of
:class:`~.transport.TransportOptions`):

- ``proxy``: ``http://HOST:PORT`` of the proxy; every request goes through it first (an ``http://`` origin in
  absolute form, an ``https://`` one through a ``CONNECT`` tunnel);
- ``proxy_fallback`` (default true): when the proxy fails (refused, reset, a body cut short, 502/504) or is
  slow (no answer, or a stalled body, within ``proxy_timeout`` seconds, default 5), the request goes to the
  origin instead, and so does every request for the next ``proxy_check_interval`` seconds (default 5); then the
  next request tries the proxy again, and it is used as before once it answers.  With ``proxy_fallback=false``
  a proxy failure is an ordinary (retried) failure.

The backend's stats count ``proxied`` requests and ``fallbacks``; the log says when the proxy is left and when it
is back.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from erofs.errors import BackendError

#: Statuses a proxy answers with when it, not the origin, failed: fall back on them.
PROXY_FAILURE_STATUSES = frozenset({502, 504})

log = logging.getLogger(__name__)


class ProxyRoute:
    """The proxy at ``url`` and whether to use it now.

    :meth:`usable` is false for ``check_interval`` seconds after :meth:`failed` (always true without
    ``fallback``); :meth:`succeeded` ends an outage.  Thread-safe.
    """

    def __init__(self, url: str, *, fallback: bool = True, timeout: float = 5.0, check_interval: float = 5.0,
                 clock: Callable[[], float] = time.monotonic) -> None:  # fmt: skip
        if not url.startswith("http://"):
            raise BackendError(f"proxy {url!r}: expected http://HOST:PORT")
        if timeout <= 0 or check_interval < 0:
            raise BackendError("proxy_timeout must be positive and proxy_check_interval not negative")
        self.url = url.rstrip("/")
        self.fallback = fallback
        self.timeout = timeout
        self.check_interval = check_interval
        self._clock = clock
        self._down_until = 0.0
        self._down = False
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"ProxyRoute({self.url!r}, fallback={self.fallback})"

    def usable(self) -> bool:
        """Whether the next request should go through the proxy."""
        if not self.fallback:
            return True
        with self._lock:
            return self._clock() >= self._down_until

    @property
    def down(self) -> bool:
        """Whether the last request through the proxy failed."""
        with self._lock:
            return self._down

    def failed(self, why: str) -> None:
        """A request through the proxy failed: go to the origin for ``check_interval`` seconds."""
        with self._lock:
            was_down, self._down = self._down, True
            self._down_until = self._clock() + self.check_interval
        if self.fallback:
            again = "still failing" if was_down else "failed"
            log.warning("proxy %s %s (%s): to the origin for %gs", self.url, again, why, self.check_interval)

    def succeeded(self) -> None:
        """A request through the proxy got its answer."""
        with self._lock:
            was_down, self._down = self._down, False
        if was_down:
            log.info("proxy %s is back: requests go through it again", self.url)


__all__ = ["PROXY_FAILURE_STATUSES", "ProxyRoute"]

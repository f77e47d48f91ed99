"""Traffic counters every backend keeps (for metrics and for tests that count fetched bytes)."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field, fields


@dataclass
class BackendStats:
    """Thread-safe counters.

    ``requests``: requests sent (HTTP requests, or ``pread`` calls for localfs), auth included;
    ``bytes``: blob bytes received from the backend (bytes skipped over when a server ignores Range count
    too); ``errors``: failed ``read``/``size`` calls; ``retries``: extra attempts after a temporary failure.
    """

    requests: int = 0
    bytes: int = 0
    errors: int = 0
    retries: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, *, requests: int = 0, bytes: int = 0, errors: int = 0, retries: int = 0) -> None:
        with self._lock:
            self.requests += requests
            self.bytes += bytes
            self.errors += errors
            self.retries += retries

    def snapshot(self) -> dict[str, int]:
        """The counters as a plain dict (consistent at one instant)."""
        with self._lock:
            return {f.name: getattr(self, f.name) for f in fields(self) if not f.name.startswith("_")}

    def reset(self) -> None:
        with self._lock:
            self.requests = self.bytes = self.errors = self.retries = 0

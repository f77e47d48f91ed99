"""One retry policy for every backend: exponential backoff with jitter, honouring ``Retry-After``.

Operations raise :class:`TempFailure` (or a network exception) for what may succeed on a later try,
:class:`~.deadline.PermanentFailure` for what will not; :func:`is_temp_failure` says which; :func:`retry` wraps a
backend method and turns exhaustion into one :class:`~erofs.errors.BackendError` line.  No retry starts or
sleeps past the caller's deadline (:mod:`.deadline`).
"""

from __future__ import annotations

import email.utils
import errno
import functools
import http.client
import random
import socket
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Concatenate, ParamSpec, Protocol, TypeVar

from erofs.errors import BackendError

from .deadline import DeadlineExceeded, PermanentFailure, time_left

_NET_ERRNOS = frozenset(
    {errno.ENETUNREACH, errno.EHOSTUNREACH, errno.ENETDOWN, errno.EHOSTDOWN, errno.ETIMEDOUT, errno.EAGAIN}
)
#: Statuses worth retrying (OCI distribution spec: 502/503/504; plus 429 and 408).
RETRY_STATUSES = frozenset({408, 429, 502, 503, 504})


class TempFailure(Exception):
    """A failure a later attempt may not hit: the message says what happened (no blob id needed)."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


def is_temp_failure(exc: BaseException) -> bool:
    """True for errors worth another attempt: network trouble, timeouts, truncated bodies, 429/5xx."""
    if isinstance(exc, TempFailure):
        return True
    if isinstance(exc, PermanentFailure | BackendError):
        return False
    if isinstance(exc, ssl.SSLCertVerificationError) or _plain_http_answer(exc):
        return False
    return isinstance(
        exc,
        (
            ConnectionError,
            TimeoutError,
            socket.timeout,
            socket.gaierror,
            http.client.IncompleteRead,
            http.client.BadStatusLine,
            http.client.LineTooLong,
            ssl.SSLError,
            EOFError,
        ),
    ) or (isinstance(exc, OSError) and exc.errno in _NET_ERRNOS)


def _plain_http_answer(exc: BaseException) -> bool:
    """The TLS handshake got an HTTP answer: the server speaks plain HTTP (a local registry, most often)."""
    return isinstance(exc, ssl.SSLError) and exc.reason == "WRONG_VERSION_NUMBER"


def describe(exc: BaseException) -> str:
    """A short one-line cause for an exception."""
    if isinstance(exc, TempFailure | PermanentFailure | BackendError):
        return str(exc)
    if _plain_http_answer(exc):
        return ("the server speaks plain HTTP, not HTTPS: add plain_http=true to --backend-config "
                "(or give an http:// URL)")  # fmt: skip
    if isinstance(exc, http.client.IncompleteRead):
        return f"body truncated: got {len(exc.partial)} bytes, {exc.expected} more expected"
    if isinstance(exc, TimeoutError | socket.timeout):
        return "timed out"
    text = str(exc) or type(exc).__name__
    if isinstance(exc, OSError) and exc.strerror:
        text = exc.strerror
    return f"{type(exc).__name__}: {text}".splitlines()[0]


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delta-seconds or HTTP-date), or None."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when is None:
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


@dataclass
class RetryPolicy:
    """``attempts`` tries in all; waits ``backoff * 2**n`` (+ up to 10% jitter), at least any
    ``Retry-After``, never more than ``max_backoff`` seconds."""

    attempts: int = 4
    backoff: float = 0.2
    max_backoff: float = 10.0
    sleep: Callable[[float], None] = field(default=time.sleep, repr=False)

    def delay(self, attempt: int, retry_after: float | None) -> float:
        wait = self.backoff * (2**attempt)
        wait += random.uniform(0, wait / 10)
        if retry_after is not None:
            wait = max(wait, retry_after)
        return min(wait, self.max_backoff)


class _Retrying(Protocol):
    retry_policy: RetryPolicy
    stats: Any


P = ParamSpec("P")
R = TypeVar("R")
S = TypeVar("S", bound=_Retrying)


def retry(
    method: Callable[Concatenate[S, str, P], R],
) -> Callable[Concatenate[S, str, P], R]:
    """Retry a backend method ``(self, blob_id, ...)`` under ``self.retry_policy``.

    Temporary failures are retried (``self.stats.retries`` counts them); anything else, or the last
    temporary failure, becomes ``BackendError("blob <id>: <cause>")`` (``self.stats.errors`` counts it).
    """

    @functools.wraps(method)
    def wrapper(self: S, blob_id: str, *args: P.args, **kwargs: P.kwargs) -> R:
        policy = self.retry_policy
        attempt = 0
        while True:
            try:
                time_left()
                return method(self, blob_id, *args, **kwargs)
            except Exception as exc:
                temp = is_temp_failure(exc)
                delay = policy.delay(attempt, getattr(exc, "retry_after", None))
                if temp:
                    try:
                        left = time_left()  # (None: no deadline)
                        if left is not None and left <= delay:  # the next try would start past the deadline
                            exc = DeadlineExceeded(f"{describe(exc)}, and no time left to retry before the deadline")
                            temp = False
                    except DeadlineExceeded as passed:
                        exc, temp = passed, False
                if not temp or attempt + 1 >= max(1, policy.attempts):
                    self.stats.add(errors=1)
                    if isinstance(exc, BackendError):
                        raise
                    tries = f" (after {attempt + 1} attempts)" if temp and attempt else ""
                    raise BackendError(f"blob {blob_id}: {describe(exc)}{tries}") from exc
                self.stats.add(retries=1)
                policy.sleep(delay)
                attempt += 1

    return wrapper

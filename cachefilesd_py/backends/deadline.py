"""Deadlines of backend calls: a caller bounds everything a backend does on its behalf with :func:`deadline` (the
pipeline does, per fill); within it, each socket wait of the transport is cut to the time left
(:func:`time_left`), no retry (:mod:`.retry`) starts or sleeps past it, and once it has passed the backend call
fails (:class:`DeadlineExceeded`, a :class:`PermanentFailure`: never retried).  A server sending one byte a second
thus costs the reader the deadline, not forever.

No network here: the pipeline bounds its fills without importing an HTTP client.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

__all__ = ["DeadlineExceeded", "PermanentFailure", "deadline", "time_left"]


class PermanentFailure(Exception):
    """A failure retrying will not fix (404, bad credentials, range past the end): message without blob id."""


class DeadlineExceeded(PermanentFailure):
    """The caller's :func:`deadline` passed: the request is abandoned."""


_DEADLINE: ContextVar[tuple[float, float] | None] = ContextVar("backend_deadline", default=None)


@contextmanager
def deadline(seconds: float | None) -> Iterator[None]:
    """Within this block (this thread), backend calls end within ``seconds`` from now (None: no deadline); a
    deadline already in force and nearer stays."""
    if seconds is None:
        yield
        return
    when = time.monotonic() + seconds
    outer = _DEADLINE.get()
    token = _DEADLINE.set(outer if outer is not None and outer[0] <= when else (when, seconds))
    try:
        yield
    finally:
        _DEADLINE.reset(token)


def time_left(cap: float | None = None) -> float | None:
    """Seconds left before the deadline in force, at most ``cap`` (``cap`` when there is none);
    DeadlineExceeded once it has passed."""
    current = _DEADLINE.get()
    if current is None:
        return cap
    left = current[0] - time.monotonic()
    if left <= 0:
        raise DeadlineExceeded(f"no answer within the {current[1]:g}s deadline")
    return left if cap is None else min(cap, left)

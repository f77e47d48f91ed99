"""Waiting, in tests, for what another process does and cannot tell us: bounded polling, never a bare sleep."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def wait_for(cond: Callable[[], T], what: str, timeout: float) -> T:
    """Call ``cond`` every 10 ms until it gives something true, and return that; fail with ``what`` once
    ``timeout`` seconds have passed."""
    deadline = time.monotonic() + timeout
    while not (got := cond()):
        assert time.monotonic() < deadline, what
        time.sleep(0.01)
    return got

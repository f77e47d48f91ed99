"""Defaults that several commands, the mount spec and the pipeline share: one definition each, in a module that
imports nothing, so that a process which only passes them on (``nydus-erofs mount``, the mount supervisor) knows
them without importing the machinery that uses them."""

from __future__ import annotations

__all__ = ["DEFAULT_DAEMON_SOCK", "FILL_TIMEOUT"]

FILL_TIMEOUT = 30.0  # seconds one fill (fetch, verify, write of what a read wants) may take, by default
#: cachefilesd-py's API socket, as systemd/cachefilesd-py.service starts it (``mount --mode fscache`` binds there)
DEFAULT_DAEMON_SOCK = "/run/cachefilesd-py/api.sock"

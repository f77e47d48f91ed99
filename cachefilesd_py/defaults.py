"""Defaults the daemons' options, the mount spec and the pipeline share: one definition each, in a module that
imports nothing, so that a process which only passes them on (``nydus-erofs mount``, the mount supervisor) knows
them without importing the machinery that uses them."""

from __future__ import annotations

__all__ = ["FILL_TIMEOUT"]

FILL_TIMEOUT = 30.0  # seconds one fill (fetch, verify, write of what a read wants) may take, by default

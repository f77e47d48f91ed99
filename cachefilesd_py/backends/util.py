"""Argument checks shared by the backends."""

from __future__ import annotations

import re

from erofs.errors import BackendError

_BLOB_ID = re.compile(r"[0-9a-f]{64}")


def check_blob_id(blob_id: str) -> str:
    """A blob id is the sha256 of the blob: 64 lowercase hex digits (so it is always a safe file name)."""
    if not isinstance(blob_id, str) or not _BLOB_ID.fullmatch(blob_id):
        raise BackendError(f"blob id {blob_id!r} is not 64 lowercase hex digits")
    return blob_id


def check_range(blob_id: str, offset: int, length: int) -> None:
    check_blob_id(blob_id)
    if offset < 0 or length < 0:
        raise BackendError(f"blob {blob_id}: invalid range {offset}+{length}")

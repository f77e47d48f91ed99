"""``--backend-config``: backend options as text, the one syntax both ``nydus-erofs mount`` and ``cachefilesd-py``
take — a JSON object, ``@FILE`` holding one, or ``key=value,key=value`` (values are text, converted to each
option's type by :func:`cachefilesd_py.backends.make_backend`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from erofs.errors import UsageError


def parse_backend_config(text: str | None) -> dict[str, Any]:
    """The options in ``text`` (empty for None or ""); a UsageError naming what is wrong otherwise."""
    if not text:
        return {}
    if text.startswith("@"):
        try:
            text = Path(text[1:]).read_text()
        except (OSError, UnicodeDecodeError) as e:
            raise UsageError(f"--backend-config {text}: {getattr(e, 'strerror', None) or e}") from None
    if text.lstrip().startswith("{"):
        try:
            value = json.loads(text)
        except ValueError as e:
            raise UsageError(f"--backend-config: not valid JSON: {e}") from None
        if not isinstance(value, dict):
            raise UsageError("--backend-config: expected a JSON object")
        return value
    out: dict[str, Any] = {}
    for item in filter(None, (p.strip() for p in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep:
            raise UsageError(f"--backend-config: {item!r} is not key=value")
        out[key.strip()] = value.strip()
    return out


__all__ = ["parse_backend_config"]

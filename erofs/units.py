"""Sizes as users type them on command lines."""

from __future__ import annotations

import re

from erofs.errors import UsageError

_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
_SIZE = re.compile(r"\s*(0x[0-9a-fA-F]{1,16}|[0-9]{1,20})\s*([kKmMgG]?)(?:i?[bB])?\s*")  # ASCII digits, < 2^64


def parse_size(text: str) -> int:
    """'1MiB', '512k', '4KiB', '0x100000', '1048576' → bytes (UsageError, a ValueError, otherwise)."""
    m = _SIZE.fullmatch(text)
    if not m:
        raise UsageError(f"not a size: {text[:40]!r}" + ("..." if len(text) > 40 else ""))
    number = m.group(1)
    value = int(number[2:], 16) if number.startswith("0x") else int(number, 10)  # '010' is ten
    return value * _UNITS[m.group(2).lower()]

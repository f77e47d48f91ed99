"""Sizes and counts as users type and read them: ``--chunk-size 1MiB`` in, ``1.2 GiB`` and ``1 chunk`` out."""

from __future__ import annotations

import re

from erofs.errors import UsageError

_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
_SIZE = re.compile(r"\s*(0x[0-9a-fA-F]{1,16}|[0-9]{1,20})\s*([kKmMgG]?)(?:i?[bB])?\s*")  # ASCII digits, < 2^64


def parse_size(text: str, option: str | None = None) -> int:
    """'1MiB', '512k', '4KiB', '0x100000', '1048576' → bytes (UsageError, a ValueError, otherwise, naming
    ``option`` when given: ``--chunk-size: not a size: '1q'``)."""
    m = _SIZE.fullmatch(text)
    if not m:
        where = f"{option}: " if option else ""
        raise UsageError(f"{where}not a size: {text[:40]!r}" + ("..." if len(text) > 40 else ""))
    number = m.group(1)
    value = int(number[2:], 16) if number.startswith("0x") else int(number, 10)  # '010' is ten
    return value * _UNITS[m.group(2).lower()]


def format_size(n: int) -> str:
    """Bytes for people: '512 B', '4.0 KiB', '1.2 GiB'."""
    if n < 1024:
        return f"{n} B"
    value = float(n)
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        value /= 1024
        if value < 1024 or unit == "TiB":
            break
    return f"{value:.1f} {unit}"


def count(n: int, noun: str, plural: str | None = None) -> str:
    """'1 chunk', '2 chunks', '0 blobs' (``plural`` for nouns that do not just take an s)."""
    return f"{n} {noun if n == 1 else plural or noun + 's'}"

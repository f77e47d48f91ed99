"""Structures declared as C text, compiled to :mod:`struct` layouts.

Each on-disk structure is written once, the way its C header spells it, so a reader can grep the kernel
tree and ours for the same name.  Only what on-disk headers need is supported: little-endian integers
(``__le16``, ``u32``...), ``__u8``/``char`` arrays (kept as ``bytes``) and arrays of integers (kept as
raw bytes too: they are reserved or opaque fields), and ``union`` blocks whose first member is used.
"""

from __future__ import annotations

import re
import struct
from collections import namedtuple
from typing import Any

_TYPES = {
    "u8": "B", "__u8": "B", "uint8_t": "B", "char": "B",
    "u16": "H", "__u16": "H", "__le16": "H", "uint16_t": "H",
    "u32": "I", "__u32": "I", "__le32": "I", "uint32_t": "I",
    "s32": "i", "__s32": "i", "__le32s": "i",
    "u64": "Q", "__u64": "Q", "__le64": "Q", "uint64_t": "Q",
}  # fmt: skip

_FIELD = re.compile(r"^\s*(?P<type>\w+)\s+(?P<name>\w+)\s*(?:\[(?P<count>[\w\s*+]+)\])?\s*;")
_STRUCT = re.compile(r"struct\s+(?P<name>\w+)\s*\{(?P<body>.*?)\}\s*;", re.S)
_UNION = re.compile(r"union\s*\{(?P<body>[^{}]*)\}\s*(?P<name>\w+)\s*;", re.S)


class CStruct:
    """One C structure: ``pack(**fields)`` and ``unpack(buf, offset)`` with a fixed ``size``."""

    def __init__(self, name: str, fields: list[tuple[str, str]], constants: dict[str, int]) -> None:
        self.name = name
        self.field_names = [f for f, _ in fields]
        self.struct = struct.Struct("<" + "".join(fmt for _, fmt in fields))
        self.size = self.struct.size
        self.tuple = namedtuple(name, self.field_names)  # type: ignore[misc]
        self._defaults = {f: (b"" if fmt.endswith("s") else 0) for f, fmt in fields}
        self._items = tuple(self._defaults.items())
        self._fields = fields

    def packer(self, *names: str) -> struct.Struct:
        """A :class:`struct.Struct` of this layout taking only ``names`` (in declaration order), positionally;
        the other fields are written as zeros.  For hot loops: ``packer(...).pack_into(buf, off, *values)``."""
        fmt = []
        wanted = list(names)
        for name, f in self._fields:
            if wanted and name == wanted[0]:
                fmt.append(f)
                wanted.pop(0)
            else:
                fmt.append(f"{struct.calcsize('<' + f)}x")
        if wanted:
            raise TypeError(f"{self.name}: {wanted} are not fields, or not in declaration order")
        return struct.Struct("<" + "".join(fmt))

    def pack(self, **fields: Any) -> bytes:
        if not fields.keys() <= self._defaults.keys():
            raise TypeError(f"{self.name} has no field(s) {sorted(fields.keys() - self._defaults.keys())}")
        get = fields.get
        return self.struct.pack(*[get(f, d) for f, d in self._items])

    def unpack(self, buf: bytes | bytearray | memoryview, offset: int = 0) -> Any:
        if offset < 0 or offset + self.size > len(buf):
            raise ValueError(
                f"{self.name}: {self.size} bytes at offset {offset} are past the end ({len(buf)})"
            )
        return self.tuple._make(self.struct.unpack_from(buf, offset))

    def __repr__(self) -> str:
        return f"<struct {self.name}: {self.size} bytes>"


def _count(expr: str, constants: dict[str, int]) -> int:
    expr = expr.strip()
    for key, value in constants.items():
        expr = re.sub(rf"\b{key}\b", str(value), expr)
    if not re.fullmatch(r"[\d\s*+]+", expr):
        raise ValueError(f"array size {expr!r} is not a constant expression")
    return int(eval(expr, {"__builtins__": {}}))  # digits, '*' and '+' only


def parse(text: str, constants: dict[str, int] | None = None) -> dict[str, CStruct]:
    """Compile every ``struct name { ... };`` in ``text``."""
    constants = constants or {}
    result: dict[str, CStruct] = {}
    for m in _STRUCT.finditer(text):
        body = re.sub(r"/\*.*?\*/|//[^\n]*", "", m.group("body"), flags=re.S)
        # a union is stored as its first member (all ours are same-sized scalars)
        body = _UNION.sub(
            lambda u: u.group("body").strip().split(";")[0].rsplit(None, 1)[0] + f" {u.group('name')};", body
        )
        fields: list[tuple[str, str]] = []
        for line in body.split(";"):
            line = line.strip()
            if not line:
                continue
            fm = _FIELD.match(line + ";")
            if not fm:
                raise ValueError(f"struct {m.group('name')}: cannot parse {line!r}")
            base = _TYPES[fm.group("type")]
            if fm.group("count"):
                n = _count(fm.group("count"), constants) * struct.calcsize("<" + base)
                fields.append((fm.group("name"), f"{n}s"))
            else:
                fields.append((fm.group("name"), base))
        result[m.group("name")] = CStruct(m.group("name"), fields, constants)
    return result

"""A backend by its one config shape, ``{"type": KIND, "config": {OPTIONS}}`` (:class:`BackendSpec`), and
``--backend-config``, the one text syntax ``nydus-erofs mount``, ``cachefilesd-py`` and the bind API take: that
shape, the options alone (a JSON object), ``@FILE`` holding either, or ``key=value,key=value`` (values are text,
converted to each option's type by :func:`cachefilesd_py.backends.make_backend`)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from erofs.errors import UsageError

from . import KINDS, make_backend


@dataclass(frozen=True)
class BackendSpec:
    """A backend by the one config shape: ``{"type": KIND, "config": {OPTIONS}}``."""

    type: str
    config: dict[str, Any] = field(default_factory=dict, repr=False)

    def to_json(self) -> dict[str, Any]:
        return {"type": self.type, "config": dict(self.config)}

    def check(self) -> None:
        """Make (and close) the backend: options it does not take or of the wrong type fail here (no I/O)."""
        make_backend(self.type, **self.config).close()


def parse_backend_option(text: str | None, what: str = "--backend-config") -> tuple[str | None, dict[str, Any]]:
    """A ``--backend-config`` value: the shape ``{"type": …, "config": {…}}`` (type given), or just the options:
    a JSON object, ``@FILE`` holding either, or ``key=value,key=value``.  Returns (type or None, options)."""
    if not text:
        return None, {}
    if text.startswith("@"):
        try:
            text = Path(text[1:]).read_text()
        except (OSError, UnicodeDecodeError) as e:
            raise UsageError(f"{what} {text}: {getattr(e, 'strerror', None) or e}") from None
    if text.lstrip().startswith("{"):
        try:
            value = json.loads(text)
        except ValueError as e:
            raise UsageError(f"{what}: not valid JSON: {e}") from None
        if not isinstance(value, dict):
            raise UsageError(f"{what}: expected a JSON object")
        if "type" in value and set(value) <= {"type", "config"}:
            spec = parse_backend_spec(value, what)
            return spec.type, spec.config
        return None, value
    out: dict[str, Any] = {}
    for item in filter(None, (p.strip() for p in text.split(","))):
        key, sep, val = item.partition("=")
        if not sep:
            raise UsageError(f"{what}: {item!r} is not key=value")
        out[key.strip()] = val.strip()
    return None, out


def parse_backend_spec(value: object, what: str = "backend") -> BackendSpec:
    """A :class:`BackendSpec` from its JSON form; UsageError naming what is wrong."""
    if not isinstance(value, dict) or not set(value) <= {"type", "config"} or "type" not in value:
        raise UsageError(f'{what}: expected {{"type": KIND, "config": {{...}}}}')
    kind, config = value["type"], value.get("config", {})
    if kind not in KINDS:
        raise UsageError(f"{what}: type {kind!r} is not one of {', '.join(KINDS)}")
    if not isinstance(config, dict):
        raise UsageError(f"{what}: config must be a JSON object")
    return BackendSpec(kind, dict(config))


__all__ = ["BackendSpec", "parse_backend_option", "parse_backend_spec"]

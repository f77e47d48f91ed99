"""Image references: ``docker://HOST[:PORT]/REPO[:TAG|@sha256:HEX]`` parsed (:func:`parse_image_reference`) and
told apart from a bootstrap file (:func:`is_image_reference`).  Text only, nothing fetched: resolving a reference
and fetching its bootstrap is :mod:`cachefilesd_py.reference`'s (a registry client), so a command that merely
checks what it was given imports no registry client.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from erofs.errors import UsageError

__all__ = ["DIGEST", "DOCKER_HUB", "ImageReference", "is_image_reference", "parse_image_reference"]

DOCKER_HUB = "registry-1.docker.io"
DIGEST = re.compile(r"sha256:([0-9a-f]{64})")
_TAG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_REPO = re.compile(rf"{_COMPONENT}(?:/{_COMPONENT})*")
_HOST = re.compile(r"(?:[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9-]+)*|\[[0-9A-Fa-f:]+\])(?::\d{1,5})?")


@dataclass(frozen=True)
class ImageReference:
    """A parsed ``docker://`` reference: ``host`` (``name[:port]``), ``repo``, and ``tag`` or ``digest``."""

    host: str
    repo: str
    tag: str | None = None
    digest: str | None = None  # sha256:<hex>

    @property
    def reference(self) -> str:
        """What goes after ``manifests/``: the digest if any, else the tag."""
        return self.digest or self.tag or "latest"

    def __str__(self) -> str:
        tail = f"@{self.digest}" if self.digest else f":{self.tag or 'latest'}"
        return f"docker://{self.host}/{self.repo}{tail}"


def parse_image_reference(text: str) -> ImageReference:
    """``[docker://]HOST[:PORT]/REPO[:TAG][@sha256:HEX]``; a first component that is no host name (no ``.`` or
    ``:``, not ``localhost``) means Docker Hub, as docker reads it.  UsageError for anything else."""
    rest = text.removeprefix("docker://")
    bad = UsageError(f"{text!r}: expected docker://HOST[:PORT]/REPO[:TAG|@sha256:HEX]")
    if not rest or any(c.isspace() for c in rest):
        raise bad
    digest = None
    if "@" in rest:
        rest, _, digest = rest.partition("@")
        if not DIGEST.fullmatch(digest):
            raise UsageError(f"{text!r}: the digest must be sha256: and 64 lowercase hex digits")
    first, sep, path = rest.partition("/")
    if sep and ("." in first or ":" in first or first == "localhost" or first.startswith("[")):
        host = DOCKER_HUB if first in ("docker.io", "index.docker.io") else first
    else:
        host, path = DOCKER_HUB, rest
    tag = None
    name, colon, maybe_tag = path.rpartition(":")
    if colon and "/" not in maybe_tag:
        path, tag = name, maybe_tag
        if not _TAG.fullmatch(tag):
            raise UsageError(f"{text!r}: {tag!r} is not a valid tag")
    if host == DOCKER_HUB and "/" not in path:
        path = f"library/{path}"
    if not _HOST.fullmatch(host) or not _REPO.fullmatch(path):
        raise bad
    return ImageReference(host, path, None if digest else (tag or "latest"), digest)


def is_image_reference(text: str) -> bool:
    """Whether a mount source is an image reference (``docker://...``) rather than a bootstrap file."""
    return text.startswith("docker://")

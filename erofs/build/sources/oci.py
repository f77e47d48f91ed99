"""An OCI image layout (``oci:PATH[:TAG]``) as a list of tar layers, bottom to top.

``index.json`` → the manifest named by ``org.opencontainers.image.ref.name`` (or the only one) → for an
image index, the manifest of the wanted platform (``--platform os/arch[/variant]``, default the host's)
→ its layers in order.  Each layer blob is read as a stream and its sha256 is checked while it streams;
a mismatch fails the build.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from erofs.build.sources.tar import TarLayer
from erofs.errors import SourceError
from erofs.imagespec import (
    DEFAULT_PLATFORM,
    MT_DOCKER_LIST,
    MT_DOCKER_MANIFEST,
    MT_INDEX,
    MT_MANIFEST,
    is_nydus_manifest,
    parse_platform,
)

LAYER_MEDIA_TYPES = {
    "application/vnd.oci.image.layer.v1.tar",
    "application/vnd.oci.image.layer.v1.tar+gzip",
    "application/vnd.oci.image.layer.v1.tar+zstd",
    "application/vnd.oci.image.layer.nondistributable.v1.tar",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd",
    "application/vnd.docker.image.rootfs.diff.tar",
    "application/vnd.docker.image.rootfs.diff.tar.gzip",
    "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
}
REF_NAME = "org.opencontainers.image.ref.name"
_DIGEST = re.compile(r"sha256:([0-9a-f]{64})")
_MAX_JSON = 16 << 20
_MAX_NESTING = 8


def parse_reference(text: str) -> tuple[Path, str | None]:
    """``oci:PATH[:TAG]`` → (PATH, TAG or None).  PATH itself may contain ':' when it is a directory."""
    rest = text[len("oci:") :]
    if os.path.isdir(rest):
        return Path(rest), None
    path, sep, tag = rest.rpartition(":")
    if sep and path and tag and "/" not in tag:
        return Path(path), tag
    return Path(rest), None


def looks_like_layout(path: str | os.PathLike[str]) -> bool:
    """Whether a directory is an OCI image layout (``oci-layout`` and ``index.json``): given as a plain
    directory SOURCE, it would be built as files, not as the image it holds."""
    return os.path.isfile(os.path.join(path, "oci-layout")) and os.path.isfile(os.path.join(path, "index.json"))


class OciLayout:
    def __init__(self, path: Path) -> None:
        self.path = path
        layout = self._json(path / "oci-layout", "oci-layout")
        if not isinstance(layout, dict) or "imageLayoutVersion" not in layout:
            raise SourceError(f"{path}: not an OCI image layout (oci-layout has no imageLayoutVersion)")

    def _json(self, file: Path, what: str) -> Any:
        try:
            with open(file, "rb") as f:
                raw = f.read(_MAX_JSON + 1)
        except FileNotFoundError:
            raise SourceError(f"{self.path}: not an OCI image layout ({what} missing)") from None
        except OSError as e:
            raise SourceError(f"{self.path}: cannot read {what}: {e.strerror}") from None
        if len(raw) > _MAX_JSON:
            raise SourceError(f"{self.path}: {what} is larger than {_MAX_JSON} bytes")
        try:
            return json.loads(raw)
        except (ValueError, UnicodeError) as e:
            raise SourceError(f"{self.path}: {what} is not valid JSON ({e})") from None

    def blob_path(self, desc: dict[str, Any]) -> tuple[Path, str]:
        digest = desc.get("digest") if isinstance(desc, dict) else None
        m = _DIGEST.fullmatch(digest) if isinstance(digest, str) else None
        if m is None:
            raise SourceError(f"{self.path}: unsupported or malformed digest {digest!r} (sha256 only)")
        return self.path / "blobs" / "sha256" / m.group(1), m.group(1)

    def blob_json(self, desc: dict[str, Any]) -> Any:
        path, hexd = self.blob_path(desc)
        try:
            raw = path.read_bytes() if path.stat().st_size <= _MAX_JSON else b""
        except OSError:
            raise SourceError(f"{self.path}: blob {desc.get('digest')} missing") from None
        if not raw or hashlib.sha256(raw).hexdigest() != hexd:
            raise SourceError(f"{self.path}: blob {desc.get('digest')} does not match its digest")
        try:
            return json.loads(raw)
        except (ValueError, UnicodeError) as e:
            raise SourceError(f"{self.path}: blob {desc.get('digest')} is not valid JSON ({e})") from None

    def top(self, tag: str | None) -> tuple[dict[str, Any], dict[str, Any]]:
        """The descriptor index.json holds for ``tag`` (None: its only one) and the document it names: an image
        index or an image manifest."""
        desc = self._top_descriptor(tag)
        doc = self.blob_json(desc)
        if not isinstance(doc, dict):
            raise SourceError(f"{self.path}: blob {desc.get('digest')} is not a manifest or index")
        return desc, doc

    def manifest(self, tag: str | None, platform: str | None) -> dict[str, Any]:
        """The image manifest of ``tag``: from an image index, the one for ``platform`` (None: the host's); a
        single-platform image must be for ``platform`` when one is given (its config says which it is)."""
        return self._resolve(self._top_descriptor(tag), platform, 0)

    def _top_descriptor(self, tag: str | None) -> dict[str, Any]:
        index = self._json(self.path / "index.json", "index.json")
        manifests = index.get("manifests") if isinstance(index, dict) else None
        if not isinstance(manifests, list) or not manifests:
            raise SourceError(f"{self.path}: index.json lists no manifests")
        if tag is not None:
            found = [d for d in manifests if isinstance(d, dict) and (d.get("annotations") or {}).get(REF_NAME) == tag]
            if not found:
                tags = sorted(str((d.get("annotations") or {}).get(REF_NAME)) for d in manifests if isinstance(d, dict))
                raise SourceError(f"{self.path}: no image tagged {tag!r} (tags: {', '.join(tags) or 'none'})")
            desc = found[0]
        elif len(manifests) == 1:
            desc = manifests[0]
        else:
            raise SourceError(f"{self.path}: the layout holds {len(manifests)} images: name one with oci:PATH:TAG")
        if not isinstance(desc, dict):
            raise SourceError(f"{self.path}: index.json has a malformed descriptor")
        return desc

    def _resolve(self, desc: dict[str, Any], platform: str | None, depth: int) -> dict[str, Any]:
        choices: list[str] = []
        want = parse_platform(platform or DEFAULT_PLATFORM)
        found = self._find(desc, want, depth, choices)
        if found is None:
            raise SourceError(f"{self.path}: no manifest for platform {platform or DEFAULT_PLATFORM} "
                              f"(has: {', '.join(choices) or 'none'})")  # fmt: skip
        if platform is not None and not choices:  # one manifest, no index: its config names the platform
            have = self._platform_of(found, desc)
            if have is not None and not _matches(have, want):
                raise SourceError(f"{self.path}: no manifest for platform {platform} (has: {_platform_text(have)})")
        return found

    def _platform_of(self, manifest: dict[str, Any], desc: dict[str, Any]) -> tuple[str, str, str | None] | None:
        """(os, architecture, variant) of a single-platform image: its descriptor's platform, else its config's."""
        p = desc.get("platform")
        if not isinstance(p, dict):
            config = manifest.get("config")
            p = self.blob_json(config) if isinstance(config, dict) else None
        if not isinstance(p, dict) or not isinstance(p.get("os"), str) or not isinstance(p.get("architecture"), str):
            return None
        variant = p.get("variant")
        return p["os"], p["architecture"], variant if isinstance(variant, str) else None

    def _find(self, desc: dict[str, Any], want: tuple[str, str, str | None], depth: int,
              choices: list[str]) -> dict[str, Any] | None:  # fmt: skip
        """The manifest below ``desc`` for platform ``want`` (an index's entries, nested indexes too)."""
        if depth > _MAX_NESTING:
            raise SourceError(f"{self.path}: image indexes nested too deeply")
        doc = self.blob_json(desc)
        if not isinstance(doc, dict):
            raise SourceError(f"{self.path}: blob {desc.get('digest')} is not a manifest or index")
        media = doc.get("mediaType") or desc.get("mediaType")
        if media in (MT_INDEX, MT_DOCKER_LIST) or (media is None and "manifests" in doc):
            for d in doc.get("manifests") or []:
                if not isinstance(d, dict):
                    continue
                p = d.get("platform")
                if not isinstance(p, dict):
                    if d.get("mediaType") in (MT_INDEX, MT_DOCKER_LIST):  # a nested index: look inside
                        found = self._find(d, want, depth + 1, choices)
                        if found is not None:
                            return found
                    continue
                variant = p.get("variant")
                choices.append(f"{p.get('os')}/{p.get('architecture')}" + (f"/{variant}" if variant else ""))
                if _matches((p.get("os"), p.get("architecture"), variant), want):
                    return self._find(d, want, depth + 1, choices)
            return None
        if media in (MT_MANIFEST, MT_DOCKER_MANIFEST) or (media is None and "layers" in doc):
            if not isinstance(doc.get("layers"), list):
                raise SourceError(f"{self.path}: manifest {desc.get('digest')} has no layer list")
            return doc
        raise SourceError(f"{self.path}: unsupported manifest media type {media!r}")

    def layers(self, tag: str | None, platform: str | None) -> list[TarLayer]:
        manifest = self.manifest(tag, platform)
        if is_nydus_manifest(manifest):
            raise SourceError(f"{self.path}: already a Nydus image (its layers are Nydus blobs and a bootstrap): "
                              "mount its bootstrap instead")  # fmt: skip
        out = []
        for i, desc in enumerate(manifest["layers"]):
            if not isinstance(desc, dict):
                raise SourceError(f"{self.path}: layer {i} has a malformed descriptor")
            media = desc.get("mediaType")
            if media not in LAYER_MEDIA_TYPES:
                raise SourceError(f"{self.path}: layer {i} has unsupported media type {media!r} (tar layers only)")
            path, hexd = self.blob_path(desc)
            size = desc.get("size")
            verify = _verifier(hexd, size if isinstance(size, int) else None, desc.get("digest"))
            label = f"{self.path} layer {i} (sha256:{hexd[:12]})"
            out.append(TarLayer(str(path), label=label, opener=_opener(path, desc.get("digest")), verify=verify))
        return out


def _matches(have: tuple[object, object, object], want: tuple[str, str, str | None]) -> bool:
    return (have[0], have[1]) == want[:2] and want[2] in (None, have[2])


def _platform_text(p: tuple[str, str, str | None]) -> str:
    return "/".join(x for x in p if x)


def _opener(path: Path, digest: object) -> Callable[[], Any]:
    def open_blob() -> Any:
        try:
            return open(path, "rb")
        except FileNotFoundError:
            raise SourceError(f"layer blob {digest} is missing from the layout") from None
        except OSError as e:
            raise SourceError(f"layer blob {digest}: {e.strerror}") from None

    return open_blob


def _verifier(hexd: str, size: int | None, digest: object) -> Callable[[bytes | None], None]:
    sha = hashlib.sha256()
    count = [0]

    def verify(data: bytes | None) -> None:
        if data is not None:
            sha.update(data)
            count[0] += len(data)
            return
        if size is not None and count[0] != size:
            raise SourceError(f"layer blob {digest}: {count[0]} bytes, the manifest says {size}")
        if sha.hexdigest() != hexd:
            raise SourceError(f"layer blob {digest}: content does not match its digest (sha256:{sha.hexdigest()})")

    return verify


def oci_layers(reference: str, want: str | None = None) -> list[TarLayer]:
    """The tar layers of ``oci:PATH[:TAG]`` (for platform ``want``, default the host's), bottom first."""
    path, tag = parse_reference(reference)
    if not path.is_dir():
        raise SourceError(f"{path}: no such OCI image layout directory")
    return OciLayout(path).layers(tag, want)

"""OCI image documents as this project reads and writes them (media types, platforms) and the Nydus conventions
in them (upstream nydusify's, ``contrib/nydusify/pkg/utils/constant.go``; :mod:`erofs.build.convert` writes such
images): one layer per data blob (:data:`MT_NYDUS_BLOB`, annotated :data:`ANN_NYDUS_BLOB`), then a tar layer holding
the bootstrap as :data:`BOOTSTRAP_MEMBER` (annotated :data:`ANN_NYDUS_BOOTSTRAP`), and :data:`NYDUS_OS_FEATURE` in
the platform of an index entry.  :func:`extract_bootstrap` takes the bootstrap out of its layer.

Vocabulary only, no builder and no registry client: what reads a Nydus image by reference
(:mod:`cachefilesd_py.reference`) imports it without the build machinery.
"""

from __future__ import annotations

import platform
import re
import tarfile
from typing import Any, BinaryIO

from erofs.build.sources.stream import LayerStream
from erofs.errors import ImageError, SourceError

__all__ = [
    "ANN_NYDUS_BLOB",
    "ANN_NYDUS_BOOTSTRAP",
    "ANN_NYDUS_FS_VERSION",
    "BOOTSTRAP_MEMBER",
    "DEFAULT_PLATFORM",
    "MAX_BOOTSTRAP",
    "MT_DOCKER_LIST",
    "MT_DOCKER_MANIFEST",
    "MT_INDEX",
    "MT_MANIFEST",
    "MT_NYDUS_BLOB",
    "NYDUS_OS_FEATURE",
    "extract_bootstrap",
    "is_nydus_manifest",
    "parse_platform",
]

MT_INDEX = "application/vnd.oci.image.index.v1+json"
MT_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MT_DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
MT_DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"

# a Nydus image: its blob layers, then its bootstrap layer
MT_NYDUS_BLOB = "application/vnd.oci.image.layer.nydus.blob.v1"
ANN_NYDUS_BOOTSTRAP = "containerd.io/snapshot/nydus-bootstrap"
ANN_NYDUS_BLOB = "containerd.io/snapshot/nydus-blob"
ANN_NYDUS_FS_VERSION = "containerd.io/snapshot/nydus-fs-version"
NYDUS_OS_FEATURE = "nydus.remoteimage.v1"
BOOTSTRAP_MEMBER = "image/image.boot"
MAX_BOOTSTRAP = 1 << 30  # bytes: the bootstrap layer, and the bootstrap in it, read from an image

# platforms, os/arch[/variant]
_ARCH = {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64", "armv7l": "arm/v7",
         "armv6l": "arm/v6", "i686": "386", "i386": "386", "ppc64le": "ppc64le", "s390x": "s390x",
         "riscv64": "riscv64"}  # fmt: skip
DEFAULT_PLATFORM = "linux/" + _ARCH.get(platform.machine().lower(), "amd64")  # the host's, as docker pulls


def is_nydus_manifest(manifest: dict[str, Any]) -> bool:
    """Whether an image manifest is a Nydus image's (Nydus blob layers or a bootstrap layer)."""
    for desc in manifest.get("layers") or []:
        if isinstance(desc, dict) and (desc.get("mediaType") == MT_NYDUS_BLOB
                                       or ANN_NYDUS_BOOTSTRAP in (desc.get("annotations") or {})):  # fmt: skip
            return True
    return False


def parse_platform(text: str) -> tuple[str, str, str | None]:
    parts = text.split("/")
    if len(parts) not in (2, 3) or not all(parts):
        raise SourceError(f"--platform must be os/arch[/variant], not {text!r}")
    return parts[0], parts[1], parts[2] if len(parts) == 3 else None


def extract_bootstrap(layer: BinaryIO, out: BinaryIO, limit: int = MAX_BOOTSTRAP) -> None:
    """Copy the ``image/image.boot`` member of a bootstrap layer (a tar: plain, gzip or zstd) to ``out``: a
    regular file of at most ``limit`` bytes; nothing else of the tar is written anywhere.  ImageError if not."""
    try:
        stream = LayerStream(layer, "bootstrap layer", threaded=False)
        with tarfile.open(fileobj=stream, mode="r|") as tar:
            for member in tar:
                if re.sub(r"^(\./)+", "", member.name) != BOOTSTRAP_MEMBER:
                    continue
                if not member.isreg():
                    raise ImageError(f"bootstrap layer: {BOOTSTRAP_MEMBER} is not a regular file")
                if member.size > limit:
                    raise ImageError(f"bootstrap layer: {BOOTSTRAP_MEMBER} of {member.size} bytes is over the "
                                     f"limit of {limit}")  # fmt: skip
                src = tar.extractfile(member)
                assert src is not None
                left = member.size
                while left:
                    chunk = src.read(min(left, 1 << 20))
                    if not chunk:
                        raise ImageError(f"bootstrap layer: {BOOTSTRAP_MEMBER} is truncated")
                    out.write(chunk)
                    left -= len(chunk)
                return
    except (tarfile.TarError, SourceError, EOFError) as e:
        raise ImageError(f"bootstrap layer: {e}") from None
    raise ImageError(f"bootstrap layer: no {BOOTSTRAP_MEMBER} in it")

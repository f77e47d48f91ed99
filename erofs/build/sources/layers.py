"""``SOURCE...`` of ``nydus-erofs build`` and ``convert`` as layer readers, bottom to top.

SOURCE is a directory, a tar layer (``.tar``, ``.tar.gz``, ``.tar.zst``, told apart by content; ``-`` for
stdin) or an OCI image layout ``oci:PATH[:TAG]`` (one layer per image layer).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from erofs.build.sources.dir import DirLayer
from erofs.build.sources.oci import oci_layers
from erofs.build.sources.tar import TarLayer
from erofs.errors import UsageError

Layer = TarLayer | DirLayer


def layers_of(sources: Sequence[str], platform: str | None = None) -> list[Layer]:
    """One layer reader per source layer, bottom first."""
    layers: list[Layer] = []
    if sum(1 for s in sources if s == "-") > 1:
        raise UsageError("stdin ('-') can be given only once")
    for src in sources:
        if src.startswith("oci:"):
            layers.extend(oci_layers(src, platform))
        elif src == "-":
            layers.append(TarLayer("-", label="<stdin>"))
        elif os.path.isdir(src):
            layers.append(DirLayer(src))
        elif os.path.exists(src):
            layers.append(TarLayer(src))
        else:
            raise UsageError(f"SOURCE {src!r}: no such file, directory or oci:PATH")
    if not layers:
        raise UsageError("the sources hold no layer")
    return layers

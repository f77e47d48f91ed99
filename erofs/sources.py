"""``SOURCE...`` of ``nydus-erofs build`` and ``convert`` as layers, and the whole build of an image from them.

SOURCE is a directory, a tar layer (``.tar``, ``.tar.gz``, ``.tar.zst``, told apart by content; ``-`` for
stdin) or an OCI image layout ``oci:PATH[:TAG]``.  Several SOURCEs are layers, bottom to top, flattened into
one bootstrap with one blob per layer that has new data.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from erofs.bootstrap import ImageOptions
from erofs.builder import BuildResult, LayerReader, build_layers
from erofs.chunk_dict import load_chunk_dict
from erofs.chunker import ChunkStore
from erofs.errors import UsageError
from erofs.overlay import merge_layers
from erofs.source_dir import read_directory
from erofs.source_oci import oci_layers
from erofs.source_tar import LayerTree, TarLayer
from erofs.tree import Inode


class DirLayer:
    """A directory as a layer (no implicit directories, no unresolved links)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.result: LayerTree | None = None

    def __call__(self, store: ChunkStore) -> Inode:
        self.result = LayerTree(read_directory(self.path, store))
        return self.result.root


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


def build_image(sources: Sequence[str], output_dir: str | os.PathLike[str], opts: ImageOptions, *,
                whiteout_spec: str = "oci", platform: str | None = None, chunk_dict: str | None = None,
                chunk_dict_blob_dir: str | None = None) -> BuildResult:  # fmt: skip
    """Build one image from SOURCE layers into ``output_dir`` (atomically; see :func:`build_layers`)."""
    if chunk_dict_blob_dir and not chunk_dict:
        raise UsageError("--chunk-dict-blob-dir needs --chunk-dict")
    layers = layers_of(sources, platform)
    out = os.path.realpath(output_dir)
    for layer in layers:
        src = os.path.realpath(layer.path) if isinstance(layer, DirLayer) else None
        if src is not None and (out == src or out.startswith(src.rstrip("/") + "/")):
            raise UsageError(f"--output-dir {output_dir} is inside SOURCE {layer.path}: the image would hold itself")
    cd = load_chunk_dict(chunk_dict, chunk_dict_blob_dir, opts) if chunk_dict else None

    def merge(_trees: list[Inode]) -> Inode:
        return merge_layers([layer.result for layer in layers if layer.result is not None], whiteout_spec)

    readers: list[LayerReader] = list(layers)
    return build_layers(
        readers, output_dir, opts, merge=merge,
        known=cd.known if cd else None, extra_blobs=cd.blobs if cd else (),
        extra_blob_files=cd.blob_files if cd else None,
    )  # fmt: skip

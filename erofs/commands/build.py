"""``nydus-erofs build SOURCE... --output-dir OUT``.

SOURCE is a directory, a tar layer (``.tar``, ``.tar.gz``, ``.tar.zst``, told apart by content; ``-`` for
stdin) or an OCI image layout ``oci:PATH[:TAG]``.  Several SOURCEs are layers, bottom to top, flattened
into one bootstrap with one blob per layer that has new data.
"""

from __future__ import annotations

import json
import os
import re
import sys
from collections.abc import Sequence

import click

from erofs.builder import LayerReader, build_layers, check_options
from erofs.chunk_dict import load_chunk_dict
from erofs.chunker import ChunkStore
from erofs.errors import UsageError
from erofs.overlay import WHITEOUT_SPECS, merge_layers
from erofs.source_dir import read_directory
from erofs.source_oci import oci_layers
from erofs.source_tar import LayerTree, TarLayer
from erofs.tree import Inode

_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}


def parse_size(text: str) -> int:
    """'1MiB', '4k', '0x100000', '1048576' → bytes."""
    m = re.fullmatch(r"\s*(0x[0-9a-fA-F]+|\d+)\s*([kKmMgG]?)(?:i?[bB])?\s*", text)
    if not m:
        raise UsageError(f"not a size: {text!r}")
    return int(m.group(1), 0) * _UNITS[m.group(2).lower()]


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


@click.command()
@click.argument("sources", nargs=-1, required=True)
@click.option(
    "--output-dir", "-o", required=True, type=click.Path(file_okay=False), help="Where image.boot and blobs/ go."
)
@click.option("--chunk-size", default="1MiB", show_default=True, help="Chunk size, a power of two from 4KiB to 16MiB.")
@click.option("--compressor", type=click.Choice(["none", "lz4_block", "zstd"]), default="none", show_default=True)
@click.option("--digester", type=click.Choice(["blake3", "sha256"]), default="blake3", show_default=True)
@click.option("--whiteout-spec", type=click.Choice(WHITEOUT_SPECS), default="oci", show_default=True,
              help="oci: apply .wh.* whiteouts; overlayfs: keep them for overlayfs; none: plain files.")  # fmt: skip
@click.option("--chunk-dict", "chunk_dict", type=click.Path(dir_okay=False),
              help="Dedup against this image bootstrap (blobs it uses are copied into OUT/blobs).")  # fmt: skip
@click.option("--chunk-dict-blob-dir", type=click.Path(file_okay=False),
              help="Blob directory of --chunk-dict [default: its directory's blobs/].")  # fmt: skip
@click.option("--platform", default=None, help="os/arch[/variant] of a multi-platform OCI image [the host's].")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def build(sources: tuple[str, ...], output_dir: str, chunk_size: str, compressor: str, digester: str,
          whiteout_spec: str, chunk_dict: str | None, chunk_dict_blob_dir: str | None, platform: str | None,
          as_json: bool) -> None:  # fmt: skip
    """Build a Nydus RAFS v6 image (OUT/image.boot + OUT/blobs/<id>) from SOURCE layers, bottom to top."""
    opts = check_options(parse_size(chunk_size), compressor, digester)
    if chunk_dict_blob_dir and not chunk_dict:
        raise UsageError("--chunk-dict-blob-dir needs --chunk-dict")
    layers = layers_of(sources, platform)
    cd = load_chunk_dict(chunk_dict, chunk_dict_blob_dir, opts) if chunk_dict else None

    def merge(_trees: list[Inode]) -> Inode:
        return merge_layers([layer.result for layer in layers if layer.result is not None], whiteout_spec)

    readers: list[LayerReader] = list(layers)
    result = build_layers(
        readers, output_dir, opts, merge=merge,
        known=cd.known if cd else None, extra_blobs=cd.blobs if cd else (),
        extra_blob_files=cd.blob_files if cd else None,
    )  # fmt: skip
    if as_json:
        click.echo(json.dumps(result.to_json(), indent=2))
    else:
        click.echo(f"{result.bootstrap}: {result.inodes} inodes, {len(result.blobs)} blob(s)")
        for b in result.blobs:
            click.echo(f"  blobs/{b.blob_id}  {b.chunk_count} chunks, {b.compressed_size} bytes")
    sys.stdout.flush()

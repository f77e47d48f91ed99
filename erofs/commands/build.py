"""``nydus-erofs build SOURCE... --output-dir OUT`` (sources: see :mod:`erofs.build.sources.layers`)."""

from __future__ import annotations

import json
import os
import sys

import click

from erofs.build.builder import build_image, check_options
from erofs.build.overlay import WHITEOUT_SPECS
from erofs.build.prefetch import selector as prefetch_selector
from erofs.build.sources.oci import looks_like_layout
from erofs.commands import SIZE
from erofs.progress import progress
from erofs.units import count


@click.command()
@click.argument("sources", nargs=-1, required=True)
@click.option(
    "--output-dir", "-o", required=True, type=click.Path(file_okay=False), help="Where image.boot and blobs/ go."
)
@click.option("--chunk-size", type=SIZE, default="1MiB", show_default=True,
              help="Chunk size, a power of two from 4KiB to 16MiB.")  # fmt: skip
@click.option("--compressor", type=click.Choice(["none", "lz4_block", "zstd"]), default="none", show_default=True)
@click.option("--digester", type=click.Choice(["blake3", "sha256"]), default="blake3", show_default=True)
@click.option("--whiteout-spec", type=click.Choice(WHITEOUT_SPECS), default="oci", show_default=True,
              help="oci: apply .wh.* whiteouts; overlayfs: keep them for overlayfs; none: plain files.")  # fmt: skip
@click.option("--chunk-dict", "chunk_dict", type=click.Path(dir_okay=False),
              help="Dedup against this image bootstrap (blobs it uses are copied into OUT/blobs).")  # fmt: skip
@click.option("--chunk-dict-blob-dir", type=click.Path(file_okay=False),
              help="Blob directory of --chunk-dict [default: its directory's blobs/].")  # fmt: skip
@click.option("--platform", default=None, help="os/arch[/variant] of a multi-platform OCI image [the host's].")
@click.option("--prefetch-list", metavar="FILE|-",
              help="Files to prefetch first: absolute paths, one a line (a directory: all under it).")  # fmt: skip
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def build(sources: tuple[str, ...], output_dir: str, chunk_size: int, compressor: str, digester: str,
          whiteout_spec: str, chunk_dict: str | None, chunk_dict_blob_dir: str | None, platform: str | None,
          prefetch_list: str | None, as_json: bool) -> None:  # fmt: skip
    """Build a Nydus RAFS v6 image (OUT/image.boot + OUT/blobs/<id>) from SOURCE layers, bottom to top."""
    opts = check_options(chunk_size, compressor, digester)
    prefetch = prefetch_selector(prefetch_list)
    for src in sources:
        if not src.startswith("oci:") and os.path.isdir(src) and looks_like_layout(src):
            click.echo(f"nydus-erofs: warning: {src} is an OCI image layout, built here as plain files: "
                       f"for the image it holds, give oci:{src}[:TAG]", err=True)  # fmt: skip
    with progress("building", quiet=as_json) as bar:
        result = build_image(sources, output_dir, opts, whiteout_spec=whiteout_spec, platform=platform,
                             chunk_dict=chunk_dict, chunk_dict_blob_dir=chunk_dict_blob_dir, progress=bar,
                             prefetch=prefetch)  # fmt: skip
    if as_json:
        click.echo(json.dumps(result.to_json(), indent=2))
    else:
        click.echo(f"{result.bootstrap}: {count(result.inodes, 'inode')}, {count(len(result.blobs), 'blob')}")
        for b in result.blobs:
            click.echo(f"  blobs/{b.blob_id}  {count(b.chunk_count, 'chunk')}, {count(b.compressed_size, 'byte')}")
    sys.stdout.flush()

"""``nydus-erofs convert SOURCE TARGET``: an OCI image to a Nydus image (OCI layout or registry)."""

from __future__ import annotations

import json

import click

from erofs.build.builder import check_options
from erofs.build.convert import convert as convert_image
from erofs.build.prefetch import selector as prefetch_selector
from erofs.commands import SIZE
from erofs.progress import progress
from erofs.units import count


@click.command()
@click.argument("source")
@click.argument("target")
@click.option("--chunk-size", type=SIZE, default="1MiB", show_default=True,
              help="Chunk size, a power of two from 4KiB to 16MiB.")  # fmt: skip
@click.option("--compressor", type=click.Choice(["none", "lz4_block", "zstd"]), default="zstd", show_default=True)
@click.option("--digester", type=click.Choice(["blake3", "sha256"]), default="blake3", show_default=True)
@click.option("--platform", default=None,
              help="os/arch[/variant] to convert [the host's]; 'all': every platform of an index, into a "
                   "Nydus index.")  # fmt: skip
@click.option("--chunk-dict", type=click.Path(dir_okay=False), help="Dedup against this image bootstrap.")
@click.option("--chunk-dict-blob-dir", type=click.Path(file_okay=False),
              help="Blob directory of --chunk-dict [default: its directory's blobs/].")  # fmt: skip
@click.option("--plain-http", is_flag=True, help="Talk to docker:// registries over HTTP, without TLS.")
@click.option("--work-dir", type=click.Path(file_okay=False), help="Where temporary files go [system temp].")
@click.option("--prefetch-list", metavar="FILE|-",
              help="Files to prefetch first: absolute paths, one a line (a directory: all under it).")  # fmt: skip
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def convert(source: str, target: str, chunk_size: int, compressor: str, digester: str, platform: str | None,
            chunk_dict: str | None, chunk_dict_blob_dir: str | None, plain_http: bool, work_dir: str | None,
            prefetch_list: str | None,
            as_json: bool) -> None:  # fmt: skip
    """Convert SOURCE (oci:PATH[:TAG] | docker://REGISTRY/REPO[:TAG]) into a Nydus image at TARGET (same forms).

    The Nydus image has one layer per data blob and a last layer holding image/image.boot, as nydusify writes.
    """
    opts = check_options(chunk_size, compressor, digester)
    prefetch = prefetch_selector(prefetch_list)
    with progress("converting", quiet=as_json) as bar:
        result = convert_image(source, target, opts, platform=platform, chunk_dict=chunk_dict,
                               chunk_dict_blob_dir=chunk_dict_blob_dir, plain_http=plain_http, work_dir=work_dir,
                               progress=bar, prefetch=prefetch)  # fmt: skip
    if as_json:
        click.echo(json.dumps(result.to_json(), indent=2))
    elif result.is_index:
        each = "; ".join(f"{i.platform}: {count(len(i.build.blobs), 'blob')} + bootstrap" for i in result.images)
        click.echo(f"{target}: {result.manifest_digest}, index of {count(len(result.images), 'platform')} ({each})")
    else:
        click.echo(f"{target}: {result.manifest_digest}, {count(len(result.build.blobs), 'blob')} + bootstrap")

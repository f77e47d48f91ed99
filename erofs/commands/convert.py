"""``nydus-erofs convert SOURCE TARGET``: an OCI image to a Nydus image (OCI layout or registry)."""

from __future__ import annotations

import json

import click

from erofs.build.builder import check_options
from erofs.build.convert import convert as convert_image
from erofs.build.prefetch import selector as prefetch_selector
from erofs.units import parse_size


@click.command()
@click.argument("source")
@click.argument("target")
@click.option("--chunk-size", default="1MiB", show_default=True, help="Chunk size, a power of two from 4KiB to 16MiB.")
@click.option("--compressor", type=click.Choice(["none", "lz4_block", "zstd"]), default="zstd", show_default=True)
@click.option("--digester", type=click.Choice(["blake3", "sha256"]), default="blake3", show_default=True)
@click.option("--platform", default=None, help="os/arch[/variant] to convert [the host's].")
@click.option("--chunk-dict", type=click.Path(dir_okay=False), help="Dedup against this image bootstrap.")
@click.option("--plain-http", is_flag=True, help="Talk to docker:// registries over HTTP, without TLS.")
@click.option("--work-dir", type=click.Path(file_okay=False), help="Where temporary files go [system temp].")
@click.option("--prefetch-list", metavar="FILE|-",
              help="Files to prefetch first: absolute paths, one a line (a directory: all under it).")  # fmt: skip
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def convert(source: str, target: str, chunk_size: str, compressor: str, digester: str, platform: str | None,
            chunk_dict: str | None, plain_http: bool, work_dir: str | None, prefetch_list: str | None,
            as_json: bool) -> None:  # fmt: skip
    """Convert SOURCE (oci:PATH[:TAG] | docker://REGISTRY/REPO[:TAG]) into a Nydus image at TARGET (same forms).

    The Nydus image has one layer per data blob and a last layer holding image/image.boot, as nydusify writes.
    """
    opts = check_options(parse_size(chunk_size), compressor, digester)
    result = convert_image(source, target, opts, platform=platform, chunk_dict=chunk_dict, plain_http=plain_http,
                           work_dir=work_dir, prefetch=prefetch_selector(prefetch_list))  # fmt: skip
    if as_json:
        click.echo(json.dumps(result.to_json(), indent=2))
    else:
        click.echo(f"{target}: {result.manifest_digest}, {len(result.build.blobs)} blob(s) + bootstrap")

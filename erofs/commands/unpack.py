"""``nydus-erofs unpack BOOT --blob-dir DIR --output DIR|FILE.tar``: the tree back out, verified."""

from __future__ import annotations

import os

import click

from erofs.commands import blob_source_options
from erofs.errors import UsageError
from erofs.paths import BLOBS_DIR, blobs_beside
from erofs.progress import progress
from erofs.reader.bootstrap import Bootstrap
from erofs.reader.data import ImageReader, open_backend
from erofs.reader.unpack import unpack_to_dir, unpack_to_tar
from erofs.units import count


@click.command()
@click.argument("bootstrap", type=click.Path(exists=True, dir_okay=False))
@blob_source_options
@click.option(
    "--output",
    "-o",
    required=True,
    type=click.Path(),
    help="A directory (must not exist or be empty) or a FILE.tar (PAX).",
)
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["auto", "dir", "tar"]),
    default="auto",
    show_default=True,
    help="Output kind; auto = tar when OUTPUT ends in .tar.",
)
def unpack(bootstrap: str, blob_dir: str | None, devices: tuple[str, ...], output: str, fmt: str) -> None:  # fmt: skip
    """Extract an image with full metadata (run as root for owners and devices); chunk digests are verified.

    Blobs are read from --blob-dir, else from the blobs/ directory beside BOOTSTRAP.
    """
    if blob_dir is None and not devices:
        found = blobs_beside(bootstrap)
        blob_dir = str(found) if found is not None else None
    _check_not_an_input(output, bootstrap, blob_dir, devices)
    with Bootstrap(bootstrap) as bs:
        backend = open_backend(bs, blob_dir, devices)
        if backend is None and (bs.blobs or bs.devices):
            raise UsageError(f"{bootstrap}: the file data is in blobs: give --blob-dir DIR (no {BLOBS_DIR}/ beside it)")
        reader = ImageReader(bs, backend)
        with progress("unpacking", bs.sb.inos or None, unit="entries") as bar:
            if fmt == "tar" or (fmt == "auto" and output.endswith(".tar")):
                n = unpack_to_tar(reader, output, bar)
            else:
                n = unpack_to_dir(reader, output, bar)
    click.echo(f"{output}: {count(n, 'entry', 'entries')}", err=True)


def _check_not_an_input(output: str, bootstrap: str, blob_dir: str | None, devices: tuple[str, ...]) -> None:
    """An existing OUTPUT (replaced by a tar) must not be the bootstrap, a --device or a file in --blob-dir."""
    if not os.path.exists(output):
        return
    for given in (bootstrap, *devices):
        if os.path.samefile(output, given):
            raise UsageError(f"{output}: the output would replace the image's own file {given}")
    parent = os.path.dirname(os.path.abspath(output))
    if blob_dir is not None and os.path.samefile(parent, blob_dir):
        raise UsageError(f"{output}: the output would replace a file in --blob-dir {blob_dir}")

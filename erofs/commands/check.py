"""``nydus-erofs check BOOT [--blob-dir DIR] [--device FILE]... [--json]``: validate an image end to end."""

from __future__ import annotations

import json
import sys

import click

from erofs.commands import blob_source_options
from erofs.errors import ImageError
from erofs.reader.bootstrap import Bootstrap
from erofs.reader.check import check_image
from erofs.reader.data import open_backend


@click.command()
@click.argument("bootstrap", type=click.Path(exists=True, dir_okay=False))
@blob_source_options
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def check(bootstrap: str, blob_dir: str | None, devices: tuple[str, ...], as_json: bool) -> None:  # fmt: skip
    """Check a bootstrap's structure and, with its blobs, read, verify and decompress every chunk.

    Exits 0 only when all is well; otherwise prints one line per problem (naming the file and chunk) and exits 3.
    """
    backend = None
    total = 0
    if blob_dir is not None or devices:
        try:
            with Bootstrap(bootstrap, verify_checksum=False) as bs:
                backend = open_backend(bs, blob_dir, devices)
                total = sum(b.compressed_size for b in bs.blobs)
        except ImageError:
            backend = None  # the report below says what is wrong with the bootstrap
    progress = None
    bar = None
    if backend is not None and total and not as_json and sys.stderr.isatty():
        bar = click.progressbar(length=total, label="verifying chunks", file=sys.stderr)
        progress = bar.update
    report = check_image(bootstrap, backend, progress=progress)
    if bar is not None:
        bar.render_finish()
    if as_json:
        click.echo(json.dumps(report.to_json(), indent=2))
    else:
        for p in report.problems:
            click.echo(str(p))
        summary = f"{report.inodes} inodes ({report.files} files, {report.directories} directories)" + (
            f", {report.blobs_checked} blob(s), {report.chunks_verified} chunks verified "
            f"({report.bytes_verified} bytes)"
            if backend is not None
            else ", blobs not checked (no --blob-dir)"
        )
        if report.ok:
            click.echo(f"OK: {summary}")
        else:
            click.echo(f"FAILED: {len(report.problems)} problem(s); {summary}", err=True)
    if not report.ok:
        sys.exit(ImageError.exit_code)

"""``nydus-erofs check BOOT [--blob-dir DIR] [--device FILE]... [--json]``: validate an image end to end."""

from __future__ import annotations

import json
import os
import sys

import click

from erofs.commands import blob_source_options
from erofs.errors import ImageError
from erofs.paths import BLOBS_DIR, blobs_beside
from erofs.progress import progress
from erofs.reader.bootstrap import Bootstrap
from erofs.reader.check import check_image
from erofs.reader.data import open_backend
from erofs.units import count


@click.command()
@click.argument("bootstrap", type=click.Path(exists=True, dir_okay=False))
@blob_source_options
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def check(bootstrap: str, blob_dir: str | None, devices: tuple[str, ...], as_json: bool) -> None:  # fmt: skip
    """Check a bootstrap's structure and, with its blobs (--blob-dir, else blobs/ beside BOOTSTRAP), read, verify
    and decompress every chunk.

    Exits 0 only when all is well; otherwise prints one line per problem (naming the file and chunk) and exits 3.
    """
    backend = None
    total = 0
    has_blobs = True
    if blob_dir is None and not devices:
        found = blobs_beside(bootstrap)
        blob_dir = str(found) if found is not None else None
    try:
        with Bootstrap(bootstrap, verify_checksum=False) as bs:
            has_blobs = bool(bs.blobs or bs.devices)
            backend = open_backend(bs, blob_dir, devices)
            total = sum(b.compressed_size for b in bs.blobs)
    except ImageError:
        backend = None  # the report below says what is wrong with the bootstrap
    with progress("verifying chunks", total or None, quiet=as_json or backend is None) as bar:
        report = check_image(bootstrap, backend, progress=bar)
    if as_json:
        click.echo(json.dumps(report.to_json(), indent=2))
    else:
        for p in report.problems:
            click.echo(str(p))
        summary = (f"{count(report.inodes, 'inode')} ({count(report.files, 'file')}, "
                   f"{count(report.directories, 'directory', 'directories')})")  # fmt: skip
        if backend is not None:
            summary += (f", {count(report.blobs_checked, 'blob')}, {count(report.chunks_verified, 'chunk')} verified "
                        f"({count(report.bytes_verified, 'byte')})")  # fmt: skip
        elif has_blobs:
            summary += ", blobs not checked"
            click.echo(f"nydus-erofs: warning: blobs not checked (metadata only): give --blob-dir DIR, or keep "
                       f"{BLOBS_DIR}/ beside {os.path.basename(bootstrap)}", err=True)  # fmt: skip
        if report.ok:
            click.echo(f"OK: {summary}")
        else:
            click.echo(f"FAILED: {count(len(report.problems), 'problem')}; {summary}", err=True)
    if not report.ok:
        sys.exit(ImageError.exit_code)

"""``nydus-erofs check BOOT [--blob-dir DIR] [--device FILE]... [--json]``: validate an image end to end;
``nydus-erofs check --source REF --target REF``: compare a converted image with its source."""

from __future__ import annotations

import json
import os
import sys

import click

from erofs.check_images import compare_images
from erofs.commands import blob_source_options
from erofs.errors import ImageError, UsageError
from erofs.paths import BLOBS_DIR, blobs_beside
from erofs.progress import progress
from erofs.reader.bootstrap import Bootstrap
from erofs.reader.check import check_image
from erofs.reader.data import open_backend
from erofs.units import count


@click.command()
@click.argument("bootstrap", required=False, type=click.Path(exists=True, dir_okay=False))
@blob_source_options
@click.option("--source", metavar="REF", help="The OCI image TARGET was converted from (oci:PATH[:TAG] | docker://...).")
@click.option("--target", metavar="REF", help="A Nydus image to compare with --source (same forms).")
@click.option("--platform", default=None, help="With --source: compare only this os/arch[/variant] [every one].")
@click.option("--plain-http", is_flag=True, help="Talk to docker:// registries over HTTP, without TLS.")
@click.option("--work-dir", type=click.Path(file_okay=False), help="Where temporary files go [system temp].")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def check(bootstrap: str | None, blob_dir: str | None, devices: tuple[str, ...], source: str | None,
          target: str | None, platform: str | None, plain_http: bool, work_dir: str | None,
          as_json: bool) -> None:  # fmt: skip
    """Check a bootstrap's structure and, with its blobs (--blob-dir, else blobs/ beside BOOTSTRAP), read, verify
    and decompress every chunk.  Or, with --source and --target, compare a converted Nydus image with its OCI
    source as nydusify check does: manifests, config, bootstrap and every file's metadata and content.

    Exits 0 only when all is well; otherwise prints one line per problem (naming the file and chunk) and exits 3
    (images: the first difference, naming the platform and path).
    """
    if source is not None or target is not None:
        if bootstrap is not None or blob_dir is not None or devices:
            raise UsageError("give either BOOTSTRAP or --source/--target, not both")
        if not source or not target:
            raise UsageError("comparing images needs both --source REF and --target REF")
        _check_images(source, target, platform, plain_http, work_dir, as_json)
        return
    if bootstrap is None:
        raise UsageError("give BOOTSTRAP, or --source REF --target REF")
    if platform is not None or plain_http or work_dir is not None:
        raise UsageError("--platform, --plain-http and --work-dir go with --source/--target")
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


def _check_images(source: str, target: str, platform: str | None, plain_http: bool, work_dir: str | None,
                  as_json: bool) -> None:  # fmt: skip
    with progress("comparing", quiet=as_json) as bar:
        report = compare_images(source, target, platform=platform, plain_http=plain_http, work_dir=work_dir,
                                progress=bar)  # fmt: skip
    if as_json:
        click.echo(json.dumps(report.to_json(), indent=2))
        return
    for p in report.platforms:
        click.echo(f"{p.platform}: {count(p.files, 'file')}, {count(p.directories, 'directory', 'directories')}, "
                   f"{count(p.others, 'other')} equal ({count(p.bytes_compared, 'byte')} compared, "
                   f"{count(p.blobs, 'blob')} verified)")  # fmt: skip
    click.echo(f"OK: {target} matches {source}")

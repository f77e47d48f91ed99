"""``nydus-erofs mount BOOT MOUNTPOINT``, ``nydus-erofs umount MOUNTPOINT`` and ``nydus-erofs mounts``
(:mod:`cachefilesd_py.mount`).

Exit codes: 0 ok; 2 bad options or environment (unsupported cache dir, mode not available); 3 image error;
4 backend error; 5 mount/umount or daemon failure.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Any

import click

from cachefilesd_py.backends import KINDS
from cachefilesd_py.backends.config import parse_backend_config
from cachefilesd_py.mount.service import list_mounts, mount_image, umount_image
from cachefilesd_py.mount.spec import MODES, MountSpec
from erofs.commands import SIZE
from erofs.errors import ImageError, UsageError
from erofs.paths import BLOBS_DIR, blobs_beside
from erofs.progress import progress
from erofs.reader.bootstrap import Bootstrap

_REQUIRED = {"http": ("url",), "registry": ("host", "repo")}


@click.command()
@click.argument("boot", type=click.Path(dir_okay=False))
@click.argument("mountpoint", type=click.Path(file_okay=False))
@click.option("--blob-dir", type=click.Path(file_okay=False), help="Blobs as files named by id (localfs backend).")
@click.option("--backend", type=click.Choice(KINDS), default=None,
              help="Where blobs come from [localfs with --blob-dir].")  # fmt: skip
@click.option("--backend-config", default=None, help="Backend options: JSON object, @FILE, or key=value,...")
@click.option("--mode", type=click.Choice(MODES), default="auto", show_default=True,
              help="fanotify: lazy (Linux >= 6.14); full: fetch all, then mount.")  # fmt: skip
@click.option("--cache-dir", required=True, type=click.Path(file_okay=False),
              help="Blob cache files go here (ext4, xfs or btrfs for fanotify mode).")  # fmt: skip
@click.option("--amplify", type=SIZE, default="1MiB", show_default=True, help="Least bytes one fetch brings in.")
@click.option("--readahead", type=SIZE, default=None,
              help="Bytes filled ahead of a sequential reader (0: off) [8 x amplify].")  # fmt: skip
@click.option("--workers", default=4, show_default=True, type=click.IntRange(1, 256), help="Fill threads.")
@click.option("--foreground", is_flag=True, help="Serve from this process until umount (fanotify mode).")
@click.option("--json", "as_json", is_flag=True, help="Print the mount record as JSON.")
def mount(blob_dir: str | None, backend: str | None, backend_config: str | None, foreground: bool, as_json: bool,
          **spec_options: Any) -> None:  # fmt: skip
    """Mount the Nydus image BOOT (its bootstrap) on MOUNTPOINT, fetching blob data lazily."""
    boot = spec_options["boot"]
    if not os.path.exists(boot):
        raise UsageError(f"bootstrap {boot} does not exist")
    config = parse_backend_config(backend_config)
    kind = backend or "localfs"
    if blob_dir is not None:
        if kind != "localfs":
            raise UsageError("--blob-dir goes with the localfs backend")
        config["dir"] = str(Path(blob_dir).resolve())
    elif kind == "localfs" and "dir" not in config and "blob_dir" not in config:
        default = blobs_beside(boot)
        if default is None:
            raise UsageError(f"no blobs: no {BLOBS_DIR}/ beside {boot}: give --blob-dir DIR, or --backend with "
                             "--backend-config")  # fmt: skip
        config["dir"] = str(default)
    for key in _REQUIRED.get(kind, ()):
        if key not in config:
            raise UsageError(f"--backend {kind} needs {key}=... in --backend-config")
    if foreground:  # a daemon in this process: its log goes to stderr
        logging.basicConfig(level=logging.INFO, format="nydus-erofs[%(process)d]: %(levelname)s: %(message)s",
                            force=True)  # fmt: skip
    # every other option is a MountSpec field of the same name
    spec = MountSpec(backend=kind, backend_config=config, **spec_options)
    with progress("fetching", _data_size(boot), quiet=as_json or foreground) as bar:  # drawn in full mode only
        rec = mount_image(spec, foreground=foreground, progress=bar)
    stopped_by = rec.pop("stopped_by", 0)
    if as_json:
        click.echo(json.dumps(rec, indent=2, sort_keys=True))
    elif not foreground:
        who = f"daemon pid {rec['pid']}, log {rec['log']}" if rec.get("pid") else "no daemon"
        click.echo(f"mounted {rec['boot']} on {rec['mountpoint']} ({rec['mode']} mode, {who})")
    if stopped_by:  # --foreground stopped by Ctrl-C or SIGTERM, not by an umount: exit as if killed by it
        click.echo(f"nydus-erofs: {'aborted' if stopped_by == signal.SIGINT else 'terminated'}", err=True)
        sys.exit(128 + stopped_by)


def _data_size(boot: str) -> int | None:
    """The bytes a full-mode mount fetches: its blobs' uncompressed sizes (None for a damaged bootstrap: mounting
    says what is wrong with it)."""
    try:
        with Bootstrap(boot) as bs:
            return sum(b.uncompressed_size for b in bs.blobs) or None
    except (ImageError, OSError):
        return None


@click.command()
@click.argument("mountpoint", type=click.Path(file_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print the daemon's final stats as JSON.")
def umount(mountpoint: str, as_json: bool) -> None:
    """Unmount MOUNTPOINT and stop its daemon."""
    rec = umount_image(mountpoint)
    if as_json:
        click.echo(json.dumps(rec, indent=2, sort_keys=True))


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print the list as JSON.")
def mounts(as_json: bool) -> None:
    """List the images nydus-erofs mounted: mountpoint, mode, state, daemon pid, image, cache dir and log.

    A read that fails with EIO on a lazy mount says why in the mount's log.
    """
    found = list_mounts()
    if as_json:
        click.echo(json.dumps(found, indent=2, sort_keys=True))
        return
    if not found:
        click.echo("no nydus-erofs mounts", err=True)
        return
    for m in found:
        click.echo(f"{m['mountpoint']}: {m['mode']} mode, {m['state']}, "
                   f"{'daemon pid ' + str(m['pid']) if m['pid'] else 'no daemon'}")  # fmt: skip
        click.echo(f"  image {m['boot']}  cache {m['cache_dir']}  log {m['log'] or '-'}")

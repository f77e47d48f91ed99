"""``nydus-erofs mount BOOT MOUNTPOINT`` and ``nydus-erofs umount MOUNTPOINT`` (:mod:`cachefilesd_py.mount`).

Exit codes: 0 ok; 2 bad options or environment (unsupported cache dir, mode not available); 3 image error;
4 backend error; 5 mount/umount or daemon failure.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import click

from cachefilesd_py.backends import KINDS
from cachefilesd_py.backends.config import parse_backend_config
from cachefilesd_py.mount.service import mount_image, umount_image
from cachefilesd_py.mount.spec import MODES, MountSpec
from erofs.errors import UsageError
from erofs.units import parse_size

_REQUIRED = {"http": ("url",), "registry": ("host", "repo")}


def _size(ctx: click.Context, param: click.Parameter, value: str | None) -> int | None:
    return None if value is None else parse_size(value)


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
@click.option("--amplify", default="1MiB", show_default=True, callback=_size, help="Least bytes one fetch brings in.")
@click.option("--readahead", default=None, callback=_size,
              help="Bytes filled ahead of a sequential reader (0: off) [8 x amplify].")  # fmt: skip
@click.option("--workers", default=4, show_default=True, type=click.IntRange(1, 256), help="Fill threads.")
@click.option("--prefetch/--no-prefetch", default=True, show_default=True,
              help="Fetch the files of the image's prefetch table in the background.")  # fmt: skip
@click.option("--prefetch-all", is_flag=True, help="Then prefetch the rest of the image too.")
@click.option("--prefetch-bandwidth", default="0", callback=_size, help="Prefetch cap in bytes/s (0: none).")
@click.option("--prefetch-merge", default="1MiB", show_default=True, callback=_size,
              help="Largest piece prefetch fills at once.")  # fmt: skip
@click.option("--foreground", is_flag=True, help="Serve from this process until umount (fanotify mode).")
@click.option("--json", "as_json", is_flag=True, help="Print the mount record as JSON.")
def mount(blob_dir: str | None, backend: str | None, backend_config: str | None, foreground: bool, as_json: bool,
          **spec_options: Any) -> None:  # fmt: skip
    """Mount the Nydus image BOOT (its bootstrap) on MOUNTPOINT, fetching blob data lazily."""
    boot = spec_options["boot"]
    config = parse_backend_config(backend_config)
    kind = backend or "localfs"
    if blob_dir is not None:
        if kind != "localfs":
            raise UsageError("--blob-dir goes with the localfs backend")
        config["dir"] = str(Path(blob_dir).resolve())
    elif kind == "localfs" and "dir" not in config and "blob_dir" not in config:
        default = Path(boot).resolve().parent / "blobs"
        if not default.is_dir():
            raise UsageError("no blobs: give --blob-dir DIR or --backend with --backend-config")
        config["dir"] = str(default)
    for key in _REQUIRED.get(kind, ()):
        if key not in config:
            raise UsageError(f"--backend {kind} needs {key}=... in --backend-config")
    if foreground:  # a daemon in this process: its log goes to stderr
        logging.basicConfig(level=logging.INFO, format="nydus-erofs[%(process)d]: %(levelname)s: %(message)s",
                            force=True)  # fmt: skip
    # every other option is a MountSpec field of the same name
    rec = mount_image(MountSpec(backend=kind, backend_config=config, **spec_options), foreground=foreground)
    if as_json:
        click.echo(json.dumps(rec, indent=2, sort_keys=True))
    elif not foreground:
        who = f"daemon pid {rec['pid']}" if rec.get("pid") else "no daemon"
        click.echo(f"mounted {rec['boot']} on {rec['mountpoint']} ({rec['mode']} mode, {who})")


@click.command()
@click.argument("mountpoint", type=click.Path(file_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print the daemon's final stats as JSON.")
def umount(mountpoint: str, as_json: bool) -> None:
    """Unmount MOUNTPOINT and stop its daemon."""
    rec = umount_image(mountpoint)
    if as_json:
        click.echo(json.dumps(rec, indent=2, sort_keys=True))

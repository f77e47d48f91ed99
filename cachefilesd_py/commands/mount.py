"""``nydus-erofs mount BOOT MOUNTPOINT`` and ``nydus-erofs umount MOUNTPOINT`` (:mod:`cachefilesd_py.mount`).

``--mode fscache`` binds the image in a running cachefilesd-py (:mod:`cachefilesd_py.fscache_mount`).

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
from cachefilesd_py.backends.config import parse_backend_option
from cachefilesd_py.fscache_mount import DEFAULT_DAEMON_SOCK, mount_fscache
from cachefilesd_py.fscache_mount import MODE as FSCACHE_MODE
from cachefilesd_py.mount.service import mount_image, umount_image
from cachefilesd_py.mount.spec import MODES, MountSpec
from cachefilesd_py.reference import cached_nydus_image, is_image_reference
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
@click.option("--backend-config", default=None, help='Backend options: {"type": KIND, "config": {...}}, the '
              "options alone (JSON), @FILE, or key=value,...")  # fmt: skip
@click.option("--mode", type=click.Choice([*MODES, FSCACHE_MODE]), default="auto", show_default=True,
              help="fanotify: lazy (Linux >= 6.14); full: fetch all, then mount; fscache: bound in cachefilesd-py "
              "through its API, mounted by fsid.")  # fmt: skip
@click.option("--cache-dir", type=click.Path(file_okay=False),
              help="Blob cache files go here (ext4, xfs or btrfs for fanotify mode); none in fscache mode.")
@click.option("--daemon-sock", default=DEFAULT_DAEMON_SOCK, show_default=True, type=click.Path(dir_okay=False),
              help="fscache mode: cachefilesd-py's API socket.")  # fmt: skip
@click.option("--domain-id", default=None, help="fscache mode: mount with this domain_id (blobs shared across images).")
@click.option("--amplify", default="1MiB", show_default=True, callback=_size, help="Least bytes one fetch brings in.")
@click.option("--readahead", default=None, callback=_size,
              help="Bytes filled ahead of a sequential reader (0: off) [8 x amplify].")  # fmt: skip
@click.option("--workers", default=4, show_default=True, type=click.IntRange(1, 256), help="Fill threads.")
@click.option("--foreground", is_flag=True, help="Serve from this process until umount (fanotify mode).")
@click.option("--platform", default=None, help="docker://: os/arch[/variant] to pick from an index [the host's].")
@click.option("--plain-http", is_flag=True, help="docker://: talk to the registry over HTTP, without TLS.")
@click.option("--json", "as_json", is_flag=True, help="Print the mount record as JSON.")
def mount(blob_dir: str | None, backend: str | None, backend_config: str | None, foreground: bool, as_json: bool,
          platform: str | None, plain_http: bool, daemon_sock: str, domain_id: str | None,
          **spec_options: Any) -> None:  # fmt: skip
    """Mount the Nydus image BOOT (its bootstrap, or docker://HOST[:PORT]/REPO[:TAG|@sha256:HEX]) on MOUNTPOINT,
    fetching blob data lazily."""
    boot = source = spec_options["boot"]
    given_kind, config = parse_backend_option(backend_config)
    if given_kind is not None and backend is not None and given_kind != backend:
        raise UsageError(f"--backend {backend} but --backend-config says type {given_kind}")
    kind = backend or given_kind or "localfs"
    if spec_options["mode"] == FSCACHE_MODE:
        _mount_fscache(boot, spec_options, blob_dir, backend or given_kind, config, platform, plain_http, daemon_sock,
                       domain_id, as_json)  # fmt: skip
        return
    if domain_id is not None:
        raise UsageError("--domain-id goes with --mode fscache")
    if spec_options["cache_dir"] is None:
        raise UsageError("--cache-dir is required (except in fscache mode)")
    if is_image_reference(boot):  # its bootstrap into the cache dir; blobs from the same repository
        if blob_dir is not None or kind not in ("localfs", "registry") or backend == "localfs":
            raise UsageError(f"{boot}: an image reference is served from its registry (no --blob-dir or --backend)")
        image = cached_nydus_image(boot, spec_options["cache_dir"], platform=platform, plain_http=plain_http)
        spec_options["boot"] = boot = str(image.bootstrap)
        kind, config = image.backend, {**image.backend_config, **config}  # --backend-config: network options
    elif platform is not None or plain_http:
        raise UsageError("--platform and --plain-http go with a docker:// image reference")
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
        what = source if is_image_reference(source) else rec["boot"]
        click.echo(f"mounted {what} on {rec['mountpoint']} ({rec['mode']} mode, {who})")


def _mount_fscache(boot: str, spec_options: dict[str, Any], blob_dir: str | None, kind: str | None,
                   config: dict[str, Any], platform: str | None, plain_http: bool, daemon_sock: str,
                   domain_id: str | None, as_json: bool) -> None:  # fmt: skip
    """``--mode fscache``: bind in cachefilesd-py, mount by fsid (no daemon of ours)."""
    if spec_options["cache_dir"] is not None:
        raise UsageError("--cache-dir is cachefilesd-py's in fscache mode (its --cache-dir)")
    if blob_dir is not None:
        kind, config = "localfs", {**config, "dir": str(Path(blob_dir).resolve())}
    if not is_image_reference(boot):
        if platform is not None or plain_http:
            raise UsageError("--platform and --plain-http go with a docker:// image reference")
        if kind is None and (Path(boot).resolve().parent / "blobs").is_dir():
            kind, config = "localfs", {"dir": str(Path(boot).resolve().parent / "blobs")}
    elif kind not in (None, "registry"):
        raise UsageError(f"{boot}: an image reference is served from its registry (no --blob-dir or --backend)")
    rec = mount_fscache(boot, spec_options["mountpoint"], daemon_sock=daemon_sock, backend=kind, backend_config=config,
                        platform=platform, plain_http=plain_http, domain_id=domain_id)  # fmt: skip
    if as_json:
        click.echo(json.dumps(rec, indent=2, sort_keys=True))
    else:
        click.echo(f"mounted {boot} on {rec['mountpoint']} (fscache mode, fsid {rec['fsid']}, cachefilesd-py)")


@click.command()
@click.argument("mountpoint", type=click.Path(file_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print the daemon's final stats as JSON.")
def umount(mountpoint: str, as_json: bool) -> None:
    """Unmount MOUNTPOINT and stop its daemon."""
    rec = umount_image(mountpoint)
    if as_json:
        click.echo(json.dumps(rec, indent=2, sort_keys=True))

"""``nydus-erofs mount BOOT MOUNTPOINT``, ``nydus-erofs umount MOUNTPOINT`` and ``nydus-erofs mounts``
(:mod:`cachefilesd_py.mount`).

``--mode fscache`` binds the image in a running cachefilesd-py (:mod:`cachefilesd_py.fscache_mount`).

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
from cachefilesd_py.backends.config import parse_backend_option
from cachefilesd_py.defaults import DEFAULT_DAEMON_SOCK, FILL_TIMEOUT
from cachefilesd_py.imageref import is_image_reference
from cachefilesd_py.logfilter import daemon_logging
from cachefilesd_py.mount.service import list_mounts, mount_image, umount_image
from cachefilesd_py.mount.spec import FSCACHE_MODE, MODES, MountSpec
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
@click.option("--backend-config", default=None, help='Backend options: {"type": KIND, "config": {...}}, the '
              "options alone (JSON), @FILE, or key=value,...")  # fmt: skip
@click.option("--mode", type=click.Choice([*MODES, FSCACHE_MODE]), default="auto", show_default=True,
              help="fanotify: lazy (Linux >= 6.14); nbd: lazy over NBD devices; full: fetch all, then mount; "
              "fscache: bound in cachefilesd-py through its API, mounted by fsid [auto: fanotify, else nbd, else "
              "full].")  # fmt: skip
@click.option("--cache-dir", type=click.Path(file_okay=False),
              help="Blob cache files go here (ext4, xfs or btrfs for fanotify mode); none in fscache mode.")
@click.option("--daemon-sock", default=DEFAULT_DAEMON_SOCK, show_default=True, type=click.Path(dir_okay=False),
              help="fscache mode: cachefilesd-py's API socket.")  # fmt: skip
@click.option("--domain-id", default=None, help="fscache mode: mount with this domain_id (blobs shared across images).")
@click.option("--amplify", type=SIZE, default="1MiB", show_default=True, help="Least bytes one fetch brings in.")
@click.option("--readahead", type=SIZE, default=None,
              help="Bytes filled ahead of a sequential reader (0: off) [8 x amplify].")  # fmt: skip
@click.option("--workers", default=4, show_default=True, type=click.IntRange(1, 256), help="Fill threads.")
@click.option("--fill-timeout", default=FILL_TIMEOUT, show_default=True, type=click.FloatRange(min=0.1),
              help="Seconds a read may wait for its data (fetch and verify, retries included); then EIO.")  # fmt: skip
@click.option("--allow-suid", is_flag=True, help="Honour setuid/setgid bits of the image (default: nosuid).")
@click.option("--allow-dev", is_flag=True, help="Allow opening the image's device nodes (default: nodev).")
@click.option("--file-backed/--no-file-backed", default=None,
              help="Mount the local files file-backed (Linux >= 6.12) or over loop devices [file-backed where the "
                   "kernel has it].")  # fmt: skip
@click.option("--prefetch/--no-prefetch", default=True, show_default=True,
              help="Fetch the files of the image's prefetch table in the background.")  # fmt: skip
@click.option("--prefetch-all", is_flag=True, help="Then prefetch the rest of the image too.")
@click.option("--prefetch-bandwidth", type=SIZE, default="0", help="Prefetch cap in bytes/s (0: none).")
@click.option("--prefetch-merge", type=SIZE, default="1MiB", show_default=True,
              help="Largest piece prefetch fills at once.")  # fmt: skip
@click.option("--cache-size-limit", type=SIZE, default="0",
              help="Most bytes the cache files may take (0: no limit); fanotify mode punches out the least recently "
              "used chunks to stay under it, full and nbd modes refuse an image that does not fit.")  # fmt: skip
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
    if not is_image_reference(boot) and not os.path.exists(boot):
        raise UsageError(f"bootstrap {boot} does not exist")
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
        from cachefilesd_py.reference import cached_nydus_image  # (a registry client: for references only)

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
        default = blobs_beside(boot)
        if default is None:
            raise UsageError(f"no blobs: no {BLOBS_DIR}/ beside {boot}: give --blob-dir DIR, or --backend with "
                             "--backend-config")  # fmt: skip
        config["dir"] = str(default)
    for key in _REQUIRED.get(kind, ()):
        if key not in config:
            raise UsageError(f"--backend {kind} needs {key}=... in --backend-config")
    if foreground:  # a daemon in this process: its log goes to stderr
        daemon_logging(logging.INFO, "nydus-erofs[%(process)d]: %(levelname)s: %(message)s")
    # every other option is a MountSpec field of the same name
    spec = MountSpec(backend=kind, backend_config=config, **spec_options)
    with progress("fetching", _data_size(boot), quiet=as_json or foreground) as bar:  # drawn in full mode only
        rec = mount_image(spec, foreground=foreground, progress=bar)
    stopped_by = rec.pop("stopped_by", 0)
    if as_json:
        click.echo(json.dumps(rec, indent=2, sort_keys=True))
    elif not foreground:
        who = f"daemon pid {rec['pid']}, log {rec['log']}" if rec.get("pid") else "no daemon"
        what = source if is_image_reference(source) else rec["boot"]
        click.echo(f"mounted {what} on {rec['mountpoint']} ({rec['mode']} mode, {who})")
    if stopped_by:  # --foreground stopped by Ctrl-C or SIGTERM, not by an umount: exit as if killed by it
        click.echo(f"nydus-erofs: {'aborted' if stopped_by == signal.SIGINT else 'terminated'}", err=True)
        sys.exit(128 + stopped_by)


def _mount_fscache(boot: str, spec_options: dict[str, Any], blob_dir: str | None, kind: str | None,
                   config: dict[str, Any], platform: str | None, plain_http: bool, daemon_sock: str,
                   domain_id: str | None, as_json: bool) -> None:  # fmt: skip
    """``--mode fscache``: bind in cachefilesd-py, mount by fsid (no daemon of ours)."""
    if spec_options["cache_dir"] is not None:
        raise UsageError("--cache-dir is cachefilesd-py's in fscache mode (its --cache-dir)")
    if spec_options["cache_size_limit"]:
        raise UsageError("--cache-size-limit is cachefilesd-py's in fscache mode (its --cache-size-limit)")
    if blob_dir is not None:
        kind, config = "localfs", {**config, "dir": str(Path(blob_dir).resolve())}
    if not is_image_reference(boot):
        if platform is not None or plain_http:
            raise UsageError("--platform and --plain-http go with a docker:// image reference")
        beside = blobs_beside(boot)
        if kind is None and beside is not None:
            kind, config = "localfs", {"dir": str(beside)}
    elif kind not in (None, "registry"):
        raise UsageError(f"{boot}: an image reference is served from its registry (no --blob-dir or --backend)")
    from cachefilesd_py.fscache_mount import mount_fscache  # (cachefilesd-py's API client: fscache mode only)

    rec = mount_fscache(boot, spec_options["mountpoint"], daemon_sock=daemon_sock, backend=kind, backend_config=config,
                        platform=platform, plain_http=plain_http, domain_id=domain_id)  # fmt: skip
    if as_json:
        click.echo(json.dumps(rec, indent=2, sort_keys=True))
    else:
        click.echo(f"mounted {boot} on {rec['mountpoint']} (fscache mode, fsid {rec['fsid']}, cachefilesd-py)")


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

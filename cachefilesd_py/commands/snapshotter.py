"""``nydus-erofs snapshotter``: serve containerd's snapshots API on a Unix socket (:mod:`cachefilesd_py.snapshotter`).

containerd loads it with ``[proxy_plugins.nydus-erofs] type = "snapshot" address = "<SOCK>"``.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import click

from cachefilesd_py.defaults import DEFAULT_DAEMON_SOCK
from cachefilesd_py.notify import Watchdog, notify
from cachefilesd_py.snapshotter.mounts import SNAPSHOTTER_MODES
from cachefilesd_py.snapshotter.service import serve
from cachefilesd_py.snapshotter.snapshotter import Snapshotter
from erofs.commands import SIZE


@click.command()
@click.option("--address", required=True, type=click.Path(dir_okay=False), help="Unix socket to serve on.")
@click.option("--root", required=True, type=click.Path(file_okay=False), help="Snapshots and their metadata.")
@click.option("--mode", type=click.Choice(SNAPSHOTTER_MODES), default="auto", show_default=True,
              help="Nydus images: fanotify (lazy, Linux >= 6.14), fscache (bound in cachefilesd-py, mounted by "
                   "fsid), or full (fetch all, then mount).")  # fmt: skip
@click.option("--cache-dir", type=click.Path(file_okay=False),
              help="Blob cache files [ROOT/cache]; none in fscache mode.")
@click.option("--daemon-sock", default=DEFAULT_DAEMON_SOCK, show_default=True,
              help="fscache mode: cachefilesd-py's API socket.")
@click.option("--plain-http", is_flag=True, help="Reach registries over HTTP, without TLS.")
@click.option("--containerd-root", default="/var/lib/containerd", show_default=True,
              type=click.Path(file_okay=False), help="containerd root (plain pulls: its content store).")  # fmt: skip
@click.option("--amplify", type=SIZE, default="1MiB", show_default=True, help="Least bytes one fetch brings in.")
@click.option("--readahead", type=SIZE, default="0", show_default=True,
              help="Bytes filled ahead of a sequential reader (0: off).")  # fmt: skip
@click.option("--cache-size-limit", type=SIZE, default="0",
              help="Most bytes each image's cache may take (0: no limit; lazy mounts evict, full mounts refuse an "
              "image over it).")  # fmt: skip
@click.option("--log-level", type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"]), default="INFO")
def snapshotter(address: str, root: str, mode: str, cache_dir: str | None, plain_http: bool, containerd_root: str,
                daemon_sock: str, amplify: int, readahead: int, cache_size_limit: int,
                log_level: str) -> None:  # fmt: skip
    """Serve containerd's snapshotter API: Nydus images run before they are downloaded, other images as overlayfs."""
    logging.basicConfig(level=log_level, stream=sys.stderr, force=True,  # a daemon: its log goes to stderr
                        format="nydus-erofs snapshotter: %(levelname)s: %(name)s: %(message)s")  # fmt: skip
    sn = Snapshotter(Path(root), cache_dir=Path(cache_dir) if cache_dir else None, mode=mode, plain_http=plain_http,
                     containerd_root=Path(containerd_root), amplify=amplify, readahead=readahead,
                     daemon_sock=daemon_sock, cache_size_limit=cache_size_limit)  # fmt: skip
    sn.reattach()
    server = serve(sn, Path(address))
    notify("READY=1", f"STATUS=serving on {address}")
    watchdog = Watchdog.start_if_enabled(lambda: True)  # WATCHDOG=1 while the process runs Python at all
    click.echo(f"serving on {address}")
    try:
        server.wait_for_termination()
    except KeyboardInterrupt:  # SIGTERM/SIGINT: stop taking calls, finish those under way
        notify("STOPPING=1")
        server.stop(10).wait()
        raise
    finally:
        if watchdog is not None:
            watchdog.stop()
        sn.close()

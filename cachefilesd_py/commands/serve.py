"""``nydus-erofs serve DIR --listen ADDR:PORT``: serve a directory of blobs and bootstraps read-only over HTTP
(:mod:`cachefilesd_py.blobserver`), for the http backend (``url=http://ADDR:PORT``), the registry backend
(``host=ADDR:PORT,repo=ANY,plain_http=true``) and ``curl``.  SIGINT or SIGTERM stops it (exit 0).

Exit codes: 0 stopped by a signal; 2 bad options (DIR not a directory, ADDR:PORT not valid or not free).
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from types import FrameType

import click

from cachefilesd_py.blobserver import parse_listen, serve_directory
from erofs.errors import UsageError


@click.command()
@click.argument("directory", type=click.Path(file_okay=False))
@click.option("--listen", default="127.0.0.1:8000", show_default=True,
              help="ADDR:PORT to listen on ([ADDR]:PORT for IPv6; port 0: any free one).")  # fmt: skip
def serve(directory: str, listen: str) -> None:
    """Serve the blobs (and bootstraps) in DIRECTORY over HTTP, read-only: Range, HEAD, ETag, /v2/ blob paths."""
    try:
        address = parse_listen(listen)
    except ValueError as e:
        raise UsageError(str(e)) from None
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("nydus-erofs serve: %(message)s"))
    logger = logging.getLogger("cachefilesd_py.blobserver")
    logger.handlers[:] = [handler]
    logger.setLevel(logging.INFO)
    logger.propagate = False
    stop_r, stop_w = os.pipe()

    def on_signal(signum: int, frame: FrameType | None) -> None:  # no locks here: one byte down a pipe
        try:
            os.write(stop_w, b"x")
        except OSError:  # (full: a stop is already on its way)
            pass

    os.set_blocking(stop_w, False)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, on_signal)
    try:
        serve_directory(directory, address, stop_r, ready=lambda url: logger.info("serving %s on %s", directory, url))
    except NotADirectoryError:
        raise UsageError(f"{directory}: not a directory") from None
    except OSError as e:
        raise UsageError(f"--listen {listen}: {e.strerror or e}") from None
    logger.info("stopped")

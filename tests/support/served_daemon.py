"""cachefilesd-py's daemon run on a thread against a fake device, its API served on a socket (host tests)."""

from __future__ import annotations

import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from cachefilesd_py.api import ApiServer, listen
from cachefilesd_py.daemon import Daemon

TIMEOUT = 30.0


@contextmanager
def serving(daemon: Daemon, sock_path: Path, routes: Mapping[str, Any], item_routes: Mapping[Any, Any],
            actions: Mapping[str, Any] | None = None) -> Iterator[None]:  # fmt: skip
    """Run ``daemon`` and serve its API at ``sock_path`` until the block ends; then stop both and close its
    store and device."""
    sock = listen(sock_path)
    api = ApiServer(sock, routes, item_routes, actions).start()
    t = threading.Thread(target=daemon.run)
    t.start()
    try:
        yield
    finally:
        daemon.stop()
        t.join(TIMEOUT)
        api.stop()
        sock.close()
        daemon.store.close()
        daemon.device.close()

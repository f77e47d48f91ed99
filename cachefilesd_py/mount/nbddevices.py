"""The NBD devices a mount's runtime record names (``nbd``), left connected by an ``nbd`` daemon that died for
good: ``nydus-erofs umount`` and the supervisor that gives up (:mod:`.nbdsupervisor`) disconnect them.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from fscache.nbd import NbdIoctl, NbdNetlink

__all__ = ["release_stale_devices"]

log = logging.getLogger(__name__)


def release_stale_devices(rec: dict[str, Any]) -> None:
    """Disconnect the NBD devices of the record ``rec`` that are still bound to its daemon, which is gone (killed):
    a device's ``/sys/block/nbdN/pid`` names the process that connected it (``nbd_pid``: the first worker)."""
    stale = []
    for dev in rec.get("nbd") or ():
        name = Path(dev).name
        try:
            pid = int(Path("/sys/block", name, "pid").read_text())
        except (OSError, ValueError):
            continue  # disconnected
        if pid == rec.get("nbd_pid", rec.get("pid")):
            stale.append(int(name.removeprefix("nbd")))
    if not stale:
        return
    try:
        with NbdIoctl() if rec.get("nbd_ioctl") else NbdNetlink() as nbd:
            for index in stale:
                log.warning("disconnecting /dev/nbd%d, left by the dead daemon %s", index, rec.get("pid"))
                nbd.disconnect(index)
    except OSError as e:
        log.error("%s", e)

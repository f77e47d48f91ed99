"""Upgrade a fanotify mount's daemon in place: :func:`request_upgrade` (what ``nydus-erofs ctl upgrade`` calls).

The mount's supervisor does the work on SIGHUP (see :mod:`.supervisor`): it re-executes itself and hands the
image over from its worker to a new one running the code now installed, without a failed read.  This module only
asks for it and waits until it is done: the runtime record names a new worker and the old one is gone.
"""

from __future__ import annotations

import errno
import os
import select
import signal
import time
from pathlib import Path
from typing import Any

from erofs.errors import UsageError
from erofs.paths import process_start_time
from fscache.inotify import IN_MODIFY, Inotify
from fscache.mount import MountError

from .record import is_daemon, log_path, read_record, run_dir

__all__ = ["UPGRADE_TIMEOUT", "request_upgrade"]

UPGRADE_TIMEOUT = 120.0  # seconds: a new interpreter loads the image while the old worker finishes its fills
IN_CLOSE_WRITE, IN_MOVED_TO = 0x00000008, 0x00000080  # (inotify) a record is a temp file renamed over it


def request_upgrade(record: dict[str, Any], timeout: float = UPGRADE_TIMEOUT) -> dict[str, Any]:
    """Upgrade the daemon of the mount ``record`` describes (a runtime record, :func:`~.record.read_record`) and
    return its record once a new worker serves it and the old worker is gone.

    UsageError: not a mount served by a supervisor (fanotify mode); MountError: its daemon is not running, the
    supervisor called the upgrade off (its log line says why: the new worker could not start; the old one serves
    on), or it did not complete within ``timeout`` seconds."""
    mp = record.get("mountpoint")
    if isinstance(mp, str):
        record = read_record(mp) or record  # as it is now (what ``mount`` returned lacks the start times)
    old = record.get("worker_pid")
    if record.get("mode") != "fanotify" or not old or not isinstance(mp, str):
        raise UsageError(f"{mp}: only a fanotify mount's daemon can be upgraded in place ({record.get('mode')} mode)")
    if not is_daemon(record) or process_start_time(old) != record.get("worker_start_time"):
        raise MountError(errno.ESRCH, f"{mp}: its daemon is not running")
    try:
        pidfd = os.pidfd_open(old)
    except ProcessLookupError:
        raise MountError(errno.ESRCH, f"{mp}: its worker {old} is gone") from None
    deadline = time.monotonic() + timeout
    log = log_path(mp)
    try:
        with Inotify() as changes:
            changes.add_watch(run_dir(), IN_CLOSE_WRITE | IN_MOVED_TO | IN_MODIFY)  # the record, the log
            logged = log.stat().st_size if log.exists() else 0
            os.kill(record["pid"], signal.SIGHUP)
            poller = select.poll()
            poller.register(pidfd, select.POLLIN)
            poller.register(changes.fileno(), select.POLLIN)
            gone = False
            while True:
                changes.read_events()
                new = read_record(Path(mp)) or {}
                if gone and _taken_over(new, old):
                    return new
                logged, off = _called_off(log, logged)
                if off:
                    raise MountError(errno.ECANCELED, f"{mp}: {off} (log: {log})")
                left = deadline - time.monotonic()
                ready = poller.poll(int(left * 1000) + 1) if left > 0 else []
                if not ready:
                    raise MountError(errno.ETIMEDOUT, f"{mp}: the upgrade did not complete in {timeout:.0f} s "
                                     f"(log: {log_path(mp)})")  # fmt: skip
                if any(fd == pidfd for fd, _ in ready):  # the old worker exited
                    gone = True
                    poller.unregister(pidfd)
    finally:
        os.close(pidfd)


def _called_off(log: Path, offset: int) -> tuple[int, str | None]:
    """The log's size read so far (whole lines), and the supervisor's "upgrade called off" line if it wrote one
    after ``offset``."""
    try:
        with open(log, "rb") as f:
            f.seek(offset)
            data = f.read()
    except FileNotFoundError:
        return offset, None
    whole = data[: data.rfind(b"\n") + 1]  # a line being written is read whole next time
    for line in whole.decode(errors="replace").splitlines():
        if "upgrade called off" in line:
            return offset, line[line.index("upgrade called off") :].strip()
    return offset + len(whole), None


def _taken_over(rec: dict[str, Any], old: int) -> bool:
    pid = rec.get("worker_pid")
    return bool(pid) and pid != old and process_start_time(pid) == rec.get("worker_start_time") is not None

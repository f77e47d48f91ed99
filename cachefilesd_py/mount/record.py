"""The runtime record of a mount: which daemon serves it, and its final stats once it stopped.

One JSON file per mountpoint in the run dir (``$NYDUS_EROFS_RUN_DIR`` or ``/run/nydus-erofs/mounts``), named
``<sha256 of the mountpoint>.json``, with the mount's other files beside it: the daemon's log (``.log``), its API
socket (``.sock``), access trace (``.trace``) and prefetch progress (``.prefetch``).  Its fields: ``mountpoint``,
``boot``, ``cache_dir``, ``mode``, ``backend`` (the kind); for a daemon ``pid`` and ``start_time`` (the process
``umount`` stops: the supervisor), ``blobs``, and with a supervisor ``worker_pid``, ``worker_start_time``,
``restarts``, ``api_sock`` (its API's socket: :func:`api_path`); ``stats`` and ``stopped`` once the daemon
stopped.  The backend's options are never written here.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import socket
from pathlib import Path
from typing import Any

from erofs.errors import NydusErofsError
from erofs.paths import process_start_time
from fscache.mount import MountError

from ..unixsock import listen
from .spec import MountSpec

__all__ = ["NBD_MODULE", "RUN_DIR_ENV", "SUPERVISOR_MODULE", "all_records", "api_path", "initial_record", "is_daemon",
           "listen_api", "live_worker", "log_path", "prefetch_progress_path", "read_record", "record_path", "run_dir",
           "trace_path", "write_record"]

log = logging.getLogger(__name__)

RUN_DIR_ENV = "NYDUS_EROFS_RUN_DIR"
DEFAULT_RUN_DIR = "/run/nydus-erofs/mounts"
#: the daemons' modules, as their command lines name them (``python -m MODULE``)
SUPERVISOR_MODULE = "cachefilesd_py.mount.supervisor"
NBD_MODULE = "cachefilesd_py.mount.nbdsupervisor"
_DAEMON_MODULES = (SUPERVISOR_MODULE.encode(), b"cachefilesd_py.mount.worker", NBD_MODULE.encode(),
                   b"cachefilesd_py.mount.nbddaemon")  # fmt: skip


def run_dir() -> Path:
    return Path(os.environ.get(RUN_DIR_ENV) or DEFAULT_RUN_DIR)


def record_path(mountpoint: str | os.PathLike[str]) -> Path:
    key = hashlib.sha256(os.fsencode(os.path.realpath(mountpoint))).hexdigest()[:32]
    return run_dir() / f"{key}.json"


def log_path(mountpoint: str | os.PathLike[str]) -> Path:
    """Where the daemon of the mount at ``mountpoint`` logs (what it could not serve, and why)."""
    return record_path(mountpoint).with_suffix(".log")


def api_path(mountpoint: str | os.PathLike[str]) -> Path:
    """The Unix socket of the API of the mount's daemon (:mod:`cachefilesd_py.api`)."""
    return record_path(mountpoint).with_suffix(".sock")


def trace_path(mountpoint: str | os.PathLike[str]) -> Path:
    """The access trace of the mount (:mod:`.trace`)."""
    return record_path(mountpoint).with_suffix(".trace")


def prefetch_progress_path(mountpoint: str | os.PathLike[str]) -> Path:
    """The progress of the mount's prefetch (:mod:`.prefetch`)."""
    return record_path(mountpoint).with_suffix(".prefetch")


def listen_api(mountpoint: str | os.PathLike[str]) -> socket.socket | None:
    """Listen on the mount's API socket; None (and a warning: the mount is served without an API) if it cannot."""
    path = api_path(mountpoint)
    try:
        return listen(path)
    except OSError as e:
        log.warning("no API: %s: %s", path, e.strerror or e)
        return None


def all_records() -> list[dict[str, Any]]:
    """Every runtime record in the run dir, by mountpoint (a record being written or removed meanwhile is left
    out)."""
    out = []
    try:
        paths = sorted(run_dir().glob("*.json"))
    except OSError:
        return []
    for path in paths:
        try:
            rec = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(rec, dict) and isinstance(rec.get("mountpoint"), str):
            out.append(rec)
    return sorted(out, key=lambda r: r["mountpoint"])


def initial_record(spec: MountSpec) -> dict[str, Any]:
    """The record's fields that say what is mounted (``spec`` resolved, its mode chosen)."""
    return {"mountpoint": spec.mountpoint, "boot": spec.boot, "cache_dir": spec.cache_dir, "mode": spec.mode,
            "backend": spec.backend}  # fmt: skip


def read_record(mountpoint: str | os.PathLike[str]) -> dict[str, Any] | None:
    try:
        return json.loads(record_path(mountpoint).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise MountError(errno.EIO, f"runtime record {record_path(mountpoint)}: {e}") from None


def write_record(path: Path, data: dict[str, Any]) -> None:
    """Write the record ``path`` whole or not at all: ``<path>.tmp`` renamed over it.  On a failure the temp file
    is removed, and an OSError (ENOSPC...) names ``path``: a write error by itself says no file."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        if isinstance(e, OSError) and not isinstance(e, NydusErofsError):
            raise OSError(e.errno, e.strerror or str(e), str(path)) from None
        raise


# -- the daemon a record names ----------------------------------------------------------------------------------------
def is_daemon(rec: dict[str, Any]) -> bool:
    """Whether the record's ``pid`` is still the mount daemon that wrote it."""
    return _still_runs(rec.get("pid"), rec.get("start_time"))


def _still_runs(pid: int | None, start_time: Any) -> bool:
    """Whether ``pid`` is still the process recorded as started at ``start_time``, and a mount daemon."""
    return bool(pid) and process_start_time(pid) == start_time is not None and _runs_a_daemon(pid)


def _runs_a_daemon(pid: int) -> bool:
    """Whether ``pid`` is a mount daemon (the supervisor or worker module, or ``mount --foreground``), so never
    init or a subreaper that a worker orphaned by its supervisor recorded as its parent."""
    if pid <= 1 or pid == os.getpid():
        return False
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().split(b"\0")
    except OSError:
        return False
    return any(m in argv for m in _DAEMON_MODULES) or (b"mount" in argv and b"--foreground" in argv)


def live_worker(rec: dict[str, Any]) -> int | None:
    """The record's worker, if it still runs."""
    worker = rec.get("worker_pid")
    return int(worker) if _still_runs(worker, rec.get("worker_start_time")) else None

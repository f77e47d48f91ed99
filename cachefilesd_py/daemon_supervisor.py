"""The fscache daemon's supervisor: holds ``/dev/cachefiles`` and restarts the daemon's worker (failover).

The worker is :class:`cachefilesd_py.daemon.Daemon` serving the device in a forked child (the CLI builds it); the
restart policy and the waiting are the core's (:mod:`cachefilesd_py.supervisor`).  On SIGHUP it hands the device
over to a new daemon (upgrade in place, :mod:`cachefilesd_py.takeover`).
"""

from __future__ import annotations

import logging
import os
import signal
import time
from collections.abc import Callable

from cachefilesd_py.notify import notify
from cachefilesd_py.supervisor import RestartPolicy, Supervisor, WorkerProcess, describe
from cachefilesd_py.takeover import HandedOver, Handover
from fscache.cachefiles import CachefilesDevice
from fscache.errors import FscacheError

__all__ = ["CachefilesSupervisor"]

log = logging.getLogger("cachefilesd_py")


class CachefilesSupervisor(Supervisor):
    """Holds ``/dev/cachefiles`` and runs ``worker(restarts)`` (the daemon) in a forked child, which inherits the
    device fd (the same open file); restarts it when it dies (the policy of :mod:`cachefilesd_py.supervisor`).

    When a worker dies, the kernel closes its anonymous fds (the objects become CLOSED) but the device stays
    bound, because the supervisor still holds it; the supervisor writes ``restore`` — requests the dead worker had
    read become NEW again — and starts a new worker, which re-OPENs the objects as READs arrive.  Mounts stay up
    and readers, even those in the middle of a read, get their data.  SIGTERM or SIGINT: the worker is stopped
    (SIGTERM, then waited for) and :meth:`run` returns 0; the device is its owner's to close.

    SIGHUP, with a ``handover`` (``--upgrade-sock``): upgrade in place (:mod:`cachefilesd_py.takeover`): start the
    successor, stop the worker once it connects, hand it the device; :meth:`run` then returns 0 with
    :attr:`handed_over` set (close nothing the successor uses).  If the successor fails, ``restore`` and a new
    worker: the daemon serves on.
    """

    stopped_between_workers = 0  # a stop is how the service ends
    upgrade_signal = signal.SIGHUP

    def __init__(self, device: CachefilesDevice, worker: Callable[[int], int], *,
                 policy: RestartPolicy | None = None, handover: Handover | None = None) -> None:  # fmt: skip
        super().__init__(policy)
        self.device = device
        self.worker = worker
        self.handover = handover
        self.handed_over = False

    def start_worker(self) -> WorkerProcess:
        restarts = self.restarts
        proc = self.fork(lambda: self.worker(restarts))
        log.info("worker %d started%s", proc.pid, f" (restart {restarts})" if restarts else "")
        return proc

    def on_exit(self, pid: int, code: int) -> int | None:
        if self.stopping:
            log.info("worker %d stopped", pid)
            return 0
        return None

    def on_death(self, pid: int, code: int) -> bool:
        log.error("worker %d died (%s): restoring the cache and starting a new one", pid, describe(code))
        try:
            self.device.restore()
        except FscacheError as e:
            log.error("restore failed: %s", e)
            return False
        return True

    def restarted(self) -> None:
        notify(f"STATUS=serving (worker restarted {self.restarts} times)")

    def on_upgrade(self) -> None:
        """SIGHUP: hand the device over to a successor (see the class's docstring); raises HandedOver once done."""
        handover = self.handover
        if handover is None:
            log.warning("SIGHUP: no --upgrade-sock, no upgrade in place")
            return
        notify("RELOADING=1", f"MONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}",
               "STATUS=upgrading")  # fmt: skip
        self.serving = False  # (a SIGHUP meanwhile starts no second upgrade)
        try:
            pid = handover.upgrade(self.stop_worker, self._resume)
        finally:
            self.serving = True
        if pid is None:
            notify("READY=1", "STATUS=serving")
            return
        self.handed_over = True
        notify(f"MAINPID={pid}")
        raise HandedOver(pid)

    def _resume(self) -> None:
        """The upgrade failed after the worker stopped: ``restore`` and a new worker."""
        try:
            self.device.restore()
        except FscacheError as e:
            log.error("restore failed: %s", e)
        self.spawn()

    def run(self) -> int:
        """Supervise until SIGTERM/SIGINT (exit status 0), a handover (0) or until the worker keeps dying (1)."""
        with self.handling_signals():
            try:
                self.spawn()
                notify("READY=1", f"MAINPID={os.getpid()}", "STATUS=serving")
                self.serving = True
                return self.supervise()
            except HandedOver as e:
                log.info("upgrade: daemon %d took over: exiting", e.pid)
                return 0
            finally:
                self.serving = False
                self.stop_worker()  # a stop raced with a restart, or an error: never leave the worker
                if not self.handed_over:
                    notify("STOPPING=1")

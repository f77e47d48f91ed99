"""Failover: a supervisor process holds ``/dev/cachefiles`` and restarts the worker that serves it.

The supervisor opens and binds the device, then forks a worker, which inherits the device fd (the same open
file) and runs the daemon.  When the worker dies, the kernel closes the worker's anonymous fds (the objects
become CLOSED) but the device stays bound, because the supervisor still holds it; the supervisor writes
``restore`` — requests the dead worker had read become NEW again — and forks a new worker, which re-OPENs the
objects as READs arrive.  Mounts stay up and readers, even those in the middle of a read, get their data.

SIGTERM or SIGINT: the worker is stopped (SIGTERM, then waited for) and the device closed.  The supervisor is
single-threaded, so forking it is safe.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from collections.abc import Callable
from types import FrameType

from cachefilesd_py.notify import notify
from fscache.cachefiles import CachefilesDevice
from fscache.errors import FscacheError

__all__ = ["Supervisor"]

log = logging.getLogger("cachefilesd_py")

_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Supervisor:
    """Run ``worker(restarts)`` in a forked child until stopped; restore and restart it when it dies.

    ``worker`` runs in the child with default signal dispositions and returns an exit status.  More than
    ``max_restarts`` restarts within ``window`` seconds means the worker cannot run: the supervisor gives up.
    """

    def __init__(
        self,
        device: CachefilesDevice,
        worker: Callable[[int], int],
        *,
        max_restarts: int = 10,
        window: float = 60.0,
    ) -> None:
        self.device = device
        self.worker = worker
        self.max_restarts = max_restarts
        self.window = window
        self.restarts = 0
        self.pid: int | None = None
        self._stopping = False
        self._recent: list[float] = []

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self._stopping = True
        if self.pid is not None:
            try:
                os.kill(self.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass

    def _spawn(self) -> int:
        old = signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
        try:
            pid = os.fork()
            if pid == 0:  # the worker
                status = 1
                try:
                    for s in _STOP_SIGNALS:
                        signal.signal(s, signal.SIG_DFL)
                    signal.pthread_sigmask(signal.SIG_SETMASK, old)
                    status = self.worker(self.restarts)
                except SystemExit as e:
                    status = e.code if isinstance(e.code, int) else 1
                except BaseException as e:  # noqa: BLE001 - the child must never return into the supervisor
                    log.error("worker failed: %s", e)
                finally:
                    logging.shutdown()
                    os._exit(status)
            self.pid = pid
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)
        log.info("worker %d started%s", pid, f" (restart {self.restarts})" if self.restarts else "")
        return pid

    def run(self) -> int:
        """Supervise until SIGTERM/SIGINT (exit status 0) or until the worker keeps dying (1)."""
        previous = {s: signal.signal(s, self._on_signal) for s in _STOP_SIGNALS}
        try:
            self._spawn()
            notify("READY=1", f"MAINPID={os.getpid()}", "STATUS=serving")
            while True:
                assert self.pid is not None
                pid, status = os.waitpid(self.pid, 0)
                self.pid = None
                if self._stopping:
                    log.info("worker %d stopped", pid)
                    return 0
                log.error("worker %d died (%s): restoring the cache and starting a new one", pid, _describe(status))
                now = time.monotonic()
                self._recent = [t for t in self._recent if now - t < self.window] + [now]
                if len(self._recent) > self.max_restarts:
                    log.error("worker died %d times in %.0f s: giving up", len(self._recent), self.window)
                    return 1
                try:
                    self.device.restore()
                except FscacheError as e:
                    log.error("restore failed: %s", e)
                    return 1
                self.restarts += 1
                self._spawn()
                notify(f"STATUS=serving (worker restarted {self.restarts} times)")
        finally:
            if self.pid is not None:  # stop() raced with a restart, or an error above: never leave the worker
                try:
                    os.kill(self.pid, signal.SIGTERM)
                    os.waitpid(self.pid, 0)
                except ChildProcessError:
                    pass
                except ProcessLookupError:
                    pass
                self.pid = None
            notify("STOPPING=1")
            for s, h in previous.items():
                signal.signal(s, h)


def _describe(status: int) -> str:
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        try:
            return f"killed by {signal.Signals(sig).name}"
        except ValueError:
            return f"killed by signal {sig}"
    return f"exit status {os.waitstatus_to_exitcode(status)}"

"""Failover: the supervisor core both kernel paths use (spawn a worker, wait, pass signals on, back off, give up).

A supervisor process holds the kernel object (``/dev/cachefiles``, or a fanotify group) and runs the worker that
serves it; when the worker dies, the kernel object stays, because the supervisor still holds it, so the mounts
stay up.  What a death needs is the path's own (:meth:`Supervisor.on_death`): the cachefiles daemon writes
``restore`` (requests the dead worker had read become NEW again, see :mod:`cachefilesd_py.daemon_supervisor`),
the fanotify mount denies the events the dead worker had read (see :mod:`cachefilesd_py.mount.supervisor`).  Then
the core starts a new worker, after a backoff.

The restart policy (:class:`RestartPolicy`, the one both paths use): the n-th worker death in a row waits
0.1 s * 2**(n-1), at most 5 s, before the restart (0.1, 0.2, 0.4, ... 3.2, 5, 5 s: a backend briefly down gets
time to come back), and the 11th in a row (about half a minute of failing workers) makes the supervisor give up
(exit status 1).  A worker that lived a minute ends the row: its death is the first of a new one.  One line is
logged per restart with its delay.  While it waits no worker runs; a stop signal ends the wait at once.
(:data:`TEST_BACKOFF_ENV` replaces these numbers, for tests.)

SIGTERM/SIGINT are passed on to the worker as SIGTERM, and the supervisor waits for it; a worker that then exits
ends the supervision.  The supervisor is single-threaded (so forking it is safe) and waits in ``poll`` (on a pidfd
of its worker and the signals' wakeup pipe).  A path may name an :attr:`Supervisor.upgrade_signal` (SIGHUP): while
a worker serves, it makes the wait call :meth:`Supervisor.on_upgrade` (an upgrade in place, the path's own).
"""

from __future__ import annotations

import logging
import os
import select
import signal
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from types import FrameType
from typing import Protocol

from erofs.errors import UsageError
from fscache.fd import drain

__all__ = ["STOP_SIGNALS", "TEST_BACKOFF_ENV", "ForkedWorker", "RestartPolicy", "Supervisor", "WorkerProcess",
           "describe"]  # fmt: skip

log = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
# a test hook, not a setting: "DELAY,MAX_DELAY,MAX_RESTARTS" replaces the restart backoff's defaults, so that a
# test of it takes seconds rather than half a minute
TEST_BACKOFF_ENV = "NYDUS_EROFS_TEST_RESTART_BACKOFF"


@dataclass
class RestartPolicy:
    """The backoff between worker restarts (see the module's docstring): ``delay * 2**(n-1)`` seconds before the
    n-th restart in a row, at most ``max_delay``; the ``max_restarts + 1``-th death in a row gives up; a worker
    that lived ``stable`` seconds ends the row."""

    delay: float = 0.1
    max_delay: float = 5.0
    max_restarts: int = 10
    stable: float = 60.0
    streak: int = 0  # worker deaths in a row

    @classmethod
    def from_env(cls) -> RestartPolicy:
        """The default policy, or the one :data:`TEST_BACKOFF_ENV` says (a test hook); UsageError if malformed."""
        text = os.environ.get(TEST_BACKOFF_ENV)
        if not text:
            return cls()
        try:
            delay, max_delay, max_restarts = text.split(",")
            return cls(delay=float(delay), max_delay=float(max_delay), max_restarts=int(max_restarts))
        except ValueError:
            raise UsageError(f"{TEST_BACKOFF_ENV}={text!r}: expected DELAY,MAX_DELAY,MAX_RESTARTS") from None

    def next_delay(self, lived: float) -> float | None:
        """The wait before restarting a worker that died ``lived`` seconds after its start; None: give up."""
        if lived >= self.stable:
            self.streak = 0
        self.streak += 1
        if self.streak > self.max_restarts:
            return None
        return min(self.delay * 2 ** (self.streak - 1), self.max_delay)


class WorkerProcess(Protocol):
    """A running worker (a ``subprocess.Popen`` or a :class:`ForkedWorker`)."""

    @property
    def pid(self) -> int: ...

    def wait(self) -> int:
        """Its exit status: ``-N`` when killed by signal N."""
        ...

    def send_signal(self, sig: int) -> None: ...


class ForkedWorker:
    """A worker forked from the supervisor (no exec)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid

    def wait(self) -> int:
        _, status = os.waitpid(self.pid, 0)
        return os.waitstatus_to_exitcode(status)

    def send_signal(self, sig: int) -> None:
        try:
            os.kill(self.pid, sig)
        except ProcessLookupError:
            pass


def describe(code: int) -> str:
    """An exit status (``-N``: killed by signal N) in words."""
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit status {code}"


class Supervisor:
    """The core: runs one worker at a time, restarting it when it dies (see the module's docstring).

    A kernel path subclasses it and plugs in :meth:`start_worker`, :meth:`on_exit` (does this exit end the
    supervision?), :meth:`on_death` (what a dead worker leaves to clean up), :meth:`restarted`, and optionally
    :meth:`wake_fds`/:meth:`pause_ended` (more reasons to stop waiting before a restart).  Its ``run`` starts the
    first worker inside :meth:`handling_signals`, then calls :meth:`supervise`.
    """

    forward_signals: tuple[int, ...] = ()  # passed on to the worker as they are (stop signals become SIGTERM)
    stopped_between_workers = 1  # the exit status when a stop signal comes while no worker runs
    upgrade_signal: int | None = None  # asks for an upgrade: :meth:`on_upgrade`, once :attr:`serving`

    def __init__(self, policy: RestartPolicy | None = None) -> None:
        self.policy = policy or RestartPolicy()
        self.restarts = 0
        self.proc: WorkerProcess | None = None
        self.stopping = False
        self._started = 0.0  # monotonic time of the last spawn
        self._wake_r = self._wake_w = -1  # the signals' wakeup pipe
        self.serving = False  # a worker serves: an upgrade may start (the subclass says when)
        self.upgrade_wanted = False  # the upgrade signal came

    # -- what a kernel path plugs in ----------------------------------------------------------------------------
    def start_worker(self) -> WorkerProcess:
        """Start a worker (``self.restarts`` says which)."""
        raise NotImplementedError

    def on_exit(self, pid: int, code: int) -> int | None:
        """The supervisor's exit status when the exit of worker ``pid`` with ``code`` ends the supervision;
        None when the worker died and is to be restarted."""
        raise NotImplementedError

    def on_death(self, pid: int, code: int) -> bool:
        """Clean up after worker ``pid`` died with ``code``; False: no worker can run any more (give up)."""
        raise NotImplementedError

    def restarted(self) -> None:
        """A new worker was started after a death (:meth:`spawn` done)."""

    def wake_fds(self) -> Sequence[int]:
        """More fds to wake the wait before a restart."""
        return ()

    def pause_ended(self, fd: int) -> bool:
        """``fd`` (of :meth:`wake_fds`) is readable: whether that ends the wait (and the supervision)."""
        return False

    def on_upgrade(self) -> None:
        """The :attr:`upgrade_signal` came while a worker serves (called from :meth:`wait`; it may replace
        :attr:`proc`)."""

    # -- the core -----------------------------------------------------------------------------------------------
    @contextmanager
    def handling_signals(self) -> Iterator[None]:
        """Stop signals (and :attr:`forward_signals`) go to the worker while this lasts; they also wake a wait."""
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        previous_wakeup = signal.set_wakeup_fd(self._wake_w, warn_on_full_buffer=False)
        previous = {s: signal.signal(s, self._on_signal) for s in (*STOP_SIGNALS, *self.forward_signals)}
        if self.upgrade_signal is not None:
            previous[self.upgrade_signal] = signal.signal(self.upgrade_signal, self._on_upgrade_signal)
        try:
            yield
        finally:
            for s, h in previous.items():
                signal.signal(s, h)
            signal.set_wakeup_fd(previous_wakeup)
            for fd in (self._wake_r, self._wake_w):
                os.close(fd)
            self._wake_r = self._wake_w = -1

    def _on_upgrade_signal(self, signum: int, frame: FrameType | None) -> None:
        self.upgrade_wanted = True

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        if signum in STOP_SIGNALS:
            self.stopping = True
        proc = self.proc
        if proc is not None:
            try:
                proc.send_signal(signal.SIGTERM if signum in STOP_SIGNALS else signum)
            except (ProcessLookupError, OSError):
                pass

    def spawn(self) -> WorkerProcess:
        """Start a worker (:meth:`start_worker`); a stop signal that came meanwhile is passed on at once."""
        self._started = time.monotonic()
        self.proc = proc = self.start_worker()
        if self.stopping:  # a stop signal came while there was no worker to pass it on to
            self._on_signal(signal.SIGTERM, None)
        return proc

    def fork(self, work: Callable[[], int]) -> ForkedWorker:
        """A worker running ``work()`` in a forked child, with default signal dispositions; its return value is
        the child's exit status."""
        own = (*STOP_SIGNALS, *self.forward_signals)
        old = signal.pthread_sigmask(signal.SIG_BLOCK, own)
        try:
            pid = os.fork()
            if pid == 0:  # the worker
                status = 1
                try:
                    for s in own:
                        signal.signal(s, signal.SIG_DFL)
                    signal.set_wakeup_fd(-1)
                    for fd in (self._wake_r, self._wake_w):
                        if fd >= 0:
                            os.close(fd)
                    signal.pthread_sigmask(signal.SIG_SETMASK, old)
                    status = work()
                except SystemExit as e:
                    status = e.code if isinstance(e.code, int) else 1
                except BaseException as e:  # noqa: BLE001 - the child must never return into the supervisor
                    log.error("worker failed: %s", e)
                finally:
                    logging.shutdown()
                    os._exit(status)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)
        return ForkedWorker(pid)

    def wait(self) -> int:
        """Wait for the worker to exit; its exit status.  An upgrade asked for meanwhile is done first."""
        while self._wake_r >= 0 and self.proc is not None:
            if self.upgrade_wanted and self.serving and not self.stopping:
                self.upgrade_wanted = False
                self.on_upgrade()
            elif self._exited_or_woken(self.proc.pid):
                break
        assert self.proc is not None
        code = self.proc.wait()
        self.proc = None
        return code

    def _exited_or_woken(self, pid: int) -> bool:
        """Wait until worker ``pid`` exits (True) or a signal wakes us (False)."""
        try:
            pidfd = os.pidfd_open(pid)
        except ProcessLookupError:
            return True
        try:
            poller = select.poll()
            poller.register(pidfd, select.POLLIN)
            poller.register(self._wake_r, select.POLLIN)
            ready = {fd for fd, _ in poller.poll()}
        finally:
            os.close(pidfd)
        if self._wake_r in ready:
            drain(self._wake_r)
        return pidfd in ready

    def stop_worker(self) -> int | None:
        """SIGTERM the worker, if one runs, and wait for it; its exit status."""
        if self.proc is None:
            return None
        try:
            self.proc.send_signal(signal.SIGTERM)
        except OSError:
            pass
        return self.wait()

    def pause(self, seconds: float) -> bool:
        """Wait ``seconds`` before a restart; False when a stop signal or :meth:`pause_ended` ended it."""
        deadline = time.monotonic() + seconds
        poller = select.poll()
        poller.register(self._wake_r, select.POLLIN)
        for fd in self.wake_fds():
            poller.register(fd, select.POLLIN)
        while not self.stopping:  # (set by the handler, which has run once the wakeup fd is readable)
            left = deadline - time.monotonic()
            if left <= 0:
                return True
            for fd, _ in poller.poll(int(left * 1000) + 1):
                if fd == self._wake_r:  # a forwarded signal wakes us too: drain, go on waiting
                    drain(fd)
                elif self.pause_ended(fd):
                    return False
        log.warning("stopped while waiting to restart the worker")
        return False

    def supervise(self) -> int:
        """Wait for the running worker; on its death clean up, back off and start the next; the exit status."""
        while True:
            assert self.proc is not None
            pid = self.proc.pid
            code = self.wait()
            lived = time.monotonic() - self._started
            status = self.on_exit(pid, code)
            if status is not None:
                return status
            if not self.on_death(pid, code):
                return 1
            if self.stopping:
                return self.stopped_between_workers
            delay = self.policy.next_delay(lived)
            if delay is None:
                log.error("worker died %d times in a row (no restarted one lived %.0f s): giving up",
                          self.policy.streak, self.policy.stable)  # fmt: skip
                return 1
            self.restarts += 1
            log.warning("restarting the worker in %.2f s (restart %d, death %d in a row)", delay, self.restarts,
                        self.policy.streak)  # fmt: skip
            if not self.pause(delay):
                return self.stopped_between_workers
            self.spawn()
            self.restarted()

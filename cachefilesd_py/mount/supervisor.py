"""The fanotify mount's supervisor (``python -m cachefilesd_py.mount.supervisor``): holds the fanotify group.

A crash of the worker must never let a hole read as zeros: when the last fd of a fanotify group closes, the
kernel drops its marks and *allows* every pending event, and an unmarked sparse file reads zeros where data is
missing.  So a small process, :class:`FanotifySupervisor`, creates the group and the inotify instance (shared
with the workers: the first worker adds the :class:`~.watch.ImageWatch`), holds them, and does nothing else (no
image machinery imported).  It starts the worker (:mod:`.worker`), relays its readiness line to its own ready
pipe and waits for it.  While it holds the group, the marks stay: a read of a hole with no worker running blocks
until a worker answers it.  It restarts a worker that dies with the policy of :mod:`cachefilesd_py.supervisor`.

When the worker dies (SIGKILL, a crash: anything but exit status 0) with the image not released, the kernel
still holds the permission events the worker had read; it matches a response by the event fd *number* only
(ENOENT when no pending event has it), so the supervisor answers every number below the worker's RLIMIT_NOFILE
with ``FAN_DENY`` + EIO: those readers get EIO (the kernel may also retry a failed readahead page by page, which
the next worker then serves), never zeros.  Events queued but not read yet stay in the group's queue for the
next worker.  While it waits to restart, reads of holes block; a stop signal or the release of the image ends
the wait at once (a detach does not: its open files need the next worker).

It closes the group only once the image is released: a worker exiting (status 0) means it was; when no worker
will run again (it gave up, a stop signal came after a worker's death, or an error) it unmounts the image if the
mountpoint still shows it (plainly, or detached when files are open there) and, until the release, answers every
event itself: ranges the cache file holds are allowed, holes denied with EIO.  SIGTERM/SIGINT are passed on to
the worker, and the supervisor waits for it; a second one changes nothing.  SIGUSR1 is passed on to the worker.

If the supervisor itself is SIGKILLed nothing restarts the worker: the worker still holds the group and serves
until the image is released, but if it dies too, the kernel drops the group and its marks, and the holes of the
cache files read as zeros through the mount.  Likewise a SIGKILL of the supervisor while it answers events itself
(no worker) drops the group.  Keep the supervisor alive (it is small, single-threaded and only waits), and give
a stop (systemd's ``TimeoutStopSec``) time for the files open on the image to close.

Its arguments are file descriptors only: the :class:`~.spec.MountSpec` comes as JSON in ``--spec-fd`` and goes
to each worker the same way.

Upgrade in place (SIGHUP, or :func:`cachefilesd_py.mount.upgrade.request_upgrade`): the code on disk replaces
the code running, with no read failed and no event lost.  In two steps:

1. the supervisor re-executes itself (``os.execv`` of the same interpreter and module, same pid): the group fd,
   the inotify fd and the running worker are inherited; the spec goes again in a new ``--spec-fd``, and what the
   new image needs (those fd numbers, the worker's pid, the restart count) as one JSON object in ``--resume``
   (:class:`ResumeState`; no secret in it).  The stop signals and SIGHUP are blocked across the exec (a mask
   survives it; the handlers do not) and unblocked once the new image handles them.  Before it execs, it checks
   that the new code imports at all (``python -c "import ..."``); if not, or if the exec fails, it logs why and
   goes on with step 2 in the old code.
2. the (new) supervisor hands the worker over (:meth:`FanotifySupervisor.hand_over`): it starts a new worker with
   ``--takeover-fd``, which loads the image and backend, says ``ok`` and waits; then it sends SIGHUP to the old
   worker, which stops reading events, finishes the fills it took (their readers get their data), flushes and
   exits 0 leaving the image mounted; events it did not read stay queued in the group.  Once it is gone (had it
   died instead, its pending events are denied as above), the supervisor writes the go byte: the new worker opens
   the cache files and serves the queue.  Reads wait meanwhile (about the time to open the cache files); none
   fails.  A new worker that fails to start calls the upgrade off (logged); the old one serves on.

A worker running code from before SIGHUP meant "hand over" is killed by it: then the upgrade is a failover.
"""

from __future__ import annotations

import argparse
import errno
import json
import logging
import os
import resource
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from erofs.errors import NydusErofsError, UsageError
from fscache.errors import FscacheError, PreContentUnsupportedError
from fscache.fanotify import FAN_DENY, FAN_DENY_ERRNO, FanotifyGroup, PreAccessEvent
from fscache.fd import drain
from fscache.inotify import Inotify

from ..supervisor import STOP_SIGNALS, ForkedWorker, RestartPolicy, describe
from .mountsupervisor import MountSupervisor
from .ready import OK, error_line, read_line, report
from .record import api_path, listen_api
from .spec import MountSpec, spec_fd

__all__ = ["FanotifySupervisor", "ResumeState", "main"]

log = logging.getLogger(__name__)

_EXEC_BLOCKED = (*STOP_SIGNALS, signal.SIGHUP)  # blocked across the re-exec (unblocked once handled again)


@dataclass(frozen=True)
class ResumeState:
    """What a re-executed supervisor takes over (``--resume``, JSON): the inherited group and inotify fds, the
    running worker (a child of this same pid), the restarts so far and the API's listening socket (-1: none)."""

    group_fd: int
    inotify_fd: int
    worker_pid: int
    restarts: int
    api_fd: int

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ResumeState:
        """The state :meth:`to_json` wrote; UsageError when ``text`` is not one."""
        try:
            value = json.loads(text)
            if not isinstance(value, dict) or set(value) != {f.name for f in fields(cls)}:
                raise ValueError("expected the ResumeState fields")
            if not all(isinstance(v, int) and not isinstance(v, bool) for v in value.values()):
                raise ValueError("expected integers")
            return cls(**value)
        except ValueError as e:
            raise UsageError(f"--resume: {e}") from None


class FanotifySupervisor(MountSupervisor):
    """Holds the fanotify group and the inotify instance watching the image; runs the worker (a fresh interpreter
    given both fds and the spec: :class:`.MountSupervisor`) and, when it dies, denies its events and starts a new
    one (see the module's docstring).  The group is closed only once the image is released (:meth:`run`); with no
    worker left, :meth:`_linger` unmounts and answers the events until then."""

    module = "cachefilesd_py.mount.supervisor"
    worker_module = "cachefilesd_py.mount.worker"
    upgrade_signal = signal.SIGHUP

    def __init__(self, spec: MountSpec, policy: RestartPolicy | None = None) -> None:
        super().__init__(spec, policy)
        self.group: FanotifyGroup | None = None
        self.died = False  # the last worker died without answering what it had read
        self._go_r = -1  # while a worker to take over starts: the read end of its go pipe
        self.api: socket.socket | None = None  # the API's listening socket, served by each worker in turn
        self.resume_state: ResumeState | None = None  # ``--resume``: re-executed for an upgrade

    # -- the mode's hooks ---------------------------------------------------------------------------------------
    @classmethod
    def add_arguments(cls, ap: argparse.ArgumentParser) -> None:
        ap.add_argument("--resume", default=None, help="Re-executed for an upgrade: the ResumeState (JSON)")

    def configure(self, args: argparse.Namespace) -> None:
        self.resume_state = ResumeState.from_json(args.resume) if args.resume is not None else None

    def start(self, ready_fd: int | None) -> int:
        return self.run(ready_fd) if self.resume_state is None else self.resume(self.resume_state)

    def worker_args(self) -> tuple[list[str], list[int]]:
        assert self.group is not None
        cmd, fds = ["--group-fd", str(self.group.fileno())], [self.group.fileno()]
        if self._go_r >= 0:
            cmd += ["--takeover-fd", str(self._go_r)]
            fds.append(self._go_r)
        if self.api is not None:
            cmd += ["--api-fd", str(self.api.fileno())]
            fds.append(self.api.fileno())
        return cmd, fds

    def on_death(self, pid: int, code: int) -> bool:
        self.died = True
        log.error("worker %d died (%s): denying its pending events", pid, describe(code))
        log.error("denied %d events of worker %d (EIO)", self.deny_in_flight(), pid)
        self.died = False
        return True

    # -- upgrade in place (see the module's docstring) ------------------------------------------------------------
    def on_upgrade(self) -> None:
        """Re-execute the supervisor (its new image hands the worker over); if it cannot, hand over here."""
        log.info("upgrade: re-executing the supervisor")
        try:
            self._reexec()
        except (OSError, subprocess.SubprocessError, NydusErofsError) as e:
            log.error("upgrade: cannot re-execute the supervisor (%s): handing over in this one", e)
        self.hand_over()

    def _reexec(self) -> None:
        """``os.execv`` this module again with the group, the inotify instance and the worker; returns only when
        the new code does not import or the exec failed (raised)."""
        assert self.group is not None and self.inotify is not None and self.proc is not None
        module = __spec__.name if __spec__ is not None else self.module
        check = subprocess.run([sys.executable, "-c", f"import {module}, {self.worker_module}"],
                               stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               timeout=60)  # fmt: skip
        if check.returncode != 0:
            last = (check.stderr.decode(errors="replace").strip().splitlines() or ["exit status"])[-1]
            raise UsageError(f"the new code does not import: {last}")
        gfd, ifd = self.group.fileno(), self.inotify.fileno()
        afd = self.api.fileno() if self.api is not None else -1
        state = ResumeState(group_fd=gfd, inotify_fd=ifd, worker_pid=self.proc.pid, restarts=self.restarts,
                            api_fd=afd)  # fmt: skip
        sfd = spec_fd(self.spec)
        argv = [sys.executable, "-m", module, "--spec-fd", str(sfd), "--resume", state.to_json()]
        for h in logging.getLogger().handlers:
            h.flush()
        old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, _EXEC_BLOCKED)
        try:
            for fd in (gfd, ifd, sfd, *((afd,) if afd >= 0 else ())):
                os.set_inheritable(fd, True)
            os.execv(sys.executable, argv)
        finally:  # the exec failed
            for fd in (gfd, ifd, *((afd,) if afd >= 0 else ())):
                os.set_inheritable(fd, False)
            os.close(sfd)
            signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)

    def hand_over(self) -> None:
        """Start a new worker and let the running one hand over to it (see the module's docstring)."""
        old = self.proc
        assert old is not None
        if self.stopping:  # (a stop came while the supervisor re-executed itself)
            return
        go_r, go_w = os.pipe2(os.O_CLOEXEC)
        self._go_r = go_r
        try:
            new = self.start_worker()
        except OSError as e:
            os.close(go_w)
            log.error("upgrade called off: cannot start a new worker: %s", e)
            return
        finally:
            os.close(go_r)
            self._go_r = -1
        try:
            line = read_line(self._ready_r)
            if line != OK:
                log.error("upgrade called off: new worker %d failed: %s", new.pid, line or "no answer")
                os.close(go_w)
                go_w = -1  # (end of file: it exits)
                new.wait()
                return
            log.info("worker %d is ready: worker %d hands over", new.pid, old.pid)
            old.send_signal(signal.SIGHUP)
            code = old.wait()
            if code != 0:
                log.error("worker %d died while handing over (%s): denying its pending events", old.pid,
                          describe(code))  # fmt: skip
                log.error("denied %d events of worker %d (EIO)", self.deny_in_flight(), old.pid)
            self.proc, self._started = new, time.monotonic()
            try:
                os.write(go_w, b"g")
            except OSError as e:  # it died meanwhile: the supervision restarts it
                log.error("new worker %d: %s", new.pid, e)
            if self.stopping:
                new.send_signal(signal.SIGTERM)
            log.info("worker %d took over from worker %d", new.pid, old.pid)
        finally:
            if go_w >= 0:
                os.close(go_w)

    # -- the group ----------------------------------------------------------------------------------------------
    def deny_in_flight(self) -> int:
        """Deny (EIO) every permission event a dead worker had read and not answered; returns how many."""
        assert self.group is not None
        limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]  # the worker's too (inherited, never raised)
        if limit == resource.RLIM_INFINITY:
            limit = int(Path("/proc/sys/fs/nr_open").read_text())
        denied = 0
        for fd in range(limit):
            try:
                if self.group.respond_fd(fd, FAN_DENY_ERRNO(errno.EIO), fallback=FAN_DENY):
                    denied += 1
            except FscacheError as e:
                log.error("deny of event fd %d: %s", fd, e)
        return denied

    def _deny_queued(self) -> None:
        assert self.group is not None
        denied = 0
        try:
            while events := self.group.read_events():
                for ev in events:
                    if ev.fd >= 0:
                        self.group.deny(ev, errno.EIO)
                        denied += 1
        except (FscacheError, OSError) as e:
            log.error("denying queued events: %s", e)
        if denied:
            log.warning("denied %d queued events (EIO)", denied)

    def _linger(self) -> None:
        """No worker will run again: if the image's filesystem is still alive, unmount it (detached when files
        are open there) and answer its reads until it is released (ranges the cache file holds are allowed, the
        others denied with EIO: never zeros); then the group may close.  Stop signals change nothing here."""
        assert self.group is not None and self.watch is not None
        watch = self.watch
        watch.unmount()
        if watch.released():
            return
        watch.log_linger("no worker left", "denying reads of missing data (EIO)")
        poller = select.poll()
        for fd in (self.group.fileno(), watch.fileno(), self._wake_r):
            poller.register(fd, select.POLLIN)
        allowed = denied = 0
        while True:
            ready = {fd for fd, _ in poller.poll()}
            if self._wake_r in ready:
                drain(self._wake_r)
            if watch.fileno() in ready and watch.released():
                break
            if self.group.fileno() in ready:
                for ev in self.group.read_events():
                    if ev.fd < 0:
                        continue
                    if self._answer_present(ev):
                        allowed += 1
                    else:
                        denied += 1
        log.warning("%s released: %d reads allowed, %d denied (EIO) meanwhile", self.mountpoint, allowed, denied)

    def _answer_present(self, ev: PreAccessEvent) -> bool:
        """Allow a read of data the cache file holds (verified when it was written), deny (EIO) one of a hole."""
        group = self.group
        assert group is not None
        try:
            if ev.offset is not None and ev.count and ev.holes():
                group.deny(ev, errno.EIO)
                return False
            group.allow(ev)
            return True
        except (FscacheError, OSError, ValueError) as e:
            log.error("answering an event: %s", e)
            if ev.fd >= 0:
                try:
                    group.deny(ev, errno.EIO)
                except (FscacheError, OSError) as e2:
                    log.error("deny failed: %s", e2)
            return False

    def run(self, ready_fd: int | None) -> int:
        """Start the first worker, relay its readiness line to ``ready_fd``, supervise; the exit status.

        The group is closed only once the image's filesystem is released (see :class:`~.watch.ImageWatch`): while a
        worker runs, by waiting for it (it serves until then); when none will run again (a stop signal after
        its death, giving up, an error), by :meth:`_linger`.
        """
        with self.handling_signals():  # (restored only at the end: a second SIGTERM must not end the wait)
            signal.pthread_sigmask(signal.SIG_UNBLOCK, _EXEC_BLOCKED)
            try:
                try:
                    self.group = FanotifyGroup(pre_content=True)
                    self.inotify = Inotify()
                    self.api = listen_api(self.mountpoint)
                except PreContentUnsupportedError as e:  # as `--mode fanotify` says when it probes for them
                    report(ready_fd, error_line(UsageError(f"{e} (use --mode full)")))
                    return 1
                except (NydusErofsError, FscacheError, OSError) as e:
                    report(ready_fd, error_line(e))
                    return 1
                code = self.start_first(ready_fd)
                if code is not None:
                    self.died = code != 0
                    return 1
                self.serving = True
                return self.supervise()
            finally:
                self._end()

    def resume(self, state: ResumeState) -> int:
        """Go on as the supervisor that re-executed itself into this process (``state``): hand its worker over to
        a new one, then supervise as :meth:`run` does."""
        with self.handling_signals():
            self.group = FanotifyGroup.from_fd(state.group_fd)
            self.inotify = Inotify.from_fd(state.inotify_fd)
            self.api = socket.socket(fileno=state.api_fd) if state.api_fd >= 0 else None
            self.restarts = state.restarts
            self.proc, self._started = ForkedWorker(state.worker_pid), time.monotonic()
            signal.pthread_sigmask(signal.SIG_UNBLOCK, _EXEC_BLOCKED)
            try:
                log.info("supervisor re-executed (pid %d): worker %d hands over", os.getpid(), state.worker_pid)
                self.hand_over()
                self.serving = True
                return self.supervise()
            finally:
                self._end()

    def _end(self) -> None:
        self.serving = False  # (no upgrade while it stops)
        code = self.stop_worker()  # an error above: stop the worker (it serves until the release)
        self.died = (code is not None and code != 0) or self.died
        self._close_group()
        if self.api is not None:
            self.api.close()
            api_path(self.mountpoint).unlink(missing_ok=True)

    def _close_group(self) -> None:
        if self.group is not None:
            if self.died:
                self.deny_in_flight()
            try:
                if not self._released():
                    self._linger()
            except (NydusErofsError, OSError) as e:  # cannot tell any more: close, as before
                log.error("waiting for %s to be released: %s", self.mountpoint, e)
            self._deny_queued()
            self.group.close()
        if self.inotify is not None:
            self.inotify.close()


def main(argv: Sequence[str] | None = None) -> int:
    return FanotifySupervisor.main(argv, __doc__.splitlines()[0])


if __name__ == "__main__":
    sys.exit(main())

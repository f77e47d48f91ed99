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
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import resource
import select
import signal
import socket
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from erofs.errors import NydusErofsError, UsageError
from fscache.errors import FscacheError, PreContentUnsupportedError
from fscache.fanotify import FAN_DENY, FAN_DENY_ERRNO, FanotifyGroup, PreAccessEvent
from fscache.fd import drain
from fscache.inotify import Inotify

from ..logfilter import daemon_logging
from ..supervisor import RestartPolicy, Supervisor, WorkerProcess, describe
from .ready import OK, error_line, read_line, report
from .record import api_path, listen_api
from .spec import MountSpec, read_spec_fd, spec_fd
from .watch import ImageWatch

__all__ = ["FanotifySupervisor", "main"]

log = logging.getLogger(__name__)

WORKER_MODULE = "cachefilesd_py.mount.worker"


class FanotifySupervisor(Supervisor):
    """Holds the fanotify group and the inotify instance watching the image; runs the worker (a fresh interpreter
    given both fds and the spec) and, when it dies, denies its events and starts a new one (see the module's
    docstring).  The group is closed only once the image is released (:meth:`run`); with no worker left,
    :meth:`_linger` unmounts and answers the events until then."""

    forward_signals = (signal.SIGUSR1,)

    def __init__(self, spec: MountSpec, policy: RestartPolicy | None = None) -> None:
        super().__init__(policy)
        self.spec = spec
        self.mountpoint = Path(spec.mountpoint)
        self.group: FanotifyGroup | None = None
        self.inotify: Inotify | None = None
        self.watch: ImageWatch | None = None
        self.died = False  # the last worker died without answering what it had read
        self._ready_r = -1  # the read end of the last worker's ready pipe
        self.api: socket.socket | None = None  # the API's listening socket, served by each worker in turn

    # -- the core's hooks ---------------------------------------------------------------------------------------
    def start_worker(self) -> WorkerProcess:
        assert self.group is not None and self.inotify is not None
        gfd, ifd = self.group.fileno(), self.inotify.fileno()
        self._ready_r, w = os.pipe2(os.O_CLOEXEC)
        sfd = spec_fd(self.spec)
        cmd = [sys.executable, "-m", WORKER_MODULE, "--spec-fd", str(sfd), "--group-fd", str(gfd),
               "--inotify-fd", str(ifd), "--restart", str(self.restarts), "--supervisor-pid", str(os.getpid()),
               "--ready-fd", str(w)]  # fmt: skip
        fds = (gfd, ifd, w, sfd)
        if self.api is not None:
            cmd += ["--api-fd", str(self.api.fileno())]
            fds += (self.api.fileno(),)
        try:
            return subprocess.Popen(cmd, stdin=subprocess.DEVNULL, pass_fds=fds)
        except BaseException:
            os.close(self._ready_r)
            raise
        finally:
            os.close(w)
            os.close(sfd)

    def _spawn_ready(self) -> str:
        """Start a worker; its readiness line (``ok``, ``error ...``, or empty if it died without one)."""
        proc = self.spawn()
        line = read_line(self._ready_r)
        log.info("worker %d started%s: %s", proc.pid, f" (restart {self.restarts})" if self.restarts else "",
                 line or "no answer")  # fmt: skip
        return line

    def on_exit(self, pid: int, code: int) -> int | None:
        clean = code == 0 or (self.stopping and code == -signal.SIGTERM)
        if code == 0 or self._released():  # a worker exits 0 once the image is released
            log.info("worker %d stopped", pid)
            return 0 if clean else 1
        return None

    def on_death(self, pid: int, code: int) -> bool:
        self.died = True
        log.error("worker %d died (%s): denying its pending events", pid, describe(code))
        log.error("denied %d events of worker %d (EIO)", self.deny_in_flight(), pid)
        self.died = False
        return True

    def restarted(self) -> None:
        line = read_line(self._ready_r)
        assert self.proc is not None
        log.info("worker %d started (restart %d): %s", self.proc.pid, self.restarts, line or "no answer")
        if line != OK:
            log.error("restarted worker failed: %s", line or "no answer")

    def wake_fds(self) -> Sequence[int]:
        assert self.inotify is not None
        return (self.inotify.fileno(),)

    def pause_ended(self, fd: int) -> bool:
        if self._released():
            log.warning("%s was unmounted and released: stopping", self.mountpoint)
            return True
        return False

    # -- the group ----------------------------------------------------------------------------------------------
    def _released(self) -> bool:
        """Whether the image's filesystem is gone (or was never mounted): nothing reads through the marks."""
        if self.watch is None:
            assert self.inotify is not None
            self.watch = ImageWatch.inherited(self.inotify, self.mountpoint)
            if self.watch is None:
                return True
        return self.watch.released()

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

        The group is closed only once the image's filesystem is released (see :class:`ImageWatch`): while a
        worker runs, by waiting for it (it serves until then); when none will run again (a stop signal after
        its death, giving up, an error), by :meth:`_linger`.
        """
        with self.handling_signals():  # (restored only at the end: a second SIGTERM must not end the wait)
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
                line = self._spawn_ready()
                if line:
                    report(ready_fd, line)
                elif ready_fd is not None:
                    os.close(ready_fd)  # the mount command reports the exit status and the log
                if line != OK:
                    self.died = self.wait() != 0
                    return 1
                return self.supervise()
            finally:
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
    ap = argparse.ArgumentParser(prog="python -m cachefilesd_py.mount.supervisor",
                                 description=__doc__.splitlines()[0])  # fmt: skip
    ap.add_argument("--spec-fd", type=int, required=True, help="Inherited fd holding the mount spec (JSON)")
    ap.add_argument("--ready-fd", type=int, default=None)
    args = ap.parse_args(argv)
    try:
        spec = read_spec_fd(args.spec_fd)
        policy = RestartPolicy.from_env()
    except (NydusErofsError, OSError) as e:
        report(args.ready_fd, error_line(e))
        return 1
    daemon_logging(spec.log_level, "%(asctime)s %(name)s %(levelname)s: %(message)s")
    return FanotifySupervisor(spec, policy).run(args.ready_fd)


if __name__ == "__main__":
    sys.exit(main())

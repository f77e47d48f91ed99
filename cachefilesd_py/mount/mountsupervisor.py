"""What the supervisors of the lazy mounts share: :class:`MountSupervisor` (on :mod:`cachefilesd_py.supervisor`).

Both the fanotify mount (:mod:`.supervisor`) and the ``nbd`` mount (:mod:`.nbdsupervisor`) run their worker as a
fresh interpreter (``python -m WORKER --spec-fd S --inotify-fd I --restart N --supervisor-pid P --ready-fd R``,
plus the mode's own arguments): the spec goes again in a new fd, the inotify instance watching the image is the
supervisor's, shared with every worker (:class:`~.watch.ImageWatch`), and the worker writes its readiness line in
its own pipe; the supervisor relays the first worker's line to its own ready pipe and logs a restarted one's.

A worker that exits 0, or exits at all once the image is released, ends the supervision (status 0 when it exited
0 or a stop's SIGTERM ended it, else 1); any other exit is a death, which the mode cleans up
(:meth:`~cachefilesd_py.supervisor.Supervisor.on_death`) before the core restarts it.  The release of the image
also ends the wait before a restart.  SIGUSR1 is passed on to the worker.

Their arguments are file descriptors only (:meth:`MountSupervisor.main`): the :class:`~.spec.MountSpec` in
``--spec-fd``, the ready pipe in ``--ready-fd``; a mode may add its own.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import ClassVar

from erofs.errors import NydusErofsError
from fscache.inotify import Inotify

from ..logfilter import daemon_logging
from ..supervisor import RestartPolicy, Supervisor, WorkerProcess
from .ready import OK, error_line, read_line, report
from .spec import MountSpec, read_spec_fd, spec_fd
from .watch import ImageWatch

__all__ = ["MountSupervisor"]


class MountSupervisor(Supervisor):
    """Runs a mount's worker (a fresh interpreter given the spec and the inotify fd; see the module's docstring)
    and restarts it when it dies.  A mode names its :attr:`module` and :attr:`worker_module`, adds its worker's
    arguments (:meth:`worker_args`), and writes its ``on_death`` and ``run``."""

    module: ClassVar[str]  # ``python -m`` this runs the supervisor
    worker_module: ClassVar[str]  # ``python -m`` this runs a worker
    forward_signals = (signal.SIGUSR1,)

    def __init__(self, spec: MountSpec, policy: RestartPolicy | None = None) -> None:
        super().__init__(policy)
        self.spec = spec
        self.mountpoint = Path(spec.mountpoint)
        self.inotify: Inotify | None = None
        self.watch: ImageWatch | None = None
        self._ready_r = -1  # the read end of the last worker's ready pipe
        self.log = logging.getLogger(type(self).__module__)  # the mode's logger, as its own lines

    # -- what a mode adds ---------------------------------------------------------------------------------------
    def worker_args(self) -> tuple[list[str], list[int]]:
        """The mode's own arguments of the next worker, and the fds they pass."""
        return [], []

    @classmethod
    def add_arguments(cls, ap: argparse.ArgumentParser) -> None:
        """The mode's own arguments of the supervisor (beyond ``--spec-fd`` and ``--ready-fd``)."""

    def configure(self, args: argparse.Namespace) -> None:
        """Take the mode's own arguments (:meth:`add_arguments`); NydusErofsError when they are bad."""

    def start(self, ready_fd: int | None) -> int:
        """Supervise (once the arguments are taken and logging is set up); the exit status."""
        return self.run(ready_fd)

    def run(self, ready_fd: int | None) -> int:
        """Start the first worker (:meth:`start_first`), supervise; the exit status."""
        raise NotImplementedError

    # -- the core's hooks ---------------------------------------------------------------------------------------
    def start_worker(self) -> WorkerProcess:
        assert self.inotify is not None
        ifd = self.inotify.fileno()
        own, own_fds = self.worker_args()
        self._ready_r, w = os.pipe2(os.O_CLOEXEC)
        sfd = spec_fd(self.spec)
        cmd = [sys.executable, "-m", self.worker_module, "--spec-fd", str(sfd), "--inotify-fd", str(ifd),
               "--restart", str(self.restarts), "--supervisor-pid", str(os.getpid()), "--ready-fd", str(w),
               *own]  # fmt: skip
        try:
            return subprocess.Popen(cmd, stdin=subprocess.DEVNULL, pass_fds=(ifd, w, sfd, *own_fds))
        except BaseException:
            os.close(self._ready_r)
            raise
        finally:
            os.close(w)
            os.close(sfd)

    def on_exit(self, pid: int, code: int) -> int | None:
        clean = code == 0 or (self.stopping and code == -signal.SIGTERM)
        if code == 0 or self._released():  # a worker exits 0 once the image is released
            self.log.info("worker %d stopped", pid)
            return 0 if clean else 1
        return None

    def restarted(self) -> None:
        line = read_line(self._ready_r)
        assert self.proc is not None
        self.log.info("worker %d started (restart %d): %s", self.proc.pid, self.restarts, line or "no answer")
        if line != OK:
            self.log.error("restarted worker failed: %s", line or "no answer")

    def wake_fds(self) -> Sequence[int]:
        assert self.inotify is not None
        return (self.inotify.fileno(),)

    def pause_ended(self, fd: int) -> bool:
        if self._released():
            self.log.warning("%s was unmounted and released: stopping", self.mountpoint)
            return True
        return False

    # -- shared by the modes ------------------------------------------------------------------------------------
    def spawn_ready(self) -> str:
        """Start a worker; its readiness line (``ok``, ``error ...``, or empty if it died without one)."""
        proc = self.spawn()
        line = read_line(self._ready_r)
        self.log.info("worker %d started%s: %s", proc.pid, f" (restart {self.restarts})" if self.restarts else "",
                 line or "no answer")  # fmt: skip
        return line

    def start_first(self, ready_fd: int | None) -> int | None:
        """Start the first worker and relay its readiness line to ``ready_fd``; None once it serves, else the exit
        status of the worker that failed (waited for)."""
        line = self.spawn_ready()
        if line:
            report(ready_fd, line)
        elif ready_fd is not None:
            os.close(ready_fd)  # the mount command reports the exit status and the log
        if line != OK:
            return self.wait()
        return None

    def _released(self) -> bool:
        """Whether the image's filesystem is gone (or was never mounted): nothing reads through it any more."""
        if self.watch is None:
            assert self.inotify is not None
            self.watch = ImageWatch.inherited(self.inotify, self.mountpoint)
            if self.watch is None:
                return True
        return self.watch.released()

    @classmethod
    def main(cls, argv: Sequence[str] | None, description: str) -> int:
        """The supervisor's command (``python -m`` :attr:`module`): its exit status."""
        ap = argparse.ArgumentParser(prog=f"python -m {cls.module}", description=description)
        ap.add_argument("--spec-fd", type=int, required=True, help="Inherited fd holding the mount spec (JSON)")
        ap.add_argument("--ready-fd", type=int, default=None)
        cls.add_arguments(ap)
        args = ap.parse_args(argv)
        try:
            supervisor = cls(read_spec_fd(args.spec_fd), RestartPolicy.from_env())
            supervisor.configure(args)
        except (NydusErofsError, OSError) as e:
            report(args.ready_fd, error_line(e))
            return 1
        daemon_logging(supervisor.spec.log_level, "%(asctime)s %(name)s %(levelname)s: %(message)s")
        return supervisor.start(args.ready_fd)

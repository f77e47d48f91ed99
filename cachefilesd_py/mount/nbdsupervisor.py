"""The ``nbd`` mount's supervisor (``python -m cachefilesd_py.mount.nbdsupervisor``): restarts its worker.

The NBD devices outlive the worker serving them: a device connected through netlink stays configured when all
its connections die, and the kernel *holds* its requests (the new ones, and, after the request timeout of 30 s,
those that were in flight on a dead connection) for ``dead_conn_timeout`` (:data:`~.nbdserver.DEAD_CONN_TIMEOUT`)
waiting for a reconnect.  So the supervisor needs no kernel object of its own; it does not hold the sockets
either (a dead worker may have left a connection in the middle of a reply: the stream is unusable, so the
kernel's end must be dropped, never handed to the next worker).  The design:

- The supervisor creates the inotify instance that watches the image (shared with its workers, as the fanotify
  supervisor does), starts the worker (:mod:`.nbddaemon`: it connects the devices, one socketpair per connection,
  mounts, and writes the devices into the record), relays its readiness line and waits for it.
- When the worker dies (SIGKILL, a crash: anything but exit status 0 with the image not released), the kernel
  sees its connections close and marks them dead; the supervisor waits with the policy of
  :mod:`cachefilesd_py.supervisor` (the one :class:`~cachefilesd_py.supervisor.RestartPolicy`) and starts a new
  worker with ``--restart N --devices I,J``: it makes fresh socketpairs and gives them to the same devices
  (``NBD_CMD_RECONFIGURE``), and the held requests go to it.  A read in progress at the death completes with the
  right bytes (the pipeline verifies every chunk; an answer is sent whole or the connection is dropped), at
  worst after the kernel's request timeout, or fails with EIO when the devices are given up — never wrong bytes.
- Every device has at least two connections: the kernel moves a request in flight on a dead connection
  (requeues it on its timeout) only when the device has more than one.
- When no worker will run again (it gave up: 11 deaths in a row; a stop signal came after a death) the
  supervisor unmounts the image if the mountpoint still shows it (detached when files are open there) and
  disconnects the devices: the held requests fail at once with EIO.

Devices set up through the ioctls (:class:`fscache.nbd.NbdIoctl`, kernels without the netlink family) cannot be
reconnected: they stop with the worker's ``NBD_DO_IT`` thread, so a worker's death fails their requests (EIO);
the supervisor then does not restart, it unmounts as above.

SIGTERM/SIGINT are passed on to the worker (it unmounts and stops once the image is released); SIGUSR1 too.
Its arguments are file descriptors only: the :class:`~.spec.MountSpec` comes in ``--spec-fd`` and goes to each
worker the same way.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence

from erofs.errors import NydusErofsError
from fscache.errors import FscacheError
from fscache.inotify import Inotify

from ..supervisor import RestartPolicy, describe
from .mountsupervisor import MountSupervisor
from .nbddevices import release_stale_devices
from .ready import error_line, report
from .record import read_record
from .spec import MountSpec

__all__ = ["NbdSupervisor", "main"]

log = logging.getLogger(__name__)


class NbdSupervisor(MountSupervisor):
    """Runs the nbd worker (a fresh interpreter given the inotify fd and the spec: :class:`.MountSupervisor`) and
    restarts it, reconnecting the same devices, when it dies (see the module's docstring)."""

    module = "cachefilesd_py.mount.nbdsupervisor"
    worker_module = "cachefilesd_py.mount.nbddaemon"

    def __init__(self, spec: MountSpec, policy: RestartPolicy | None = None) -> None:
        super().__init__(spec, policy)
        self.record: dict[str, object] = {}  # the first worker's: its devices

    def _devices(self) -> list[int]:
        return [int(str(d).removeprefix("/dev/nbd")) for d in self.record.get("nbd") or ()]  # type: ignore[union-attr]

    # -- the mode's hooks ---------------------------------------------------------------------------------------
    def worker_args(self) -> tuple[list[str], list[int]]:
        return (["--devices", ",".join(map(str, self._devices()))] if self.restarts else []), []

    def on_death(self, pid: int, code: int) -> bool:
        if self.record.get("nbd_ioctl"):
            log.error("worker %d died (%s): its NBD devices (set up by ioctl) stopped with it", pid, describe(code))
            return False
        log.error("worker %d died (%s): the kernel holds the requests of %s for the next worker", pid,
                  describe(code), ", ".join(map(str, self.record.get("nbd") or ())))  # type: ignore[arg-type]  # fmt: skip
        return True

    # -- the image ----------------------------------------------------------------------------------------------
    def _give_up(self) -> None:
        """No worker will run again: unmount the image (detached if busy) and disconnect its devices, so that
        the requests the kernel holds fail now (EIO) rather than after the dead-connection timeout."""
        if self.watch is not None and not self._released():
            self.watch.unmount()
        rec = read_record(self.mountpoint) or self.record
        if rec.get("nbd"):
            release_stale_devices(dict(rec))

    def run(self, ready_fd: int | None) -> int:
        """Start the first worker, relay its readiness line to ``ready_fd``, supervise; the exit status."""
        with self.handling_signals():
            gave_up = False
            try:
                try:
                    self.inotify = Inotify()
                except (NydusErofsError, FscacheError, OSError) as e:
                    report(ready_fd, error_line(e))
                    return 1
                if self.start_first(ready_fd) is not None:
                    return 1
                self.record = read_record(self.mountpoint) or {}
                status = self.supervise()
                gave_up = status != 0 and not self._released()
                return status
            finally:
                code = self.stop_worker()
                if gave_up or (code is not None and code != 0 and not self._released()):
                    self._give_up()
                if self.inotify is not None:
                    self.inotify.close()


def main(argv: Sequence[str] | None = None) -> int:
    return NbdSupervisor.main(argv, __doc__.splitlines()[0])


if __name__ == "__main__":
    sys.exit(main())

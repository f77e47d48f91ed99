"""The worker of an ``nbd`` mount (``python -m cachefilesd_py.mount.nbddaemon``), run by :mod:`.nbdsupervisor`
(or in the foreground, alone).

For kernels with NBD but neither fanotify pre-content events (6.14) nor cachefiles on-demand: it prepares the
blobs' sparse cache files, serves each blob as an NBD device (:class:`~.nbdserver.BlobDevice`, ``workers``
connections each), mounts the bootstrap — bound to a loop device, since a file-backed mount takes no block
device — with ``device=/dev/nbdN`` per blob, watches the image (on the supervisor's inotify instance), writes
the runtime record (``pid``: the supervisor, ``worker_pid``: itself, ``source``: the loop device, ``nbd``: the
devices, ``nbd_pid``: the process that connected them, ``nbd_ioctl``: whether through the ioctls), reports
``ok`` on the ready pipe and serves until the image is released.  Then it disconnects the devices and writes its
final stats into the record.  A restarted worker (``--restart N --devices I,J``) finds the image mounted and
watched and its devices without connections: it gives each device new sockets (``NBD_CMD_RECONFIGURE``) and
serves the requests the kernel held meanwhile.

SIGTERM/SIGINT: it unmounts if the mountpoint still shows the image — plainly, else detached, serving on until
the files open there close (:class:`~.watch.ImageWatch`).  A worker that fails after its start leaves the
devices connected (for the next one); only a release, or a failed first start, disconnects them.  Devices left
by a daemon that died for good are disconnected by ``nydus-erofs umount`` (:mod:`.nbddevices`).
"""

from __future__ import annotations

import argparse
import errno
import faulthandler
import json
import logging
import os
import select
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from erofs.errors import BackendError, NydusErofsError, UsageError
from erofs.paths import process_start_time
from fscache.errors import FscacheError
from fscache.inotify import Inotify
from fscache.mount import MountError
from fscache.nbd import Nbd, NbdIoctl, open_nbd

from ..backends import BlobBackend, make_backend
from ..blob_handles import open_image
from ..logfilter import daemon_logging
from ..pipeline import Pipeline
from .cachefile import CacheFile, prepare_cache_files
from .localmount import mount_over_block_devices
from .nbdserver import BlobDevice
from .ready import OK, error_line, report
from .record import initial_record, read_record, record_path, write_record
from .spec import MountSpec, read_spec_fd
from .watch import ImageWatch

__all__ = ["main", "run_nbd_daemon"]

log = logging.getLogger(__name__)


def run_nbd_daemon(spec: MountSpec, *, ready_fd: int | None, inotify_fd: int | None = None, restart: int = 0,
                   devices_at: Sequence[int] = (), supervisor_pid: int | None = None) -> int:  # fmt: skip
    """Serve, mount, report readiness on ``ready_fd``, serve until the image is released (``spec`` resolved, its
    mode nbd).  A startup failure is reported as one line on ``ready_fd`` and raised.  ``restart`` > 0: the
    image is mounted and watched (``inotify_fd``) already, over ``devices_at`` (their indexes, one per blob), by a
    worker that died: reconnect them.  ``supervisor_pid``: the supervisor, named in the record."""
    boot, mountpoint, cache_dir = Path(spec.boot), Path(spec.mountpoint), Path(spec.cache_dir)
    record = record_path(mountpoint)
    adopted = restart > 0
    files: list[CacheFile] = []
    devices: list[BlobDevice] = []
    backend: BlobBackend | None = None
    nbd: Nbd | None = None
    inotify = Inotify() if inotify_fd is None else Inotify.from_fd(inotify_fd)
    watch: ImageWatch | None = None
    release_devices = not adopted  # a failed first start disconnects what it connected; a restart never
    pipeline = Pipeline(amplify=spec.amplify, workers=spec.workers, fill_timeout=spec.fill_timeout)
    wake_r, wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
    stopping: list[int] = []

    def on_signal(signum: int, frame: object) -> None:
        stopping.append(signum)

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    old_wakeup = signal.set_wakeup_fd(wake_w)
    me = os.getpid()
    try:
        try:
            try:
                backend = make_backend(spec.backend, **spec.backend_config)
            except BackendError as e:
                raise UsageError(f"backend {spec.backend}: {e}") from None
            if adopted:
                watch = ImageWatch.inherited(inotify, mountpoint)
                if watch is None:
                    raise UsageError(f"{mountpoint} was unmounted and released")
            handles = open_image(boot, backend)
            if not handles:
                raise UsageError(f"{boot}: the image has no data blobs: mount it directly")
            if adopted and len(devices_at) != len(handles):
                raise UsageError(f"{len(devices_at)} NBD devices for the {len(handles)} blobs of {boot}")
            files = prepare_cache_files(cache_dir, handles)
            nbd = open_nbd()
            for n, cf in enumerate(files):
                devices.append(BlobDevice(cf, pipeline, nbd, connections=spec.workers,
                                          index=devices_at[n] if adopted else None))  # fmt: skip
            owner = me
            if supervisor_pid is not None:
                if os.getppid() != supervisor_pid:
                    raise MountError(errno.ESRCH, f"the supervisor (pid {supervisor_pid}) is gone")
                owner = supervisor_pid
            if adopted:
                earlier = read_record(mountpoint) or {}
                source, nbd_pid = earlier.get("source"), earlier.get("nbd_pid")
            else:
                source = mount_over_block_devices(str(boot), str(mountpoint), [d.path for d in devices],
                                                  allow_suid=spec.allow_suid, allow_dev=spec.allow_dev)  # fmt: skip
                watch = ImageWatch.add(inotify, mountpoint)
                nbd_pid = me
            data = dict(initial_record(spec), pid=owner, start_time=process_start_time(owner), source=source,
                        blobs=[cf.handle.blob_id for cf in files], nbd=[d.path for d in devices], nbd_pid=nbd_pid,
                        nbd_ioctl=isinstance(nbd, NbdIoctl))  # fmt: skip
            if supervisor_pid is not None:
                data.update(worker_pid=me, worker_start_time=process_start_time(me), restarts=restart)
            write_record(record, data)
        except BaseException as e:
            report(ready_fd, error_line(e))
            if watch is not None and not adopted:
                watch.unmount()
            raise
        report(ready_fd, OK)
        release_devices = False  # from now on a failure leaves them to the next worker
        log.info("serving %s on %s (%d blobs over NBD%s)", boot, mountpoint, len(files),
                 f", restart {restart}" if adopted else "")  # fmt: skip
        poll = select.poll()
        poll.register(watch.fileno(), select.POLLIN)
        poll.register(wake_r, select.POLLIN)
        while not watch.released():
            if stopping:
                watch.unmount()
                if watch.released():
                    break
                watch.log_linger("stopping", "serving it")
                stopping.clear()
            poll.poll()
            try:
                os.read(wake_r, 512)
            except BlockingIOError:
                pass
        release_devices = True
        stats = _stats(devices, pipeline)
        try:
            if (read_record(mountpoint) or {}).get("pid") == data["pid"]:  # not removed, nor a new mount's by now
                write_record(record, dict(data, stats=stats, stopped=True))
        except (OSError, ValueError, NydusErofsError) as e:
            log.error("cannot write final stats to %s: %s", record, e)
        log.info("stopped: %s", json.dumps(stats["pipeline"]))
    finally:
        for d in devices:
            if release_devices:
                d.disconnect()
            else:
                d.hang_up()
        pipeline.close()
        for cf in files:
            cf.close()
        for closable in (nbd, inotify, backend):
            if closable is not None:
                closable.close()
        signal.set_wakeup_fd(old_wakeup)
        os.close(wake_r)
        os.close(wake_w)
        for s, h in old.items():
            signal.signal(s, h)
    return 0


def _stats(devices: Sequence[BlobDevice], pipeline: Pipeline) -> dict[str, Any]:
    return {"pipeline": pipeline.stats.snapshot(), "devices": [d.stats() for d in devices]}


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m cachefilesd_py.mount.nbddaemon", description=__doc__.splitlines()[0])
    ap.add_argument("--spec-fd", type=int, required=True, help="Inherited fd holding the mount spec (JSON)")
    ap.add_argument("--ready-fd", type=int, default=None)
    ap.add_argument("--inotify-fd", type=int, default=None, help="Inherited inotify instance (the supervisor's)")
    ap.add_argument("--restart", type=int, default=0, help="Restart number of this worker (0: the first)")
    ap.add_argument("--devices", default="", help="The NBD device indexes to reconnect (a restart), comma-separated")
    ap.add_argument("--supervisor-pid", type=int, default=None)
    args = ap.parse_args(argv)
    try:
        spec = read_spec_fd(args.spec_fd)
    except (NydusErofsError, OSError) as e:
        report(args.ready_fd, error_line(e))
        return 1
    daemon_logging(spec.log_level, "%(asctime)s %(name)s %(levelname)s: %(message)s")
    faulthandler.register(signal.SIGUSR1, file=sys.stderr, all_threads=True)
    try:
        run_nbd_daemon(spec, ready_fd=args.ready_fd, inotify_fd=args.inotify_fd, restart=args.restart,
                       devices_at=[int(i) for i in args.devices.split(",") if i],
                       supervisor_pid=args.supervisor_pid)  # fmt: skip
    except (NydusErofsError, FscacheError, OSError, ValueError) as e:  # reported on --ready-fd already
        log.error("%s", e)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

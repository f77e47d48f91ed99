"""The mount daemon's worker: the process that serves a fanotify mount (``python -m cachefilesd_py.mount.worker``).

It loads the image, prepares the cache files and marks them (on the group inherited from the supervisor),
mounts the bootstrap file-backed with ``device=<cache files>``, adds the :class:`~.watch.ImageWatch`, writes the
runtime record (``pid``: the supervisor, ``worker_pid``: itself), reports ``ok`` (or a one-line error) on the
ready pipe and serves until the image is released; then it exits with status 0 after writing its final stats
into the record (unless the record is not its own any more).  A plain umount thus ends it at once, a
``umount -l`` when the last file open there closes.  Once the image is released, before it waits for its fills to
end, it marks the record ``released``: a worker of a released image serves nobody, and a later mount of its
cache dir that finds it still running (its supervisor gone) may kill it.

SIGTERM/SIGINT: it unmounts if the mountpoint still shows the image: plainly when nothing is open there (the
release follows at once), else detached, logging one line (``stopping: MP is detached, serving it until its N
open files close``) and serving on until the release; a second signal changes nothing.  A restarted worker
(``--restart N``) finds the files marked and the image mounted (perhaps detached) and watched: it only reopens the
cache files (those fds, opened after the marks, are watched by the group: it writes through a dup of an event fd
instead, opened by the kernel without notification).  ``kill -USR1`` dumps its threads' stacks into the log.

Upgrade in place (:mod:`.upgrade`): SIGHUP makes a worker hand over: it stops reading events, finishes the fills
it took (each answers its event), flushes its chunk maps and exits with status 0, leaving the image mounted and
the events it did not read queued for the next worker; it writes no final record (the next worker's is the
mount's).  The next worker (``--takeover-fd``) is one that starts as a restarted one would, but reports ``ok``
once its image and backend are loaded and then waits for one byte on that fd (the old worker is gone) before it
opens the cache files and serves: two workers never read the same group at once (the kernel matches an answer
by the event fd's *number*, which two processes could both have).

Its arguments are file descriptors only: the :class:`~.spec.MountSpec` comes as JSON in ``--spec-fd`` (it may
carry credentials: never on a command line).  ``nydus-erofs mount --foreground`` runs :func:`run_daemon` in the
calling process, with no supervisor.
"""

from __future__ import annotations

import argparse
import errno
import faulthandler
import json
import logging
import os
import signal
import socket
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from erofs.errors import BackendError, NydusErofsError, UsageError
from erofs.paths import process_start_time
from fscache.errors import FscacheError, PreContentUnsupportedError, UnsupportedFilesystemError
from fscache.fanotify import FanotifyGroup
from fscache.inotify import Inotify
from fscache.mount import MountError, mount_erofs_file_backed, set_mount_readahead

from ..backends import BlobBackend, make_backend
from ..blob_handles import open_image
from ..logfilter import daemon_logging
from ..pipeline import Pipeline
from .api import MountApi
from .cachefile import CacheFile, prepare_cache_files
from .evict import CacheLimit
from .prefetch import start_prefetch, stop_prefetch
from .ready import OK, error_line, report
from .record import api_path, initial_record, listen_api, record_path, write_record
from .server import FanotifyServer
from .spec import MountSpec, read_spec_fd
from .trace import start_trace
from .watch import ImageWatch

__all__ = ["main", "run_daemon"]

log = logging.getLogger(__name__)


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None


def _mark_record(record: Path, who: str, me: int, data: dict[str, Any]) -> None:
    """Write ``data`` as the record, if it is still ours (not removed, nor a new mount's by now)."""
    try:
        if (_read_json(record) or {}).get(who) == me:
            write_record(record, data)
    except (OSError, ValueError) as e:
        log.error("cannot write %s: %s", record, e)


def run_daemon(spec: MountSpec, *, ready_fd: int | None, group_fd: int | None = None, inotify_fd: int | None = None,
               restart: int = 0, supervisor_pid: int | None = None, takeover_fd: int | None = None,
               api_fd: int | None = None) -> int:  # fmt: skip
    """Prepare, mark, mount, watch the mount (:class:`ImageWatch`), report readiness on ``ready_fd`` and serve
    until the image's filesystem is released; ``spec`` is resolved, its mode fanotify.

    SIGTERM/SIGINT unmount: plainly if nothing is open there (the filesystem is released at once), else the
    mount is detached and served until its last open file closes; a second signal changes nothing.

    ``group_fd``, ``inotify_fd``: the fanotify group and the inotify instance, inherited from the supervisor
    (the record then names the supervisor as ``pid`` and this process as ``worker_pid``);
    ``restart`` > 0: the files are marked and the image mounted (perhaps detached) and watched already, by a
    worker that died: serve them as they are.  ``supervisor_pid``: the supervisor's pid, for the record (never
    ``getppid()``: a worker whose supervisor died is re-parented, to init or a subreaper); a worker whose
    supervisor is gone before the record is written fails its start.  ``takeover_fd``: take over from a worker
    handing over (see the module's docstring): report ``ok`` once the image is loaded, then wait on this fd.
    ``api_fd``: the API's listening socket, the supervisor's (:mod:`.api`); without a supervisor, the worker
    listens itself.

    Every startup failure is reported as one line on ``ready_fd`` (:func:`error_line`) and raised.  On exit the
    final stats go into the runtime record, for ``umount`` (unless the record is another daemon's by then).
    Returns the signal that stopped it, or 0 when the image was released by an umount.
    """
    boot, mountpoint, cache_dir = Path(spec.boot), Path(spec.mountpoint), Path(spec.cache_dir)
    amplify, workers = spec.amplify, spec.workers
    record = record_path(mountpoint)
    files: list[CacheFile] = []
    server: FanotifyServer | None = None
    watch: ImageWatch | None = None
    backend: BlobBackend | None = None
    group = None if group_fd is None else FanotifyGroup.from_fd(group_fd)
    inotify = None if inotify_fd is None else Inotify.from_fd(inotify_fd)
    adopted = restart > 0 or takeover_fd is not None
    pipeline = Pipeline(amplify=amplify, workers=workers, fill_timeout=spec.fill_timeout)
    api_sock: socket.socket | None = None
    try:
        try:
            try:
                backend = make_backend(spec.backend, **spec.backend_config)
            except BackendError as e:  # bad options: a usage error, as `nydus-erofs mount` says before starting us
                raise UsageError(f"backend {spec.backend}: {e}") from None
            if inotify is None:
                inotify = Inotify()
            if adopted:
                watch = ImageWatch.inherited(inotify, mountpoint)
                if watch is None:
                    raise UsageError(f"{mountpoint} was unmounted and released")
            handles = open_image(boot, backend)
            if not handles:
                raise UsageError(f"{boot}: the image has no data blobs: mount it directly")
            if takeover_fd is not None:  # ready to take over; the cache files once the old worker is gone
                report(ready_fd, OK)
                ready_fd = None
                await_takeover(takeover_fd)
            files = prepare_cache_files(cache_dir, handles, marked=adopted)
            limit = CacheLimit(files, spec.cache_size_limit) if spec.cache_size_limit else None
            server = FanotifyServer(files, pipeline, workers=workers, readahead=spec.readahead, group=group,
                                    adopted=adopted, limit=limit)  # fmt: skip
            if limit is not None:  # a warm cache over the limit (a lower one than last time)
                limit.shrink()
            if not adopted:
                mount_erofs_file_backed(boot, mountpoint, [cf.path for cf in files], allow_suid=spec.allow_suid,
                                        allow_dev=spec.allow_dev)  # fmt: skip
                watch = ImageWatch.add(inotify, mountpoint)
                # events as big as a fetch: one round trip per amplification window rather than per 128 KiB
                set_mount_readahead(mountpoint, min(max(amplify >> 10, 128), 1024))
        except UnsupportedFilesystemError as e:
            raise UsageError(f"cache dir {cache_dir}: {e}") from None
        except PreContentUnsupportedError as e:
            raise UsageError(f"{e} (use --mode full)") from None
        me = os.getpid()
        owner = me  # umount stops the process named here: the supervisor, if there is one
        if group_fd is not None:
            if supervisor_pid is None or os.getppid() != supervisor_pid:
                raise MountError(errno.ESRCH, f"the supervisor (pid {supervisor_pid}) is gone")  # a daemon failure
            owner = supervisor_pid
        api_sock = socket.socket(fileno=api_fd) if api_fd is not None else listen_api(mountpoint)
        data = dict(initial_record(spec), pid=owner, start_time=process_start_time(owner),
                    blobs=[cf.handle.blob_id for cf in files],
                    api_sock=str(api_path(mountpoint)) if api_sock is not None else None)  # fmt: skip
        if group_fd is not None:
            data.update(worker_pid=me, worker_start_time=process_start_time(me), restarts=restart)
        write_record(record, data)
    except BaseException as e:
        report(ready_fd, error_line(e))
        if watch is not None and not adopted:  # mounted by us: nobody has used it yet
            watch.unmount()  # (a supervisor serves what a detach leaves until it is released)
        if server is not None:
            server.close(deny_queued=not adopted)  # a restarted worker leaves the queue to the next one
        elif group is not None:
            group.close()
        for cf in files:
            cf.close()
        pipeline.close()
        if inotify is not None:
            inotify.close()
        if backend is not None:
            backend.close()
        _close_api(api_sock, api_fd, mountpoint)
        raise
    assert watch is not None and inotify is not None and server is not None and backend is not None

    stopped_by: list[int] = []
    handing_over: list[int] = []

    def on_signal(signum: int, frame: object) -> None:
        (handing_over if signum == signal.SIGHUP else stopped_by).append(signum)
        server.stop()

    handled = (signal.SIGTERM, signal.SIGINT, *((signal.SIGHUP,) if group_fd is not None else ()))
    old = {s: signal.signal(s, on_signal) for s in handled}
    # the access trace and the prefetch start once a stop signal is handled (so it always ends in final stats)
    trace = start_trace(mountpoint, boot, resume=adopted)
    try:
        prefetcher = start_prefetch(spec, files, server, pipeline)
    except (NydusErofsError, OSError) as e:  # the image was checked already: this is not worth failing the mount
        log.warning("no prefetch: %s", e)
        prefetcher = None
    mount_api = MountApi(spec, files, server, pipeline, backend, restarts=restart, supervisor_pid=supervisor_pid)
    mount_api.prefetcher = prefetcher
    api = mount_api.serve(api_sock) if api_sock is not None else None
    report(ready_fd, OK)
    log.info("serving %s on %s (%d blobs)", boot, mountpoint, len(files))
    try:
        while not server.serve(watch):  # a stop signal: unmount; if files are open there, serve until they close
            if handing_over:  # (a supervisor's worker) the next worker serves the mount as it is
                log.info("handing over: finishing the fills under way")
                server.finish()
                break
            watch.unmount()
            if not watch.released():
                watch.log_linger("stopping", "serving it")
    finally:
        # a failure: a supervisor starts the next worker on the mount as it is; alone, unmount (detached if busy)
        if group_fd is None and not watch.released():
            watch.unmount()
        mount_api.state = "STOPPING"
        if api is not None:
            api.stop()
        _close_api(api_sock, api_fd, mountpoint)
        prefetch_stats = stop_prefetch(prefetcher, mountpoint) if prefetcher is not None else None
        stats = server.stats()
        who = "worker_pid" if group_fd is not None else "pid"
        if watch.released():  # nothing reads through the marks: a `mount` finding us stuck below may kill us
            _mark_record(record, who, me, dict(data, released=True))
        if prefetch_stats is not None:
            stats["prefetch"] = prefetch_stats
        if trace is not None:
            trace.stop()
            stats["trace"] = trace.stats()
        server.close(deny_queued=not handing_over)
        pipeline.close()
        for cf in files:
            cf.close()
        if backend is not None:
            backend.close()
        inotify.close()
        if handing_over:
            log.info("handed over: %s", json.dumps(stats["pipeline"]))
        else:
            _mark_record(record, who, me, dict(data, stats=stats, stopped=True))
            log.info("stopped: %s", json.dumps(stats["pipeline"]))
        for s, h in old.items():  # only now: a late SIGTERM must not cut the final record short
            signal.signal(s, h)
    return stopped_by[0] if stopped_by and not handing_over else 0


def await_takeover(fd: int) -> None:
    """Wait for the supervisor's go (one byte on ``fd``: the old worker is gone); closes ``fd``.  MountError when
    the supervisor gave up the upgrade (end of file)."""
    try:
        while True:
            try:
                got = os.read(fd, 1)
                break
            except InterruptedError:
                continue
    finally:
        os.close(fd)
    if not got:
        raise MountError(errno.ECANCELED, "the supervisor called the upgrade off")


def _close_api(sock: socket.socket | None, api_fd: int | None, mountpoint: Path) -> None:
    """Close the API socket; one this worker listened on itself (no supervisor) is removed too."""
    if sock is None:
        return
    sock.close()
    if api_fd is None:
        try:
            api_path(mountpoint).unlink()
        except FileNotFoundError:
            pass


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m cachefilesd_py.mount.worker", description=__doc__.splitlines()[0])
    ap.add_argument("--spec-fd", type=int, required=True, help="Inherited fd holding the mount spec (JSON)")
    ap.add_argument("--ready-fd", type=int, default=None)
    ap.add_argument("--group-fd", type=int, default=None, help="Inherited fanotify group")
    ap.add_argument("--inotify-fd", type=int, default=None, help="Inherited inotify instance")
    ap.add_argument("--restart", type=int, default=0, help="Restart number of this worker (0: the first)")
    ap.add_argument("--supervisor-pid", type=int, default=None, help="The supervisor's pid")
    ap.add_argument("--takeover-fd", type=int, default=None, help="Take over from a worker handing over")
    ap.add_argument("--api-fd", type=int, default=None, help="Inherited listening socket of the API")
    args = ap.parse_args(argv)
    try:
        spec = read_spec_fd(args.spec_fd)
    except (NydusErofsError, OSError) as e:
        report(args.ready_fd, error_line(e))
        return 1
    daemon_logging(spec.log_level, "%(asctime)s %(name)s %(levelname)s: %(message)s")
    faulthandler.register(signal.SIGUSR1, file=sys.stderr, all_threads=True)  # `kill -USR1`: thread stacks to the log
    try:
        run_daemon(spec, ready_fd=args.ready_fd, group_fd=args.group_fd, inotify_fd=args.inotify_fd,
                   restart=args.restart, supervisor_pid=args.supervisor_pid, takeover_fd=args.takeover_fd,
                   api_fd=args.api_fd)  # fmt: skip
    except (NydusErofsError, FscacheError, OSError, ValueError) as e:  # reported on --ready-fd already
        log.error("%s", e)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""``nydus-erofs mount`` / ``umount`` as library calls: choose the mode, start or stop the daemon.

Modes (:func:`select_mode`; ``--mode fscache`` binds the image in cachefilesd-py and mounts ``-o fsid=``:
:mod:`cachefilesd_py.fscache_mount`, whose mounts :func:`umount_image` also unmounts and unbinds):

- ``fanotify``: lazy; a daemon (:mod:`.supervisor` and its :mod:`.worker`) marks sparse blob cache files,
  mounts the bootstrap file-backed with ``device=<cache files>`` and fills what readers touch (Linux >= 6.14).
- ``full``: every blob is fetched (verified) into its cache file first, then the image is mounted; no daemon.
- ``nbd``: lazy; a daemon (:mod:`.nbdsupervisor` and its :mod:`.nbddaemon`) serves each blob as an NBD device and
  mounts the bootstrap (over a loop device) with ``device=/dev/nbdN``, for kernels with NBD but no pre-content
  events.
- ``auto``: fanotify when the kernel has pre-content events, else nbd when it has NBD, else full.

:func:`mount_image` starts the supervisor with the :class:`~.spec.MountSpec` in an inherited memfd and waits for
its readiness line (:mod:`.ready`); the runtime record (:mod:`.record`) names the supervisor (``pid``) and the
worker (``worker_pid``). :func:`umount_image` unmounts, stops the supervisor, which stops its worker (SIGTERM, then
waits for it through a pidfd) and returns the worker's final stats; a daemon that does not stop in time is killed,
worker and supervisor both (a worker left behind would keep its marks on the cache files, and every later read of
them would wait for it). A mount finds the daemons of earlier mounts of its cache dir whose image is gone from the
mount table and whose supervisor died (a worker orphaned by a ``kill -9``): it kills them rather than share cache
files with a process that answers no event (:func:`reap_stale`). It never detaches: a mount with files open there
is an error (EBUSY) and stays served. A mount detached by other means (``umount -l``) lives on while files are open
on it, and its daemon serves them until they close: :func:`umount_image` then waits for it, and when it does not
exit in time says so, without killing it (the holes of those files would read as zeros).
"""

from __future__ import annotations

import dataclasses
import errno
import json
import logging
import os
import select
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from erofs.errors import BackendError, UsageError
from erofs.progress import ProgressCallback
from erofs.reader.bootstrap import Bootstrap
from fscache.errors import PreContentUnsupportedError, UnsupportedFilesystemError
from fscache.mount import MountError, filesystem_name, is_mounted, top_mount, umount
from fscache.nbd import why_no_nbd

from ..backends import make_backend
from ..blob_handles import blob_order, open_image
from ..pipeline import Pipeline
from .cachefile import check_cache_path, fill_all, prepare_cache_files, probe_pre_content
from .evict import check_whole_image_fits
from .localmount import mount_files
from .nbddevices import release_stale_devices
from .ready import OK, daemon_error, read_line
from .record import (
    NBD_MODULE,
    SUPERVISOR_MODULE,
    all_records,
    api_path,
    initial_record,
    is_daemon,
    live_worker,
    log_path,
    prefetch_progress_path,
    read_record,
    record_path,
    run_dir,
    trace_path,
    write_record,
)
from .spec import FSCACHE_MODE, MODES, MountSpec, spec_fd

__all__ = ["list_mounts", "mount_image", "select_mode", "umount_image"]

log = logging.getLogger(__name__)


# -- mode selection -----------------------------------------------------------------------------------------------
def check_cache_dir(cache_dir: Path, mode: str) -> None:
    fs = filesystem_name(cache_dir)
    if fs is not None and mode == "fanotify":
        raise UsageError(
            f"cache dir {cache_dir} is on {fs}, which has no fanotify pre-content events: "
            "use a directory on ext4, xfs or btrfs (or --mode full)"
        )


def select_mode(mode: str, cache_dir: Path) -> str:
    """The mode to use for ``mode`` (``auto`` resolved), or UsageError saying why it cannot be had."""
    if mode not in MODES:
        raise UsageError(f"unknown mode {mode!r} (expected one of: {', '.join(MODES)})")
    if mode == "full":
        return mode
    if mode == "nbd":
        if why := why_no_nbd():
            raise UsageError(f"--mode nbd: {why} (use --mode full)")
        return mode
    cache_dir.mkdir(parents=True, exist_ok=True)
    check_cache_dir(cache_dir, "fanotify")
    try:
        probe_pre_content(cache_dir)
    except UnsupportedFilesystemError as e:
        raise UsageError(f"cache dir {cache_dir}: {e}") from None
    except PreContentUnsupportedError as e:
        if mode == "fanotify":
            raise UsageError(f"--mode fanotify: {e} (use --mode full)") from None
        if why_no_nbd() is None:
            log.info("no fanotify pre-content events (%s): mounting in nbd mode", e)
            return "nbd"
        log.info("no fanotify pre-content events (%s): mounting in full mode", e)
        return "full"
    return "fanotify"


# -- mount --------------------------------------------------------------------------------------------------------
def mount_image(spec: MountSpec, *, foreground: bool = False,
                progress: ProgressCallback | None = None) -> dict[str, Any]:  # fmt: skip
    """Mount ``spec``; returns the runtime record (``mode``, ``pid`` of the daemon, ``log``: the daemon's log).

    In the foreground (fanotify mode) the daemon runs in this process and this call returns after umount, or
    after a SIGINT/SIGTERM, which the record's ``stopped_by`` then names.  In full mode ``progress`` is told the
    bytes of each range fetched or found in the cache (the blobs' uncompressed sizes add up to the total).
    """
    given = spec
    spec = spec.resolved()
    boot_p, mp, cache = Path(spec.boot), Path(spec.mountpoint), Path(spec.cache_dir)
    if not boot_p.is_file():
        raise UsageError(f"bootstrap {given.boot} is not a file")
    if not mp.is_dir():
        raise UsageError(f"mountpoint {given.mountpoint} is not a directory")
    if is_mounted(mp, None) or read_record(mp) is not None:
        rec = read_record(mp)
        if rec is not None and not is_mounted(mp, None):
            _check_orphan(mp, rec)
            _forget(mp, rec)  # stale record of a mount gone by other means
        else:
            raise UsageError(f"{mp} is already a mountpoint (nydus-erofs umount {mp} first)")
    if spec.backend == "localfs":
        _check_cache_not_blobs(cache, spec.backend_config)
    reap_stale(cache)
    _check_image_and_backend(spec)
    check_cache_path(cache)  # cache file paths go into the mount options (any mode: say it here, exit 2)
    spec = dataclasses.replace(spec, mode=select_mode(spec.mode, cache))
    if spec.mode != "fanotify":
        check_whole_image_fits(spec.cache_size_limit, spec.boot, spec.mode)
    run_dir().mkdir(parents=True, exist_ok=True)
    record = record_path(mp)
    data = initial_record(spec)
    if spec.mode == "full":
        data["source"] = _mount_full(spec, progress)
        data["pid"] = None
        try:
            write_record(record, data)
        except BaseException:  # a mount without its record could not be unmounted by us
            umount(mp)
            raise
        return data
    if foreground:
        data["log"] = None  # it logs to stderr
        data["stopped_by"] = _run_foreground(spec)
        return data
    return _start_daemon(spec, data, NBD_MODULE if spec.mode == "nbd" else SUPERVISOR_MODULE)


def _run_foreground(spec: MountSpec) -> int:
    """Serve ``spec`` in this process (``mount --foreground``) until umount; the signal that stopped it, or 0.
    The daemon's modules are imported only here: a mount that starts a daemon leaves them to its processes."""
    if spec.mode == "nbd":
        from .nbddaemon import run_nbd_daemon

        return run_nbd_daemon(spec, ready_fd=None)
    from .worker import run_daemon

    return run_daemon(spec, ready_fd=None)


def _start_daemon(spec: MountSpec, data: dict[str, Any], module: str = SUPERVISOR_MODULE) -> dict[str, Any]:
    """Start the supervisor (the spec in an inherited memfd, never on its command line) and wait until it says
    the worker serves."""
    mp = Path(spec.mountpoint)
    r, w = os.pipe2(os.O_CLOEXEC)
    log_file = log_path(mp)
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    try:
        sfd = spec_fd(spec)
        try:
            cmd = [sys.executable, "-m", module, "--spec-fd", str(sfd), "--ready-fd", str(w)]
            with open(log_file, "ab") as logf:
                proc = subprocess.Popen(
                    cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=logf, pass_fds=(w, sfd),
                    start_new_session=True, cwd="/", env=env,
                )  # fmt: skip
        finally:
            os.close(sfd)
    finally:
        os.close(w)
    try:
        status = read_line(r)
    except BaseException:  # Ctrl-C: stop the supervisor as umount would (it stops its worker and unmounts);
        _stop_unready(proc, mp, log_file)  # a SIGKILL orphaned the worker: it mounted after "aborted"
        raise
    if status == OK:
        data["pid"] = proc.pid
        data["log"] = str(log_file)
        written = read_record(mp) or {}
        data["worker_pid"] = written.get("worker_pid")
        data.update({key: written[key] for key in ("source", "nbd", "api_sock") if key in written})  # (nbd: devices)
        return data
    code = proc.wait()
    if status.startswith("error "):
        log_file.unlink(missing_ok=True)  # the error is the one line reported (the log holds only that line)
        raise daemon_error(status)
    raise MountError(errno.EIO, f"mount daemon exited with status {code} before mounting (log: {log_file})")


def _stop_unready(proc: subprocess.Popen[bytes], mp: Path, log_file: Path) -> None:
    """Stop a mount daemon that has not said it is ready; with nothing left mounted, its record and log go."""
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    if not is_mounted(mp):
        rec = read_record(mp)
        if rec is not None:
            _forget(mp, rec)
        log_file.unlink(missing_ok=True)


def _check_image_and_backend(spec: MountSpec) -> None:
    """A damaged bootstrap or bad backend options fail here, with their own error, not in the daemon."""
    with Bootstrap(spec.boot) as bs:
        blob_order(bs)  # a Nydus bootstrap, blob and device tables agreeing
    try:
        make_backend(spec.backend, **spec.backend_config).close()
    except BackendError as e:  # making a backend does no I/O: its options are wrong
        raise UsageError(f"--backend-config: {e}") from None


def _check_cache_not_blobs(cache: Path, config: dict[str, Any]) -> None:
    """The cache files (CACHE/<blob id>, sparse, resized) must never be the localfs blob files themselves."""
    dirs = [config.get("dir"), config.get("blob_dir"), *(config.get("alt_dirs") or ())]
    for d in dirs:
        if isinstance(d, str | os.PathLike) and cache.is_dir() and os.path.isdir(d) and os.path.samefile(cache, d):
            raise UsageError(f"--cache-dir {cache} is the blob directory: its cache files would overwrite the blobs")


def _mount_full(spec: MountSpec, progress: ProgressCallback | None) -> str:
    be = make_backend(spec.backend, **spec.backend_config)
    files = []
    try:
        with Pipeline(amplify=max(spec.amplify, 1 << 20), workers=spec.workers,
                      fill_timeout=spec.fill_timeout) as pipeline:  # fmt: skip
            files = prepare_cache_files(Path(spec.cache_dir), open_image(spec.boot, be))
            fill_all(files, pipeline, progress)
        return mount_files(spec.boot, spec.mountpoint, [str(cf.path) for cf in files], file_backed=spec.file_backed,
                           allow_suid=spec.allow_suid, allow_dev=spec.allow_dev)  # fmt: skip
    finally:
        for cf in files:
            cf.close()
        be.close()


# -- list ------------------------------------------------------------------------------------------------------
def list_mounts() -> list[dict[str, Any]]:
    """The mounts nydus-erofs made, from their runtime records: ``mountpoint``, ``mode``, ``boot``, ``cache_dir``,
    ``backend``, ``pid``, ``log`` and ``state``: ``serving`` (a daemon serves it), ``mounted`` (full mode, nothing
    to serve), ``daemon gone`` (mounted, but no daemon: reads of data not yet cached fail), ``stopped`` (the
    daemon stopped: detached by other means, or being unmounted) or ``not mounted`` (a stale record)."""
    out = []
    for rec in all_records():
        mp = rec["mountpoint"]
        mounted = is_mounted(mp)
        if rec.get("pid") and is_daemon(rec):
            state = "serving" if mounted or not rec.get("stopped") else "stopped"
        elif mounted:
            state = "mounted" if rec.get("mode") == "full" else "daemon gone"
        else:
            state = "stopped" if rec.get("stopped") else "not mounted"
        lp = log_path(mp)
        out.append({"mountpoint": mp, "mode": rec.get("mode"), "boot": rec.get("boot"),
                    "cache_dir": rec.get("cache_dir"), "backend": rec.get("backend"), "pid": rec.get("pid"),
                    "state": state, "log": str(lp) if lp.exists() else None})  # fmt: skip
    return out


# -- umount -------------------------------------------------------------------------------------------------------
def _wait_exit(pid: int, timeout: float | None) -> bool:
    """Wait for process ``pid`` to exit (a pidfd, no polling); reap it if it is our child."""
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        p = select.poll()
        p.register(pidfd, select.POLLIN)
        done = bool(p.poll(None if timeout is None else int(timeout * 1000)))
    finally:
        os.close(pidfd)
    if done:
        try:
            os.waitpid(pid, 0)
        except ChildProcessError:
            pass
    return done


def _kill(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:  # exited meanwhile
        pass


def _forget(mp: Path, rec: dict[str, Any], timeout: float = 30.0) -> dict[str, Any]:
    """Stop what is left of the mount's daemons (its image is unmounted) and remove its record and log."""
    pid = rec.get("pid")
    if pid and is_daemon(rec):
        _kill(pid, signal.SIGTERM)
        _wait_exit(pid, timeout)
    elif pid:
        try:  # our child that exited by itself: reap it
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass
    rec = read_record(mp) or rec
    release_stale_devices(rec)  # an nbd daemon that was killed left its devices connected
    worker = live_worker(rec)
    if worker is not None:  # its supervisor is gone: the worker stops once its mount is gone, or now
        if rec.get("released"):  # it serves nobody: never wait for its fills
            _kill(worker, signal.SIGKILL)
            _wait_exit(worker, None)
        else:
            _kill(worker, signal.SIGTERM)
            _wait_exit(worker, timeout)
    for p in (record_path(mp), log_path(mp), trace_path(mp), prefetch_progress_path(mp), api_path(mp)):
        try:
            p.unlink()
        except FileNotFoundError:
            pass
    return rec


def umount_image(mountpoint: str | os.PathLike[str], *, timeout: float = 30.0) -> dict[str, Any]:
    """Unmount, stop the mount's daemon and wait for it; returns the record with the daemon's final ``stats``."""
    mp = Path(mountpoint).resolve()
    rec = read_record(mp)
    if rec is None:  # whatever is mounted there is someone else's: leave it alone
        why = " (an EROFS mount it has no record of: use umount(8))" if is_mounted(mp) else ""
        raise UsageError(f"{mp} is not mounted by nydus-erofs{why}")
    top = top_mount(mp)
    source = rec.get("source") or rec.get("boot")  # a loop device when mounted over loop devices
    if top is not None and (top.fstype, top.source) != ("erofs", source):  # ours is gone (or under it)
        raise UsageError(f"{mp}: {top.fstype} {top.source} is mounted there, not the image nydus-erofs mounted: "
                         "left alone")  # fmt: skip
    mounted = top is not None
    if mounted:
        umount(mp)  # never lazily: EBUSY when files are open there, and the daemon serves on
    pid = rec.get("pid")
    if pid and is_daemon(rec):  # (it also stops by itself once the image is released)
        _kill(pid, signal.SIGTERM)
        if not _wait_exit(pid, timeout):
            if not mounted:  # detached by other means and still in use: it serves those files until they close
                raise MountError(errno.EBUSY, f"{mp} was detached but files are still open on it: daemon {pid} "
                                 "serves them until they close, then exits "
                                 f"(log: {log_path(mp)})")  # fmt: skip
            _kill(pid, signal.SIGUSR1)  # the daemon dumps its threads' stacks into its log
            _wait_exit(pid, 1.0)
            worker = live_worker(read_record(mp) or rec)
            if worker is not None:  # first: its supervisor denies what it held, sees the release and exits
                _kill(worker, signal.SIGKILL)
                _wait_exit(worker, None)
            _kill(pid, signal.SIGKILL)
            _wait_exit(pid, None)
            _forget(mp, rec)
            raise MountError(errno.ETIMEDOUT, f"daemon {pid} did not stop within {timeout:g}s: killed "
                             f"(log: {log_path(mp)})")  # fmt: skip
    rec = _forget(mp, rec)
    if rec.get("mode") != FSCACHE_MODE:
        return rec
    from ..fscache_mount import unbind  # (its API client: fscache mode only)

    return unbind(rec)  # the image bound in cachefilesd-py


def reap_stale(cache: Path) -> None:
    """Deal with the workers left by earlier mounts of ``cache`` whose supervisor is gone and whose image is not in
    the mount table: such a worker keeps its marks on the cache files, and a worker stuck on its fills would
    answer no event of ours (every read of the new mount would wait for it).  One whose image is released
    (its record says so) serves nobody: it is killed.  One whose image is not released (a detached mount with
    open files, or a fill the kernel still waits for) is refused with an error naming it, never waited for:
    killing it would let the kernel read its holes as zeros."""
    try:
        records = sorted(run_dir().glob("*.json"))
    except OSError:
        return
    for path in records:
        try:
            rec = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if not isinstance(rec, dict) or rec.get("cache_dir") != os.fspath(cache) or rec.get("stopped"):
            continue
        mp = Path(rec.get("mountpoint") or "/nonexistent")
        if is_mounted(mp, None) or is_daemon(rec) or live_worker(rec) is None:
            continue
        _check_orphan(mp, rec)
        log.warning("%s: worker %s of an earlier mount of %s outlived its supervisor and its image: killed",
                    cache, rec.get("worker_pid"), mp)  # fmt: skip
        _forget(mp, rec)


def _check_orphan(mp: Path, rec: dict[str, Any]) -> None:
    """UsageError if the record's worker runs on without its supervisor and its image is not released."""
    worker = live_worker(rec)
    if worker is None or is_daemon(rec) or (read_record(mp) or rec).get("released"):
        return
    raise UsageError(f"worker {worker} of an earlier mount of {mp} on cache dir {rec.get('cache_dir')} outlived its "
                     "supervisor and still waits on its image (a detached mount with open files, or a stuck fill): "
                     f"its marks hold the cache files; kill {worker}, or use another --cache-dir")  # fmt: skip

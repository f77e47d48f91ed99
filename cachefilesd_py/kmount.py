"""Mounting Nydus images with the kernel's EROFS: ``nydus-erofs mount`` / ``umount`` as library calls.

Modes (:func:`mount_image`):

- ``fanotify``: lazy; a daemon process (:mod:`cachefilesd_py.fanotify_mount`) marks sparse blob cache files,
  mounts the bootstrap file-backed with ``device=<cache files>`` and fills what readers touch (Linux >= 6.14).
- ``full``: every blob is fetched (verified) into its cache file first, then the image is mounted; no daemon.
- ``fscache``: served by the cachefilesd-py daemon by fsid (``mount -t erofs -o fsid=...``), not by this
  command; asking for it here is an error that says so.
- ``auto``: fanotify when the kernel has pre-content events, else full.

The fanotify daemon is two processes: a supervisor holding the fanotify group, and the worker serving it,
which the supervisor restarts if it dies (see :class:`cachefilesd_py.fanotify_mount.Supervisor`).

A runtime record per mountpoint (``$NYDUS_EROFS_RUN_DIR`` or ``/run/nydus-erofs/mounts``,
``<sha256 of the mountpoint>.json``) holds the supervisor's pid (``pid``) and the worker's (``worker_pid``);
:func:`umount_image` unmounts, stops the supervisor, which stops its worker (SIGTERM, then waits for it
through a pidfd) and returns the worker's final stats.  It never detaches: a mount with files open there is an
error (EBUSY) and stays served.  A mount detached by other means (``umount -l``) lives on while files are open on
it, and its daemon serves them until they close: :func:`umount_image` then waits for it, and when it does not exit
in time says so, without killing it (the holes of those files would read as zeros).

mount(2) is called directly through ctypes: util-linux ``mount`` attaches a loop device, which breaks
``device=<regular file>`` of file-backed EROFS mounts.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import json
import logging
import os
import select
import signal
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from erofs.errors import BackendError, ImageError, NydusErofsError, UsageError
from erofs.paths import process_start_time
from fscache.errors import PreContentUnsupportedError, UnsupportedFilesystemError

__all__ = [
    "MODES",
    "MountError",
    "is_mounted",
    "mount_erofs_file_backed",
    "mount_image",
    "record_path",
    "run_dir",
    "select_mode",
    "umount",
    "umount_image",
    "write_record",
]

log = logging.getLogger(__name__)

MODES = ("auto", "fscache", "fanotify", "full")
MS_RDONLY = 1
MNT_DETACH = 2
RUN_DIR_ENV = "NYDUS_EROFS_RUN_DIR"
DEFAULT_RUN_DIR = "/run/nydus-erofs/mounts"
_TMPFS_MAGIC = {0x01021994: "tmpfs", 0x858458F6: "ramfs"}

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]


class MountError(NydusErofsError, OSError):
    """mount(2) / umount2(2) failed, or the daemon did not start."""

    exit_code = 5

    def __str__(self) -> str:  # the message alone, without OSError's "[Errno N] "
        return self.strerror or super().__str__()


# -- syscalls -----------------------------------------------------------------------------------------------------
def mount_erofs_file_backed(boot: str | os.PathLike[str], mountpoint: str | os.PathLike[str],
                            devices: Sequence[str | os.PathLike[str]]) -> None:  # fmt: skip
    """mount(2) the bootstrap file read-only as EROFS with ``device=`` files, in device-table order."""
    paths = [os.path.realpath(d) for d in devices]
    for p in paths:
        if "," in p:
            raise UsageError(f"device path {p!r} contains a comma, which mount options cannot carry")
    opts = ",".join(f"device={p}" for p in paths)
    src, dst = os.path.realpath(boot), os.path.realpath(mountpoint)
    if _libc.mount(os.fsencode(src), os.fsencode(dst), b"erofs", MS_RDONLY, opts.encode()) != 0:
        err = ctypes.get_errno()
        hint = ""
        if err == errno.EINVAL:
            hint = " (not an EROFS image, or a kernel without file-backed EROFS mounts: Linux >= 6.12)"
        elif err == errno.ENODEV:
            hint = " (the kernel has no EROFS)"
        raise MountError(err, f"mount {src} on {dst}: {os.strerror(err)}{hint}")


def umount(mountpoint: str | os.PathLike[str], *, lazy: bool = False) -> None:
    """umount2(2); EBUSY is an error unless ``lazy`` (then the mount is detached)."""
    target = os.fsencode(os.path.realpath(mountpoint))
    if _libc.umount2(target, MNT_DETACH if lazy else 0) == 0:
        return
    err = ctypes.get_errno()
    hint = " (files are still open there)" if err == errno.EBUSY else ""
    raise MountError(err, f"umount {os.fsdecode(target)}: {os.strerror(err)}{hint}")


FS_IOC_GETFSSYSFSPATH = 0x80811501  # _IOR(0x15, 1, struct fs_sysfs_path { __u8 len; __u8 name[128]; })


def mount_bdi_name(mountpoint: str | os.PathLike[str]) -> str | None:
    """The backing-dev name of the filesystem mounted at ``mountpoint`` (``erofs-324`` for a file-backed
    EROFS mount, from its sysfs path ``erofs/erofs-324``), or None when the kernel does not say (< 6.8)."""
    import fcntl

    fd = os.open(mountpoint, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        buf = bytearray(129)
        fcntl.ioctl(fd, FS_IOC_GETFSSYSFSPATH, buf)
    except OSError:
        return None
    finally:
        os.close(fd)
    name = bytes(buf[1 : 1 + min(buf[0], 128)]).decode(errors="replace")
    return name.rsplit("/", 1)[-1] or None


def set_mount_readahead(mountpoint: str | os.PathLike[str], kib: int) -> bool:
    """Set the readahead window of the mount's backing-dev (``/sys/class/bdi/<name>/read_ahead_kb``).

    A file-backed EROFS mount reads its ``device=`` files in windows of this size, so in fanotify mode it is
    the size of each pre-content event: 1 MiB windows mean 8x fewer daemon round trips than the 128 KiB
    default.  Best effort: False when the kernel does not say which bdi the mount has.
    """
    name = mount_bdi_name(mountpoint)
    if not name or "/" in name or name.startswith("."):
        return False
    path = Path("/sys/class/bdi") / name / "read_ahead_kb"
    try:
        path.write_text(f"{int(kib)}\n")
    except OSError as e:
        log.info("cannot set %s: %s", path, e)
        return False
    return True


def _unescape(field: str) -> str:
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and i + 3 < len(field) and field[i + 1 : i + 4].isdigit():
            out.append(chr(int(field[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def is_mounted(mountpoint: str | os.PathLike[str], fstype: str | None = "erofs") -> bool:
    """Whether something (of ``fstype``) is mounted exactly at ``mountpoint`` in this mount namespace."""
    target = os.path.realpath(mountpoint)
    with open("/proc/self/mountinfo") as f:
        for line in f:
            parts = line.split(" - ", 1)
            fields = parts[0].split()
            if len(fields) >= 5 and _unescape(fields[4]) == target:
                if fstype is None or (len(parts) > 1 and parts[1].split()[0] == fstype):
                    return True
    return False


def _top_mount(mountpoint: str | os.PathLike[str]) -> tuple[str, str] | None:
    """(fstype, source) of what is mounted at ``mountpoint`` last (on top), or None."""
    target = os.path.realpath(mountpoint)
    top = None
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields, _, rest = line.partition(" - ")
            fields_l, rest_l = fields.split(), rest.split()
            if len(fields_l) >= 5 and len(rest_l) >= 2 and _unescape(fields_l[4]) == target:
                top = (rest_l[0], _unescape(rest_l[1]))
    return top


def filesystem_name(path: str | os.PathLike[str]) -> str | None:
    """'tmpfs'/'ramfs' when ``path`` is on one of those, else None."""
    libc_statfs = getattr(_libc, "statfs", None)
    if libc_statfs is None:  # pragma: no cover
        return None
    buf = ctypes.create_string_buffer(256)
    if libc_statfs(os.fsencode(path), buf) != 0:
        return None
    magic = int.from_bytes(buf.raw[:8], sys.byteorder)  # f_type is the first member (long)
    return _TMPFS_MAGIC.get(magic & 0xFFFFFFFF)


# -- runtime records ----------------------------------------------------------------------------------------------
def run_dir() -> Path:
    return Path(os.environ.get(RUN_DIR_ENV) or DEFAULT_RUN_DIR)


def record_path(mountpoint: str | os.PathLike[str]) -> Path:
    key = hashlib.sha256(os.fsencode(os.path.realpath(mountpoint))).hexdigest()[:32]
    return run_dir() / f"{key}.json"


def read_record(mountpoint: str | os.PathLike[str]) -> dict[str, Any] | None:
    try:
        return json.loads(record_path(mountpoint).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise MountError(errno.EIO, f"runtime record {record_path(mountpoint)}: {e}") from None


def write_record(path: Path, data: dict[str, Any]) -> None:
    """Write the record ``path`` whole or not at all: ``<path>.tmp`` renamed over it.  On a failure the temp file
    is removed, and an OSError (ENOSPC...) names ``path``: a write error by itself says no file."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        if isinstance(e, OSError) and not isinstance(e, NydusErofsError):
            raise OSError(e.errno, e.strerror or str(e), str(path)) from None
        raise


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
    if mode == "fscache":
        why = "no /dev/cachefiles on this kernel" if not os.path.exists("/dev/cachefiles") else (
            "fscache images are served by the cachefilesd-py daemon: put the image in its --images-dir and "
            "run `mount -t erofs -o fsid=NAME none MOUNTPOINT`"
        )  # fmt: skip
        raise UsageError(f"--mode fscache is not available through `nydus-erofs mount`: {why}")
    if mode == "full":
        return mode
    cache_dir.mkdir(parents=True, exist_ok=True)
    check_cache_dir(cache_dir, "fanotify")
    from .fanotify_mount import probe_pre_content

    try:
        probe_pre_content(cache_dir)
    except UnsupportedFilesystemError as e:
        raise UsageError(f"cache dir {cache_dir}: {e}") from None
    except PreContentUnsupportedError as e:
        if mode == "fanotify":
            raise UsageError(f"--mode fanotify: {e} (use --mode full)") from None
        log.info("no fanotify pre-content events (%s): mounting in full mode", e)
        return "full"
    return "fanotify"


# -- mount / umount -----------------------------------------------------------------------------------------------
def mount_image(boot: str | os.PathLike[str], mountpoint: str | os.PathLike[str], *, cache_dir: str | os.PathLike[str],
                backend: str = "localfs", backend_config: dict[str, Any] | None = None, mode: str = "auto",
                amplify: int = 1 << 20, readahead: int | None = None, workers: int = 4,
                foreground: bool = False, log_level: str = "INFO") -> dict[str, Any]:  # fmt: skip
    """Mount ``boot`` on ``mountpoint``; returns the runtime record (``mode``, ``pid`` of the daemon, ...).

    In the foreground (fanotify mode) the daemon runs in this process and this call returns after umount.
    """
    boot_p = Path(boot).resolve()
    mp = Path(mountpoint).resolve()
    cache = Path(cache_dir).resolve()
    if not boot_p.is_file():
        raise UsageError(f"bootstrap {boot} is not a file")
    if not mp.is_dir():
        raise UsageError(f"mountpoint {mountpoint} is not a directory")
    if is_mounted(mp, None) or read_record(mp) is not None:
        rec = read_record(mp)
        if rec is not None and not is_mounted(mp, None):
            _forget(mp, rec)  # stale record of a mount gone by other means
        else:
            raise UsageError(f"{mp} is already a mountpoint (nydus-erofs umount {mp} first)")
    config = dict(backend_config or {})
    if backend == "localfs":
        _check_cache_not_blobs(cache, config)
    _check_image_and_backend(boot_p, backend, config)
    from .fanotify_mount import check_cache_path

    check_cache_path(cache)  # cache file paths go into the mount options (any mode: say it here, exit 2)
    chosen = select_mode(mode, cache)
    rdir = run_dir()
    rdir.mkdir(parents=True, exist_ok=True)
    record = record_path(mp)
    data: dict[str, Any] = {"mountpoint": str(mp), "boot": str(boot_p), "cache_dir": str(cache), "mode": chosen,
                            "backend": backend}  # fmt: skip
    if chosen == "full":
        _mount_full(boot_p, mp, cache, backend, config, amplify, workers)
        data["pid"] = None
        try:
            write_record(record, data)
        except BaseException:  # a mount without its record could not be unmounted by us
            umount(mp)
            raise
        return data

    if foreground:
        from .fanotify_mount import backend_from_options, run_daemon

        run_daemon(boot=boot_p, mountpoint=mp, cache_dir=cache, backend=backend_from_options(backend, config),
                   amplify=amplify, workers=workers, readahead=readahead, record=record, record_data=data,
                   ready_fd=None)  # fmt: skip
        return data

    r, w = os.pipe2(os.O_CLOEXEC)
    log_path = record.with_suffix(".log")
    cmd = [
        sys.executable, "-m", "cachefilesd_py.fanotify_mount", "--supervise",
        "--boot", str(boot_p), "--mountpoint", str(mp), "--cache-dir", str(cache),
        "--backend", backend, "--backend-config", json.dumps(config),
        "--amplify", str(amplify), "--workers", str(workers), "--record", str(record),
        "--record-data", json.dumps(data), "--ready-fd", str(w), "--log-level", log_level,
    ]  # fmt: skip
    if readahead is not None:
        cmd += ["--readahead", str(readahead)]
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    try:
        with open(log_path, "ab") as logf:
            proc = subprocess.Popen(
                cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=logf, pass_fds=(w,),
                start_new_session=True, cwd="/", env=env,
            )  # fmt: skip
    finally:
        os.close(w)
    try:
        with os.fdopen(r, "rb") as rf:
            status = rf.read().decode(errors="replace").strip()
    except BaseException:  # Ctrl-C: stop the supervisor as umount would (it stops its worker and unmounts);
        _stop_unready(proc, mp, log_path)  # a SIGKILL orphaned the worker: it mounted after "aborted"
        raise
    if status == "ok":
        data["pid"] = proc.pid
        data["log"] = str(log_path)
        written = read_record(mp) or {}
        data["worker_pid"] = written.get("worker_pid")
        return data
    code = proc.wait()
    if status.startswith("error "):
        log_path.unlink(missing_ok=True)  # the error is the one line reported
        raise daemon_error(status)
    raise MountError(errno.EIO, f"mount daemon exited with status {code} before mounting (log: {log_path})")


def daemon_error(status: str) -> NydusErofsError:
    """The error a mount daemon reported on its ready pipe: ``error CODE MESSAGE``, CODE the exit status the same
    failure has in full mode (see :func:`cachefilesd_py.fanotify_mount.error_line`), as that project error, so
    ``nydus-erofs mount`` exits alike in both modes.  A line without a known CODE is a MountError."""
    _, _, rest = status.partition(" ")
    code, _, message = rest.partition(" ")
    kind = _DAEMON_ERRORS.get(code) if message else None
    if kind is None:
        return MountError(errno.EIO, rest)
    if kind is MountError:
        return MountError(errno.EIO, message)
    return kind(message)


_DAEMON_ERRORS: dict[str, type[NydusErofsError]] = {
    "1": NydusErofsError, "2": UsageError, "3": ImageError, "4": BackendError, "5": MountError,
}  # fmt: skip


def _stop_unready(proc: subprocess.Popen[bytes], mp: Path, log_path: Path) -> None:
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
        log_path.unlink(missing_ok=True)


def _check_image_and_backend(boot: Path, backend: str, config: dict[str, Any]) -> None:
    """A damaged bootstrap or bad backend options fail here, with their own error, not in the daemon."""
    from erofs.reader.bootstrap import Bootstrap

    from .blob_handles import blob_order
    from .fanotify_mount import backend_from_options

    with Bootstrap(boot) as bs:
        blob_order(bs)  # a Nydus bootstrap, blob and device tables agreeing
    try:
        backend_from_options(backend, config).close()
    except BackendError as e:  # making a backend does no I/O: its options are wrong
        raise UsageError(f"--backend-config: {e}") from None


def _check_cache_not_blobs(cache: Path, config: dict[str, Any]) -> None:
    """The cache files (CACHE/<blob id>, sparse, resized) must never be the localfs blob files themselves."""
    dirs = [config.get("dir"), config.get("blob_dir"), *(config.get("alt_dirs") or ())]
    for d in dirs:
        if isinstance(d, str | os.PathLike) and cache.is_dir() and os.path.isdir(d) and os.path.samefile(cache, d):
            raise UsageError(f"--cache-dir {cache} is the blob directory: its cache files would overwrite the blobs")


def _mount_full(boot: Path, mp: Path, cache: Path, backend: str, config: dict[str, Any], amplify: int,
                workers: int) -> None:  # fmt: skip
    from .blob_handles import open_image
    from .fanotify_mount import backend_from_options, fill_all, prepare_cache_files
    from .pipeline import Pipeline

    be = backend_from_options(backend, config)
    files = []
    try:
        with Pipeline(amplify=max(amplify, 1 << 20), workers=workers) as pipeline:
            files = prepare_cache_files(cache, open_image(boot, be))
            fill_all(files, pipeline)
        mount_erofs_file_backed(boot, mp, [cf.path for cf in files])
    finally:
        for cf in files:
            cf.close()
        be.close()


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


def _is_daemon(rec: dict[str, Any]) -> bool:
    pid = rec.get("pid")
    return bool(pid) and process_start_time(pid) == rec.get("start_time") is not None and _runs_a_daemon(pid)


def _runs_a_daemon(pid: int) -> bool:
    """Whether ``pid`` is a mount daemon (``-m cachefilesd_py.fanotify_mount`` or ``mount --foreground``), so
    never init or a subreaper that a worker orphaned by its supervisor recorded as its parent."""
    if pid <= 1 or pid == os.getpid():
        return False
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().split(b"\0")
    except OSError:
        return False
    return b"cachefilesd_py.fanotify_mount" in argv or (b"mount" in argv and b"--foreground" in argv)


def _kill(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:  # exited meanwhile
        pass


def _forget(mp: Path, rec: dict[str, Any]) -> dict[str, Any]:
    pid = rec.get("pid")
    if pid and _is_daemon(rec):
        _kill(pid, signal.SIGTERM)
        _wait_exit(pid, 30)
    elif pid:
        try:  # our child that exited by itself: reap it
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass
    rec = read_record(mp) or rec
    worker = rec.get("worker_pid")
    if worker and process_start_time(worker) == rec.get("worker_start_time") is not None and _runs_a_daemon(worker):
        # its supervisor is gone (killed): the worker stops once its mount is gone, or now
        _kill(worker, signal.SIGTERM)
        _wait_exit(worker, 30)
    for p in (record_path(mp), record_path(mp).with_suffix(".log")):
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
    top = _top_mount(mp)
    if top is not None and top != ("erofs", rec.get("boot")):  # ours is gone (or under it): not ours to unmount
        raise UsageError(f"{mp}: {top[0]} {top[1]} is mounted there, not the image nydus-erofs mounted: left alone")
    mounted = top is not None
    if mounted:
        umount(mp)  # never lazily: EBUSY when files are open there, and the daemon serves on
    pid = rec.get("pid")
    if pid and _is_daemon(rec):  # (it also stops by itself once the image is released)
        _kill(pid, signal.SIGTERM)
        if not _wait_exit(pid, timeout):
            if not mounted:  # detached by other means and still in use: it serves those files until they close
                raise MountError(errno.EBUSY, f"{mp} was detached but files are still open on it: daemon {pid} "
                                 "serves them until they close, then exits")  # fmt: skip
            _kill(pid, signal.SIGUSR1)  # the daemon dumps its threads' stacks into its log
            _wait_exit(pid, 1.0)
            _kill(pid, signal.SIGKILL)
            _wait_exit(pid, None)
            raise MountError(errno.ETIMEDOUT, f"daemon {pid} did not stop within {timeout:g}s: killed")
    return _forget(mp, rec)

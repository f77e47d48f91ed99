"""``cachefilesd-py``: serve Nydus RAFS v6 images to the kernel's EROFS through fscache on-demand mode.

::

    cachefilesd-py --cache-dir DIR --images-dir IMAGES
                   [--backend localfs [--blob-dir BLOBS] | --backend http --url U
                    | --backend registry --host H --repo R [--plain-http] [--auth user:pass]
                    | --backend s3 --backend-config bucket=B,...]
                   [--backend-config JSON|@FILE|KEY=VALUE,...] [--threads N] [--amplify 1MiB] [--api-sock PATH]
                   [--cache-size-limit SIZE] [--no-supervisor] [--json-logs] [--upgrade-sock PATH]
                   [--takeover PATH]

While it runs, ``mount -t erofs none -o fsid=NAME /mnt`` mounts ``IMAGES/NAME/image.boot`` (blobs from
``IMAGES/NAME/blobs/`` unless a backend for all images is given).  With ``--api-sock``, images are also bound
and unbound at run time, each with its own backend: ``PUT``/``DELETE /api/v1/images/{fsid}``
(:mod:`cachefilesd_py.bindings`).  Errors are one line
(``cachefilesd-py: error: ...``), exit status 1 (2 for usage errors); ``--debug`` shows tracebacks.

Under systemd (``Type=notify``): READY=1 once serving, WATCHDOG=1 pings from the worker when ``WatchdogSec=`` is
set, the bound device kept in the fd store (``FDSTORE=1``, name ``cachefiles``: a restart of the service finds
it bound and writes ``restore``), and SIGHUP (``ExecReload``) upgrades in place with ``--upgrade-sock``
(:mod:`cachefilesd_py.takeover`).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import socket
import sys
from collections.abc import Sequence
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any, NoReturn

import click

from cachefilesd_py.defaults import FILL_TIMEOUT
from cachefilesd_py.logfilter import RepeatFilter
from cachefilesd_py.notify import Watchdog, listen_fds, notify, watchdog_interval
from erofs.errors import BackendError, NydusErofsError, UsageError
from erofs.units import parse_size
from fscache.cachefiles import DEVICE_PATH, CachefilesDevice
from fscache.errors import FscacheError

if TYPE_CHECKING:
    from cachefilesd_py.backends import BlobBackend
    from cachefilesd_py.daemon_supervisor import CachefilesSupervisor

# The daemon, pipeline, reader and backends are imported once the device is bound: startup errors come fast.

__all__ = ["main"]

PROG = "cachefilesd-py"
log = logging.getLogger("cachefilesd_py")
BACKENDS = ("localfs", "http", "registry", "s3")  # cachefilesd_py.backends.KINDS


class _Size(click.ParamType):
    name = "size"

    def convert(self, value: object, param: click.Parameter | None, ctx: click.Context | None) -> int:
        if isinstance(value, int):
            return value
        try:
            return parse_size(str(value))
        except ValueError as e:
            self.fail(str(e), param, ctx)


_PATH = click.Path(path_type=Path)


@click.command(
    name=PROG,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110},
    help="fscache on-demand daemon for Nydus RAFS v6 images: while it runs, `mount -t erofs none -o fsid=NAME MNT` "
    "mounts IMAGES/NAME/image.boot (blobs from IMAGES/NAME/blobs/ unless a backend for all images is given).",
)
@click.option("--cache-dir", required=True, type=_PATH, help="Cache directory (ext4/xfs/btrfs, not tmpfs).")
@click.option("--images-dir", required=True, type=_PATH, help="IMAGES: IMAGES/<fsid>/image.boot per image.")
@click.option("--backend", type=click.Choice(BACKENDS), default="localfs", show_default=True,
              help="Where blobs come from (localfs: IMAGES/<fsid>/blobs/ unless --blob-dir).")  # fmt: skip
@click.option("--blob-dir", type=_PATH, help="localfs: one blob directory for every image.")
@click.option("--url", help="http: base URL, blobs at URL/<blob id>.")
@click.option("--host", help="registry: host[:port] or URL.")
@click.option("--repo", help="registry: repository (namespace/name).")
@click.option("--plain-http", is_flag=True, help="registry: http instead of https.")
@click.option("--auth", help="registry: user:pass (or its base64).")
@click.option("--backend-config", help='Backend options: {"type": KIND, "config": {...}}, the options alone '
              "(JSON), @FILE, or key=value,... (s3: bucket=B,...; any network backend: proxy=http://HOST:PORT,...); "
              "the flags above win.")  # fmt: skip
@click.option("--threads", type=click.IntRange(max=1024), default=4, show_default=True, help="READ worker threads.")
@click.option("--amplify", type=_Size(), default="1MiB", show_default=True,
              help="Merge reads of adjacent chunks up to this many bytes.")  # fmt: skip
@click.option("--fill-timeout", type=click.FloatRange(min=0.1), default=FILL_TIMEOUT, show_default=True,
              help="Seconds a read may wait for its data (fetch and verify, retries included); then EIO.")  # fmt: skip
@click.option("--prefetch/--no-prefetch", default=True, show_default=True,
              help="On mount, fetch the files of the image's prefetch table in the background.")  # fmt: skip
@click.option("--prefetch-all", is_flag=True, help="Then prefetch the rest of the image's blobs too.")
@click.option("--prefetch-bandwidth", type=_Size(), default="0", help="Prefetch cap in bytes/s (0: none).")
@click.option("--prefetch-merge", type=_Size(), default="1MiB", show_default=True,
              help="Largest piece prefetch fills at once.")  # fmt: skip
@click.option("--cache-size-limit", type=_Size(), default="0",
              help="Most bytes the cache may take (0: no limit): objects no mount uses are culled, least recently "
              "used first.")  # fmt: skip
@click.option("--api-sock", type=_PATH, help="Serve the HTTP API on this Unix socket.")
@click.option("--no-supervisor", is_flag=True, help="One process, no failover.")
@click.option("--upgrade-sock", type=_PATH, help="Hand over to a new daemon on SIGHUP through this socket.")
@click.option("--takeover", type=_PATH, help="Take over from the daemon whose --upgrade-sock this is.")
@click.option("--json-logs", is_flag=True, help="Log JSON lines.")
@click.option("--tag", default=PROG, show_default=True, help="cachefiles cache tag.")
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]), default="info",
              show_default=True)  # fmt: skip
@click.option("--debug", is_flag=True, help="Tracebacks instead of one-line errors.")
@click.option("--device", default=DEVICE_PATH, hidden=True)
@click.version_option(package_name="nydus-erofs")
def command(**options: Any) -> None:
    """Parsed options → :func:`run`; errors are one line (see :func:`main`)."""
    args = argparse.Namespace(**options)
    _setup_logging(args.json_logs, args.log_level)
    try:
        code = run(args)
    except _Usage as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        sys.exit(2)
    except (FscacheError, NydusErofsError, OSError) as e:
        if args.debug:
            raise
        print(f"{PROG}: error: {e}", file=sys.stderr)
        sys.exit(getattr(e, "exit_code", 1))
    sys.exit(code)


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": round(record.created, 3),
            "level": record.levelname.lower(),
            "pid": record.process,
            "msg": record.getMessage(),
        }
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out)


def _setup_logging(json_logs: bool, level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if json_logs:
        handler.setFormatter(_JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter(f"{PROG}[%(process)d]: %(levelname)s: %(message)s"))
    handler.addFilter(RepeatFilter())  # identical lines counted, not repeated
    log.handlers[:] = [handler]
    log.setLevel(level.upper())
    log.propagate = False


def _backend_options(args: argparse.Namespace) -> dict[str, Any] | None:
    """Options of the backend shared by every image, or None for per-image ``IMAGES/<fsid>/blobs``; sets
    ``args.backend`` from a ``--backend-config`` that names its type."""
    from cachefilesd_py.backends.config import parse_backend_option  # (with the backends: see the note above)

    try:
        kind, extra = parse_backend_option(args.backend_config)
    except UsageError as e:
        raise _Usage(str(e)) from None
    if kind is not None:
        args.backend = kind
    if args.backend == "localfs":
        if args.blob_dir is not None and not args.blob_dir.is_dir():
            raise _Usage(f"--blob-dir {args.blob_dir}: not a directory")
        opts: dict[str, Any] = {**extra, **({} if args.blob_dir is None else {"dir": args.blob_dir})}
        return opts or None
    if args.backend == "http":
        url = args.url or extra.get("url")
        if not url:
            raise _Usage("--backend http needs --url")
        from cachefilesd_py.backends.http import check_url  # the backend's own check, before the device is bound

        try:
            check_url(url, "--url")
        except BackendError as e:
            raise _Usage(str(e)) from None
        return {**extra, "url": url}
    if args.backend == "s3":
        if not extra.get("bucket"):
            raise _Usage("--backend s3 needs --backend-config bucket=...")
        return extra
    opts = {**extra}
    for key in ("host", "repo", "auth"):
        if getattr(args, key):
            opts[key] = getattr(args, key)
    if args.plain_http:
        opts["plain_http"] = True
    if not opts.get("host") or not opts.get("repo"):
        raise _Usage("--backend registry needs --host and --repo")
    return opts


class _Usage(Exception):
    pass


def _make_backend(args: argparse.Namespace) -> BlobBackend | None:
    from cachefilesd_py.backends import make_backend

    opts = _backend_options(args)
    return None if opts is None else make_backend(args.backend, **opts)


def _serve(args: argparse.Namespace, device: CachefilesDevice, api_sock: socket.socket | None,
           restarts: int, supervisor_pid: int | None, ready: bool) -> int:  # fmt: skip
    """The worker: image store, daemon and API, until SIGTERM."""
    from cachefilesd_py.api import ApiServer
    from cachefilesd_py.cache_limit import ObjectCuller
    from cachefilesd_py.daemon import Daemon
    from cachefilesd_py.daemon_api import daemon_routes
    from cachefilesd_py.image_store import ImageStore
    from cachefilesd_py.pipeline import Pipeline
    from cachefilesd_py.prefetch import PrefetchOptions

    store = ImageStore(args.images_dir, _make_backend(args))
    prefetch = PrefetchOptions(args.prefetch, args.prefetch_all, args.prefetch_bandwidth, args.prefetch_merge)
    pipeline = Pipeline(amplify=args.amplify, workers=args.threads, fill_timeout=args.fill_timeout)
    daemon = Daemon(device, store, threads=args.threads, pipeline=pipeline, prefetch=prefetch)
    # the worker holds the culler (its counters: ``culler.stats()``, in the daemon info)
    culler = None
    if args.cache_size_limit:
        culler = ObjectCuller(device, args.cache_dir, args.cache_size_limit,
                              lambda: {o["key"] for o in daemon.info()["objects"]}).start()  # fmt: skip
    api = None
    if api_sock is not None:
        more = None if culler is None else (lambda: {"cache_limit": culler.stats()})
        api = ApiServer(api_sock, *daemon_routes(daemon, args.cache_dir, restarts, supervisor_pid, more)).start()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        daemon.stop()

    for s in (signal.SIGTERM, signal.SIGINT):
        signal.signal(s, on_signal)
    if ready:
        notify("READY=1", f"MAINPID={os.getpid()}", "STATUS=serving")
    interval = getattr(args, "watchdog", None)
    watchdog = Watchdog(interval, lambda: daemon.state == "RUNNING").start() if interval else None
    try:
        daemon.run()
    finally:
        if culler is not None:
            culler.stop()
        if watchdog is not None:
            watchdog.stop()
        if api is not None:
            api.stop()
        store.close()
    log.info("stopped")
    return 0


def run(args: argparse.Namespace) -> int:
    # absolute: a successor (upgrade in place) gets the same command line, wherever it is started from
    for name in ("images_dir", "cache_dir", "blob_dir", "api_sock"):
        if getattr(args, name) is not None:
            setattr(args, name, Path(os.path.abspath(getattr(args, name))))
    images = args.images_dir
    if not images.is_dir():
        raise _Usage(f"--images-dir {images}: not a directory")
    if args.threads < 1:
        raise _Usage("--threads must be at least 1")
    _backend_options(args)  # usage errors first; the backend itself is made by each worker
    if os.path.lexists(args.cache_dir) and not args.cache_dir.is_dir():
        raise _Usage(f"--cache-dir {args.cache_dir}: cannot create it: File exists")
    if args.takeover is not None:
        _preload(args)  # all checked before the old daemon stops its worker
    device, passed, how = _acquire_device(args)
    api_sock: socket.socket | None = None
    upgrade_sock: socket.socket | None = None
    sup: CachefilesSupervisor | None = None
    try:
        _preload(args)
        from cachefilesd_py.api import listen
        from cachefilesd_py.daemon_supervisor import CachefilesSupervisor
        from cachefilesd_py.supervisor import RestartPolicy
        from cachefilesd_py.takeover import Handover

        args.watchdog = watchdog_interval()  # (systemd's WATCHDOG_PID is this process: the worker pings for it)
        for name, option in (("api", "api_sock"), ("upgrade", "upgrade_sock")):
            path = getattr(args, option)
            if name in passed:
                sock = passed.pop(name)
            elif path is not None:
                try:
                    sock = listen(path)
                except OSError as e:
                    raise _Usage(f"--{option.replace('_', '-')} {path}: {e.strerror or e}") from None
            else:
                continue
            if name == "api":
                api_sock = sock
            else:
                upgrade_sock = sock
        for extra in passed.values():  # handed over, not wanted by these options
            extra.close()
        log.info("%s", how)
        if args.no_supervisor:
            return _serve(args, device, api_sock, 0, None, ready=True)
        sup_pid = os.getpid()
        handover = None
        if upgrade_sock is not None:
            handover = Handover(upgrade_sock, str(args.upgrade_sock or args.takeover),
                                lambda: _takeover_state(args, api_sock, upgrade_sock),
                                lambda: _takeover_fds(device, api_sock, upgrade_sock))  # fmt: skip
        sup = CachefilesSupervisor(
            device,
            lambda restarts: _serve(args, device, api_sock, restarts, sup_pid, ready=False),
            policy=RestartPolicy.from_env(),
            handover=handover,
        )
        return sup.run()
    finally:
        handed_over = sup is not None and sup.handed_over  # the successor serves on these sockets' paths
        for sock, path in ((api_sock, args.api_sock), (upgrade_sock, args.upgrade_sock)):
            if sock is not None:
                sock.close()
                if path is not None and not handed_over:
                    try:
                        os.unlink(path)
                    except OSError:
                        pass
        device.close()


def _preload(args: argparse.Namespace) -> None:
    """Load the daemon's modules (once here, not again in each new worker) and make the backend once: bad options
    (auth, URL) fail here, before serving."""
    if getattr(args, "preloaded", False):
        return
    from cachefilesd_py import daemon, daemon_supervisor, image_store  # noqa: F401

    backend = _make_backend(args)
    if backend is not None:
        backend.close()
    args.preloaded = True


def _acquire_device(args: argparse.Namespace) -> tuple[CachefilesDevice, dict[str, socket.socket], str]:
    """The bound device: taken over (``--takeover``, with the listening sockets handed over), found in systemd's
    fd store (a restart of the service: bound already), or opened and bound (then put in the fd store).  With one
    bound before, ``restore``: the requests read and not completed by its last user come again.  Also a log line
    saying which."""
    from cachefilesd_py.takeover import TakeoverState, accept_done, take_over

    if args.takeover is not None:
        def check(state: TakeoverState) -> None:
            if os.path.realpath(state.cache_dir) != os.path.realpath(args.cache_dir) or state.tag != args.tag:
                raise UsageError(f"the daemon at {args.takeover} serves cache {state.cache_dir} (tag {state.tag}), "
                                 f"not {args.cache_dir} (tag {args.tag})")  # fmt: skip

        try:
            state, fds, conn = take_over(str(args.takeover), check)
        except UsageError as e:
            raise _Usage(str(e)) from None
        device = CachefilesDevice(fds.pop("cachefiles"), args.device)
        sockets = {name: socket.socket(fileno=fd) for name, fd in fds.items()}
        try:
            device.restore()
        except BaseException:
            device.close()
            for s in sockets.values():
                s.close()
            conn.close()
            raise
        accept_done(conn)
        return device, sockets, f"took {args.device} over from daemon {state.pid} (cache {state.cache_dir})"
    stored = listen_fds().get("cachefiles")
    if stored:
        device = CachefilesDevice(stored[0], args.device)
        device.restore()
        return device, {}, f"{args.device} from the fd store: bound already, restored"
    device = CachefilesDevice.open(args.device)  # before creating the cache dir: no device, nothing made
    try:
        try:
            args.cache_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise _Usage(f"--cache-dir {args.cache_dir}: cannot create it: {e.strerror}") from None
        device.bind(args.cache_dir, args.tag)
    except BaseException:
        device.close()
        raise
    notify("FDSTORE=1", "FDNAME=cachefiles", fds=[device.fileno()])  # kept while the service runs
    return device, {}, f"bound {args.device} to cache {args.cache_dir.resolve()}"


def _takeover_state(args: argparse.Namespace, api_sock: socket.socket | None,
                    upgrade_sock: socket.socket | None) -> Any:  # fmt: skip
    from cachefilesd_py.takeover import TakeoverState

    names = ["cachefiles", *(name for name, s in (("api", api_sock), ("upgrade", upgrade_sock)) if s is not None)]
    return TakeoverState(pid=os.getpid(), cache_dir=str(args.cache_dir.resolve()), tag=args.tag,
                         images_dir=str(args.images_dir.resolve()), fds=names)  # fmt: skip


def _takeover_fds(device: CachefilesDevice, api_sock: socket.socket | None,
                  upgrade_sock: socket.socket | None) -> list[int]:  # fmt: skip
    return [device.fileno(), *(s.fileno() for s in (api_sock, upgrade_sock) if s is not None)]


def main(argv: Sequence[str] | None = None) -> NoReturn:
    """The console script: usage errors are one line too (exit status 2)."""
    try:
        command.main(args=list(argv) if argv is not None else None, prog_name=PROG, standalone_mode=False)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
    except click.Abort:
        sys.exit(130)
    except click.ClickException as e:
        print(f"{PROG}: error: {e.format_message()} (see --help)", file=sys.stderr)
        sys.exit(2)
    sys.exit(0)


if __name__ == "__main__":
    main()

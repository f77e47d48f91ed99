"""``nydus-erofs ctl``: talk to a running daemon's API (:mod:`cachefilesd_py.api`): what nydusctl is to nydusd.

``--sock PATH`` names the socket (cachefilesd-py's ``--api-sock``), ``--mount MNT`` the fanotify mount whose
daemon to ask (the socket its runtime record names).  Subcommands print tables, or the API's JSON with ``--json``:
``info``, ``images``, ``metrics`` (``--prometheus``: the ``/metrics`` text), ``gc`` (``--cache-dir DIR``: collect
a cache dir of mounts without asking any daemon: :mod:`cachefilesd_py.mount.gc`), ``upgrade`` (a new daemon takes
over without a failed read: :mod:`cachefilesd_py.mount.upgrade` for a mount, SIGHUP and
:mod:`cachefilesd_py.takeover` for cachefilesd-py).
"""

from __future__ import annotations

import errno
import json
import os
import signal
import time
from collections.abc import Callable, Mapping
from typing import Any

import click

from cachefilesd_py.api import request
from cachefilesd_py.mount.gc import collect
from cachefilesd_py.mount.record import read_record
from cachefilesd_py.mount.upgrade import UPGRADE_TIMEOUT, request_upgrade
from erofs.errors import NydusErofsError, UsageError
from fscache.mount import MountError

__all__ = ["ctl"]


class ApiUnreachableError(NydusErofsError):
    """The daemon's API could not be asked, or refused the request."""


def _socket(ctx: click.Context) -> str:
    opts = ctx.obj  # the group's options
    if opts["sock"] is not None:
        return str(opts["sock"])
    if opts["mount"] is not None:
        rec = read_record(opts["mount"])
        if rec is None:
            raise UsageError(f"{opts['mount']} is not mounted by nydus-erofs")
        if not rec.get("api_sock"):
            raise UsageError(f"{opts['mount']}: its daemon serves no API ({rec.get('mode')} mode)")
        return str(rec["api_sock"])
    raise UsageError("which daemon? give --sock PATH or --mount MNT")


def _ask(ctx: click.Context, method: str, path: str) -> dict[str, Any]:
    sock = _socket(ctx)
    try:
        status, body = request(sock, method, path, timeout=60.0)
    except FileNotFoundError:
        raise ApiUnreachableError(f"{sock}: no such socket (is the daemon running?)") from None
    except ConnectionRefusedError:
        raise ApiUnreachableError(f"{sock}: connection refused (the daemon is not running)") from None
    except PermissionError:
        raise ApiUnreachableError(f"{sock}: permission denied (the API answers root only)") from None
    except OSError as e:
        raise ApiUnreachableError(f"{sock}: {e.strerror or e}") from None
    if status != 200:
        raise ApiUnreachableError(f"{method} {path}: HTTP {status}: {body.get('message') or body.get('text', '')}")
    return body


Table = Callable[[Mapping[str, Any]], None]


def _emit(ctx: click.Context, as_json: bool, body: Mapping[str, Any], table: Table) -> None:
    if as_json or ctx.obj["json"]:
        click.echo(json.dumps(body, indent=2, sort_keys=True))
    else:
        table(body)


def _table(rows: list[tuple[str, ...]]) -> None:
    """A table under a blank line: headers, then the rows (headers alone are not printed)."""
    if len(rows) > 1:
        click.echo()
        _rows(rows)


def _rows(rows: list[tuple[str, ...]]) -> None:
    """Columns padded to their widest cell."""
    if not rows:
        return
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        click.echo("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


_JSON = click.option("--json", "as_json", is_flag=True, help="Print the API's JSON answer.")


@click.group()
@click.option("--sock", type=click.Path(dir_okay=False), help="The daemon's API socket (cachefilesd-py --api-sock).")
@click.option("--mount", type=click.Path(file_okay=False), help="A fanotify mount: ask its daemon.")
@click.option("--json", "as_json", is_flag=True, help="Print the API's JSON answers.")
@click.pass_context
def ctl(ctx: click.Context, sock: str | None, mount: str | None, as_json: bool) -> None:
    """Ask a running daemon (cachefilesd-py, or a fanotify mount's) through its API."""
    if sock is not None and mount is not None:
        raise UsageError("give --sock or --mount, not both")
    ctx.obj = {"sock": sock, "mount": mount, "json": as_json}


@ctl.command()
@_JSON
@click.pass_context
def info(ctx: click.Context, as_json: bool) -> None:
    """The daemon: version, pid, state, uptime, mode."""

    def table(d: Mapping[str, Any]) -> None:
        keys = ["version", "mode", "state", "pid", "supervisor_pid", "restarts", "uptime", "mountpoint"]
        _rows([(k, str(d[k])) for k in keys if d.get(k) is not None])

    _emit(ctx, as_json, _ask(ctx, "GET", "/api/v1/daemon"), table)


@ctl.command()
@_JSON
@click.pass_context
def images(ctx: click.Context, as_json: bool) -> None:
    """The images (or the mount) the daemon serves."""

    def table(d: Mapping[str, Any]) -> None:
        rows = [("IMAGE", "BACKEND", "BLOBS")]
        for i in d.get("images", []):
            rows.append((str(i.get("id") or i.get("fsid")), str(i.get("backend") or "-"),
                         str(len(i["blobs"])) if "blobs" in i else "-"))  # fmt: skip
        _rows(rows)

    _emit(ctx, as_json, _ask(ctx, "GET", "/api/v1/images"), table)


@ctl.command()
@_JSON
@click.option("--prometheus", is_flag=True, help="Print the Prometheus text (GET /metrics).")
@click.pass_context
def metrics(ctx: click.Context, as_json: bool, prometheus: bool) -> None:
    """Backend traffic and latency, cache hits and misses, fills, failures, prefetch, per image and per blob."""
    if prometheus:
        click.echo(_ask(ctx, "GET", "/metrics")["text"], nl=False)
        return

    def table(d: Mapping[str, Any]) -> None:
        b, p, c = d["backend"], d["pipeline"], d["cache"]
        lat = f"{b['latency_sum_ms'] / b['latency_count']:.1f} ms avg" if b.get("latency_count") else "-"
        _rows([("backend", f"{b['requests']} requests, {_size(b['bytes'])}, {b['errors']} errors, "
                           f"{b['retries']} retries, latency {lat}"),
               ("cache", f"{c['hits']} hits, {c['misses']} misses"),
               ("pipeline", f"{p['fills']} fills, {p['chunks_fetched']} chunks fetched, "
                            f"{p['digest_failures']} digest failures, {p['fetch_failures']} fetch failures"),
               ("in flight", f"{d['inflight']} chunk fetches")])  # fmt: skip
        rows = [("IMAGE", "REQUESTS", "BYTES", "PREFETCH")]
        for name, i in d["images"].items():
            pf = i.get("prefetch") or {}
            progress = f"{pf.get('pieces_done', 0)}/{pf.get('pieces', 0)} {pf.get('state', '')}" if pf else "-"
            rows.append((name, str(i["backend"]["requests"]), _size(i["backend"]["bytes"]), progress))
        _table(rows)
        rows = [("BLOB", "IMAGE", "SIZE", "CACHED")]
        for blob, x in d["blobs"].items():
            cached = _size(x["cached"]) if x.get("cached") is not None else "-"
            rows.append((blob[:16], str(x.get("image", "")), _size(x.get("size", 0)), cached))
        _table(rows)

    _emit(ctx, as_json, _ask(ctx, "GET", "/api/v1/metrics"), table)


@ctl.command()
@_JSON
@click.option("--cache-dir", type=click.Path(file_okay=False, exists=True),
              help="Collect this cache dir of mounts (no daemon asked): the files no live mount uses.")  # fmt: skip
@click.pass_context
def gc(ctx: click.Context, as_json: bool, cache_dir: str | None) -> None:
    """Drop the cache of blobs no image references."""
    if cache_dir is not None:
        if ctx.obj["sock"] is not None or ctx.obj["mount"] is not None:
            raise UsageError("gc --cache-dir asks no daemon: give no --sock or --mount")
        body = collect(os.path.abspath(cache_dir))
    else:
        body = _ask(ctx, "POST", "/api/v1/gc")

    def table(d: Mapping[str, Any]) -> None:
        for name in d.get("removed", []):
            click.echo(f"removed {name}")
        click.echo(f"{len(d.get('removed', []))} files removed, {_size(d.get('freed_bytes', 0))} freed")

    _emit(ctx, as_json, body, table)


@ctl.command()
@_JSON
@click.option("--timeout", type=float, default=UPGRADE_TIMEOUT, show_default=True, help="Seconds to wait for it.")
@click.pass_context
def upgrade(ctx: click.Context, as_json: bool, timeout: float) -> None:
    """Replace the daemon with one running the code installed now, without a failed read."""
    if ctx.obj["mount"] is not None:
        rec = read_record(ctx.obj["mount"])
        if rec is None:
            raise UsageError(f"{ctx.obj['mount']} is not mounted by nydus-erofs")
        old = rec.get("worker_pid")
        new = request_upgrade(rec, timeout)
        body = {"old_pid": old, "pid": new.get("worker_pid"), "supervisor_pid": new.get("pid")}
    else:  # cachefilesd-py: SIGHUP to its main process, then wait for the API to be served by the successor
        before = _ask(ctx, "GET", "/api/v1/daemon")
        main_pid = before.get("supervisor_pid") or before["pid"]
        os.kill(main_pid, signal.SIGHUP)
        deadline = time.monotonic() + timeout
        while True:
            try:
                now = _ask(ctx, "GET", "/api/v1/daemon")
            except ApiUnreachableError:  # between the two daemons
                now = before
            if (now.get("supervisor_pid") or now["pid"]) != main_pid:
                break
            if time.monotonic() > deadline:
                raise MountError(errno.ETIMEDOUT, f"the daemon (pid {main_pid}) did not hand over within {timeout:g} s"
                                 " (its log says why; it serves on)")  # fmt: skip
            time.sleep(0.2)  # polling the API: the successor announces itself nowhere else
        body = {"old_pid": main_pid, "pid": now["pid"], "supervisor_pid": now.get("supervisor_pid")}

    def table(d: Mapping[str, Any]) -> None:
        click.echo(f"upgraded: pid {d['old_pid']} handed over to pid {d['pid']}")

    _emit(ctx, as_json, body, table)

"""Upgrade cachefilesd-py in place: a new daemon takes ``/dev/cachefiles`` over from the running one.

The running daemon, started with ``--upgrade-sock SOCK``, listens there (mode 0600, root's).  On SIGHUP (the
unit's ``ExecReload``) it starts its successor: its own command line again, plus ``--takeover SOCK`` — the code
now installed.  The successor checks its options, loads what it needs, then connects.  The old daemon
(:meth:`Handover.run`, its supervisor) then stops its worker: it reads no more requests, finishes the READs it
took (their readers get their data) and closes its cache objects' fds; it sends one :class:`TakeoverState` (JSON)
with the fds (``SCM_RIGHTS``): the device (still bound: the cache stays, and so do the mounts), the API's and the
upgrade socket's listening sockets (the paths stay the same).  The successor (:func:`take_over`) writes
``restore`` on the device: the requests the old worker had read and not completed become new again, and the
kernel re-opens (OPEN) the objects whose fds were closed as their next READ comes; then it says ``ok`` and
serves.  The old daemon tells systemd the new main pid (``MAINPID=``) and exits 0 without closing anything the
successor uses.  Reads meanwhile wait (the time the old worker takes to finish its READs); none fails.

What the successor needs is the device and the sockets: the images bound are the images dir's (on disk), and the
kernel re-opens every object it still uses, so no object id carries over.  If the successor fails or says
anything but ``ok`` (another ``--cache-dir``...), the old daemon writes ``restore`` itself and starts a worker
again: it serves on.
"""

from __future__ import annotations

import array
import json
import logging
import os
import select
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

from erofs.errors import NydusErofsError, UsageError

__all__ = ["HANDOVER_TIMEOUT", "HandedOver", "Handover", "TakeoverError", "TakeoverState", "accept_done",
           "successor_command", "take_over"]

log = logging.getLogger("cachefilesd_py")

HANDOVER_TIMEOUT = 600.0  # seconds a successor has to connect (a new interpreter loads the images' backends)
_MAX_STATE = 1 << 20
_MAX_FDS = 8


class TakeoverError(NydusErofsError):
    """The takeover could not be done (the old daemon serves on)."""


class HandedOver(Exception):  # noqa: N818 - not an error: how the old daemon's supervision ends
    """The successor ``pid`` took over: the old daemon exits 0, closing nothing the successor uses."""

    def __init__(self, pid: int) -> None:
        super().__init__(f"handed over to pid {pid}")
        self.pid = pid


@dataclass(frozen=True)
class TakeoverState:
    """What the old daemon hands over with the fds, in ``fds`` order: ``cachefiles`` (the bound device), and
    ``api`` / ``upgrade`` (listening sockets) when it has them."""

    pid: int
    cache_dir: str
    tag: str
    images_dir: str
    fds: list[str]
    version: int = 1

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode() + b"\n"

    @classmethod
    def from_json(cls, data: bytes) -> TakeoverState:
        try:
            value = json.loads(data)
            if not isinstance(value, dict) or value.get("version") != 1:
                raise ValueError("not a version 1 takeover state")
            return cls(**value)
        except (ValueError, TypeError) as e:
            raise TakeoverError(f"takeover state: {e}") from None


def successor_command(upgrade_sock: str) -> list[str]:
    """This process's command line (the interpreter and its script), ``--takeover upgrade_sock`` instead of any
    it had."""
    argv = list(sys.orig_argv[1:])
    out: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg == "--takeover":
            skip = True
            continue
        if arg.startswith("--takeover="):
            continue
        out.append(arg)
    return [sys.executable, *out, "--takeover", upgrade_sock]


def _send(conn: socket.socket, state: TakeoverState, fds: Sequence[int]) -> None:
    conn.sendmsg([state.to_json()], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())])


def _recv_state(conn: socket.socket) -> tuple[TakeoverState, list[int]]:
    fds = array.array("i")
    data = b""
    while not data.endswith(b"\n"):
        msg, anc, _flags, _ = conn.recvmsg(_MAX_STATE, socket.CMSG_SPACE(_MAX_FDS * fds.itemsize))
        for level, kind, payload in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
        if not msg:
            for fd in fds:
                os.close(fd)
            raise TakeoverError("the old daemon closed the connection without handing over")
        data += msg
        if len(data) > _MAX_STATE:
            raise TakeoverError("takeover state too long")
    for fd in fds:
        os.set_inheritable(fd, False)
    return TakeoverState.from_json(data), list(fds)


def take_over(path: str, check: Callable[[TakeoverState], None], timeout: float = HANDOVER_TIMEOUT
              ) -> tuple[TakeoverState, dict[str, int], socket.socket]:  # fmt: skip
    """Connect to the daemon's upgrade socket ``path`` and receive its state and fds (by name); ``check(state)``
    raises UsageError when this daemon cannot take that over (the old one is told, and serves on).  Returns the
    connection too: :func:`accept_done` on it once ``restore`` is written."""
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        conn.settimeout(timeout)
        try:
            conn.connect(path)
        except OSError as e:
            raise TakeoverError(f"--takeover {path}: {e.strerror or e}") from None
        state, fds = _recv_state(conn)
        named = dict(zip(state.fds, fds, strict=False))
        if len(fds) != len(state.fds) or "cachefiles" not in named:
            for fd in fds:
                os.close(fd)
            raise TakeoverError(f"--takeover {path}: expected the fds {state.fds}, got {len(fds)}")
        try:
            check(state)
        except UsageError as e:
            conn.sendall(f"refused {e}\n".encode())
            for fd in fds:
                os.close(fd)
            raise
        return state, named, conn
    except BaseException:
        conn.close()
        raise


def accept_done(conn: socket.socket) -> None:
    """Tell the old daemon the takeover is done (it exits) and close the connection."""
    try:
        conn.sendall(b"ok\n")
    finally:
        conn.close()


class Handover:
    """The old daemon's side (see the module's docstring): ``listener`` is the upgrade socket; ``state()`` what
    to send, ``fds()`` the fds in its ``fds`` order; ``stop_worker()`` stops the worker (it finishes its READs)."""

    def __init__(self, listener: socket.socket, path: str, state: Callable[[], TakeoverState],
                 fds: Callable[[], list[int]]) -> None:  # fmt: skip
        self.listener = listener
        self.path = path
        self.state = state
        self.fds = fds
        self.successor: subprocess.Popen[bytes] | None = None

    def start_successor(self) -> subprocess.Popen[bytes]:
        """Start the successor (the code installed now), its stdout/stderr ours; ``$WATCHDOG_PID`` (this pid) is
        not passed on: it will be the main process."""
        env = {k: v for k, v in os.environ.items() if k != "WATCHDOG_PID"}
        cmd = successor_command(self.path)
        log.info("upgrade: starting %s", " ".join(cmd[1:3]))
        self.successor = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, env=env)
        return self.successor

    def accept(self, timeout: float = HANDOVER_TIMEOUT) -> socket.socket:
        """The successor's connection (root's, or this user's); TakeoverError if it exits or times out first."""
        assert self.successor is not None
        deadline = time.monotonic() + timeout
        pidfd = os.pidfd_open(self.successor.pid)
        try:
            poller = select.poll()
            poller.register(self.listener.fileno(), select.POLLIN)
            poller.register(pidfd, select.POLLIN)
            while True:
                left = deadline - time.monotonic()
                ready = {fd for fd, _ in poller.poll(max(0, int(left * 1000)))} if left > 0 else set()
                if not ready:
                    raise TakeoverError(f"the new daemon did not connect within {timeout:.0f} s")
                if self.listener.fileno() in ready:
                    conn, _ = self.listener.accept()
                    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)
                    uid = int.from_bytes(creds[4:8], sys.byteorder)
                    if uid in (0, os.getuid()):
                        return conn
                    log.warning("upgrade socket: refused a connection of uid %d", uid)
                    conn.close()
                elif pidfd in ready:
                    raise TakeoverError(f"the new daemon exited with status {self.successor.wait()} first")
        finally:
            os.close(pidfd)

    def hand_over(self, conn: socket.socket, timeout: float = HANDOVER_TIMEOUT) -> None:
        """Send the state and the fds on ``conn`` and wait for the successor's ``ok``; TakeoverError otherwise."""
        conn.settimeout(timeout)
        try:
            _send(conn, self.state(), self.fds())
            answer = b""
            while not answer.endswith(b"\n"):
                piece = conn.recv(4096)
                if not piece:
                    break
                answer += piece
        except OSError as e:
            raise TakeoverError(f"handing over: {e.strerror or e}") from None
        finally:
            conn.close()
        text = answer.decode(errors="replace").strip()
        if text != "ok":
            raise TakeoverError(f"the new daemon did not take over: {text or 'no answer'}")

    def upgrade(self, stop_worker: Callable[[], int | None], resume: Callable[[], None]) -> int | None:
        """Start the successor; once it connects, ``stop_worker()`` (it finishes its READs) and hand over.  The
        successor's pid, or None when the upgrade was called off (then, if the worker was stopped, ``resume()``
        was called: the daemon serves on)."""
        try:
            successor = self.start_successor()
            conn = self.accept()
        except (TakeoverError, OSError) as e:
            log.error("upgrade called off: %s", e)
            self.abandon()
            return None
        log.info("upgrade: daemon %d connected: the worker finishes its reads", successor.pid)
        code = stop_worker()
        if code not in (None, 0):
            log.warning("the worker ended with exit status %s", code)
        try:
            self.hand_over(conn)
        except TakeoverError as e:
            log.error("upgrade failed: %s: serving on", e)
            self.abandon()
            resume()
            return None
        return successor.pid

    def abandon(self) -> None:
        """Stop a successor that did not take over (it may still be starting)."""
        if self.successor is not None and self.successor.poll() is None:
            self.successor.kill()
            self.successor.wait()
        self.successor = None


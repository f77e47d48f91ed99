"""sd_notify(3) without libsystemd: one datagram to ``$NOTIFY_SOCKET`` (a path, or ``@name`` for the abstract
namespace).  Without the variable it does nothing, so the daemon runs the same under systemd and by hand.

- :func:`notify`: ``READY=1``, ``STOPPING=1``, ``STATUS=...``, ``MAINPID=<pid>``, ``WATCHDOG=1``; with ``fds``,
  the fds go along (``SCM_RIGHTS``): ``FDSTORE=1`` + ``FDNAME=NAME`` keeps them in the service's fd store
  (``FileDescriptorStoreMax=`` in the unit), and systemd hands them to the next start of the service;
- :func:`listen_fds`: those fds, by name, at that next start (``$LISTEN_FDS``, ``$LISTEN_FDNAMES``, for this pid);
- :class:`Watchdog`: a thread sending ``WATCHDOG=1`` at half of ``$WATCHDOG_USEC`` while its ``alive`` says so.
"""

from __future__ import annotations

import array
import os
import socket
import threading
from collections.abc import Callable, Mapping, Sequence

__all__ = ["LISTEN_FDS_START", "Watchdog", "listen_fds", "notify", "watchdog_interval"]

LISTEN_FDS_START = 3  # SD_LISTEN_FDS_START: the first fd systemd passes


def notify(*states: str, fds: Sequence[int] = (), env: Mapping[str, str] | None = None) -> bool:
    """Send ``"READY=1"``, ``"STOPPING=1"``, ``"STATUS=..."``, ``"MAINPID=<pid>"``... (and ``fds`` with them);
    True if sent."""
    addr = (os.environ if env is None else env).get("NOTIFY_SOCKET")
    if not addr or not states:
        return False
    if addr[0] not in "/@":
        return False
    target = "\0" + addr[1:] if addr[0] == "@" else addr
    payload = "\n".join(states).encode()
    ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())] if fds else []
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
        try:
            s.sendmsg([payload], ancillary, 0, target)
        except OSError:
            return False
    return True


def listen_fds(env: Mapping[str, str] | None = None) -> dict[str, list[int]]:
    """The fds systemd passed to this process (``$LISTEN_PID`` must be ours), by ``$LISTEN_FDNAMES`` name
    (``unknown`` without one); made close-on-exec.  Empty when there are none."""
    env = os.environ if env is None else env
    try:
        if int(env.get("LISTEN_PID", "")) != os.getpid():
            return {}
        count = int(env.get("LISTEN_FDS", ""))
    except ValueError:
        return {}
    names = env.get("LISTEN_FDNAMES", "").split(":") if env.get("LISTEN_FDNAMES") else []
    out: dict[str, list[int]] = {}
    for i in range(count):
        fd = LISTEN_FDS_START + i
        try:
            os.set_inheritable(fd, False)
        except OSError:
            continue
        out.setdefault(names[i] if i < len(names) else "unknown", []).append(fd)
    return out


def watchdog_interval(env: Mapping[str, str] | None = None) -> float | None:
    """Seconds between ``WATCHDOG=1`` pings (half of ``$WATCHDOG_USEC``), or None when systemd expects none (or
    expects them from another pid, ``$WATCHDOG_PID``)."""
    env = os.environ if env is None else env
    try:
        usec = int(env.get("WATCHDOG_USEC", ""))
        if env.get("WATCHDOG_PID") and int(env["WATCHDOG_PID"]) != os.getpid():
            return None
    except ValueError:
        return None
    return usec / 2e6 if usec > 0 else None


class Watchdog:
    """Pings the watchdog (``WATCHDOG=1``) every ``interval`` seconds from a daemon thread while ``alive()`` is
    true; a process whose serving loop is wedged stops pinging, and systemd restarts the service."""

    def __init__(self, interval: float, alive: Callable[[], bool], env: Mapping[str, str] | None = None) -> None:
        self.interval = interval
        self.alive = alive
        self.env = env
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="watchdog", daemon=True)

    @classmethod
    def start_if_enabled(cls, alive: Callable[[], bool]) -> Watchdog | None:
        """A running watchdog if systemd asks for pings (:func:`watchdog_interval`), else None."""
        interval = watchdog_interval()
        return cls(interval, alive).start() if interval is not None else None

    def start(self) -> Watchdog:
        self._thread.start()
        return self

    def _run(self) -> None:
        while True:
            if self.alive():
                notify("WATCHDOG=1", env=self.env)
            if self._stop.wait(self.interval):
                return

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

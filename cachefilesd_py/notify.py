"""sd_notify(3) without libsystemd: one datagram to ``$NOTIFY_SOCKET`` (a path, or ``@name`` for the abstract
namespace).  Without the variable it does nothing, so the daemon runs the same under systemd and by hand."""

from __future__ import annotations

import os
import socket

__all__ = ["notify"]


def notify(*states: str, env: dict[str, str] | None = None) -> bool:
    """Send ``"READY=1"``, ``"STOPPING=1"``, ``"STATUS=..."``, ``"MAINPID=<pid>"``...; True if sent."""
    addr = (os.environ if env is None else env).get("NOTIFY_SOCKET")
    if not addr or not states:
        return False
    if addr[0] not in "/@":
        return False
    target = "\0" + addr[1:] if addr[0] == "@" else addr
    payload = "\n".join(states).encode()
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
        try:
            s.sendto(payload, target)
        except OSError:
            return False
    return True

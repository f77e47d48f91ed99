"""The ready pipe: the one line a mount daemon writes when it is serving, or why it could not start.

``ok``, or ``error CODE MESSAGE``: CODE is the exit status ``nydus-erofs mount`` has for the same failure in full
mode, MESSAGE one line.  The worker writes it (:func:`report`), the supervisor relays it as it is, and
``nydus-erofs mount`` reads it (:func:`read_line`) and raises the same project error again (:func:`daemon_error`),
so both modes exit alike.  A daemon that dies without a line leaves the pipe empty.
"""

from __future__ import annotations

import errno
import os

from erofs.errors import BackendError, ImageError, NydusErofsError, UsageError
from fscache.errors import FscacheError
from fscache.mount import MountError

__all__ = ["OK", "daemon_error", "error_line", "read_line", "report"]

OK = "ok"


def error_line(e: BaseException) -> str:
    """The readiness line of a startup failure: ``error CODE MESSAGE``.

    CODE is the error's ``exit_code`` (2 usage, 3 a damaged image, 4 a backend, 5 a mount or a failure of the
    daemon's own); 1 a plain OSError; 5 anything else.  MESSAGE is one line; an OSError's names its file
    (``No space left on device: PATH``, not ``[Errno 28] ...``).
    """
    if isinstance(e, NydusErofsError):
        code = e.exit_code
    elif isinstance(e, OSError) and not isinstance(e, FscacheError):
        code = 1
    else:
        code = MountError.exit_code
    if isinstance(e, OSError) and not isinstance(e, NydusErofsError | FscacheError) and e.strerror:
        msg = e.strerror if e.filename is None else f"{e.strerror}: {os.fsdecode(e.filename)}"
    else:
        msg = str(e)
    msg = (msg.splitlines() or [""])[0] or type(e).__name__
    return f"error {code} {msg}"


def report(fd: int | None, line: str) -> None:
    """Write ``line`` to the ready pipe ``fd`` and close it (nothing when there is no pipe)."""
    if fd is None:
        return
    try:
        os.write(fd, line.encode(errors="replace") + b"\n")
    finally:
        os.close(fd)


def read_line(fd: int) -> str:
    """The line written to the ready pipe whose read end is ``fd`` (empty: the writer died without one); closes
    ``fd``.  Blocks until every writer has closed the pipe."""
    with os.fdopen(fd, "rb") as f:
        return f.read().decode(errors="replace").strip()


_DAEMON_ERRORS: dict[str, type[NydusErofsError]] = {
    "1": NydusErofsError, "2": UsageError, "3": ImageError, "4": BackendError, "5": MountError,
}  # fmt: skip


def daemon_error(line: str) -> NydusErofsError:
    """The project error of the readiness line ``error CODE MESSAGE`` (see :func:`error_line`).  A line without a
    known CODE is a MountError."""
    _, _, rest = line.partition(" ")
    code, _, message = rest.partition(" ")
    kind = _DAEMON_ERRORS.get(code) if message else None
    if kind is None:
        return MountError(errno.EIO, rest)
    if kind is MountError:
        return MountError(errno.EIO, message)
    return kind(message)

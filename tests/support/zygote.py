"""A fork server for the command-line programs: under ``pytest -n`` (the quick loop) the tests' runs of
``nydus-erofs`` and ``cachefilesd-py`` are forked from a process that has already imported them.

Every run is still its own process, running the entry point its installed script runs (``erofs.cli:main``,
``cachefilesd_py.cli:main``) on the test's argv, environment, working directory, umask and stdin/stdout/stderr
(passed as file descriptors), with the exit status, signals included, handed back; only the interpreter's start
and the imports are paid once (a small build: ~40 ms of CPU instead of ~120 ms here).  The full run (``pytest``, as CI
runs it) starts every program from its installed script.

Protocol, over a SOCK_SEQPACKET Unix socket: the client sends one JSON request with the three descriptors
(SCM_RIGHTS); the server forks a waiter, the waiter forks the program and sends ``{"pid": N}``, then
``{"status": W}`` (a wait status) when the program ends.  The server exits when its stdin reaches EOF (its
pytest worker is gone).
"""

from __future__ import annotations

import atexit
import importlib
import io
import json
import os
import selectors
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import IO, Any

from erofs.cli import entry_points

# what the server imports before forking: everything the programs import at start, so a run imports nothing
PRELOAD = [
    "erofs.cli", "cachefilesd_py.cli",
    "erofs.commands.build", "erofs.commands.check", "erofs.commands.convert", "erofs.commands.inspect",
    "erofs.commands.unpack", "cachefilesd_py.commands.mount", "cachefilesd_py.commands.ctl",
]  # fmt: skip
PROGRAMS = ("nydus-erofs", "cachefilesd-py")  # run by the entry points their installed scripts run
_MAX_REQUEST = 1 << 20


# ---- server (python -m tests.support.zygote SOCKET) -----------------------------------------------------------
def _serve(path: str) -> dict[str, Any]:
    """Answer requests until stdin reaches EOF (then exit); return a request in each forked program."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    listener.bind(path)
    listener.listen(64)
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # waiters are reaped by the kernel
    sel = selectors.DefaultSelector()
    sel.register(listener, selectors.EVENT_READ)
    sel.register(sys.stdin, selectors.EVENT_READ)
    print("ready", flush=True)
    while True:
        for key, _ in sel.select():
            if key.fileobj is sys.stdin:
                os._exit(0)
            conn, _ = listener.accept()
            msg, fds, _, _ = socket.recv_fds(conn, _MAX_REQUEST, 3)
            if os.fork() != 0:
                conn.close()
                for fd in fds:
                    os.close(fd)
                continue
            # the waiter
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            pid = os.fork()
            if pid == 0:
                sel.close()
                listener.close()
                conn.close()
                request = json.loads(msg)
                request["fds"] = fds
                return request
            for fd in fds:
                os.close(fd)
            try:
                conn.send(json.dumps({"pid": pid}).encode())
                _, status = os.waitpid(pid, 0)
                conn.send(json.dumps({"status": status}).encode())
            finally:
                os._exit(0)


def _become(request: dict[str, Any]) -> None:
    """Turn this forked process into the one a fresh start of the program would be."""
    for target, fd in enumerate(request["fds"]):
        os.dup2(fd, target)
    os.closerange(3, os.sysconf("SC_OPEN_MAX"))  # as subprocess's close_fds
    os.chdir(request["cwd"])
    os.umask(request["umask"])
    os.environ.clear()
    os.environ.update(request["env"])
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    sys.argv = request["argv"]
    main = sys.modules["__main__"]  # a script's, as the installed entry point's is (click names the program by it)
    main.__spec__ = None
    main.__package__ = None


def main() -> None:
    for name in PRELOAD:
        importlib.import_module(name)
    scripts = entry_points("console_scripts")  # "module:function" of each program, as pyproject declares it
    request = _serve(sys.argv[1])
    _become(request)  # in a forked program from here on
    module, _, function = scripts[Path(sys.argv[0]).name].partition(":")
    try:
        code = getattr(importlib.import_module(module), function)()
    except SystemExit as e:
        code = e.code
    # The end of a Python process (an uncaught exception has already ended it as Python does): non-daemon
    # threads joined, atexit handlers run, stdio flushed, the exit status as sys.exit's; only the teardown of
    # the preloaded modules (~15 ms) is left out.
    threading._shutdown()  # type: ignore[attr-defined]
    atexit._run_exitfuncs()
    if code is not None and not isinstance(code, int):
        print(code, file=sys.stderr)
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code or 0)


# ---- client -------------------------------------------------------------------------------------------------
class Zygote:
    """A running server (one per pytest worker)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._proc = subprocess.Popen([sys.executable, "-m", "tests.support.zygote", str(path)],
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE, start_new_session=True,
                                      cwd=Path(__file__).resolve().parents[2])  # fmt: skip
        assert self._proc.stdout is not None
        line = self._proc.stdout.readline()
        if line != b"ready\n":
            self._proc.kill()
            self._proc.wait()
            raise RuntimeError(f"the fork server did not start: {line!r}")

    def stop(self) -> None:
        assert self._proc.stdin is not None
        self._proc.stdin.close()
        self._proc.wait()
        self.path.unlink(missing_ok=True)

    OPTIONS = frozenset({"input", "stdin", "cwd", "env", "umask"})

    def run(self, argv: list[str], *, timeout: float | None = None, input: str | None = None,
            stdin: int | IO[Any] | None = None, cwd: str | os.PathLike[str] | None = None,
            env: Mapping[str, str] | None = None, umask: int = -1) -> subprocess.CompletedProcess[str]:  # fmt: skip
        """As ``subprocess.run(argv, capture_output=True, text=True, ...)`` with these arguments."""
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        in_w = -1
        if input is not None:
            in_r, in_w = os.pipe()
        elif stdin == subprocess.DEVNULL:
            in_r = os.open(os.devnull, os.O_RDONLY)
        else:
            in_r = os.dup(0 if stdin is None else stdin if isinstance(stdin, int) else stdin.fileno())
        request = {
            "argv": argv,
            "cwd": os.fspath(cwd) if cwd is not None else os.getcwd(),
            "env": dict(os.environ if env is None else env),
            "umask": umask if umask >= 0 else _umask(),
        }
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            conn.connect(str(self.path))
            socket.send_fds(conn, [json.dumps(request).encode()], [in_r, out_w, err_w])
            pid = json.loads(conn.recv(4096))["pid"]
        except BaseException:
            conn.close()
            os.close(out_r)
            os.close(err_r)
            if in_w >= 0:
                os.close(in_w)
            raise
        finally:
            for fd in (in_r, out_w, err_w):
                os.close(fd)
        if in_w >= 0:
            threading.Thread(target=_feed, args=(in_w, (input or "").encode()), daemon=True).start()
        try:
            stdout, stderr = _collect(out_r, err_r, conn, pid, timeout, argv)
            status = json.loads(conn.recv(4096))["status"]
        finally:
            conn.close()
        return subprocess.CompletedProcess(argv, os.waitstatus_to_exitcode(status), _text(stdout), _text(stderr))


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _feed(fd: int, data: bytes) -> None:
    try:
        with open(fd, "wb") as f:
            f.write(data)
    except BrokenPipeError:
        pass


def _collect(out_r: int, err_r: int, conn: socket.socket, pid: int, timeout: float | None,
             argv: list[str]) -> tuple[bytes, bytes]:  # fmt: skip
    """stdout and stderr to their EOF; past ``timeout``, the program is killed and TimeoutExpired raised."""
    chunks: dict[int, list[bytes]] = {out_r: [], err_r: []}
    sel = selectors.DefaultSelector()
    for fd in chunks:
        sel.register(fd, selectors.EVENT_READ)
    deadline = None if timeout is None else time.monotonic() + timeout
    try:
        while sel.get_map():
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                os.kill(pid, signal.SIGKILL)
                json.loads(conn.recv(4096))  # the status of the killed program
                raise subprocess.TimeoutExpired(argv, timeout or 0)
            for key, _ in sel.select(left):
                data = os.read(key.fd, 1 << 16)
                if data:
                    chunks[key.fd].append(data)
                else:
                    sel.unregister(key.fd)
    finally:
        sel.close()
        os.close(out_r)
        os.close(err_r)
    return b"".join(chunks[out_r]), b"".join(chunks[err_r])


def _text(data: bytes) -> str:
    """As subprocess's text mode: the locale's encoding, universal newlines."""
    return io.TextIOWrapper(io.BytesIO(data)).read()


if __name__ == "__main__":
    main()

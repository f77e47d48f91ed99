"""On the host: sd_notify against a real datagram socket (READY, WATCHDOG, FDSTORE with an fd, the fd store given
back), and the takeover protocol of cachefilesd-py's upgrade in place over a real Unix socket (the device itself
is in the VM: tests/vm/test_upgrade.py)."""

from __future__ import annotations

import array
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cachefilesd_py.api import get, listen
from cachefilesd_py.notify import LISTEN_FDS_START, Watchdog, listen_fds, notify, watchdog_interval
from cachefilesd_py.takeover import Handover, TakeoverError, TakeoverState, accept_done, successor_command, take_over
from erofs.errors import UsageError
from tests.support.cli import CACHEFILESD

TIMEOUT = 30.0


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[tuple[socket.socket, dict[str, str]]]:
    path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.bind(str(path))
        s.settimeout(TIMEOUT)
        yield s, {"NOTIFY_SOCKET": str(path)}


def test_watchdog_pings_while_alive_and_stops(notify_socket: tuple[socket.socket, dict[str, str]]) -> None:
    sock, env = notify_socket
    assert notify("READY=1", env=env)
    assert sock.recv(100) == b"READY=1"
    alive = threading.Event()
    alive.set()
    dog = Watchdog(0.02, alive.is_set, env=env).start()
    try:
        assert [sock.recv(100) for _ in range(3)] == [b"WATCHDOG=1"] * 3
    finally:
        dog.stop()  # (the thread has ended when it returns)
    sock.setblocking(False)
    while True:  # the pings sent before the stop
        try:
            assert sock.recv(100) == b"WATCHDOG=1"
        except BlockingIOError:
            break
    sock.settimeout(0.2)
    with pytest.raises(TimeoutError):  # stopped: no more pings
        print(sock.recv(100))


def test_watchdog_interval_follows_systemd() -> None:
    assert watchdog_interval({"WATCHDOG_USEC": "30000000"}) == 15.0
    assert watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())}) == 15.0
    assert watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}) is None  # another pid's
    assert watchdog_interval({}) is None and watchdog_interval({"WATCHDOG_USEC": "x"}) is None


def test_fdstore_sends_the_fd(notify_socket: tuple[socket.socket, dict[str, str]], tmp_path: Path) -> None:
    sock, env = notify_socket
    kept = tmp_path / "kept"
    kept.write_bytes(b"x")
    fd = os.open(kept, os.O_RDONLY)
    try:
        assert notify("FDSTORE=1", "FDNAME=cachefiles", fds=[fd], env=env)
    finally:
        os.close(fd)
    fds = array.array("i")
    msg, anc, _, _ = sock.recvmsg(100, socket.CMSG_SPACE(4 * fds.itemsize))
    assert msg == b"FDSTORE=1\nFDNAME=cachefiles"
    fds.frombytes(anc[0][2])
    assert len(fds) == 1
    try:
        assert os.fstat(fds[0]).st_ino == kept.stat().st_ino  # the same file, passed whole
    finally:
        os.close(fds[0])


def test_listen_fds_names_what_systemd_passed(tmp_path: Path) -> None:
    """A child started as systemd starts a service with an fd store (fd 3 on, $LISTEN_PID its pid) finds it."""
    code = ("import os, json; from cachefilesd_py.notify import listen_fds; "
            "fds = listen_fds(); print(json.dumps({k: [os.readlink(f'/proc/self/fd/{f}') for f in v] "
            "for k, v in fds.items()}))")  # fmt: skip
    kept = tmp_path / "kept"
    kept.write_bytes(b"x")
    fd = os.open(kept, os.O_RDONLY)
    # the child puts it at fd 3 and sets $LISTEN_PID to its pid, then execs the check (same pid)
    start = (f"import os, sys; os.dup2({fd}, {LISTEN_FDS_START}); os.close({fd}); "
             "os.environ['LISTEN_PID'] = str(os.getpid()); "
             "os.execv(sys.executable, [sys.executable, '-c', sys.argv[1]])")  # fmt: skip
    try:
        env = {**os.environ, "LISTEN_FDS": "1", "LISTEN_FDNAMES": "cachefiles"}
        done = subprocess.run([sys.executable, "-c", start, code], env=env, capture_output=True, text=True,
                              pass_fds=(fd,))  # fmt: skip
    finally:
        os.close(fd)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f'{{"cachefiles": ["{kept}"]}}'
    assert listen_fds({"LISTEN_PID": "1", "LISTEN_FDS": "1"}) == {}  # not ours


def test_successor_command_is_ours_with_takeover(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "orig_argv", ["python3", "/bin/cachefilesd-py", "--takeover", "/old", "--cache-dir", "C"])
    assert successor_command("/run/up.sock") == [sys.executable, "/bin/cachefilesd-py", "--cache-dir", "C",
                                                 "--takeover", "/run/up.sock"]  # fmt: skip


STATE = TakeoverState(pid=1, cache_dir="/var/cache/c", tag="t", images_dir="/images", fds=["cachefiles", "api"])


def _successor(path: str, check: Any, box: dict[str, Any]) -> threading.Thread:
    def run() -> None:
        try:
            state, fds, conn = take_over(path, check, timeout=TIMEOUT)
            box["state"], box["fds"] = state, fds
            accept_done(conn)
        except Exception as e:  # noqa: BLE001 - reported by the test
            box["error"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def _handover(tmp_path: Path, passed: list[int]) -> Handover:
    path = tmp_path / "upgrade.sock"
    h = Handover(listen(path), str(path), lambda: STATE, lambda: passed)
    h.successor = subprocess.Popen(["cat"], stdin=subprocess.PIPE)  # stands in for the new daemon: it runs
    return h


def test_handover_passes_the_state_and_the_fds(tmp_path: Path) -> None:
    r, w = os.pipe()
    h = _handover(tmp_path, [r, w])
    box: dict[str, Any] = {}
    try:
        t = _successor(h.path, lambda state: None, box)
        h.hand_over(h.accept(TIMEOUT), TIMEOUT)  # returns on the successor's "ok"
        t.join(TIMEOUT)
        assert "error" not in box, box
        assert box["state"] == STATE
        got = box["fds"]
        assert set(got) == {"cachefiles", "api"}
        os.write(w, b"through")
        assert os.read(got["cachefiles"], 100) == b"through"  # the same pipe, received whole
        for fd in got.values():
            os.close(fd)
    finally:
        assert h.successor is not None
        h.successor.stdin.close()  # type: ignore[union-attr]
        h.successor.wait()
        h.listener.close()
        os.close(r)
        os.close(w)


def test_a_refusing_successor_leaves_the_old_daemon_serving(tmp_path: Path) -> None:
    r, w = os.pipe()
    h = _handover(tmp_path, [r, w])
    box: dict[str, Any] = {}

    def refuse(state: TakeoverState) -> None:
        raise UsageError(f"serves cache {state.cache_dir}, not /other")

    try:
        t = _successor(h.path, refuse, box)
        with pytest.raises(TakeoverError, match="did not take over: refused serves cache /var/cache/c, not /other"):
            h.hand_over(h.accept(TIMEOUT), TIMEOUT)
        t.join(TIMEOUT)
        assert isinstance(box.get("error"), UsageError)
    finally:
        h.abandon()
        h.listener.close()
        os.close(r)
        os.close(w)


def test_a_successor_that_exits_first_calls_the_upgrade_off(tmp_path: Path) -> None:
    h = _handover(tmp_path, [])
    assert h.successor is not None
    h.successor.stdin.close()  # type: ignore[union-attr]
    started = time.monotonic()
    try:
        with pytest.raises(TakeoverError, match="exited with status 0 first"):
            h.accept(TIMEOUT)
        assert time.monotonic() - started < TIMEOUT
    finally:
        h.listener.close()


Notify = tuple[socket.socket, dict[str, str]]


def test_cli_upgrade_in_place_with_a_stand_in_device(tmp_path: Path, notify_socket: Notify) -> None:
    """The whole of ``cachefilesd-py --upgrade-sock``'s reload, /dev/null standing in for /dev/cachefiles (as in
    tests/cli/test_cli_hostile.py; the kernel's side, restore and re-opens, is tests/vm/test_upgrade.py's): the
    device goes to the fd store, SIGHUP starts the successor, which takes the device and the API socket over and
    says READY=1 with its MAINPID; the old daemon exits 0; the new one pings the watchdog, answers on the same API
    path, and removes the sockets when it stops."""
    sock, env = notify_socket
    (tmp_path / "images").mkdir()
    api, up = tmp_path / "api.sock", tmp_path / "up.sock"
    cmd = [CACHEFILESD, "--device", "/dev/null", "--cache-dir", str(tmp_path / "cache"), "--images-dir",
           str(tmp_path / "images"), "--api-sock", str(api), "--upgrade-sock", str(up), "--threads", "1"]  # fmt: skip
    lines: list[str] = []

    def until(line: str) -> None:
        while line not in lines:
            lines.extend(sock.recv(4096).decode().split("\n"))

    log = tmp_path / "log"
    with open(log, "wb") as out:
        old = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                               env={**os.environ, **env, "WATCHDOG_USEC": "1000000"})  # fmt: skip
    new_pid = 0
    try:
        until("READY=1")
        assert "FDSTORE=1" in lines and "FDNAME=cachefiles" in lines
        until("WATCHDOG=1")
        first = get(api, "/api/v1/daemon", timeout=TIMEOUT)
        lines.clear()
        old.send_signal(signal.SIGHUP)
        until("READY=1")
        new_pid = int(next(x for x in lines if x.startswith("MAINPID=")).split("=")[1])
        assert old.wait(TIMEOUT) == 0 and new_pid != old.pid
        assert "STOPPING=1" not in lines
        lines.clear()
        until("WATCHDOG=1")
        second = get(api, "/api/v1/daemon", timeout=TIMEOUT)
        assert second["supervisor_pid"] == new_pid and second["pid"] != first["pid"]
        assert f"took /dev/null over from daemon {old.pid}" in log.read_text()
    finally:
        if new_pid:
            os.kill(new_pid, signal.SIGTERM)
            pidfd = os.pidfd_open(new_pid)
            assert select.select([pidfd], [], [], TIMEOUT)[0], log.read_text()
            os.close(pidfd)
        if old.poll() is None:
            old.kill()
            old.wait()
    assert not api.exists() and not up.exists()

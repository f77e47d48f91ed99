"""cachefilesd-py upgraded in place in the test VM: SIGHUP starts a new daemon, which takes ``/dev/cachefiles`` over
(``--upgrade-sock``) during a cold 64 MiB read, while the old worker holds a READ (its fetch stalled); the read
gets every byte, the old daemon is gone.  Under a real ``$NOTIFY_SOCKET``: READY=1, the device in the fd store
(FDSTORE=1), WATCHDOG=1 pings, the new MAINPID."""

from __future__ import annotations

import array
import os
import re
import select
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from cachefilesd_py.takeover import HANDOVER_TIMEOUT
from tests.mount.test_fanotify_mount import GatedBlobServer
from tests.support.cold_read import ColdReader
from tests.support.poll import wait_for
from tests.vm.test_daemon import CACHEFILESD, TIMEOUT, DaemonProc, MiB, large_image, link_image, mounted, scratch

pytestmark = pytest.mark.kernel("cachefiles")


class Notifications:
    """A real sd_notify socket: what the daemons say on it, line by line."""

    def __init__(self, path: Path) -> None:
        path.unlink(missing_ok=True)
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.lines: list[str] = []
        self.fds: list[int] = []

    def wait_for(self, want: str, proc: subprocess.Popen[bytes] | None = None) -> None:
        """Receive until the line ``want`` came (``proc`` exiting first fails)."""
        deadline = time.monotonic() + TIMEOUT
        while want not in self.lines:
            left = deadline - time.monotonic()
            assert left > 0, f"no {want} in {self.lines}"
            assert proc is None or proc.poll() is None, f"daemon exited {proc.returncode} before {want}"
            if not select.select([self.sock], [], [], min(left, 1.0))[0]:
                continue
            fds = array.array("i")
            msg, anc, _, _ = self.sock.recvmsg(4096, socket.CMSG_SPACE(16 * fds.itemsize))
            for _level, _kind, data in anc:
                fds.frombytes(data[: len(data) - len(data) % fds.itemsize])
            self.fds.extend(fds)
            self.lines.extend(msg.decode().split("\n"))

    def close(self) -> None:
        for fd in self.fds:
            os.close(fd)
        self.sock.close()


def _gone(pid: int) -> None:
    """Wait (bounded, on a pidfd) until process ``pid`` has exited."""
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    try:
        assert select.select([pidfd], [], [], TIMEOUT)[0], f"process {pid} still running"
    finally:
        os.close(pidfd)


def _log_has(d: DaemonProc, text: str, timeout: float) -> None:
    wait_for(lambda: text in d.log_text() or (d.proc is not None and d.proc.poll() is not None),
             f"{text!r} not in the log", timeout)  # fmt: skip
    assert text in d.log_text(), d.log_text()


def test_upgrade_during_cold_read_fails_no_read(monkeypatch: pytest.MonkeyPatch) -> None:
    base = scratch() / "upgrade"
    base.mkdir(exist_ok=True)
    upgrade_sock = base / "upgrade.sock"
    d = DaemonProc(base, "--upgrade-sock", str(upgrade_sock))
    d.images.mkdir(parents=True, exist_ok=True)
    note = Notifications(base / "notify.sock")
    monkeypatch.setenv("WATCHDOG_USEC", "2000000")  # a ping a second
    new_pid = 0
    image, digest = large_image()
    server = GatedBlobServer(image / "blobs")  # the blobs over HTTP; armed, the next fetch waits for release
    # (a while: the new daemon starts meanwhile, tens of seconds under TCG; hence the long --fill-timeout)
    try:
        env = {**os.environ, "NOTIFY_SOCKET": str(note.path)}
        cmd = [str(CACHEFILESD), "--cache-dir", str(d.cache), "--images-dir", str(d.images), "--api-sock",
               str(d.api_sock), "--upgrade-sock", str(upgrade_sock), "--backend", "http",
               "--url", server.url, "--fill-timeout", "900"]  # fmt: skip
        with open(d.log, "wb") as log:
            d.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env)
        note.wait_for("READY=1", d.proc)
        assert "FDSTORE=1" in note.lines and "FDNAME=cachefiles" in note.lines
        assert len(note.fds) == 1 and os.readlink(f"/proc/self/fd/{note.fds[0]}") == "/dev/cachefiles"
        note.wait_for("WATCHDOG=1", d.proc)  # from the worker
        first = d.api("/api/v1/daemon")
        assert first["supervisor_pid"] == d.proc.pid

        link_image(d.images, "large-upgrade", image)
        with mounted("large-upgrade") as mnt:
            reader = ColdReader(mnt / "big", TIMEOUT)
            reader.wait_read(MiB)
            server.armed.set()
            assert server.arrived.wait(TIMEOUT), "no fetch"  # the old worker holds the reader's READ
            server.armed.clear()  # (only that fetch)
            note.lines.clear()
            d.proc.send_signal(signal.SIGHUP)
            # the new daemon started and connected (a new interpreter: minutes under TCG on a loaded host), the old
            # worker stops
            _log_has(d, "the worker finishes its reads", HANDOVER_TIMEOUT)
            assert reader.thread.is_alive() and reader.read < 64 * MiB, "the read ended before the upgrade"
            server.release.set()
            note.wait_for("READY=1")  # the new daemon's, once it serves
            mainpid = [line for line in note.lines if line.startswith("MAINPID=")]
            assert mainpid, note.lines
            new_pid = int(mainpid[-1].split("=")[1])
            assert d.proc.wait(TIMEOUT) == 0  # the old daemon exited
            assert "STOPPING=1" not in note.lines  # (systemd: the service goes on)
            reader.join()
            second = d.api("/api/v1/daemon")  # the same socket path, the new daemon
        assert not reader.errors, reader.errors
        assert reader.digest == digest
        assert second["supervisor_pid"] == new_pid != first["supervisor_pid"]
        _gone(first["pid"])  # the old worker
        assert not Path(f"/proc/{first['supervisor_pid']}").exists()
        note.lines.clear()
        note.wait_for("WATCHDOG=1")  # the new daemon pings too
        log_text = d.log_text()
        assert f"took /dev/cachefiles over from daemon {first['supervisor_pid']}" in log_text, log_text
        assert not re.search(r"READ .* failed|died", log_text), log_text
    finally:
        server.close()
        if new_pid:
            try:
                os.kill(new_pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            _gone(new_pid)
        d.kill()
        note.close()
        print(d.log_text()[-4000:])
    assert not upgrade_sock.exists() and not d.api_sock.exists()  # the last daemon removed them

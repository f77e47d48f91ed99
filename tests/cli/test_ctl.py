"""``nydus-erofs ctl`` without a daemon, or with a bad one: one-line errors and their exit statuses (its tables
and JSON: tests/daemon/test_daemon_api.py, tests/mount/test_mount_api.py)."""

from __future__ import annotations

import socket
import subprocess
from pathlib import Path

from tests.support.cli import run


def ctl(*args: str) -> subprocess.CompletedProcess[str]:
    return run("ctl", *args, timeout=120)


def _one_line_error(p: subprocess.CompletedProcess[str], code: int, text: str) -> None:
    assert p.returncode == code, (p.returncode, p.stderr)
    assert p.stdout == "" and p.stderr.count("\n") == 1 and "Traceback" not in p.stderr, p.stderr
    assert p.stderr.startswith("nydus-erofs: error: ") and text in p.stderr, p.stderr


def test_no_daemon_named(tmp_path: Path) -> None:
    _one_line_error(ctl("info"), 2, "give --sock PATH or --mount MNT")
    _one_line_error(ctl("--sock", "x", "--mount", str(tmp_path), "info"), 2, "not both")
    _one_line_error(ctl("--mount", str(tmp_path), "info"), 2, "is not mounted by nydus-erofs")


def test_no_socket_and_refused(tmp_path: Path) -> None:
    _one_line_error(ctl("--sock", str(tmp_path / "none.sock"), "info"), 1, "no such socket")
    stale = tmp_path / "stale.sock"
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(stale))  # bound, never listening: as a dead daemon leaves it
    _one_line_error(ctl("--sock", str(stale), "metrics"), 1, "connection refused")
    (tmp_path / "file").write_text("")
    _one_line_error(ctl("--sock", str(tmp_path / "file"), "images"), 1, str(tmp_path / "file"))


def test_gc_of_a_cache_dir_that_is_not_there() -> None:
    _one_line_error(ctl("gc", "--cache-dir", "/nonexistent"), 2, "does not exist")

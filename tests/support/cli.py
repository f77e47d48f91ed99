"""Running the command-line programs as a user does, and what a user sees of a failure."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from tests.support.zygote import PROGRAMS, Zygote

BIN = Path(sys.executable).parent
CLI = str(BIN / "nydus-erofs")
CACHEFILESD = str(BIN / "cachefilesd-py")
TIMEOUT = 60
FORKABLE = {str(BIN / name) for name in PROGRAMS}

_fork_server: Zygote | None = None  # under pytest -n: tests/conftest.py's fork server


def use_fork_server(server: Zygote | None) -> None:
    """From now on :func:`run` forks the programs from ``server`` (None: starts them from their scripts)."""
    global _fork_server
    _fork_server = server


def run(*args: str | os.PathLike[str], prog: str = CLI, timeout: float = TIMEOUT,
        **kw: Any) -> subprocess.CompletedProcess[str]:  # fmt: skip
    """``prog`` (``nydus-erofs``) with ``args``; stdout and stderr captured as text.  ``kw``: ``input``,
    ``stdin``, ``cwd``, ``env``, ``umask`` as for subprocess.run (any other: run from the script)."""
    argv = [prog, *map(str, args)]
    if _fork_server is not None and prog in FORKABLE and set(kw) <= Zygote.OPTIONS:
        return _fork_server.run(argv, timeout=timeout, **kw)
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, **kw)


def one_line(proc: subprocess.CompletedProcess[str], code: int, text: str, prog: str = "nydus-erofs") -> None:
    """Exit ``code``, and stderr is exactly one error line holding ``text``."""
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{prog}: error: "), proc.stderr
    assert text in lines[0], lines[0]
    assert proc.returncode == code, (proc.returncode, proc.stderr)

"""Running a command with its stderr on a pseudo-terminal, as a user at a terminal sees it."""

from __future__ import annotations

import errno
import os
import re
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

# A redrawn progress line: a carriage return, then "LABEL: ..." (plain newlines arrive as "\r\n" from a terminal).
PROGRESS_LINE = re.compile(r"\r(?!\n)[a-z]+[^\r\n]*?: +[^\r\n]*\d[^\r\n]*")


@dataclass
class TerminalRun:
    returncode: int
    stdout: str
    terminal: str  # everything the command wrote to its stderr, the terminal

    def progress_lines(self) -> list[str]:
        return PROGRESS_LINE.findall(self.terminal)


def run_in_terminal(args: Sequence[str | os.PathLike[str]], timeout: float = 60,
                    env: Mapping[str, str] | None = None) -> TerminalRun:  # fmt: skip
    """Run ``args`` with stderr on a pty (stdout a pipe, stdin /dev/null) and collect what the pty shows."""
    master, slave = os.openpty()
    try:
        proc = subprocess.Popen([os.fspath(a) for a in args], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=slave, env=env)  # fmt: skip
    finally:
        os.close(slave)
    seen = bytearray()
    try:
        while True:
            try:
                data = os.read(master, 65536)
            except OSError as e:  # EIO: the last holder of the slave side closed it
                if e.errno != errno.EIO:
                    raise
                break
            if not data:
                break
            seen += data
        assert proc.stdout is not None
        out = proc.stdout.read()
        rc = proc.wait(timeout)
    finally:
        os.close(master)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return TerminalRun(rc, out.decode(errors="replace"), seen.decode(errors="replace"))

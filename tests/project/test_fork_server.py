"""tests/support/zygote.py: a program forked from the fork server behaves as one started from its script — the
quick loop (``pytest -n``) runs the programs that way, the full run from their scripts."""

from __future__ import annotations

import io
import os
import subprocess
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.cli import CLI
from tests.support.zygote import Zygote


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Zygote]:
    zygote = Zygote(tmp_path_factory.mktemp("zygote") / "z.sock")
    try:
        yield zygote
    finally:
        zygote.stop()


def both(server: Zygote, *args: str, **kw: object) -> tuple[subprocess.CompletedProcess[str], ...]:
    argv = [CLI, *args]
    forked = server.run(argv, timeout=60, **kw)  # type: ignore[arg-type]
    started = subprocess.run(argv, capture_output=True, text=True, timeout=60, **kw)  # type: ignore[call-overload]
    return forked, started


@pytest.mark.parametrize(
    "args",
    [
        [],  # no command: the help, exit 2
        ["--help"],
        ["build", "/nonexistent", "-o", "/nonexistent-out"],  # one error line, exit 2
        ["check", "--bogus"],
        ["mounts", "--json"],
    ],
    ids=["no-command", "help", "missing-source", "unknown-option", "mounts"],
)
def test_same_output_and_exit_code(server: Zygote, args: list[str], tmp_path: Path) -> None:
    env = dict(os.environ, NYDUS_EROFS_RUN_DIR=str(tmp_path / "run"))
    forked, started = both(server, *args, env=env)
    assert (forked.returncode, forked.stdout, forked.stderr) == (started.returncode, started.stdout, started.stderr)


def test_argv_cwd_env_stdin_and_umask_reach_the_program(server: Zygote, tmp_path: Path) -> None:
    layer = io.BytesIO()
    with tarfile.open(fileobj=layer, mode="w") as tar:
        info = tarfile.TarInfo("hello")
        info.size = 5
        tar.addfile(info, io.BytesIO(b"hello"))
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    for where, umask in (("a", 0o077), ("b", 0o022)):
        with open(tmp_path / "layer.tar", "wb") as f:
            f.write(layer.getvalue())
        with open(tmp_path / "layer.tar", "rb") as stdin:  # "-": the layer on stdin; "out": relative to cwd
            r = server.run([CLI, "build", "-", "-o", "out", "--json"], stdin=stdin, cwd=tmp_path / where,
                           umask=umask, timeout=60)  # fmt: skip
        assert r.returncode == 0, r.stderr
        assert (tmp_path / where / "out" / "image.boot").is_file()
        assert '"bootstrap"' in r.stdout
        mode = (tmp_path / where / "out" / "image.boot").stat().st_mode & 0o777
        assert mode & umask == 0, oct(mode)


def test_a_program_past_its_timeout_is_killed(server: Zygote, tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    fd = os.open(fifo, os.O_RDWR)  # a reader that waits for ever: no one writes
    try:
        with pytest.raises(subprocess.TimeoutExpired):
            server.run([CLI, "build", "-", "-o", str(tmp_path / "out")], stdin=fd, timeout=2)
    finally:
        os.close(fd)

"""Plugins for every pytest run from the repository root (tests/, benchmarks/, and tests/vm inside the VM).

Benchmarks compare us with a reference (mkfs.erofs, a direct read); ``comparison`` is how they say so.  Each
line a test passes to it is printed at the end of the run, in a "benchmark comparisons" section, with no
``-s`` needed.  tests/test_vm_suite.py finds that section in the guest's output and passes its lines on, so
the VM's benchmarks show up in the host's run too.
"""

from __future__ import annotations

import compileall
import os
import re
import sys
from pathlib import Path

import pytest

SECTION = "benchmark comparisons"
_SECTION_LINE = re.compile(rf"^=+ {SECTION} =+$")
# what follows the section: another section, pytest-benchmark's table, or -q's result line ("3 passed in 1.2s")
_END_LINE = re.compile(r"^(=+ .* =+|-{20,}.*|(\d+ [a-z]+(, )?)+ in [\d.]+s( \(.*\))?|no tests ran.*)$")


class Comparisons:
    """The comparison lines of this run, printed in the terminal summary."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def __call__(self, line: str) -> None:
        """One line of a benchmark's result against its reference."""
        self.lines.append(line)

    def relay(self, output: str, prefix: str = "") -> list[str]:
        """Take over the comparison lines printed by another pytest run (the VM's), given its output."""
        found: list[str] = []
        inside = False
        for line in output.splitlines():
            if _SECTION_LINE.match(line):
                inside = True
            elif inside and _END_LINE.match(line):
                break
            elif inside and line.strip():
                found.append(prefix + line)
        self.lines.extend(found)
        return found


_COMPARISONS = pytest.StashKey[Comparisons]()


# The packages every test's subprocesses import (nydus-erofs, its supervisors and workers, cachefilesd-py).
_PACKAGES = ("erofs", "cachefilesd_py", "fscache", "tests/support")


@pytest.hookimpl(tryfirst=True)  # before xdist's own, which makes an unset --dist "load"
def pytest_cmdline_main(config: pytest.Config) -> None:
    """Under ``pytest -n N`` with no ``--dist``: ``--dist loadfile``, so a module's tests run on one worker and its
    module-scoped fixtures (an image, a registry, a containerd; the README's earlier blocks) are made once, not
    once per worker (xdist's loadgroup does not group under pytest 9.2: pytest-dev/pytest-xdist#1386).  Not in
    pyproject's addopts: any ``--dist`` there turns pytest-benchmark off even without ``-n``."""
    if getattr(config.option, "numprocesses", None) and getattr(config.option, "dist", "no") == "no":
        config.option.dist = "loadfile"


def pytest_configure(config: pytest.Config) -> None:
    config.stash[_COMPARISONS] = Comparisons()
    # pytest keeps each test module's assertion-rewritten code in __pycache__ (``*-pytest-*.pyc``) only when
    # bytecode may be written: with PYTHONDONTWRITEBYTECODE set (as on these machines) every worker of every run
    # rewrote every test module again (collection: 4.0 s CPU a process; 1.5–1.9 s from the cache).
    sys.dont_write_bytecode = False
    if "PYTEST_XDIST_WORKER" not in os.environ:
        _compile_packages()


def _compile_packages() -> None:
    """Byte-compile the project once per run: with PYTHONDONTWRITEBYTECODE set (as on these machines) an editable
    install is otherwise compiled again by every process the tests start (~60 ms of each ``nydus-erofs``).
    Where the tree is read-only (the VM's view of it) nothing is written and nothing fails."""
    root = Path(__file__).parent
    for package in _PACKAGES:
        compileall.compile_dir(root / package, quiet=2, workers=1)


@pytest.fixture(scope="session")
def comparison(pytestconfig: pytest.Config) -> Comparisons:
    """``comparison(line)``: one line of a benchmark's result against its reference, shown in the summary."""
    return pytestconfig.stash[_COMPARISONS]


@pytest.hookimpl(trylast=True)  # after pytest-benchmark's tables, closest to the result line
def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter, config: pytest.Config) -> None:
    comparisons = config.stash.get(_COMPARISONS, None)
    if comparisons is not None and comparisons.lines:
        terminalreporter.section(SECTION)
        for line in comparisons.lines:
            terminalreporter.write_line(line)

"""Plugins for every pytest run from the repository root (tests/, benchmarks/, and tests/vm inside the VM).

Benchmarks compare us with a reference (mkfs.erofs, a direct read); ``comparison`` is how they say so.  Each
line a test passes to it is printed at the end of the run, in a "benchmark comparisons" section, with no
``-s`` needed.  tests/test_vm_suite.py finds that section in the guest's output and passes its lines on, so
the VM's benchmarks show up in the host's run too.
"""

from __future__ import annotations

import re

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


def pytest_configure(config: pytest.Config) -> None:
    config.stash[_COMPARISONS] = Comparisons()


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

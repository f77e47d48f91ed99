"""Output directories that a failed command takes back: ``make_dirs`` says what it created, ``remove_dirs``
removes exactly that (when still empty), so a failure leaves no new parent directories behind."""

from __future__ import annotations

import os
from pathlib import Path


def make_dirs(path: str | os.PathLike[str]) -> list[Path]:
    """``mkdir -p path``; returns the directories it created, outermost first (empty if ``path`` exists)."""
    missing: list[Path] = []
    p = Path(path)
    while not os.path.lexists(p) and p != p.parent:
        missing.append(p)
        p = p.parent
    created: list[Path] = []
    try:
        for d in reversed(missing):
            d.mkdir()
            created.append(d)
    except BaseException:
        remove_dirs(created)
        raise
    return created


def remove_dirs(created: list[Path]) -> None:
    """Remove directories :func:`make_dirs` created, innermost first; one no longer empty stays."""
    for d in reversed(created):
        try:
            d.rmdir()
        except OSError:
            pass

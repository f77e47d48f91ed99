"""Which ``mkfs.erofs`` the benchmarks compare with, and its version.

In order: the one ``NYDUS_EROFS_MKFS`` names; else erofs-utils 1.9.3 (the current release) built once from the
anchors beside the checkout (``../shared/anchors``, by its own ``build-erofs-utils`` script) into
``.benchmarks/erofs-utils-1.9.3``; else the ``mkfs.erofs`` on PATH (Debian 12 ships 1.5).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from functools import cache
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
ANCHORS = REPO.parent / "shared" / "anchors"
BUILD_SCRIPT = "build-erofs-utils"
CACHE = REPO / ".benchmarks" / "erofs-utils-1.9.3"
ENV = "NYDUS_EROFS_MKFS"


@dataclass(frozen=True)
class Mkfs:
    path: str
    version: str
    origin: str  # where it came from: the environment variable, the anchors, PATH

    def __str__(self) -> str:
        return f"mkfs.erofs {self.version} ({self.path}, from {self.origin})"


def version(path: str) -> str:
    """The erofs-utils version of a ``mkfs.erofs``: ``--version`` (newer releases), else its banner (1.5)."""
    proc = subprocess.run([path, "--version"], capture_output=True, text=True)
    found = re.search(r"(\d+\.\d+(?:\.\d+)?)", proc.stdout + proc.stderr) if proc.returncode == 0 else None
    if found:
        return found.group(1)
    with tempfile.TemporaryDirectory() as tmp:  # 1.5 has no --version; it names itself when it writes an image
        proc = subprocess.run([path, f"{tmp}/img", tmp], capture_output=True, text=True)
    found = re.search(r"mkfs\.erofs\s+(\d+\.\d+(?:\.\d+)?)", proc.stdout + proc.stderr)
    return found.group(1) if found else "unknown"


def build_anchor(anchors: Path = ANCHORS, prefix: Path = CACHE) -> str | None:
    """``mkfs.erofs`` 1.9.3 built from ``anchors`` into ``prefix`` (once: the script reuses a build); None
    when there are no anchors."""
    script = anchors / BUILD_SCRIPT
    if not script.is_file():
        return None
    proc = subprocess.run([str(script), str(prefix)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{script} failed:\n{proc.stdout}{proc.stderr}")
    return str(Path(proc.stdout.strip().splitlines()[-1]) / "mkfs.erofs")


@cache
def mkfs_erofs() -> Mkfs | None:
    """The ``mkfs.erofs`` to compare with (see the module's docstring); None when there is none at all."""
    named = os.environ.get(ENV)
    if named:
        path = shutil.which(named)
        if path is None:
            raise RuntimeError(f"{ENV}={named}: no such executable")
        return Mkfs(path, version(path), ENV)
    built = build_anchor()
    if built is not None:
        return Mkfs(built, version(built), str(ANCHORS))
    path = shutil.which("mkfs.erofs")
    return None if path is None else Mkfs(path, version(path), "PATH")

"""Garbage collection of a cache dir of fanotify/full/nbd mounts (``nydus-erofs ctl gc --cache-dir DIR``).

A cache dir holds one cache file per blob, ``<blob_id>.<key>``, and its chunk map ``<blob_id>.<key>.map``
(:mod:`.cachefile`).  :func:`collect` removes the pairs of the blobs no live mount of that dir uses: a blob is
in use when the runtime record (:mod:`.record`) of a mount of the dir that has not stopped lists it (a full mount
lists none: while one is up, nothing is collected), or when a
daemon holds the cache file's lock (the first daemon serving a cache file holds an exclusive ``flock`` on it for
as long as it serves it).  A file is removed while this holds its lock, so a daemon starting meanwhile waits
for nothing and finds no file: it makes a new one.  Anything else in the dir is left alone.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
from pathlib import Path
from typing import Any

from .chunkmap import KEY_HEX, map_path
from .record import all_records

__all__ = ["collect"]

_CACHE_FILE = re.compile(rf"(?P<blob>[0-9a-f]{{64}})\.[0-9a-f]{{{KEY_HEX}}}")


def _live_blobs(cache_dir: Path) -> set[str] | None:
    """The blobs of the mounts of ``cache_dir`` whose record says they have not stopped; None when one of them
    lists none (a full mount, no daemon): then every file may be in use."""
    out: set[str] = set()
    for rec in all_records():
        if rec.get("stopped") or os.path.realpath(str(rec.get("cache_dir") or "")) != os.fspath(cache_dir):
            continue
        if not isinstance(rec.get("blobs"), list):
            return None
        out.update(b for b in rec["blobs"] if isinstance(b, str))
    return out


def collect(cache_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """Remove the cache files (and chunk maps) of ``cache_dir`` that no live mount uses; what was removed
    (``removed``: file names, ``freed_bytes``: their allocated bytes) and what was kept (``kept``)."""
    root = Path(os.path.realpath(cache_dir))
    live = _live_blobs(root)
    removed: list[str] = []
    kept: list[str] = []
    freed = 0
    for entry in sorted(os.scandir(root), key=lambda e: e.name):
        m = _CACHE_FILE.fullmatch(entry.name)
        if m is None or not entry.is_file(follow_symlinks=False):
            continue
        if live is None or m["blob"] in live:
            kept.append(entry.name)
            continue
        try:
            fd = os.open(entry.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
        except FileNotFoundError:
            continue
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:  # a daemon serves it
                kept.append(entry.name)
                continue
            for path in (Path(entry.path), map_path(Path(entry.path))):
                with contextlib.suppress(FileNotFoundError):
                    freed += os.lstat(path).st_blocks * 512
                    path.unlink()
                    removed.append(path.name)
        finally:
            os.close(fd)
    return {"cache_dir": str(root), "removed": removed, "freed_bytes": freed, "kept": kept}

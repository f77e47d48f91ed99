"""The prefetch list of a build (``--prefetch-list``): which files the bootstrap's prefetch table names.

The rules are upstream's ``nydus-image --prefetch-policy fs`` (``builder/src/core/prefetch.rs``):

- one pattern a line, surrounding white space trimmed; a line that is not an absolute path is skipped
  with a warning (so are empty lines);
- a pattern equal to, or under, an earlier pattern is skipped with a warning (the earlier one covers it);
- a pattern names a file or a directory; a directory means everything under it (the daemons expand it);
- the table gets one entry per pattern that names an inode of the image, in pattern order.  Upstream never
  matches an empty regular file (nothing to fetch): those are skipped too.

Unlike upstream, a pattern naming a symlink or a special file is skipped with a warning (it has no data
to prefetch), and a pattern that names nothing in the image is a warning (upstream is silent): the table
holds regular files and directories only, which is what ``check`` insists on.
"""

from __future__ import annotations

import stat
import sys
from collections.abc import Callable, Iterable, Sequence

from erofs.build.tree import Node
from erofs.errors import UsageError

Warn = Callable[[str], None]


def _normalize(path: str) -> str | None:
    """``/a//b/./c/`` → ``/a/b/c``; None for a path that is not absolute or climbs with ``..``."""
    if not path.startswith("/"):
        return None
    parts = [p for p in path.split("/") if p not in ("", ".")]
    if ".." in parts:
        return None
    return "/" + "/".join(parts)


def _covered(path: str, seen: set[str]) -> bool:
    if path in seen or "/" in seen:
        return True
    cut = path
    while True:
        cut = cut.rsplit("/", 1)[0]
        if not cut:
            return False
        if cut in seen:
            return True


def parse_patterns(lines: Iterable[str], warn: Warn) -> list[str]:
    """The patterns of a prefetch list, in order, after upstream's filtering (see the module docstring)."""
    out: list[str] = []
    seen: set[str] = set()
    for n, raw in enumerate(lines, 1):
        line = raw.strip()
        path = _normalize(line)
        if path is None:
            if line:
                warn(f"prefetch list line {n}: {line!r} is not an absolute path, skipped")
            continue
        if _covered(path, seen):
            warn(f"prefetch list line {n}: {line} is covered by an earlier pattern, skipped")
            continue
        seen.add(path)
        out.append(path)
    return out


def read_prefetch_list(source: str, warn: Warn) -> list[str]:
    """Patterns from the file ``source`` (``-``: standard input)."""
    if source == "-":
        return parse_patterns(sys.stdin, warn)
    try:
        with open(source, encoding="utf-8", errors="surrogateescape") as f:
            return parse_patterns(f, warn)
    except OSError as e:
        raise UsageError(f"--prefetch-list {source}: {e.strerror}") from None


def _find(root: Node, path: str) -> Node | None:
    node = root
    for part in path.split("/"):
        if not part:
            continue
        if node.children is None:
            return None
        child = node.children.get(part.encode("utf-8", "surrogateescape"))
        if child is None:
            return None
        node = child
    return node


def resolve(root: Node, patterns: Sequence[str], warn: Warn) -> list[Node]:
    """The inodes the prefetch table lists, in pattern order (see the module docstring for what is skipped)."""
    out: list[Node] = []
    for path in patterns:
        node = _find(root, path)
        if node is None:
            warn(f"prefetch list: {path} is not in the image, skipped")
            continue
        fmt = stat.S_IFMT(node.mode)
        if fmt == stat.S_IFREG:
            if node.size == 0:
                continue  # upstream never matches an empty regular file
        elif fmt != stat.S_IFDIR:
            warn(f"prefetch list: {path} is not a regular file or a directory, skipped")
            continue
        out.append(node)
    return out


def stderr_warning(message: str) -> None:
    """How the commands report a skipped pattern: one line on standard error."""
    print(f"warning: {message}", file=sys.stderr, flush=True)


def selector(source: str | None, warn: Warn = stderr_warning) -> Callable[[Node], list[Node]] | None:
    """What ``--prefetch-list SOURCE`` gives the builder: the list is read now (a missing file fails before the
    build), the inodes are picked from the merged tree."""
    if source is None:
        return None
    patterns = read_prefetch_list(source, warn)
    return lambda root: resolve(root, patterns, warn)

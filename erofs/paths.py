"""Output directories that a failed command takes back: ``make_dirs`` says what it created, ``remove_dirs``
removes exactly that (when still empty), so a failure leaves no new parent directories behind.

Temporaries beside an output (build, unpack, convert) are named with their owner process (:func:`temp_prefix`),
so that one left by a killed command is removed by the next (:func:`remove_stale_temps`), never a live one."""

from __future__ import annotations

import hashlib
import os
import re
import stat
import sys
from pathlib import Path

# An image directory: what ``build`` writes into OUT, what the daemon serves from IMAGES/<fsid>.
BOOTSTRAP_NAME = "image.boot"
BLOBS_DIR = "blobs"  # blob files named by their id


def blobs_beside(bootstrap: str | os.PathLike[str]) -> Path | None:
    """The ``blobs/`` directory beside a bootstrap (an image directory as ``build`` writes it), if there is one:
    where ``check``, ``unpack`` and ``mount`` read blobs when no other blob source is given."""
    found = Path(bootstrap).resolve().parent / BLOBS_DIR
    return found if found.is_dir() else None

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


def process_start_time(pid: int) -> int | None:
    """Start time of a live process (clock ticks since boot, /proc/PID/stat field 22): with the pid, its
    identity.  None when there is no such process or it has exited (a zombie not yet reaped)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read()
    except OSError:
        return None
    fields = raw[raw.rindex(b")") + 2 :].split()
    if fields[0] in (b"Z", b"X"):
        return None
    return int(fields[19])


def _tag(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogateescape")).hexdigest()[:8]


def _owner() -> str | None:
    """``PID-START-TABLE-BOOT`` for this process: its pid and start time, a tag of the process table its pid is
    in (machine id, host name, pid namespace) and one of this boot.  None when /proc cannot tell (not cached: a
    forked child is another owner)."""
    pid = os.getpid()
    try:
        if os.readlink("/proc/self") != str(pid):  # a /proc of another pid namespace: its pids are not ours
            return None
        pidns = os.stat("/proc/self/ns/pid").st_ino
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
    except OSError:
        return None
    start = process_start_time(pid)
    if start is None:
        return None
    machine = ""
    for name in ("/etc/machine-id", "/var/lib/dbus/machine-id"):
        try:
            with open(name) as f:
                machine = f.read().strip()
            break
        except OSError:
            pass
    return f"{pid}-{start}-{_tag(f'{machine} {os.uname().nodename} {pidns}')}-{_tag(boot)}"


def temp_prefix(head: str) -> str:
    """The ``prefix`` for ``tempfile.mkdtemp``/``mkstemp``: ``head`` and this process as the owner."""
    owner = _owner()
    return f"{head}{owner}-" if owner else head


def remove_stale_temps(directory: str | os.PathLike[str], head: str) -> None:
    """Remove the temporaries in ``directory`` made with ``temp_prefix(HEAD)`` (``head``: a regular expression
    for HEAD) whose owner is gone: a directory, or a regular file named ``*.tmp``, of our uid, named by a process
    of this process table that has exited (or whose pid now is another process), or that ran before a reboot.
    One line on stderr per removal.  A symlink is never followed nor removed, nor a name not quite ours."""
    me = _owner()
    if me is None:
        return
    _, _, table, boot = me.split("-")
    ours = re.compile(rf"{head}(\d+)-(\d+)-([0-9a-f]{{8}})-([0-9a-f]{{8}})-[a-z0-9_]{{8}}(\.tmp)?", re.DOTALL)
    try:
        with os.scandir(directory) as it:
            names = [e.name for e in it]
    except OSError:
        return
    for name in names:
        m = ours.fullmatch(name)
        if m is None or m[3] != table:  # not ours, or named in another process table (a container, a host)
            continue
        pid, start, is_file = int(m[1]), int(m[2]), bool(m[5])
        if m[4] == boot and process_start_time(pid) == start:
            continue  # its owner is alive
        path = os.path.join(directory, name)
        try:
            st = os.lstat(path)
            if st.st_uid != os.geteuid() or not (stat.S_ISREG if is_file else stat.S_ISDIR)(st.st_mode):
                continue
            if is_file:
                os.unlink(path)
            else:
                import shutil  # (here only: the daemons that import this module for process_start_time never need it)

                shutil.rmtree(path)  # refuses a symlink put in its place; never follows one inside
        except FileNotFoundError:
            continue  # another command removed it first
        except OSError as e:
            print(f"nydus-erofs: cannot remove stale temporary {path}: {e.strerror}", file=sys.stderr)
            continue
        print(f"nydus-erofs: removed stale temporary {path} (its process {pid} is gone)", file=sys.stderr)

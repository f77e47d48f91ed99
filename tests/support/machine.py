"""What this machine can do, probed at most once per session, for the one skip hook (tests/conftest.py).

Each ``missing_*`` answers None when the capability is there, else a sentence saying what is missing; the hook
skips a test whose markers ask for something missing — or fails it under ``CI``, where nothing may skip.
"""

from __future__ import annotations

import functools
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import NoReturn

import pytest

from fscache.errors import KernelInterfaceError
from fscache.fanotify import FanotifyGroup
from tests.support.cli import run
from tests.support.kmount import mount_erofs
from tests.support.paths import NYDUS, REPO

# Where setup.sh's tools may live although root's PATH lacks them (sbin) — the same places the tests look.
_TOOL_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/local/sbin", "/usr/sbin", "/sbin", "/usr/bin"])


@functools.cache
def missing_root() -> str | None:
    return None if os.geteuid() == 0 else "needs root"


@functools.cache
def missing_erofs() -> str | None:
    """File-backed EROFS: an image our builder writes, mounted read-only from a regular file (Linux ≥ 6.12)."""
    if missing_root():
        return "file-backed EROFS mounts need root"
    try:
        with open("/proc/filesystems") as f:
            if not any(line.split()[-1:] == ["erofs"] for line in f):
                return "the kernel has no EROFS"
    except OSError:
        return "no /proc/filesystems"
    with tempfile.TemporaryDirectory(prefix="probe-erofs-") as tmp:
        src, out = Path(tmp) / "src", Path(tmp) / "out"
        src.mkdir()
        built = run("build", src, "-o", out, stdin=subprocess.DEVNULL, timeout=120)
        if built.returncode != 0:
            return f"cannot build the probe image for a file-backed EROFS mount: {built.stderr.strip()[-300:]}"
        try:
            with mount_erofs(out / "image.boot", Path(tmp) / "mnt"):
                pass
        except OSError as e:
            return f"the kernel cannot mount a file-backed EROFS image: {e}"
    return None


@functools.cache
def missing_fanotify() -> str | None:
    """fanotify pre-content events (Linux ≥ 6.14) on a sparse file in the temp dir, where tests put theirs."""
    if missing_root():
        return "fanotify pre-content groups need root"
    with tempfile.TemporaryDirectory(prefix="probe-fanotify-") as tmp:
        probe = Path(tmp) / "sparse"
        probe.write_bytes(b"")
        try:
            with FanotifyGroup(pre_content=True) as group:
                group.mark(probe)
        except (KernelInterfaceError, OSError) as e:
            return f"no fanotify pre-content events here: {e}"
    return None


@functools.cache
def missing_cachefiles() -> str | None:
    """fscache on-demand mode: /dev/cachefiles and a scratch disk for it (the test VM on our 6.12 kernel)."""
    if "VM_SCRATCH" not in os.environ:
        return "needs the fscache test VM (VM_SCRATCH and /dev/cachefiles)"
    if not os.path.exists("/dev/cachefiles"):
        return f"this kernel ({os.uname().release}) has no cachefiles on-demand mode (/dev/cachefiles)"
    return None


@functools.cache
def missing_loop() -> str | None:
    """Loop block devices: /dev/loop-control (root)."""
    if missing_root():
        return "loop devices need root"
    return None if os.path.exists("/dev/loop-control") else "no loop devices here (/dev/loop-control)"


@functools.cache
def missing_nbd() -> str | None:
    """NBD block devices (/dev/nbd0), which the nbd mount mode serves."""
    if missing_root():
        return "NBD devices need root"
    return None if os.path.exists("/dev/nbd0") else f"this kernel ({os.uname().release}) has no NBD (/dev/nbd0)"


# A test's kernel("feature", ...) marker: "erofs" (the default) is file-backed EROFS, "erofs-file-backed" says so.
KERNEL_FEATURES = {
    "erofs": missing_erofs,
    "erofs-file-backed": missing_erofs,
    "fanotify": missing_fanotify,
    "cachefiles": missing_cachefiles,
    "loop": missing_loop,
    "nbd": missing_nbd,
}


def in_vm() -> bool:
    return os.environ.get("NYDUS_EROFS_IN_VM") == "1"


def _run_vm_module():  # noqa: ANN202 - kernel-test/run_vm.py, stdlib only, outside the package
    sys.path.insert(0, str(REPO / "kernel-test"))
    try:
        import run_vm
    finally:
        sys.path.remove(str(REPO / "kernel-test"))
    return run_vm


@functools.cache
def missing_vm(kernel: str | None = None) -> str | None:
    """Whether the test VM boots here: qemu, mkfs.ext4 and its kernel — the fitting one, or ``kernel`` (a name
    run-vm --kernel takes, e.g. ``debian-6.1``, fetched and prepared once)."""
    run_vm = _run_vm_module()
    why = run_vm.missing_prerequisites()
    if why is None and kernel is not None:
        try:
            run_vm.find_boot(Path(kernel))
        except run_vm.RunVmError as e:
            why = str(e)
    return f"cannot boot the test VM: {why}" if why else None


@functools.cache
def missing_network() -> str | None:
    """A peer on 127.0.0.1: the loopback interface takes a listening socket."""
    try:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            s.listen()
    except OSError as e:
        return f"cannot listen on 127.0.0.1: {e}"
    return None


@functools.cache
def missing_tool(name: str) -> str | None:
    return None if shutil.which(name, path=_TOOL_PATH) else f"{name} is not installed (setup.sh installs it)"


@functools.cache
def missing_upstream() -> str | None:
    boot = NYDUS / "rafs-v6-2.2.boot"
    return None if boot.is_file() else f"upstream nydus-image fixtures not found at {NYDUS}"


def missing_kernel_features(item: pytest.Item) -> list[str]:
    """What ``item``'s ``kernel(...)`` markers ask for and the running kernel lacks."""
    why = [KERNEL_FEATURES[feature]() for mark in item.iter_markers("kernel") for feature in mark.args or ("erofs",)]
    return [w for w in why if w]


def missing_for(item: pytest.Item) -> list[str]:
    """What ``item``'s markers ask for and this machine lacks."""
    why: list[str | None] = []
    if item.get_closest_marker("root"):
        why.append(missing_root())
    why.extend(missing_kernel_features(item))
    for mark in item.iter_markers("vm"):
        why.append(missing_vm(*mark.args))
    if item.get_closest_marker("network"):
        why.append(missing_network())
    for mark in item.iter_markers("tools"):
        why.extend(missing_tool(name) for name in mark.args)
    if item.get_closest_marker("upstream"):
        why.append(missing_upstream())
    return list(dict.fromkeys(w for w in why if w))


def unavailable(why: str, *, even_in_ci: bool = False) -> NoReturn:
    """Skip a test whose needs this machine does not meet, saying why — but under ``CI``, where every test must
    run, fail instead (``even_in_ci``: a kernel feature the VM's kernel lacks, which each kernel may skip)."""
    if os.environ.get("CI") and not even_in_ci:
        pytest.fail(f"CI must run this test, but: {why}")
    pytest.skip(why)

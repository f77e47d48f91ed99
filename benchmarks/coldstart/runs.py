"""One cold start: a new containerd (empty content store and snapshots, the snapshotter's blob cache empty),
the page cache dropped, then the pull and ``ctr run`` of the workload, timed from the start of the pull to the
workload's first line of output.  The bytes fetched are the registry's: the sizes of the responses its access
log records from the pull until containerd is stopped (so a background prefetch counts too, up to then)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from tests.support.busybox_image import run
from tests.support.containerd import CLI, NAMESPACE, SNAPSHOTTER, Containerd
from tests.support.registry import RegistryServer

from .images import WORKLOAD, Image

MODES = ("oci", "nydus", "nydus-prefetch")
#: the modes run in the test VM (:mod:`.vm`): skopeo copy + umoci unpack + chroot, and Nydus lazy over fscache
VM_MODES = ("vm-oci", "vm-fscache")
#: a combined-log-format line: "METHOD PATH HTTP/x" STATUS SIZE
_ACCESS = re.compile(r'"([A-Z]+) (\S+) HTTP/[\d.]+" (\d{3}) (\d+|-)')


@dataclass
class Run:
    mode: str
    size_bytes: int
    seconds: float
    bytes_fetched: int
    pull_seconds: float
    repetition: int

    def as_json(self) -> dict:
        return asdict(self)


def drop_caches() -> None:
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def registry_bytes(log: Path, offset: int) -> int:
    """The bytes of the responses to GET requests the registry logged after ``offset`` of its log."""
    with open(log, "rb") as f:
        f.seek(offset)
        text = f.read().decode(errors="replace")
    return sum(int(m.group(4)) for m in _ACCESS.finditer(text) if m.group(1) == "GET" and m.group(4) != "-")


def first_line(argv: list[str], t0: float, what: str) -> float:
    """Run ``argv`` (the workload) to its end; the seconds from ``t0`` to its first line of output."""
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    first = proc.stdout.readline()
    seconds = time.perf_counter() - t0
    rest, err = proc.communicate(timeout=600)
    if proc.returncode != 0 or not first.strip():
        raise RuntimeError(f"{what}: the workload failed (exit {proc.returncode}): {first}{rest}{err}")
    return seconds


def cold_start(mode: str, image: Image, registry: RegistryServer, tmp: Path, repetition: int) -> Run:
    """One run of ``mode`` (see :data:`MODES`) on ``image``, from a cold state."""
    ref = image.ref(registry.host, mode)
    offset = registry.log.stat().st_size
    root = tmp / f"containerd-{mode}-{image.tag}-{repetition}"
    with Containerd(root, "--plain-http") as cd:
        drop_caches()
        t0 = time.perf_counter()
        if mode == "oci":
            cd.ctr("images", "pull", "--plain-http", ref, timeout=3600)
            snapshotter: list[str] = []
        else:
            run(CLI, "pull", "--plain-http", "--address", cd.sock, ref)
            snapshotter = ["--snapshotter", SNAPSHOTTER]
        pulled = time.perf_counter() - t0
        seconds = first_line(["ctr", "--address", str(cd.sock), "--namespace", NAMESPACE, "run", "--rm",
                              *snapshotter, ref, f"coldstart-{repetition}", "/bin/bash", "-c", WORKLOAD],
                             t0, f"{mode} {ref}")  # fmt: skip
    shutil.rmtree(root, ignore_errors=True)
    return Run(mode, image.size_bytes, seconds, registry_bytes(registry.log, offset), pulled, repetition)

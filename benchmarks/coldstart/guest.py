"""``python -m benchmarks.coldstart.guest MODE REF``: one cold start inside the test VM (kernel-test/run-vm, started
by :mod:`.vm` on the host, one boot per run: an empty page cache and an empty cachefiles cache).  Prints one JSON
line, ``{"seconds": …, "pull_seconds": …, "kernel": …, "cpu": …}``: from the start of the pull to the workload's
first line of output, and of that the pull (everything before the workload starts); the guest's kernel release and
CPU model (``QEMU TCG CPU`` under TCG).

- ``vm-fscache``: cachefilesd-py is started first (not timed), then ``nydus-erofs mount docker://REF --mode
  fscache`` (the daemon fetches the manifest and bootstrap and binds the image; the kernel mounts it by fsid), an
  overlay with an upper directory on the scratch disk over it, and the workload in a chroot of the overlay.
- ``vm-oci``: ``skopeo copy`` of REF into an OCI layout on the scratch disk, ``umoci unpack``, the workload in a
  chroot of the unpacked root filesystem.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import click

from tests.support.busybox_image import run
from tests.support.containerd import CLI
from tests.support.kmount import mount, umount
from tests.vm.test_daemon import DaemonProc

from .images import PATH, WORKLOAD
from .runs import VM_MODES, drop_caches, first_line


def _workload(root: Path, t0: float, what: str) -> float:
    """The workload in a chroot of ``root`` (with the guest's /dev bound in): seconds from ``t0`` to its first
    line."""
    run("mount", "--bind", "/dev", root / "dev")
    try:
        return first_line(["chroot", str(root), "/usr/bin/env", "-i", f"PATH={PATH}", "/bin/bash", "-c", WORKLOAD],
                          t0, what)  # fmt: skip
    finally:
        run("umount", root / "dev")


def fscache_start(ref: str, scratch: Path) -> tuple[float, float]:
    daemon = DaemonProc(scratch / "daemon").start()  # cold: its cache directory is new
    mnt, root = scratch / "lower", scratch / "rootfs"
    upper, work = scratch / "upper", scratch / "work"
    for d in (mnt, root, upper, work):
        d.mkdir()
    try:
        drop_caches()
        t0 = time.perf_counter()
        run(CLI, "mount", f"docker://{ref}", mnt, "--mode", "fscache", "--plain-http", "--daemon-sock",
            daemon.api_sock)  # fmt: skip
        try:
            mount("overlay", root, "overlay", 0, f"lowerdir={mnt},upperdir={upper},workdir={work}")
            try:
                pulled = time.perf_counter() - t0
                seconds = _workload(root, t0, f"vm-fscache {ref}")
            finally:
                umount(root)
            per = daemon.api("/api/v1/metrics/backend")["backends"]  # the daemon's own count, beside the registry's
            print(f"cachefilesd-py: {sum(b['bytes'] for b in per.values())} backend bytes", file=sys.stderr)
        finally:
            run(CLI, "umount", mnt)
    finally:
        rc = daemon.stop()
    if rc != 0:
        raise RuntimeError(f"cachefilesd-py exited {rc}: {daemon.log_text()[-2000:]}")
    return seconds, pulled


def oci_start(ref: str, scratch: Path) -> tuple[float, float]:
    layout, bundle = scratch / "layout", scratch / "bundle"
    tag = ref.rsplit(":", 1)[1]
    drop_caches()
    t0 = time.perf_counter()
    run("skopeo", "copy", "--insecure-policy", "--src-tls-verify=false", "--quiet", f"docker://{ref}",
        f"oci:{layout}:{tag}")  # fmt: skip
    copied = time.perf_counter() - t0
    run("umoci", "unpack", "--image", f"{layout}:{tag}", bundle)
    pulled = time.perf_counter() - t0
    print(f"skopeo copy {copied:.1f} s, umoci unpack {pulled - copied:.1f} s", file=sys.stderr)
    return _workload(bundle / "rootfs", t0, f"vm-oci {ref}"), pulled


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("mode", type=click.Choice(VM_MODES))
@click.argument("ref")
def main(mode: str, ref: str) -> None:
    """One cold start of REF (HOST:PORT/REPO:TAG, plain HTTP) in MODE; run inside kernel-test/run-vm."""
    if os.environ.get("NYDUS_EROFS_IN_VM") != "1":
        raise click.ClickException("run this inside the test VM (kernel-test/run-vm): it mounts and drops caches")
    scratch = Path(os.environ["VM_SCRATCH"]) / "coldstart"
    scratch.mkdir()
    try:
        seconds, pulled = (fscache_start if mode == "vm-fscache" else oci_start)(ref, scratch)
    except (RuntimeError, AssertionError, OSError, subprocess.SubprocessError) as e:
        raise click.ClickException(str(e).strip()[-2000:] or repr(e)) from None
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), "?")  # fmt: skip
    click.echo(json.dumps({"seconds": round(seconds, 3), "pull_seconds": round(pulled, 3),
                           "kernel": platform.release(), "cpu": cpu}))  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())

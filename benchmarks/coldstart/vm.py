"""``python -m benchmarks.coldstart --vm``: the cold starts in the test VM (kernel-test/run-vm: our kernel with
cachefiles on-demand, under TCG), one VM boot per run, :mod:`.guest` doing the run inside.

The registry is the host's (docker-registry in the tbf-shaped network namespace of :mod:`.netns`, as for the
host's runs): the guest reaches it through qemu's user-mode network, whose connections leave from the host and
so cross the shaped link.  The bytes fetched are the registry's access log's, as on the host, from the VM's boot
to its power-off.  Under TCG the guest's CPU is several times slower than the host's: the times are relative
figures, comparable with each other, not with the host's.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.support.registry import RegistryServer

from .images import Image
from .runs import Run, registry_bytes

REPO = Path(__file__).resolve().parents[2]
RUN_VM = REPO / "kernel-test" / "run-vm"
VM_MEM_MB = 2048
#: the guest's scratch disk (sparse): the OCI mode's layout and unpacked tree of the largest image fit
VM_SCRATCH_SIZE = "12G"
VM_TIMEOUT_S = 3600


def vm_cold_start(mode: str, image: Image, registry: RegistryServer, repetition: int) -> tuple[Run, dict]:
    """One run of ``mode`` (``vm-oci`` or ``vm-fscache``) on ``image`` in a fresh VM; and what the guest said of
    itself (its kernel, its CPU)."""
    ref = image.ref(registry.host, "oci" if mode == "vm-oci" else "nydus")
    offset = registry.log.stat().st_size
    cmd = [str(RUN_VM), "--net", "--mem", str(VM_MEM_MB), "--scratch-size", VM_SCRATCH_SIZE, "--timeout",
           str(VM_TIMEOUT_S), "--", sys.executable, "-m", "benchmarks.coldstart.guest", mode, ref]  # fmt: skip
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, stdin=subprocess.DEVNULL,
                          timeout=VM_TIMEOUT_S + 120)  # fmt: skip
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"{mode} {ref} in the VM: exit {done.returncode}: {done.stderr.strip()[-2000:]}")
    got = json.loads(lines[-1])
    if done.stderr.strip():
        print(done.stderr.strip(), file=sys.stderr)
    run = Run(mode, image.size_bytes, got["seconds"], registry_bytes(registry.log, offset), got["pull_seconds"],
              repetition)  # fmt: skip
    return run, {"kernel": got["kernel"], "cpu": got["cpu"], "mem_mb": VM_MEM_MB}

"""docs/coldstart.md holds two runs of ``python -m benchmarks.coldstart``: the host's and the test VM's
(``--vm``), each rewriting only its own part of the page (``--from-json`` re-renders a run without measuring)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
MIB = 1 << 20
FACTS = {"rate": "200mbit", "repetitions": 1, "workload": "true", "kernel": "6.18", "cpus": 2,
         "load_before": "1.0 / 1.0 / 1.0", "load_after": "2.0 / 2.0 / 2.0", "build_minutes": 1.0,
         "run_minutes": 2.0}  # fmt: skip


def _runs(path: Path, modes: dict[str, float], vm: bool) -> Path:
    runs = [{"mode": mode, "size_bytes": size, "seconds": secs, "bytes_fetched": size // 10, "pull_seconds": 1.0,
             "repetition": 0} for mode, secs in modes.items() for size in (100 * MIB, 2048 * MIB)]  # fmt: skip
    facts = {**FACTS, "vm": {"kernel": "6.12.117", "cpu": "QEMU TCG CPU", "mem_mb": 2048}} if vm else FACTS
    path.write_text(json.dumps({"runs": runs, "facts": facts}))
    return path


def _report(*args: str | Path) -> str:
    proc = subprocess.run([sys.executable, "-m", "benchmarks.coldstart", *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_the_vm_run_adds_its_section_and_the_host_run_keeps_it(tmp_path: Path) -> None:
    page = tmp_path / "coldstart.md"
    host = _runs(tmp_path / "host.json", {"oci": 50.0, "nydus": 5.0}, vm=False)
    vm = _runs(tmp_path / "vm.json", {"vm-oci": 400.0, "vm-fscache": 40.0}, vm=True)
    _report("--from-json", host, "--markdown", page)
    host_page = page.read_text()
    assert "## In the test VM" not in host_page

    out = _report("--vm", "--from-json", vm, "--markdown", page)
    assert "| 2048 MiB | 400.0 (1.0) / 204.8 (10.0%) | 40.0 (1.0) / 204.8 (10.0%) |" in out
    _report("--vm", "--from-json", vm, "--markdown", page)  # again: the section replaced, not repeated
    text = page.read_text()
    assert text.startswith(host_page.rstrip("\n")) and text.count("## In the test VM") == 1
    section = text.split("## In the test VM", 1)[1]
    assert "VM/TCG: Nydus lazy over fscache" in section and "QEMU TCG CPU" in section
    assert "at 2048 MiB, Nydus over fscache starts in 10.0% of the OCI time" in section

    _report("--from-json", host, "--markdown", page)  # the host's run rewrites its part only
    assert page.read_text() == text


def test_vm_modes_are_only_known_with_vm() -> None:
    proc = subprocess.run([sys.executable, "-m", "benchmarks.coldstart", "--modes", "vm-fscache"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 2 and "unknown vm-fscache" in proc.stderr, proc.stderr

"""Benchmarks print their comparison in a plain ``pytest`` run (no ``-s``): bench_build on a small tree."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(shutil.which("mkfs.erofs") is None or os.geteuid() != 0,
                    reason="needs mkfs.erofs (erofs-utils) and root (the benchmark drops the page cache)")  # fmt: skip
def test_a_benchmark_prints_its_comparison(tmp_path: Path, comparison: Any) -> None:
    src = tmp_path / "src"
    (src / "d").mkdir(parents=True)
    (src / "d" / "f.bin").write_bytes(os.urandom(3 << 20))
    (src / "small").write_text("hello\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}  # not a worker of ours (xdist)
    env.update(NYDUS_EROFS_BENCH_SOURCE=str(src), NYDUS_EROFS_MKFS="mkfs.erofs")
    proc = subprocess.run([sys.executable, "-m", "pytest", "benchmarks/bench_build.py", "-q", "--color=no",
                           "-p", "no:cacheprovider", f"--basetemp={tmp_path / 'run'}"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "= benchmark comparisons =" in proc.stdout, proc.stdout
    line = next(x for x in proc.stdout.splitlines() if x.startswith(f"build {src} "))
    mkfs = shutil.which("mkfs.erofs")
    assert "nydus-erofs build" in line and f"({mkfs}, from NYDUS_EROFS_MKFS)" in line and "x as fast" in line
    # and the VM suite's relay finds exactly that line in such an output
    relayed = type(comparison)().relay(proc.stdout, prefix="VM: ")
    assert relayed == [f"VM: {line}"]

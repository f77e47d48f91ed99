"""``python -m benchmarks.coldstart --quick``: container cold start at two image sizes (100 MiB, 500 MiB; one
repetition) for OCI, Nydus lazy and Nydus with a trace-based prefetch table, registry behind a 200 Mbit link in a
network namespace (benchmarks/coldstart/ says how).  A few minutes; the full run (docs/coldstart.md) is by hand.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.coldstart.runs import MODES

REPO = Path(__file__).resolve().parents[1]

pytestmark = [
    pytest.mark.root,
    pytest.mark.kernel("erofs", "fanotify"),
    pytest.mark.network,
    pytest.mark.tools("containerd", "runc", "ctr", "skopeo", "docker-registry", "ip"),
]


def test_coldstart_quick(tmp_path: Path, comparison) -> None:  # type: ignore[no-untyped-def]
    out, plot = tmp_path / "coldstart.json", tmp_path / "coldstart.png"
    proc = subprocess.run([sys.executable, "-m", "benchmarks.coldstart", "--quick", "--json", str(out), "--plot",
                           str(plot)], cwd=REPO, capture_output=True, text=True, timeout=1800)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = json.loads(out.read_text())["runs"]
    assert plot.stat().st_size > 0
    by = {(r["mode"], r["size_bytes"]): r for r in runs}
    sizes = sorted({size for _, size in by})
    assert len(sizes) == 2 and set(by) == {(m, s) for m in MODES for s in sizes}
    for size in sizes:
        oci = by["oci", size]
        assert oci["bytes_fetched"] >= size  # the whole image came over the link
        line = [f"coldstart {size >> 20:4d} MiB: oci {oci['seconds']:.1f}s"]
        for mode in MODES[1:]:
            r = by[mode, size]
            assert r["bytes_fetched"] < oci["bytes_fetched"] / 4  # a Nydus start reads a little of the image
            line.append(f"{mode} {r['seconds']:.1f}s ({r['seconds'] / oci['seconds']:.2f}x, "
                        f"{r['bytes_fetched'] / oci['bytes_fetched']:.3f}x bytes)")  # fmt: skip
        comparison(", ".join(line))

"""``ctr run`` of a command that reads a few files: the OCI image (``ctr image pull`` + run) vs its Nydus
conversion (``nydus-erofs pull`` + run), same busybox image (96 MiB of data nobody reads, tests/support), same
registry on 127.0.0.1, same containerd and snapshotter.

Reported per variant: the median pull and run times of the rounds, and the bytes fetched: for OCI the layers
ctr downloads; for Nydus the bootstrap layer plus what the containers' reads filled into the blob cache.  Each
round removes the image first (``ctr image rm --sync``: snapshots and cache go), so every round is cold.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.support.busybox_image import busybox_layout, push_layout, run
from tests.support.containerd import CLI, SNAPSHOTTER, Containerd
from tests.support.registry import RegistryServer

ROUNDS = 3
COMMAND = "cat /etc/hello.txt /data/log >/dev/null"

pytestmark = [
    pytest.mark.root,
    pytest.mark.kernel("erofs", "fanotify"),
    pytest.mark.network,
    pytest.mark.tools("containerd", "runc", "ctr", "umoci", "skopeo", "docker-registry", "busybox"),
]


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    tmp = tmp_path_factory.mktemp("bench-containerd")
    with RegistryServer(tmp / "registry") as registry_server, _images(tmp, registry_server) as out:
        yield out


@contextmanager
def _images(tmp: Path, registry_server: RegistryServer) -> Iterator[dict]:
    layout = busybox_layout(tmp)
    oci = push_layout(layout, "v1", registry_server.host, "bench/busybox")
    run(CLI, "convert", f"oci:{layout}:v1", f"oci:{tmp / 'nydus'}:v1")
    nydus = push_layout(tmp / "nydus", "v1", registry_server.host, "bench/busybox-nydus")
    with Containerd(tmp / "containerd", "--plain-http") as cd:
        yield {"cd": cd, "oci": oci, "nydus": nydus, "oci_layout": layout, "nydus_layout": tmp / "nydus"}


def _layer_bytes(layout: Path) -> list[tuple[int, bool]]:
    """(size, is the bootstrap) of each layer of the layout's one image."""
    index = json.loads((layout / "index.json").read_text())
    digest = index["manifests"][0]["digest"].split(":")[1]
    manifest = json.loads((layout / "blobs" / "sha256" / digest).read_text())
    return [(lay["size"], (lay.get("annotations") or {}).get("containerd.io/snapshot/nydus-bootstrap") == "true")
            for lay in manifest["layers"]]  # fmt: skip


def _cache_bytes(cd: Containerd) -> int:
    total = 0
    for dirpath, _, files in os.walk(cd.snapshotter.root / "cache"):
        total += sum(os.lstat(os.path.join(dirpath, f)).st_blocks * 512 for f in files)
    return total


def _timed(*cmd: str) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    dt = time.perf_counter() - t0
    assert proc.returncode == 0, proc.stderr
    return dt


def test_ctr_run_oci_vs_nydus(setup: dict, comparison) -> None:  # type: ignore[no-untyped-def]
    cd: Containerd = setup["cd"]
    ctr = ["ctr", "--address", str(cd.sock), "--namespace", "default"]
    results: dict[str, dict[str, list[float]]] = {}
    fetched: dict[str, int] = {}
    for variant in ("oci", "nydus"):
        ref = setup[variant]
        times: dict[str, list[float]] = {"pull": [], "run": []}
        for i in range(ROUNDS):
            if variant == "oci":
                times["pull"].append(_timed(*ctr, "images", "pull", "--plain-http", "--snapshotter", SNAPSHOTTER, ref))
            else:
                times["pull"].append(_timed(CLI, "pull", "--plain-http", "--address", str(cd.sock), ref))
            times["run"].append(_timed(*ctr, "run", "--rm", "--snapshotter", SNAPSHOTTER, ref, f"bench-{variant}-{i}",
                                       "/bin/sh", "-c", COMMAND))  # fmt: skip
            if variant == "nydus":
                boot = sum(size for size, is_boot in _layer_bytes(setup["nydus_layout"]) if is_boot)
                fetched[variant] = boot + _cache_bytes(cd)
            else:
                fetched[variant] = sum(size for size, _ in _layer_bytes(setup["oci_layout"]))
            cd.ctr("images", "rm", "--sync", ref)
        results[variant] = times
    for variant, times in results.items():
        pull, run_ = statistics.median(times["pull"]), statistics.median(times["run"])
        comparison(f"containerd {variant:5}: pull {pull:.2f}s + run {run_:.2f}s = {pull + run_:.2f}s, "
                   f"fetched {fetched[variant] / (1 << 20):.1f} MiB")  # fmt: skip
    total = {v: statistics.median(t["pull"]) + statistics.median(t["run"]) for v, t in results.items()}
    comparison(f"containerd nydus/oci: time {total['nydus'] / total['oci']:.2f}x, "
               f"bytes {fetched['nydus'] / fetched['oci']:.3f}x")  # fmt: skip
    assert fetched["nydus"] < fetched["oci"]

"""``nydus-erofs snapshotter`` and ``nydus-erofs pull`` with Debian's containerd, runc and ctr: a busybox image
(umoci) pushed to docker-registry on 127.0.0.1 as OCI and, converted by ``nydus-erofs convert``, as Nydus."""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from tests.support.busybox_image import busybox_layout, push_layout, run
from tests.support.cli import run as cli_run
from tests.support.containerd import SNAPSHOTTER, Containerd, mounts_under
from tests.support.cri import cri_pb2, cri_pb2_grpc
from tests.support.registry import RegistryServer

pytestmark = [
    pytest.mark.root,
    pytest.mark.kernel("erofs", "fanotify"),
    pytest.mark.network,
    pytest.mark.tools("containerd", "runc", "ctr", "umoci", "skopeo", "docker-registry", "busybox"),
]

BIG = 32 << 20  # /data/big: nobody reads it but the listings and --mode full

# what the container lists: path, type and mode (hex), owner, size (not of directories: each file system has its
# own), and the sha256 of regular files
LISTING = ("find /bin /etc /data -xdev | sort | while read -r f; do "
           "if [ -d \"$f\" ]; then stat -c '%n %f %u:%g' \"$f\"; else stat -c '%n %f %u:%g %s' \"$f\"; fi; "
           "[ -f \"$f\" ] && [ ! -L \"$f\" ] && sha256sum \"$f\" | cut -d' ' -f1; done")  # fmt: skip


@pytest.fixture(scope="module")
def images(registry_server: RegistryServer, tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    tmp = tmp_path_factory.mktemp("images")
    layout = busybox_layout(tmp, big_size=BIG)
    oci = push_layout(layout, "v1", registry_server.host, "test/busybox")
    proc = cli_run("convert", f"oci:{layout}:v1", f"oci:{tmp / 'nydus'}:v1")
    assert proc.returncode == 0, proc.stderr
    nydus = push_layout(tmp / "nydus", "v1", registry_server.host, "test/busybox-nydus")
    rootfs = tmp / "unpacked"
    run("umoci", "unpack", "--image", f"{layout}:v1", rootfs)
    return {"oci": oci, "nydus": nydus, "rootfs": rootfs / "rootfs"}


@pytest.fixture(scope="module")
def containerd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Containerd]:
    with Containerd(tmp_path_factory.mktemp("containerd"), "--plain-http") as cd:
        yield cd
    assert not mounts_under(cd.tmp), "mounts left behind"


def nydus_pull(cd: Containerd, ref: str) -> str:
    proc = cli_run("pull", "--plain-http", "--address", cd.sock, ref)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def ctr_run(cd: Containerd, ref: str, cid: str, script: str) -> str:
    return cd.run(ref, cid, "/bin/sh", "-c", script)


def remove_image(cd: Containerd, ref: str) -> None:
    cd.ctr("images", "rm", "--sync", ref)


def snapshots(cd: Containerd) -> list[str]:
    return cd.ctr("snapshots", "--snapshotter", SNAPSHOTTER, "ls").stdout.splitlines()[1:]


def erofs_mounts(cd: Containerd) -> list[str]:
    with open("/proc/self/mountinfo") as f:
        return [ln for ln in f if " - erofs " in ln and str(cd.snapshotter.root) in ln]


def cache_bytes(cd: Containerd) -> int:
    """Bytes of blob data in the snapshotter's cache (not the chunk maps, ``*.map``, a mount starts empty)."""
    total = 0
    for dirpath, _, files in os.walk(cd.snapshotter.root / "cache"):
        total += sum(os.lstat(os.path.join(dirpath, f)).st_blocks * 512 for f in files if not f.endswith(".map"))
    return total


def wait_reconnected(cd: Containerd, timeout: float = 60) -> None:
    """Until containerd's connection to the restarted snapshotter is up again (gRPC reconnects with a backoff of
    about a second after a refused connection; calls meanwhile fail with "unavailable")."""
    deadline = time.monotonic() + timeout
    while cd.ctr("snapshots", "--snapshotter", SNAPSHOTTER, "ls", check=False).returncode != 0:
        assert time.monotonic() < deadline, "containerd did not reconnect to the snapshotter"
        time.sleep(0.2)  # polling interval, not synchronisation


def expected_listing(rootfs: Path) -> str:
    """What LISTING prints for the source root file system, computed here."""
    proc = subprocess.run(["chroot", str(rootfs), "/bin/sh", "-c", LISTING], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_oci_image_runs_through_the_snapshotter(containerd: Containerd, images: dict) -> None:
    ref = images["oci"]
    containerd.ctr("images", "pull", "--plain-http", "--snapshotter", SNAPSHOTTER, ref)
    try:
        assert ctr_run(containerd, ref, "oci-1", "cat /etc/hello.txt") == "hello from the image\n"
        assert ctr_run(containerd, ref, "oci-2", LISTING) == expected_listing(images["rootfs"])
    finally:
        remove_image(containerd, ref)
    assert snapshots(containerd) == []


def test_nydus_pull_then_run_fetches_little(containerd: Containerd, images: dict) -> None:
    ref = images["nydus"]
    out = nydus_pull(containerd, ref)
    assert "none downloaded" in out
    assert cache_bytes(containerd) == 0  # nothing of the blobs fetched by the pull
    try:
        assert ctr_run(containerd, ref, "nydus-1", "cat /etc/hello.txt; head -c 5 /data/log") == \
            "hello from the image\nline "  # fmt: skip
        fetched = cache_bytes(containerd)
        assert 0 < fetched < BIG // 8, fetched  # busybox (~2 MB) and the small files, not /data/big
    finally:
        remove_image(containerd, ref)
    assert snapshots(containerd) == []
    assert not erofs_mounts(containerd)


def test_nydus_container_sees_the_source_files(containerd: Containerd, images: dict) -> None:
    ref = images["nydus"]
    nydus_pull(containerd, ref)
    nydus_pull(containerd, ref)  # again: nothing changes
    assert len(snapshots(containerd)) == 2
    try:
        assert ctr_run(containerd, ref, "nydus-list", LISTING) == expected_listing(images["rootfs"])
    finally:
        remove_image(containerd, ref)


def test_nydus_container_writes_are_its_own(containerd: Containerd, images: dict) -> None:
    ref = images["nydus"]
    nydus_pull(containerd, ref)
    try:
        containerd.ctr("run", "-d", "--snapshotter", SNAPSHOTTER, ref, "writer", "/bin/sleep", "1000")
        script = ("echo new > /etc/new.txt && rm /etc/hello.txt && echo 'line 2' >> /data/log && "
                  "echo tail >> /data/big && cat /etc/new.txt /data/log && tail -c 5 /data/big && "
                  "[ ! -e /etc/hello.txt ] && echo gone")  # fmt: skip
        out = containerd.ctr("tasks", "exec", "--exec-id", "w1", "writer", "/bin/sh", "-c", script).stdout
        assert out == "new\nline 1\nline 2\ntail\ngone\n"
        # a second container, while the first runs: the same image mount under it, none of the first's changes
        script = "cat /etc/hello.txt /data/log; [ ! -e /etc/new.txt ] && echo no-new; stat -c %s /data/big"
        assert ctr_run(containerd, ref, "reader", script) == f"hello from the image\nline 1\nno-new\n{BIG}\n"
        assert len(erofs_mounts(containerd)) == 1
    finally:
        containerd.ctr("tasks", "kill", "-s", "KILL", "writer", check=False)
        containerd.ctr("tasks", "delete", "-f", "writer", check=False)
        containerd.ctr("containers", "delete", "writer", check=False)
        remove_image(containerd, ref)
    assert not erofs_mounts(containerd)


def test_snapshotter_killed_and_restarted(containerd: Containerd, images: dict) -> None:
    ref = images["nydus"]
    nydus_pull(containerd, ref)
    try:
        containerd.ctr("run", "-d", "--snapshotter", SNAPSHOTTER, ref, "long", "/bin/sleep", "1000")
        containerd.snapshotter.kill()
        # the running container reads what nobody read before: the mount's daemon outlived the snapshotter
        script = f"dd if=/data/big bs=1M skip={(BIG >> 20) - 2} count=1 2>/dev/null | wc -c"
        out = containerd.ctr("tasks", "exec", "--exec-id", "r1", "long", "/bin/sh", "-c", script).stdout
        assert out.strip() == "1048576"
        containerd.snapshotter.start()
        wait_reconnected(containerd)
        assert ctr_run(containerd, ref, "after-restart", "cat /etc/hello.txt") == "hello from the image\n"
        assert len(erofs_mounts(containerd)) == 1
    finally:
        containerd.ctr("tasks", "kill", "-s", "KILL", "long", check=False)
        containerd.ctr("tasks", "delete", "-f", "long", check=False)
        containerd.ctr("containers", "delete", "long", check=False)
        remove_image(containerd, ref)
    assert snapshots(containerd) == []
    assert not erofs_mounts(containerd)
    assert not mounts_under(containerd.snapshotter.root)


def top_snapshot(cd: Containerd) -> str:
    """The committed snapshot no other one has as parent: the image's chain ID."""
    rows = [line.split() for line in snapshots(cd)]
    parents = {r[1] for r in rows if len(r) == 3}
    tops = [r[0] for r in rows if r[-1] == "Committed" and r[0] not in parents]
    assert len(tops) == 1, rows
    return tops[0]


def mount_json(cd: Containerd, mounts_json: str, target: Path) -> None:
    (m,) = json.loads(mounts_json)
    target.mkdir(exist_ok=True)
    subprocess.run(["mount", "-t", m["Type"], m["Source"], str(target), "-o", ",".join(m["Options"])], check=True)


def test_commit_on_a_nydus_base_and_view_it(containerd: Containerd, images: dict, tmp_path: Path) -> None:
    """An image built on a Nydus base: an active snapshot over the lazy mount, changed, committed, then seen
    through a view (read-only, both layers)."""
    ref = images["nydus"]
    nydus_pull(containerd, ref)
    mnt = tmp_path / "mnt"
    sn = ("snapshots", "--snapshotter", SNAPSHOTTER)
    try:
        base = top_snapshot(containerd)
        mount_json(containerd, containerd.ctr(*sn, "prepare", "--mounts", "work-1", base).stdout, mnt)
        try:
            (mnt / "etc" / "added").write_text("added on top\n")
            (mnt / "etc" / "hello.txt").unlink()
            with open(mnt / "data" / "log", "a") as f:
                f.write("line 2\n")
        finally:
            subprocess.run(["umount", str(mnt)], check=True)
        containerd.ctr(*sn, "commit", "layer-2", "work-1")
        info = json.loads(containerd.ctr(*sn, "info", "layer-2").stdout)
        assert (info["Kind"], info["Parent"]) == ("Committed", base)
        mount_json(containerd, containerd.ctr(*sn, "view", "--mounts", "view-2", "layer-2").stdout, mnt)
        try:
            assert (mnt / "etc" / "added").read_text() == "added on top\n"
            assert not (mnt / "etc" / "hello.txt").exists()
            assert (mnt / "data" / "log").read_text() == "line 1\nline 2\n"
            assert (mnt / "data" / "big").stat().st_size == BIG
            with pytest.raises(OSError):
                (mnt / "etc" / "new").write_text("read-only")
        finally:
            subprocess.run(["umount", str(mnt)], check=True)
    finally:
        for key in ("view-2", "layer-2", "work-1"):
            containerd.ctr(*sn, "rm", key, check=False)
        remove_image(containerd, ref)
    assert snapshots(containerd) == []
    assert not erofs_mounts(containerd)


def test_restarted_snapshotter_mounts_the_image_again(containerd: Containerd, images: dict) -> None:
    """The image's mount went while the snapshotter was down (here: unmounted by hand): the snapshotter mounts it
    again when it starts, for the container snapshots on it."""
    ref = images["nydus"]
    nydus_pull(containerd, ref)
    sn = ("snapshots", "--snapshotter", SNAPSHOTTER)
    try:
        containerd.ctr(*sn, "prepare", "ctr-snap", top_snapshot(containerd))
        (mount,) = erofs_mounts(containerd)
        mountpoint = mount.split()[4]
        containerd.snapshotter.kill()
        proc = cli_run("umount", mountpoint)
        assert proc.returncode == 0, proc.stderr
        assert not erofs_mounts(containerd)
        containerd.snapshotter.start()
        assert [m.split()[4] for m in erofs_mounts(containerd)] == [mountpoint]
        assert (Path(mountpoint) / "etc" / "hello.txt").read_text() == "hello from the image\n"
        wait_reconnected(containerd)
    finally:
        containerd.ctr(*sn, "rm", "ctr-snap", check=False)
        remove_image(containerd, ref)
    assert not erofs_mounts(containerd)


def test_nydus_erofs_pull_of_an_oci_image_pulls_it(containerd: Containerd, images: dict) -> None:
    ref = images["oci"]
    assert "not a Nydus image" in nydus_pull(containerd, ref)
    try:
        assert ctr_run(containerd, ref, "oci-pulled", "cat /etc/hello.txt") == "hello from the image\n"
    finally:
        remove_image(containerd, ref)


def test_plain_ctr_pull_of_nydus_runs_it(containerd: Containerd, images: dict) -> None:
    """containerd 1.6's own ``ctr image pull`` (no layer labels; every blob downloaded): with the stream processor
    the README configures, its differ applies each data blob as the empty tar it starts with, and the bootstrap
    layer, known by its content, is mounted lazily over the blobs in containerd's content store."""
    ref = images["nydus"]
    containerd.ctr("images", "pull", "--plain-http", "--snapshotter", SNAPSHOTTER, ref)
    try:
        assert ctr_run(containerd, ref, "ctr-pull-1", "cat /etc/hello.txt") == "hello from the image\n"
        assert ctr_run(containerd, ref, "ctr-pull-2", LISTING) == expected_listing(images["rootfs"])
        assert erofs_mounts(containerd)  # the image is the lazy EROFS mount, not unpacked files
    finally:
        remove_image(containerd, ref)
    assert snapshots(containerd) == []
    assert not erofs_mounts(containerd)


def test_pull_errors_are_one_line(containerd: Containerd, images: dict, tmp_path: Path) -> None:
    cases = [
        ([images["nydus"], "--address", str(tmp_path / "nothing.sock")], "cannot reach containerd"),
        ([images["nydus"].replace("busybox-nydus", "missing"), "--address", str(containerd.sock)], "no such image"),
    ]
    for args, message in cases:
        started = time.monotonic()
        proc = cli_run("pull", "--plain-http", *args)
        assert time.monotonic() - started < 5, "an unreachable containerd is said at once, not after a timeout"
        assert proc.returncode != 0
        assert proc.stderr.startswith("nydus-erofs: error: ") and proc.stderr.count("\n") == 1, proc.stderr
        assert message in proc.stderr


def test_kubelet_pull_through_cri_is_lazy(registry_server: RegistryServer, images: dict, tmp_path: Path) -> None:
    """kubelet's pull (CRI PullImage, what kubelet calls) of the Nydus image with the snapshotter configured as
    the README says: no blob downloaded, and the image runs."""
    ref = images["nydus"]
    with Containerd(tmp_path / "cri", "--plain-http", cri_registry=registry_server.host) as cd:
        with grpc.insecure_channel(f"unix:{cd.sock}") as ch:
            cri_pb2_grpc.ImageServiceStub(ch).PullImage(cri_pb2.PullImageRequest(image=cri_pb2.ImageSpec(image=ref)))
        rows = cd.ctr("snapshots", "--snapshotter", SNAPSHOTTER, "ls", namespace="k8s.io").stdout.splitlines()[1:]
        assert len(rows) == 2 and all(r.split()[-1] == "Committed" for r in rows)
        assert cache_bytes(cd) == 0
        assert cd.run(ref, "cri-1", "/bin/cat", "/etc/hello.txt", namespace="k8s.io") == "hello from the image\n"
        assert 0 < cache_bytes(cd) < BIG // 8  # busybox and /etc/hello.txt, not /data/big
    assert not mounts_under(tmp_path / "cri")


def test_cri_pull_without_annotations_says_what_to_set(registry_server: RegistryServer, images: dict,
                                                       tmp_path: Path) -> None:  # fmt: skip
    """containerd's CRI plugin as it comes (``disable_snapshot_annotations = true``) labels the layers without
    the image's location: the blob layers are skipped undownloaded, so the bootstrap's commit has no blobs to
    read. The pull fails then, saying what to set, rather than a container later."""
    ref = images["nydus"]
    with Containerd(tmp_path / "cri", "--plain-http", cri_registry=registry_server.host, cri_annotations=False) as cd:
        with grpc.insecure_channel(f"unix:{cd.sock}") as ch, pytest.raises(grpc.RpcError) as e:
            cri_pb2_grpc.ImageServiceStub(ch).PullImage(cri_pb2.PullImageRequest(image=cri_pb2.ImageSpec(image=ref)))
        assert "disable_snapshot_annotations = false" in str(e.value.details())
        assert "\n" not in str(e.value.details())
    assert not mounts_under(tmp_path / "cri")


def test_full_mode_fetches_the_image_at_pull(images: dict, tmp_path: Path) -> None:
    """``--mode full`` (for kernels without fanotify pre-content events): the image is fetched whole when pulled,
    and runs the same."""
    ref = images["nydus"]
    with Containerd(tmp_path / "full", "--plain-http", "--mode", "full") as cd:
        nydus_pull(cd, ref)
        assert cache_bytes(cd) >= BIG  # all of it, uncompressed
        assert ctr_run(cd, ref, "full-1", "cat /etc/hello.txt") == "hello from the image\n"
        remove_image(cd, ref)
        assert not erofs_mounts(cd) and snapshots(cd) == []
        assert cache_bytes(cd) == 0
    assert not mounts_under(tmp_path / "full")

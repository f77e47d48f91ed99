"""``nydus-erofs snapshotter --mode fscache`` in the VM: a Nydus image from the host's registry
(tests/support/vm_remote.py), its layers prepared over the snapshotter's gRPC socket with the labels containerd's
CRI plugin (and ``nydus-erofs pull``) send, is bound in cachefilesd-py and mounted by fsid, without a blob layer
being downloaded; a container's snapshot is an overlay over that mount: its tree is the source image's, its writes
stay in its upper directory, and removing the snapshots unmounts and unbinds the image."""

from __future__ import annotations

import base64
import io
import json
import os
from pathlib import Path

import grpc
import pytest

from cachefilesd_py.reference import RemoteImage, bootstrap_layers, json_object
from cachefilesd_py.snapshotter.nydus import LABEL_IMAGE_REF, LABEL_LAYER_DIGEST, LABEL_MANIFEST_DIGEST, LABEL_TARGET
from cachefilesd_py.snapshotter.proto import snapshots_pb2 as pb
from cachefilesd_py.snapshotter.proto import snapshots_pb2_grpc as pb_grpc
from cachefilesd_py.snapshotter.pull import SNAPSHOT_LABEL_PREFIX, chain_ids
from tests.support.containerd import SnapshotterProcess
from tests.support.fstree import assert_same_snapshot, snapshot
from tests.support.kmount import mount, umount
from tests.support.vm_remote import Served
from tests.vm.test_daemon import DaemonProc, scratch

pytestmark = [pytest.mark.kernel("cachefiles"), pytest.mark.network]


def _registry(served: Served, base: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """The registry's ``host:port``, its credentials in ``$DOCKER_CONFIG`` for every process started from here
    on (cachefilesd-py reads the blobs, the snapshotter the bootstraps, this test the manifest)."""
    host = f"{os.environ['VM_HOST']}:{served.registry_port}"
    (base / "docker").mkdir(parents=True, exist_ok=True)
    auth = base64.b64encode(served.registry_auth.encode()).decode()
    (base / "docker" / "config.json").write_text(json.dumps({"auths": {host: {"auth": auth}}}))
    monkeypatch.setenv("DOCKER_CONFIG", str(base / "docker"))
    return host


def _layers(ref: str) -> tuple[list[dict[str, str]], str]:
    """Each layer's labels (as containerd's CRI plugin sets them) and the image's top chain ID."""
    with RemoteImage(ref, plain_http=True) as remote:
        docs = remote.documents()
        assert bootstrap_layers(docs.manifest), f"{ref} is not a Nydus image"
        config = io.BytesIO()
        remote.fetch_blob(docs.manifest["config"], config, "config")
    chains = chain_ids(json_object(config.getvalue(), "config")["rootfs"]["diff_ids"])
    labels = []
    for chain, layer in zip(chains, docs.manifest["layers"], strict=True):
        annotations = layer.get("annotations") or {}
        one = {k: v for k, v in annotations.items() if k.startswith(SNAPSHOT_LABEL_PREFIX)}
        one.update({LABEL_TARGET: chain, LABEL_IMAGE_REF: ref, LABEL_LAYER_DIGEST: layer["digest"],
                    LABEL_MANIFEST_DIGEST: docs.digest})  # fmt: skip
        labels.append(one)
    return labels, chains[-1]


def _mount_options(mountpoint: Path) -> tuple[str, str]:
    """(fstype, super options) of what is mounted at ``mountpoint``."""
    found = ("", "")
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        sep = fields.index("-")
        if fields[4] == str(mountpoint):
            found = (fields[sep + 1], fields[sep + 3])
    return found


def _mounts_under(root: Path) -> list[str]:
    return [f.split()[4] for f in Path("/proc/self/mountinfo").read_text().splitlines()
            if f.split()[4].startswith(f"{root}/")]  # fmt: skip


def test_container_snapshot_is_an_overlay_over_the_image_mounted_by_fsid(served: Served,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    served.require("registry", "nydus")
    image = served.nydus_images["a"]
    base = scratch() / "snapshotter-fscache"
    ref = f"{_registry(served, base, monkeypatch)}/{image['repo']}:{image['tag']}"
    labels, top = _layers(ref)
    expected = served.expected_snapshot(image["snapshot"])

    d = DaemonProc(base / "daemon").start()
    sn_proc = SnapshotterProcess(base / "sn.sock", base / "root", base / "sn.log", "--mode", "fscache",
                                 "--daemon-sock", str(d.api_sock), "--plain-http")  # fmt: skip
    rootfs = base / "rootfs"
    rootfs.mkdir(exist_ok=True)
    try:
        sn_proc.start()
        root = sn_proc.root.resolve()
        with grpc.insecure_channel(f"unix:{sn_proc.sock}") as ch:
            sn = pb_grpc.SnapshotsStub(ch)
            parent = ""
            for i, one in enumerate(labels):  # as containerd unpacks: each layer answered without a download
                req = pb.PrepareSnapshotRequest(key=f"default/{i}/extract {one[LABEL_TARGET]}", parent=parent,
                                                labels=one)  # fmt: skip
                with pytest.raises(grpc.RpcError) as e:
                    sn.Prepare(req)
                assert e.value.code() == grpc.StatusCode.ALREADY_EXISTS, e.value.details()
                parent = one[LABEL_TARGET]
            bound = d.api("/api/v1/images")["images"]
            assert [b["fsid"][:6] for b in bound] == ["nydus-"], bound  # bound (and mounted) at the pull
            fsid = bound[0]["fsid"]
            assert d.backend_bytes(fsid) == 0  # not a byte of the blobs yet

            (m,) = sn.Prepare(pb.PrepareSnapshotRequest(key="default/9/ctr", parent=top)).mounts
            assert list(sn.Mounts(pb.MountsRequest(key="default/9/ctr")).mounts) == [m]
            options = dict(o.split("=", 1) for o in m.options if "=" in o)
            assert m.type == "overlay" and options["lowerdir"].startswith(f"{root}/snapshots/"), m
            lower = Path(options["lowerdir"])
            fstype, super_options = _mount_options(lower)
            assert fstype == "erofs" and f"fsid={fsid}" in super_options.split(","), (fstype, super_options)

            mount("overlay", rootfs, "overlay", 0, ",".join(m.options))  # what containerd mounts for runc
            try:
                got = snapshot(rootfs)
                got[b"."] = expected[b"."]  # (the overlay's root is the upper dir, made by the snapshotter)
                assert_same_snapshot(expected, got)
                (rootfs / "new.txt").write_text("written in the container\n")
                with open(rootfs / "data" / "small.txt", "a") as f:
                    f.write("appended\n")
                before = (lower / "data" / "small.txt").read_text()
                assert (rootfs / "data" / "small.txt").read_text() == before + "appended\n"
            finally:
                umount(rootfs, detach_if_busy=False)
            upper = Path(options["upperdir"])
            assert (upper / "new.txt").read_text() == "written in the container\n"
            assert (upper / "data" / "small.txt").read_text() == before + "appended\n"
            assert not (lower / "new.txt").exists() and (lower / "data" / "small.txt").read_text() == before

            sn.Remove(pb.RemoveSnapshotRequest(key="default/9/ctr"))
            for one in reversed(labels):  # the image's removal: its layers, top first
                sn.Remove(pb.RemoveSnapshotRequest(key=one[LABEL_TARGET]))
            assert [i for r in sn.List(pb.ListSnapshotsRequest()) for i in r.info] == []
            assert _mounts_under(root) == []
            assert d.api("/api/v1/images")["images"] == []  # unbound
            assert list((root / "snapshots").iterdir()) == []
    finally:
        sn_proc.stop()
        for mp in reversed(_mounts_under(base)):  # (a failed test's leftovers)
            umount(mp)
        rc = d.stop()
    assert rc == 0, d.log_text() + (base / "sn.log").read_text()


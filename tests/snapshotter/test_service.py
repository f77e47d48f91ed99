"""The snapshots gRPC API of ``nydus-erofs snapshotter`` as containerd calls it (our own client stubs, no
containerd): ordinary layers behave as containerd's overlayfs snapshotter, metadata survives a restart."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from google.protobuf import field_mask_pb2

from cachefilesd_py.snapshotter.proto import snapshots_pb2 as pb
from cachefilesd_py.snapshotter.proto import snapshots_pb2_grpc as pb_grpc
from tests.support.cli import run
from tests.support.containerd import SnapshotterProcess


@pytest.fixture
def service(tmp_path: Path) -> Iterator[tuple[SnapshotterProcess, pb_grpc.SnapshotsStub]]:
    proc = SnapshotterProcess(tmp_path / "sn.sock", tmp_path / "root", tmp_path / "sn.log")
    proc.start()
    try:
        with grpc.insecure_channel(f"unix:{proc.sock}") as ch:
            yield proc, pb_grpc.SnapshotsStub(ch)
    finally:
        proc.stop()


def code(fn, *args) -> grpc.StatusCode:  # type: ignore[no-untyped-def]
    with pytest.raises(grpc.RpcError) as e:
        fn(*args)
    return e.value.code()


def test_layers_as_overlayfs(service: tuple[SnapshotterProcess, pb_grpc.SnapshotsStub]) -> None:
    proc, sn = service
    root = proc.root.resolve()
    first = sn.Prepare(pb.PrepareSnapshotRequest(key="extract-1", labels={"a": "1"})).mounts
    assert [(m.type, m.source, list(m.options)) for m in first] == [("bind", f"{root}/snapshots/1/fs", ["rw", "rbind"])]
    (root / "snapshots/1/fs/file").write_text("layer 1\n")
    sn.Commit(pb.CommitSnapshotRequest(name="layer-1", key="extract-1", labels={"b": "2"}))
    info = sn.Stat(pb.StatSnapshotRequest(key="layer-1")).info
    assert (info.name, info.parent, info.kind, dict(info.labels)) == ("layer-1", "", pb.COMMITTED, {"a": "1", "b": "2"})
    assert code(sn.Stat, pb.StatSnapshotRequest(key="extract-1")) == grpc.StatusCode.NOT_FOUND

    (m,) = sn.Prepare(pb.PrepareSnapshotRequest(key="ctr", parent="layer-1")).mounts
    assert (m.type, list(m.options)) == ("overlay", ["index=off", f"workdir={root}/snapshots/2/work",
                                                     f"upperdir={root}/snapshots/2/fs",
                                                     f"lowerdir={root}/snapshots/1/fs"])  # fmt: skip
    assert list(sn.Mounts(pb.MountsRequest(key="ctr")).mounts) == [m]
    (v,) = sn.View(pb.ViewSnapshotRequest(key="view", parent="layer-1")).mounts
    assert (v.type, v.source, list(v.options)) == ("bind", f"{root}/snapshots/1/fs", ["ro", "rbind"])

    assert code(sn.Prepare, pb.PrepareSnapshotRequest(key="ctr", parent="layer-1")) == grpc.StatusCode.ALREADY_EXISTS
    assert code(sn.Prepare, pb.PrepareSnapshotRequest(key="x", parent="ctr")) == grpc.StatusCode.INVALID_ARGUMENT
    assert code(sn.Prepare, pb.PrepareSnapshotRequest(key="x", parent="none")) == grpc.StatusCode.NOT_FOUND
    assert code(sn.Remove, pb.RemoveSnapshotRequest(key="layer-1")) == grpc.StatusCode.FAILED_PRECONDITION

    usage = sn.Usage(pb.UsageRequest(key="layer-1"))
    assert usage.inodes == 2 and usage.size > 0  # fs and its file

    new = pb.Info(name="layer-1", labels={"b": "3", "c": "4"})
    mask = field_mask_pb2.FieldMask(paths=["labels.b", "labels.a"])
    info = sn.Update(pb.UpdateSnapshotRequest(info=new, update_mask=mask)).info
    assert dict(info.labels) == {"b": "3"}

    names = sorted(i.name for r in sn.List(pb.ListSnapshotsRequest()) for i in r.info)
    assert names == ["ctr", "layer-1", "view"]

    # a restart keeps it all
    proc.stop()
    proc.start()
    with grpc.insecure_channel(f"unix:{proc.sock}") as ch:
        sn = pb_grpc.SnapshotsStub(ch)
        assert sn.Stat(pb.StatSnapshotRequest(key="layer-1")).info.labels["b"] == "3"
        assert list(sn.Mounts(pb.MountsRequest(key="ctr")).mounts) == [m]
        for key in ("ctr", "view", "layer-1"):
            sn.Remove(pb.RemoveSnapshotRequest(key=key))
        assert [i for r in sn.List(pb.ListSnapshotsRequest()) for i in r.info] == []
        assert list((root / "snapshots").iterdir()) == []
        (root / "snapshots" / "99").mkdir()  # a crash's leftover
        sn.Cleanup(pb.CleanupRequest())
        assert list((root / "snapshots").iterdir()) == []


def test_nydus_blob_layer_is_committed_without_download(service: tuple[SnapshotterProcess,
                                                                         pb_grpc.SnapshotsStub]) -> None:  # fmt: skip
    _, sn = service
    labels = {"containerd.io/snapshot.ref": "sha256:aa", "containerd.io/snapshot/nydus-blob": "true"}
    req = pb.PrepareSnapshotRequest(key="default/1/extract-x sha256:aa", labels=labels)
    assert code(sn.Prepare, req) == grpc.StatusCode.ALREADY_EXISTS
    info = sn.Stat(pb.StatSnapshotRequest(key="sha256:aa")).info
    assert (info.kind, info.labels["containerd.io/snapshot.ref"]) == (pb.COMMITTED, "sha256:aa")
    # the same layer again (another namespace): already there
    req = pb.PrepareSnapshotRequest(key="other/2/extract-y sha256:aa", labels=labels)
    assert code(sn.Prepare, req) == grpc.StatusCode.ALREADY_EXISTS
    assert [i.name for r in sn.List(pb.ListSnapshotsRequest()) for i in r.info] == ["sha256:aa"]


def test_one_snapshotter_per_root(service: tuple[SnapshotterProcess, pb_grpc.SnapshotsStub], tmp_path: Path) -> None:
    proc, _ = service
    second = run("snapshotter", "--address", tmp_path / "other.sock", "--root", proc.root, timeout=60)
    assert (second.returncode, second.stderr) == (2, f"nydus-erofs: error: another snapshotter is using {proc.root}\n")

"""The ``containerd.services.snapshots.v1.Snapshots`` gRPC service over :class:`~.snapshotter.Snapshotter`, served
on a Unix socket for containerd's ``[proxy_plugins]``."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator
from concurrent import futures
from pathlib import Path
from typing import Any, TypeVar

import grpc
from google.protobuf import empty_pb2, timestamp_pb2

from erofs.errors import NydusErofsError

from .mounts import MountEntry
from .proto import snapshots_pb2 as pb
from .proto import snapshots_pb2_grpc as pb_grpc
from .proto import types_pb2
from .snapshotter import Snapshotter
from .store import Snapshot, SnapshotError

__all__ = ["SnapshotsService", "serve"]

log = logging.getLogger(__name__)
T = TypeVar("T")
LIST_BATCH = 100


def _timestamp(t: float) -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    ts.FromNanoseconds(int(t * 1e9))
    return ts


def _info(s: Snapshot) -> pb.Info:
    return pb.Info(name=s.name, parent=s.parent, kind=s.kind, created_at=_timestamp(s.created),
                   updated_at=_timestamp(s.updated), labels=s.labels)  # fmt: skip


def _mounts(entries: list[MountEntry]) -> list[types_pb2.Mount]:
    return [types_pb2.Mount(type=m.type, source=m.source, options=list(m.options)) for m in entries]


def _call(context: grpc.ServicerContext, what: str, fn: Callable[[], T]) -> T:
    """Run ``fn``; its errors become gRPC statuses containerd maps back (NOT_FOUND, ALREADY_EXISTS...)."""
    try:
        return fn()
    except SnapshotError as e:
        if e.code not in ("ALREADY_EXISTS", "NOT_FOUND"):
            log.warning("%s: %s", what, e)
        context.abort(grpc.StatusCode[e.code], str(e))
    except (NydusErofsError, OSError) as e:
        log.error("%s: %s", what, e)
        context.abort(grpc.StatusCode.UNKNOWN, f"{what}: {e}")
    except Exception as e:
        log.exception("%s failed", what)
        context.abort(grpc.StatusCode.INTERNAL, f"{what}: {e}")
    raise AssertionError("unreachable")  # abort raises


class SnapshotsService(pb_grpc.SnapshotsServicer):
    def __init__(self, sn: Snapshotter) -> None:
        self.sn = sn

    def Prepare(self, request: Any, context: grpc.ServicerContext) -> pb.PrepareSnapshotResponse:
        m = _call(context, f"prepare {request.key}",
                  lambda: self.sn.prepare(request.key, request.parent, dict(request.labels)))  # fmt: skip
        return pb.PrepareSnapshotResponse(mounts=_mounts(m))

    def View(self, request: Any, context: grpc.ServicerContext) -> pb.ViewSnapshotResponse:
        m = _call(context, f"view {request.key}",
                  lambda: self.sn.view(request.key, request.parent, dict(request.labels)))  # fmt: skip
        return pb.ViewSnapshotResponse(mounts=_mounts(m))

    def Mounts(self, request: Any, context: grpc.ServicerContext) -> pb.MountsResponse:
        return pb.MountsResponse(mounts=_mounts(_call(context, f"mounts {request.key}",
                                                      lambda: self.sn.mounts(request.key))))  # fmt: skip

    def Commit(self, request: Any, context: grpc.ServicerContext) -> empty_pb2.Empty:
        _call(context, f"commit {request.key}",
              lambda: self.sn.commit(request.name, request.key, dict(request.labels)))  # fmt: skip
        return empty_pb2.Empty()

    def Remove(self, request: Any, context: grpc.ServicerContext) -> empty_pb2.Empty:
        _call(context, f"remove {request.key}", lambda: self.sn.remove(request.key))
        return empty_pb2.Empty()

    def Stat(self, request: Any, context: grpc.ServicerContext) -> pb.StatSnapshotResponse:
        return pb.StatSnapshotResponse(info=_info(_call(context, f"stat {request.key}",
                                                        lambda: self.sn.store.need(request.key))))  # fmt: skip

    def Update(self, request: Any, context: grpc.ServicerContext) -> pb.UpdateSnapshotResponse:
        info = request.info
        snap = _call(context, f"update {info.name}",
                     lambda: self.sn.update(info.name, dict(info.labels), list(request.update_mask.paths)))  # fmt: skip
        return pb.UpdateSnapshotResponse(info=_info(snap))

    def List(self, request: Any, context: grpc.ServicerContext) -> Iterator[pb.ListSnapshotsResponse]:
        # filters are not applied: containerd checks what it walks (and an unfiltered list is always a superset)
        snaps = _call(context, "list", self.sn.store.all)
        for i in range(0, len(snaps), LIST_BATCH):
            yield pb.ListSnapshotsResponse(info=[_info(s) for s in snaps[i : i + LIST_BATCH]])

    def Usage(self, request: Any, context: grpc.ServicerContext) -> pb.UsageResponse:
        size, inodes = _call(context, f"usage {request.key}", lambda: self.sn.usage(request.key))
        return pb.UsageResponse(size=size, inodes=inodes)

    def Cleanup(self, request: Any, context: grpc.ServicerContext) -> empty_pb2.Empty:
        _call(context, "cleanup", self.sn.cleanup)
        return empty_pb2.Empty()


def serve(sn: Snapshotter, address: Path, *, workers: int = 16) -> grpc.Server:
    """Start serving ``sn`` on Unix socket ``address`` (a stale socket there is replaced); returns the server."""
    address.parent.mkdir(parents=True, exist_ok=True)
    try:
        address.unlink()
    except FileNotFoundError:
        pass
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="snapshots"))
    pb_grpc.add_SnapshotsServicer_to_server(SnapshotsService(sn), server)
    server.add_insecure_port(f"unix:{os.fspath(address)}")
    server.start()
    os.chmod(address, 0o600)
    return server

"""gRPC edge: containerd.services.snapshots.v1.Snapshots over a unix socket.

Translates protobuf requests into Snapshotter calls and our error taxonomy into
gRPC status codes (which containerd's proxy client maps back to its errdefs).
Nothing here decides anything about snapshots.
"""

from __future__ import annotations

import functools
import logging
import os
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from pathlib import Path
from typing import Any, TypeVar

import grpc
from google.protobuf import empty_pb2, timestamp_pb2

from pynydus.api import mount_pb2, snapshots_pb2, snapshots_pb2_grpc
from pynydus.errors import NydusError
from pynydus.snapshot import filters
from pynydus.snapshot.metastore import Info
from pynydus.snapshot.metrics import RPC_ERRORS, RPC_SECONDS
from pynydus.snapshot.mounts import Mount
from pynydus.snapshot.snapshotter import Snapshotter

log = logging.getLogger(__name__)

# containerd's snapshot service sends List results in batches of this many infos.
_LIST_BATCH = 100

F = TypeVar("F", bound=Callable[..., Any])


def _timestamp(ns: int) -> timestamp_pb2.Timestamp:
    return timestamp_pb2.Timestamp(seconds=ns // 1_000_000_000, nanos=ns % 1_000_000_000)


def info_to_pb(info: Info) -> snapshots_pb2.Info:
    return snapshots_pb2.Info(
        name=info.name,
        parent=info.parent,
        kind=int(info.kind),
        created_at=_timestamp(info.created_ns),
        updated_at=_timestamp(info.updated_ns),
        labels=dict(info.labels),
    )


def mounts_to_pb(mounts: list[Mount]) -> list[mount_pb2.Mount]:
    return [mount_pb2.Mount(type=m.type, source=m.source, options=list(m.options)) for m in mounts]


def _rpc(method: F) -> F:
    """Run an RPC body, turning our errors into gRPC statuses and timing the call."""

    @functools.wraps(method)
    def wrapper(self: SnapshotsService, request: Any, context: grpc.ServicerContext) -> Any:
        start = time.perf_counter()
        name = method.__name__
        try:
            return method(self, request, context)
        except NydusError as err:
            log.debug("%s failed: %s", name, err)
            RPC_ERRORS.labels(name, err.grpc_code).inc()
            context.abort(getattr(grpc.StatusCode, err.grpc_code), str(err))
        except Exception as err:  # an internal bug must not kill the server
            log.exception("%s: internal error", name)
            RPC_ERRORS.labels(name, "INTERNAL").inc()
            context.abort(grpc.StatusCode.INTERNAL, f"{name}: internal error: {err}")
        finally:
            elapsed = time.perf_counter() - start
            RPC_SECONDS.labels(name).observe(elapsed)
            log.debug("%s took %.2f ms", name, elapsed * 1e3)

    return wrapper  # type: ignore[return-value]


class SnapshotsService(snapshots_pb2_grpc.SnapshotsServicer):
    def __init__(self, snapshotter: Snapshotter) -> None:
        self.sn = snapshotter

    @_rpc
    def Prepare(self, request: Any, context: grpc.ServicerContext) -> Any:
        mounts = self.sn.prepare(request.key, request.parent, dict(request.labels))
        return snapshots_pb2.PrepareSnapshotResponse(mounts=mounts_to_pb(mounts))

    @_rpc
    def View(self, request: Any, context: grpc.ServicerContext) -> Any:
        mounts = self.sn.view(request.key, request.parent, dict(request.labels))
        return snapshots_pb2.ViewSnapshotResponse(mounts=mounts_to_pb(mounts))

    @_rpc
    def Mounts(self, request: Any, context: grpc.ServicerContext) -> Any:
        return snapshots_pb2.MountsResponse(mounts=mounts_to_pb(self.sn.mounts(request.key)))

    @_rpc
    def Commit(self, request: Any, context: grpc.ServicerContext) -> Any:
        self.sn.commit(request.name, request.key, dict(request.labels))
        return empty_pb2.Empty()

    @_rpc
    def Remove(self, request: Any, context: grpc.ServicerContext) -> Any:
        self.sn.remove(request.key)
        return empty_pb2.Empty()

    @_rpc
    def Stat(self, request: Any, context: grpc.ServicerContext) -> Any:
        return snapshots_pb2.StatSnapshotResponse(info=info_to_pb(self.sn.stat(request.key)))

    @_rpc
    def Update(self, request: Any, context: grpc.ServicerContext) -> Any:
        paths = list(request.update_mask.paths) if request.HasField("update_mask") else []
        info = self.sn.update(request.info.name, dict(request.info.labels), paths)
        return snapshots_pb2.UpdateSnapshotResponse(info=info_to_pb(info))

    def List(self, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        # A generator cannot use _rpc's abort-after-return; parse first, then stream.
        try:
            flt = filters.parse(list(request.filters))
            batch: list[snapshots_pb2.Info] = []
            for info in self.sn.walk(flt):
                batch.append(info_to_pb(info))
                if len(batch) >= _LIST_BATCH:
                    yield snapshots_pb2.ListSnapshotsResponse(info=batch)
                    batch = []
            if batch:
                yield snapshots_pb2.ListSnapshotsResponse(info=batch)
        except NydusError as err:
            context.abort(getattr(grpc.StatusCode, err.grpc_code), str(err))
        except Exception as err:
            log.exception("List: internal error")
            context.abort(grpc.StatusCode.INTERNAL, f"List: internal error: {err}")

    @_rpc
    def Usage(self, request: Any, context: grpc.ServicerContext) -> Any:
        usage = self.sn.usage(request.key)
        return snapshots_pb2.UsageResponse(size=usage.size, inodes=usage.inodes)

    @_rpc
    def Cleanup(self, request: Any, context: grpc.ServicerContext) -> Any:
        removed = self.sn.cleanup()
        if removed:
            log.info("cleanup removed %d directories", len(removed))
        return empty_pb2.Empty()


def serve(snapshotter: Snapshotter, address: str, *, workers: int = 16, uid: int = 0,
          gid: int = 0) -> grpc.Server:
    """Start serving on unix socket ``address`` (stale socket replaced, parents created)."""
    path = Path(address)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.is_socket() or path.exists():
        path.unlink()
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="grpc"),
        options=[("grpc.max_receive_message_length", 16 << 20)],
    )
    snapshots_pb2_grpc.add_SnapshotsServicer_to_server(SnapshotsService(snapshotter), server)
    server.add_insecure_port("unix:" + str(path))
    server.start()
    os.chmod(path, 0o660)
    if uid or gid:
        os.chown(path, uid, gid)
    return server

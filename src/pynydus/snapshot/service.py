"""gRPC edge: containerd.services.snapshots.v1.Snapshots, without a transport.

Translates protobuf requests into Snapshotter calls and our error taxonomy into
gRPC status codes (which containerd's proxy client maps back to its errdefs).
Nothing here decides anything about snapshots. ``Snapshots.methods()`` is the table
our HTTP/2 server (``pynydus.grpcwire``) is handed; ``grpcio_server`` puts the same
service on grpcio's server. Which of the two runs is chosen at start-up
(``snapshot/server.py``).
"""

from __future__ import annotations

import functools
import logging
import os
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent import futures
from pathlib import Path
from typing import Any, TypeVar, cast

import grpc
from google.protobuf import empty_pb2

from pynydus.api import mount_pb2, snapshots_pb2, snapshots_pb2_grpc
from pynydus.errors import NydusError
from pynydus.grpcwire.rpc import Method, RpcAbort
from pynydus.snapshot import filters
from pynydus.snapshot.metastore import Info
from pynydus.snapshot.metrics import OPERATION_MS, RPC_ERRORS, RPC_SECONDS, UPSTREAM_OPERATIONS
from pynydus.snapshot.mounts import Mount
from pynydus.snapshot.snapshotter import MountsTarget, Snapshotter

log = logging.getLogger(__name__)

# containerd's snapshot service sends List results in batches of this many infos.
_LIST_BATCH = 100
# A List over at most this many snapshots runs on the server's reader thread (``inline``):
# ~10 us each, and no hand-off to a worker thread.
_INLINE_LIST = 64

F = TypeVar("F", bound=Callable[..., Any])


def fill_info(msg: snapshots_pb2.Info, info: Info) -> None:
    """Write ``info`` into ``msg``, the Info field of a response or one added to a List
    batch: in place, as messages built apart and copied in (an Info into its response,
    a Timestamp into its Info) cost 1.5x as much (Stat and every snapshot of a List pass
    here)."""
    msg.name = info.name
    msg.parent = info.parent
    msg.kind = cast(snapshots_pb2.Kind, info.kind)
    if info.labels:
        msg.labels.update(info.labels)
    msg.created_at.seconds, msg.created_at.nanos = divmod(info.created_ns, 1_000_000_000)
    msg.updated_at.seconds, msg.updated_at.nanos = divmod(info.updated_ns, 1_000_000_000)


def mounts_to_pb(mounts: list[Mount]) -> list[mount_pb2.Mount]:
    return [mount_pb2.Mount(type=m.type, source=m.source, options=list(m.options)) for m in mounts]


def _rpc(method: F) -> F:
    """Run an RPC body, turning our errors into RpcAbort and timing the call."""

    name = method.__name__
    seconds = RPC_SECONDS.labels(name)  # the per-method child, looked up once
    upstream = UPSTREAM_OPERATIONS.get(name)  # upstream's histogram (milliseconds), if it times this
    millis = OPERATION_MS.labels(upstream) if upstream else None

    @functools.wraps(method)
    def wrapper(self: Snapshots, request: Any, *args: Any) -> Any:
        start = time.perf_counter()
        try:
            return method(self, request, *args)
        except NydusError as err:
            log.debug("%s failed: %s", name, err)
            RPC_ERRORS.labels(name, err.grpc_code).inc()
            raise RpcAbort(err.grpc_code, str(err)) from err
        except Exception as err:  # an internal bug must not kill the server
            log.exception("%s: internal error", name)
            RPC_ERRORS.labels(name, "INTERNAL").inc()
            raise RpcAbort("INTERNAL", f"{name}: internal error: {err}") from err
        finally:
            elapsed = time.perf_counter() - start
            seconds.observe(elapsed)
            if millis is not None:
                millis.observe(elapsed * 1e3)
            log.debug("%s took %.2f ms", name, elapsed * 1e3)

    return wrapper  # type: ignore[return-value]


class Snapshots:
    """The Snapshots service without a transport: protobuf request in, response out.

    Every method raises RpcAbort for a failed call; both servers (grpcio's and
    ``grpcwire``'s) wrap this one object.
    """

    def __init__(self, snapshotter: Snapshotter) -> None:
        self.sn = snapshotter

    @_rpc
    def Prepare(self, request: Any) -> Any:
        mounts = self.sn.prepare(request.key, request.parent, dict(request.labels))
        return snapshots_pb2.PrepareSnapshotResponse(mounts=mounts_to_pb(mounts))

    @_rpc
    def View(self, request: Any) -> Any:
        mounts = self.sn.view(request.key, request.parent, dict(request.labels))
        return snapshots_pb2.ViewSnapshotResponse(mounts=mounts_to_pb(mounts))

    @_rpc
    def Mounts(self, request: Any, target: MountsTarget | None = None) -> Any:
        """``target``: what ``inline`` already read for ``request.key``."""
        if target is None:
            target = self.sn.mounts_target(request.key)
        return snapshots_pb2.MountsResponse(mounts=mounts_to_pb(self.sn.mounts_of(target)))

    @_rpc
    def Commit(self, request: Any) -> Any:
        self.sn.commit(request.name, request.key, dict(request.labels), request.parent)
        return empty_pb2.Empty()

    @_rpc
    def Remove(self, request: Any) -> Any:
        self.sn.remove(request.key)
        return empty_pb2.Empty()

    @_rpc
    def Stat(self, request: Any) -> Any:
        response = snapshots_pb2.StatSnapshotResponse()
        fill_info(response.info, self.sn.stat(request.key))
        return response

    @_rpc
    def Update(self, request: Any) -> Any:
        paths = list(request.update_mask.paths) if request.HasField("update_mask") else []
        info = self.sn.update(request.info.name, dict(request.info.labels), paths)
        response = snapshots_pb2.UpdateSnapshotResponse()
        fill_info(response.info, info)
        return response

    def inline(self, method: Method, request: Any) -> Callable[[], Any] | None:
        """The call, ready to run, if it answers from the metastore alone (tens of
        microseconds, never waits on a daemon or the disk), so a server may run it on its
        connection's reader thread; None otherwise. What deciding read is not read again.
        None while a transaction holds the metastore: its commit fsyncs, and the reader
        thread must stay free to dispatch the connection's other calls. A List is
        inline when there are at most ``_INLINE_LIST`` snapshots: read here, its
        callable returns every message."""
        if self.sn.ms.busy():
            return None
        if method.name == "Stat":
            return functools.partial(self.Stat, request)
        if method.name == "List":
            return self._list_inline(request)
        if method.name == "Mounts":
            try:
                target = self.sn.mounts_target(request.key)
            except NydusError:
                return functools.partial(self.Mounts, request)  # fails just as fast
            if target.needs_instance:
                return None
            return functools.partial(self.Mounts, request, target)
        return None

    def List(self, request: Any) -> Iterator[Any]:
        """Batches of infos; a failure (even after some batches) raises RpcAbort."""
        try:
            yield from _list_batches(self.sn.walk(filters.parse(list(request.filters))))
        except NydusError as err:
            raise RpcAbort(err.grpc_code, str(err)) from err
        except Exception as err:
            log.exception("List: internal error")
            raise RpcAbort("INTERNAL", f"List: internal error: {err}") from err

    def _list_inline(self, request: Any) -> Callable[[], list[Any]] | None:
        """List's messages, read now, when there are at most ``_INLINE_LIST`` snapshots
        (what containerd's garbage collector walks on a node of a few images); None for
        more, or for anything that fails (the worker's List reports it)."""
        try:
            infos = self.sn.walk_upto(filters.parse(list(request.filters)), _INLINE_LIST)
        except Exception:  # noqa: BLE001 - reported by the List that runs instead
            return None
        if infos is None:
            return None
        return functools.partial(list, _list_batches(infos))

    @_rpc
    def Usage(self, request: Any) -> Any:
        usage = self.sn.usage(request.key)
        return snapshots_pb2.UsageResponse(size=usage.size, inodes=usage.inodes)

    @_rpc
    def Cleanup(self, request: Any) -> Any:
        removed = self.sn.cleanup()
        if removed:
            log.info("cleanup removed %d directories", len(removed))
        return empty_pb2.Empty()

    def methods(self) -> dict[str, Method]:
        """The method table by gRPC path, for ``pynydus.grpcwire``'s server."""
        return {_PREFIX + name: Method(name, getattr(snapshots_pb2, req).FromString,
                                       getattr(self, name), name == "List")
                for name, req in _RPCS}


def _list_batches(infos: Iterable[Info]) -> Iterator[snapshots_pb2.ListSnapshotsResponse]:
    batch = snapshots_pb2.ListSnapshotsResponse()
    for info in infos:
        fill_info(batch.info.add(), info)
        if len(batch.info) >= _LIST_BATCH:
            yield batch
            batch = snapshots_pb2.ListSnapshotsResponse()
    if batch.info:
        yield batch


_PREFIX = "/containerd.services.snapshots.v1.Snapshots/"
# (method, request message) of every RPC of the service; List is the one server stream.
_RPCS = [
    ("Prepare", "PrepareSnapshotRequest"), ("View", "ViewSnapshotRequest"),
    ("Mounts", "MountsRequest"), ("Commit", "CommitSnapshotRequest"),
    ("Remove", "RemoveSnapshotRequest"), ("Stat", "StatSnapshotRequest"),
    ("Update", "UpdateSnapshotRequest"), ("List", "ListSnapshotsRequest"),
    ("Usage", "UsageRequest"), ("Cleanup", "CleanupRequest"),
]


class SnapshotsService(snapshots_pb2_grpc.SnapshotsServicer):
    """grpcio's servicer over Snapshots: RpcAbort becomes context.abort."""

    def __init__(self, core: Snapshots) -> None:
        self.core = core

    def List(self, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        try:
            yield from self.core.List(request)
        except RpcAbort as err:
            context.abort(getattr(grpc.StatusCode, err.code), err.message)


def _unary(name: str) -> Callable[[SnapshotsService, Any, grpc.ServicerContext], Any]:
    def call(self: SnapshotsService, request: Any, context: grpc.ServicerContext) -> Any:
        try:
            return getattr(self.core, name)(request)
        except RpcAbort as err:
            context.abort(getattr(grpc.StatusCode, err.code), err.message)

    call.__name__ = name
    return call


for _name, _ in _RPCS:
    if _name != "List":
        setattr(SnapshotsService, _name, _unary(_name))


def grpcio_server(core: Snapshots, path: Path, *, workers: int, uid: int = 0,
                  gid: int = 0, extra: Sequence[grpc.GenericRpcHandler] = ()) -> grpc.Server:
    """``core`` on grpcio's sync server, listening on unix socket ``path`` (already free);
    ``extra``: more services (the CRI image service proxy)."""
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="grpc"),
        options=[("grpc.max_receive_message_length", 16 << 20)],
    )
    snapshots_pb2_grpc.add_SnapshotsServicer_to_server(SnapshotsService(core), server)
    if extra:
        server.add_generic_rpc_handlers(tuple(extra))
    server.add_insecure_port("unix:" + str(path))
    server.start()
    os.chmod(path, 0o660)
    if uid or gid:
        os.chown(path, uid, gid)
    return server

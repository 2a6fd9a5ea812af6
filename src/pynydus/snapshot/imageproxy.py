"""The CRI ImageService proxy (``[remote.auth] enable_cri_keychain``).

kubelet (``--image-service-endpoint``) or crictl (``--image-endpoint``) talks to the
snapshotter's own socket; every ImageService call is forwarded unchanged, as bytes, to
containerd at ``image_service_address`` and its answer or error status comes back
unchanged. On the way, a PullImage's credentials go into the CRI keychain
(:mod:`pynydus.registry.crikeychain`), where the image's daemon finds them when the
image is mounted. Both ``runtime.v1`` and ``runtime.v1alpha2`` (kubelet before 1.26 with
containerd 1.6) are served.

The calls are ``detached`` (``pynydus.grpcwire``): a pull waits minutes on containerd,
which meanwhile calls this same server's Snapshots service; the proxy's calls never take
the workers those need. The credentials are never logged.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

import grpc

from pynydus.errors import NydusError
from pynydus.grpcwire.rpc import Method, RpcAbort
from pynydus.registry.crikeychain import CriKeychain

log = logging.getLogger(__name__)

SERVICES = ("runtime.v1.ImageService", "runtime.v1alpha2.ImageService")
METHODS = ("ListImages", "ImageStatus", "PullImage", "RemoveImage", "ImageFsInfo")
# containerd answers these from its metadata: a bound keeps a wedged containerd from
# holding threads forever when the client gave no deadline. Pulls take what they take.
_QUERY_TIMEOUT = 120.0


class _Raw:
    """Bytes as a response message for the transport."""

    __slots__ = ("data",)

    def __init__(self, data: bytes) -> None:
        self.data = data

    def SerializeToString(self) -> bytes:
        return self.data


class ImageServiceProxy:
    """Forwards ImageService calls to containerd's socket ``address``; records the
    credentials of PullImage calls in ``keychain``. ``close()`` closes the channel."""

    def __init__(self, address: str, keychain: CriKeychain) -> None:
        self.address = address
        self.keychain = keychain
        self._channel: grpc.Channel | None = None
        self._lock = threading.Lock()

    def channel(self) -> grpc.Channel:
        with self._lock:
            if self._channel is None:
                target = self.address if "://" in self.address else "unix://" + self.address
                self._channel = grpc.insecure_channel(
                    target, options=[("grpc.max_receive_message_length", 16 << 20)])
            return self._channel

    def forward(self, path: str, request: bytes, timeout: float | None) -> bytes:
        """One call, as bytes both ways; RpcAbort with containerd's status on error."""
        name = path.rsplit("/", 1)[-1]
        if name == "PullImage":
            try:
                image = self.keychain.record_pull(request)
            except NydusError as err:
                raise RpcAbort("INVALID_ARGUMENT", f"PullImage: {err}") from None
            log.info("CRI PullImage %s (forwarded to %s)", image, self.address)
        elif timeout is None:
            timeout = _QUERY_TIMEOUT
        call: grpc.UnaryUnaryMultiCallable[bytes, bytes] = self.channel().unary_unary(path)
        try:
            answer: bytes = call(request, timeout=timeout)
        except grpc.RpcError as err:
            code = err.code() if callable(getattr(err, "code", None)) else None
            details = err.details() if callable(getattr(err, "details", None)) else str(err)
            if code == grpc.StatusCode.UNAVAILABLE:
                details = f"image service {self.address}: {details}"
            raise RpcAbort(code.name if code is not None else "UNKNOWN",
                           str(details or "")) from None
        return answer

    def methods(self) -> dict[str, Method]:
        """The method table for ``pynydus.grpcwire``'s server (detached calls)."""
        out = {}
        for service in SERVICES:
            for name in METHODS:
                path = f"/{service}/{name}"
                out[path] = Method(f"{service}.{name}", bytes, self._caller(path),
                                   detached=True)
        return out

    def _caller(self, path: str) -> Callable[[bytes, float | None], _Raw]:
        def call(request: bytes, timeout: float | None) -> _Raw:
            return _Raw(self.forward(path, request, timeout))
        return call

    def grpcio_handlers(self) -> list[Any]:
        """The same service as generic handlers for grpcio's server."""
        handlers = []
        for service in SERVICES:
            table: dict[str, grpc.RpcMethodHandler[bytes, bytes]] = {}
            for name in METHODS:
                table[name] = grpc.unary_unary_rpc_method_handler(self._grpcio_caller(
                    f"/{service}/{name}"))
            handlers.append(grpc.method_handlers_generic_handler(service, table))
        return handlers

    def _grpcio_caller(self, path: str) -> Callable[[bytes, grpc.ServicerContext], bytes]:
        def call(request: bytes, context: grpc.ServicerContext) -> bytes:
            try:
                return self.forward(path, request, context.time_remaining())
            except RpcAbort as err:
                context.abort(getattr(grpc.StatusCode, err.code), err.message)
        return call

    def close(self) -> None:
        with self._lock:
            if self._channel is not None:
                self._channel.close()
                self._channel = None

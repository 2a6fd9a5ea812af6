"""What a service hands the transport: its method table, and the error that ends a call.

The transport knows nothing of any particular service. A ``Method`` says how to decode
the request message and what to call with it; a call ends with a gRPC status by raising
``RpcAbort``. Responses are protobuf messages (anything with ``SerializeToString``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

# gRPC status codes by name (grpc.StatusCode's member names; NydusError.grpc_code uses them).
STATUS_CODES: Mapping[str, int] = {
    "OK": 0, "CANCELLED": 1, "UNKNOWN": 2, "INVALID_ARGUMENT": 3, "DEADLINE_EXCEEDED": 4,
    "NOT_FOUND": 5, "ALREADY_EXISTS": 6, "PERMISSION_DENIED": 7, "RESOURCE_EXHAUSTED": 8,
    "FAILED_PRECONDITION": 9, "ABORTED": 10, "OUT_OF_RANGE": 11, "UNIMPLEMENTED": 12,
    "INTERNAL": 13, "UNAVAILABLE": 14, "DATA_LOSS": 15, "UNAUTHENTICATED": 16,
}


class RpcAbort(Exception):
    """A call ends with gRPC status ``code`` (a grpc.StatusCode name) and ``message``."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True)
class Method:
    """One RPC as a transport sees it.

    ``decode(bytes)`` parses the single request message (any exception: a malformed
    request). ``call(request)`` returns the response message of a unary method, or an
    iterator of response messages when ``streaming`` (server-streaming); it raises
    RpcAbort to end the call with an error status.

    ``detached``: a unary call that may wait long on another service (a proxy). It runs
    on a thread of its own (a bounded number at once: RESOURCE_EXHAUSTED beyond), never
    on the worker pool, so that it cannot starve the calls the other service makes back
    to this server meanwhile; it is called as ``call(request, timeout)`` with the
    seconds the client's ``grpc-timeout`` leaves (None: no deadline).
    """

    name: str
    decode: Callable[[bytes], Any]
    call: Callable[..., Any]
    streaming: bool = False
    detached: bool = False


# The call, ready to run, when a method may run on the connection's reader thread (it
# answers in microseconds and never blocks); None sends it to the worker pool. For a
# server-streaming method the callable returns all the messages (a few) at once.
Inline = Callable[[Method, Any], Callable[[], Any] | None]

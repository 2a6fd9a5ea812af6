"""Server streams on the real server, in-process, over a unix socket and grpcio's client:
an inline stream is answered on the I/O thread, a worker's stream leaves in few writes."""

from __future__ import annotations

import shutil
import socket
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from pynydus.grpcwire import server as h2server
from pynydus.grpcwire.connection import Limits
from pynydus.grpcwire.rpc import Method
from pynydus.grpcwire.server import H2Server


class _Msg(bytes):
    """A response message: its bytes are its serialisation."""

    def SerializeToString(self) -> bytes:  # protobuf's name
        return bytes(self)


def _serve(methods: dict[str, Method], inline: Any = None
           ) -> tuple[H2Server, grpc.Channel, Path]:
    path = Path(tempfile.mkdtemp(prefix="pyn-h2s-")) / "s.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(8)
    server = H2Server(methods, listener, workers=1, per_connection=1, limits=Limits(),
                      inline=inline)
    server.start()
    return server, grpc.insecure_channel(f"unix://{path}"), path


def _stream(channel: grpc.Channel, name: str) -> Callable[..., Iterator[bytes]]:
    return channel.unary_stream(f"/t/{name}")  # type: ignore[return-value]


def test_an_inline_stream_is_answered_while_every_worker_is_busy() -> None:
    started, release = threading.Event(), threading.Event()

    def block(request: bytes) -> Iterator[_Msg]:
        started.set()
        release.wait(60)
        yield _Msg(b"late")

    methods = {"/t/Block": Method("Block", bytes, block, streaming=True),
               "/t/Few": Method("Few", bytes, lambda r: iter(()), streaming=True)}

    def inline(method: Method, request: bytes) -> Callable[[], list[_Msg]] | None:
        return (lambda: [_Msg(b"one"), _Msg(b"two")]) if method.name == "Few" else None

    server, channel, path = _serve(methods, inline)
    try:
        blocked = _stream(channel, "Block")(b"", timeout=60)
        assert started.wait(30)  # the one worker (and the connection's one slot) is taken
        assert list(_stream(channel, "Few")(b"", timeout=30)) == [b"one", b"two"]
        release.set()
        assert list(blocked) == [b"late"]
    finally:
        release.set()
        channel.close()
        server.stop(0).wait(10)
        shutil.rmtree(path.parent, ignore_errors=True)


def _worker_flushes(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The times a worker thread hands its output to the socket (its thread name each
    time), whatever the I/O thread writes meanwhile."""
    flushes: list[str] = []
    flush = h2server._Conn.send_from_worker

    def counted(self: h2server._Conn) -> None:
        name = threading.current_thread().name
        if name.startswith("h2-call"):
            flushes.append(name)
        flush(self)

    monkeypatch.setattr(h2server._Conn, "send_from_worker", counted)
    return flushes


def test_a_workers_small_stream_leaves_in_one_write(monkeypatch: pytest.MonkeyPatch) -> None:
    """Three messages of a stream under ``_STREAM_WRITE`` bytes are handed to the socket
    once, with its headers and trailers (before: once for the headers, once a message,
    once for the trailers)."""
    flushes = _worker_flushes(monkeypatch)
    batches = [_Msg(b"m" * 5000) for _ in range(3)]
    methods = {"/t/Three": Method("Three", bytes, lambda r: iter(batches), streaming=True)}
    server, channel, path = _serve(methods)
    try:
        assert list(_stream(channel, "Three")(b"", timeout=30)) == batches
        assert len(flushes) == 1
    finally:
        channel.close()
        server.stop(0).wait(10)
        shutil.rmtree(path.parent, ignore_errors=True)


def test_a_large_stream_is_written_as_it_is_produced(monkeypatch: pytest.MonkeyPatch) -> None:
    """Past ``_STREAM_WRITE`` bytes the messages leave before the stream ends."""
    flushes = _worker_flushes(monkeypatch)
    batches = [_Msg(bytes([65 + i]) * 30000) for i in range(8)]  # 240 KB
    methods = {"/t/Many": Method("Many", bytes, lambda r: iter(batches), streaming=True)}
    server, channel, path = _serve(methods)
    try:
        assert list(_stream(channel, "Many")(b"", timeout=30)) == batches
        assert len(flushes) >= 3  # 240 KB in writes of 64 KiB or more, and the end
    finally:
        channel.close()
        server.stop(0).wait(10)
        shutil.rmtree(path.parent, ignore_errors=True)

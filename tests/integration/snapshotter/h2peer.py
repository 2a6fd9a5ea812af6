"""A bare HTTP/2 gRPC client side for tests: frames out, frames in, no state machine.

Written apart from ``pynydus.grpcwire.connection`` (only its frame constants are shared) so
tests check the server against an independent reading of the protocol.
"""

from __future__ import annotations

import socket
from collections.abc import Callable

import hpack

from pynydus.grpcwire import connection as w

STAT = "/containerd.services.snapshots.v1.Snapshots/Stat"
LIST = "/containerd.services.snapshots.v1.Snapshots/List"


class Peer:
    """The client side, written independently of the core: frames out, frames in."""

    def __init__(self) -> None:
        self.enc = hpack.Encoder()
        self.dec = hpack.Decoder()

    def headers(self, path: str = STAT, extra: list[tuple[str, str]] | None = None) -> bytes:
        return self.enc.encode([(":method", "POST"), (":scheme", "http"), (":path", path),
                                (":authority", "localhost"), ("content-type", "application/grpc"),
                                ("te", "trailers"), *(extra or [])])

    @staticmethod
    def body(message: bytes, compressed: int = 0) -> bytes:
        return bytes([compressed]) + len(message).to_bytes(4, "big") + message

    def request(self, sid: int, message: bytes, path: str = STAT) -> bytes:
        return (w.frame(w.HEADERS, w.END_HEADERS, sid, self.headers(path))
                + w.frame(w.DATA, w.END_STREAM, sid, self.body(message)))

    @staticmethod
    def frames(data: bytes) -> list[tuple[int, int, int, bytes]]:
        out, pos = [], 0
        while pos < len(data):
            n = int.from_bytes(data[pos:pos + 3], "big")
            out.append((data[pos + 3], data[pos + 4],
                        int.from_bytes(data[pos + 5:pos + 9], "big"), data[pos + 9:pos + 9 + n]))
            pos += 9 + n
        assert pos == len(data)
        return out

    def response(self, data: bytes, sid: int) -> tuple[dict[str, str], list[bytes], bool]:
        """(headers and trailers merged, gRPC messages, ended) of stream ``sid``."""
        fields: dict[str, str] = {}
        body = b""
        ended = False
        block = b""
        for ftype, flags, fsid, payload in self.frames(data):
            if fsid != sid:
                continue
            if ftype in (w.HEADERS, w.CONTINUATION):
                block += payload
                if flags & w.END_HEADERS:
                    fields.update((k, v) for k, v in self.dec.decode(block))
                    block = b""
            elif ftype == w.DATA:
                body += payload
            ended = ended or bool(ftype == w.HEADERS and flags & w.END_STREAM)
        msgs = []
        while body:
            n = int.from_bytes(body[1:5], "big")
            msgs.append(body[5:5 + n])
            body = body[5 + n:]
        return fields, msgs, ended




def recv_until(sock: socket.socket, done: Callable[[bytes], bool], limit: float = 10.0) -> bytes:
    """Read from ``sock`` until ``done(everything so far)`` or EOF; frames stay whole."""
    sock.settimeout(limit)
    data = b""
    while not done(data):
        chunk = sock.recv(1 << 16)
        if not chunk:
            break
        data += chunk
    return data


def whole_frames(data: bytes) -> bytes:
    """The prefix of ``data`` made of complete frames."""
    pos = 0
    while len(data) - pos >= 9:
        n = int.from_bytes(data[pos:pos + 3], "big")
        if len(data) - pos - 9 < n:
            break
        pos += 9 + n
    return data[:pos]

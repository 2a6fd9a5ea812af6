"""Sans-I/O HTTP/2 server connection carrying gRPC unary and server-streaming calls.

Theory of operation (bytes in, events and bytes out, as h11 does for HTTP/1.1):

* ``receive(data)`` parses whatever bytes arrived (any split, frames may straddle calls)
  and returns events; ``data_to_send()`` returns the bytes the connection wants written
  (SETTINGS and its ACK, PING ACKs, WINDOW_UPDATEs, responses, RST_STREAM, GOAWAY).
  Go's client sends a BDP PING after nearly every response it reads; the caller may
  hold the ACK back briefly so that it leaves with the next response in one write
  (``data_to_send(defer_pings=True)``, ``pings_waiting``), after that response's
  frames: grpc-go's estimator pings at the first DATA it reads once its ping is
  answered, so a client that reads the response before the ACK pings after every
  other call, not after each (a WINDOW_UPDATE and a PING fewer to parse per call).
  The caller owns the socket and serialises calls into one ``H2Connection``.
* A request is delivered once, whole: ``Request`` after the client ends its half of the
  stream, carrying the ``:path`` and the single gRPC message (5-byte prefix stripped).
  Our calls take exactly one request message, so nothing is streamed inwards.
* Responses: ``respond(sid, message)`` for a unary call, or ``start(sid)``,
  ``send_message(sid, message)``... ``finish(sid, code, text)`` for a server stream;
  ``fail(sid, code, text)`` sends a trailers-only error. Outgoing DATA obeys the peer's
  connection and stream windows and max frame size: what does not fit waits in the
  stream's queue and leaves with the WINDOW_UPDATE that makes room (``pending(sid)``
  says how much still waits, so a producer can hold back).
* Inward flow control is enforced: DATA beyond a stream's window resets that stream,
  beyond the connection's window ends the connection (FLOW_CONTROL_ERROR). Request bytes
  are *held* from their arrival until their stream ends (answered, reset or cancelled),
  and connection credit is given back only while the connection holds at most
  ``Limits.max_held`` bytes and, for a connection holding more than one stream window,
  while all connections together (``HoldBudget``) stay under their cap: a client that
  sends bodies faster than its calls finish is slowed by flow control, not buffered.
  Stream credit is given back as data arrives (a message may be 16 MiB).
* Abuse that costs us work but no protocol error ends the connection with
  ENHANCE_YOUR_CALM: more than ``Limits.max_continuations`` CONTINUATION frames in one
  header block (empty ones grow nothing, so a size cap alone does not stop them), and
  streams reset by the client before we answered them faster than we answer others
  ("rapid reset": a score that each such reset raises and each answered call lowers).
* Time is the caller's: ``expired(now, ...)`` names streams whose request body or whose
  output has not moved for too long, and ``cancel(sid)`` resets one (RST_STREAM CANCEL).
* Any violation of the protocol by the peer (bad preface, malformed frame, HPACK
  garbage, wrong stream ids) ends the connection: a GOAWAY with the error code is
  queued, ``closed`` becomes true and ``Terminated`` is returned. Nothing raises to
  the caller. Errors confined to one stream reset only that stream.

HPACK: requests are decoded by ``hpackin`` (clients use the dynamic table and Huffman
coding); our few response header blocks are literals without indexing, so we keep no
encoder state and the constant blocks are encoded once.
"""

from __future__ import annotations

import struct
import threading
from collections import deque
from dataclasses import dataclass

from pynydus.grpcwire._hpack import encode_integer
from pynydus.grpcwire.hpackin import Decoder, HpackError
from pynydus.grpcwire.rpc import STATUS_CODES

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY, WINDOW_UPDATE, \
    CONTINUATION = range(10)
END_STREAM = ACK = 0x1
END_HEADERS, PADDED, PRIORITY_FLAG = 0x4, 0x8, 0x20

NO_ERROR, PROTOCOL_ERROR, INTERNAL_ERROR, FLOW_CONTROL_ERROR = 0, 1, 2, 3
STREAM_CLOSED, FRAME_SIZE_ERROR, REFUSED_STREAM, CANCEL, COMPRESSION_ERROR = 5, 6, 7, 8, 9
ENHANCE_YOUR_CALM = 11

S_HEADER_TABLE_SIZE, S_ENABLE_PUSH, S_MAX_CONCURRENT_STREAMS = 1, 2, 3
S_INITIAL_WINDOW_SIZE, S_MAX_FRAME_SIZE, S_MAX_HEADER_LIST_SIZE = 4, 5, 6

_DEFAULT_WINDOW = 65_535
_MAX_WINDOW = 2**31 - 1
_DEFAULT_FRAME = 16_384
_FRAME_HEAD = struct.Struct(">BHBBL")  # 24-bit length written as a byte and a short

_OUT_HEADERS, _OUT_DATA, _OUT_TRAILERS = range(3)  # what a stream's output queue holds
# How a stream we no longer track was closed (RFC 9113 5.1 treats late frames by it).
_PEER_ENDED, _WE_RESET, _PEER_RESET = range(3)
_CLOSED_KEPT = 512  # closed streams remembered, newest
_SELF_DEPENDENT = 0x100  # not a wire flag: a HEADERS block whose priority names itself
# RFC 9113 8.2.2: connection-specific fields are malformed in HTTP/2.
_CONNECTION_FIELDS = {b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding",
                      b"upgrade"}
_TIMEOUT_UNITS = {b"H": 3600.0, b"M": 60.0, b"S": 1.0, b"m": 1e-3, b"u": 1e-6, b"n": 1e-9}


@dataclass(frozen=True)
class Limits:
    """What one connection accepts; advertised in our SETTINGS where HTTP/2 has a setting."""

    max_concurrent_streams: int = 100  # containerd keeps a handful of calls in flight
    max_message: int = 16 << 20  # as grpcio's grpc.max_receive_message_length before
    max_header_list: int = 64 << 10  # request headers are a few hundred bytes
    stream_window: int = 1 << 20  # a request rarely exceeds this: no WINDOW_UPDATE round trip
    connection_window: int = 1 << 20  # what a client may send ahead of its calls finishing
    # Request bytes one connection may hold (buffered or in calls not yet answered) and
    # still get credit back: one message of the largest size fits.
    max_held: int = (16 << 20) + (64 << 10)
    max_continuations: int = 16  # a 64 KiB header list needs 4 frames of 16 KiB
    max_reset_score: int = 200  # rapid reset: early client resets not offset by answers


class HoldBudget:
    """Request bytes held by all connections of a server; shared, so it locks.

    Only a connection holding more than a stream window is slowed by it: one that sends
    small calls always gets its credit back."""

    def __init__(self, cap: int = 64 << 20) -> None:
        self.cap = cap
        self.held = 0
        self._lock = threading.Lock()

    def add(self, n: int) -> None:
        with self._lock:
            self.held += n

    def over(self) -> bool:
        return self.held > self.cap


@dataclass(frozen=True)
class Request:
    stream_id: int
    path: str
    message: bytes
    timeout: float | None  # seconds, from grpc-timeout


@dataclass(frozen=True)
class StreamReset:
    stream_id: int
    error_code: int


@dataclass(frozen=True)
class Terminated:
    """The connection is over: the peer sent GOAWAY (remote) or broke the protocol."""

    error_code: int
    remote: bool
    reason: str


Event = Request | StreamReset | Terminated


class ProtocolError(Exception):
    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code


class _Stream:
    __slots__ = (
        "answered",
        "body",
        "content_length",
        "done",
        "held",
        "out",
        "out_bytes",
        "path",
        "recv_unacked",
        "recv_window",
        "remote_closed",
        "send_window",
        "sid",
        "since",
        "timeout",
    )

    def __init__(self, sid: int, send_window: int, recv_window: int, now: float) -> None:
        self.sid = sid
        self.path = ""
        self.timeout: float | None = None
        self.body = bytearray()
        self.content_length: int | None = None
        self.remote_closed = False
        self.answered = False  # our response has started (a reset now is no early reset)
        self.send_window = send_window
        self.recv_window = recv_window  # what the peer may still send on this stream
        self.recv_unacked = 0
        self.held = 0  # request bytes of this stream counted in the connection's hold
        self.out: deque[tuple[int, bytes]] = deque()  # (_OUT_*, payload)
        self.out_bytes = 0
        self.done = False  # our END_STREAM is queued
        self.since = now  # when its input or output last moved (for ``expired``)


def frame(ftype: int, flags: int, sid: int, payload: bytes = b"") -> bytes:
    n = len(payload)
    return _FRAME_HEAD.pack(n >> 16, n & 0xFFFF, ftype, flags, sid) + payload


def literal(name: bytes, value: bytes) -> bytes:
    """One header field as an HPACK literal without indexing, new name (no table state)."""
    return b"\x00" + encode_integer(len(name), 7) + name + encode_integer(len(value), 7) + value


def percent_encode(text: str) -> bytes:
    """grpc-message encoding: printable ASCII except '%' as is, everything else %XX of UTF-8."""
    raw = text.encode("utf-8", "replace")
    if all(0x20 <= b <= 0x7E and b != 0x25 for b in raw):
        return raw
    return b"".join(bytes([b]) if 0x20 <= b <= 0x7E and b != 0x25 else b"%%%02X" % b for b in raw)


_RESPONSE_HEADERS = b"\x88" + literal(b"content-type", b"application/grpc")  # 0x88: :status 200
_TRAILERS_OK = literal(b"grpc-status", b"0")


def _trailers(code: int, text: str) -> bytes:
    block = literal(b"grpc-status", str(code).encode())
    return block + literal(b"grpc-message", percent_encode(text)) if text else block


def parse_timeout(value: bytes) -> float | None:
    """grpc-timeout ``<1-8 digits><unit>``; None when absent or malformed (no deadline)."""
    if 2 <= len(value) <= 9 and value[:-1].isdigit():
        unit = _TIMEOUT_UNITS.get(value[-1:])
        if unit is not None:
            return int(value[:-1]) * unit
    return None


class H2Connection:
    """The server side of one HTTP/2 connection. Not thread-safe: callers serialise."""

    def __init__(self, limits: Limits = Limits(), budget: HoldBudget | None = None,
                 now: float = 0.0) -> None:
        self.limits = limits
        self.budget = budget
        self.now = now  # the caller's clock, as of its last call (see ``expired``)
        self.closed = False
        self._buf = bytearray()
        self._out: list[bytes] = []
        self._acks: list[bytes] = []  # PING ACKs, sent after the next output
        self._preface_seen = False
        self._settings_seen = False
        self._decoder = Decoder(max_header_list=limits.max_header_list)
        self._streams: dict[int, _Stream] = {}
        self._waiting: dict[int, _Stream] = {}  # streams with queued output
        self._last_sid = 0
        self._going_away = False
        # (sid, flags, block, frames so far) of a header block awaiting CONTINUATION
        self._cont: tuple[int, int, bytearray, int] | None = None
        self._send_window = _DEFAULT_WINDOW
        self._peer_initial_window = _DEFAULT_WINDOW
        self._peer_max_frame = _DEFAULT_FRAME
        self._recv_window = max(limits.connection_window, _DEFAULT_WINDOW)  # peer may send
        self._owed = 0  # connection credit not given back yet
        self._held = 0  # request bytes of live streams
        self._reset_score = 0
        self._closed: dict[int, int] = {}  # sid -> _PEER_ENDED/_WE_RESET/_PEER_RESET
        settings = struct.pack(
            ">HLHLHLHL", S_ENABLE_PUSH, 0, S_MAX_CONCURRENT_STREAMS, limits.max_concurrent_streams,
            S_INITIAL_WINDOW_SIZE, limits.stream_window, S_MAX_HEADER_LIST_SIZE,
            limits.max_header_list)
        self._out.append(frame(SETTINGS, 0, 0, settings))
        if limits.connection_window > _DEFAULT_WINDOW:
            self._window_update(0, limits.connection_window - _DEFAULT_WINDOW)

    # --- output ----------------------------------------------------------------

    def data_to_send(self, defer_pings: bool = False) -> bytes:
        """Bytes to write. With ``defer_pings``, PING ACKs alone are kept back (see
        ``pings_waiting``) so they can ride with the next response."""
        if defer_pings and not self._out:
            return b""
        out = b"".join(self._out + self._acks)
        self._acks.clear()
        self._out.clear()
        return out

    @property
    def pings_waiting(self) -> bool:
        """PING ACKs are held back by ``data_to_send(defer_pings=True)``."""
        return bool(self._acks)

    @property
    def last_stream_id(self) -> int:
        return self._last_sid

    def is_open(self, sid: int) -> bool:
        """The stream still wants our response (not reset by the peer, connection up)."""
        return not self.closed and sid in self._streams

    @property
    def open_streams(self) -> int:
        """Streams not finished: requests arriving, calls running, responses leaving."""
        return len(self._streams)

    @property
    def output_waiting(self) -> bool:
        """Some stream's response waits for flow-control credit."""
        return bool(self._waiting)

    @property
    def established(self) -> bool:
        """The client's preface and first SETTINGS have arrived."""
        return self._settings_seen

    @property
    def held(self) -> int:
        """Request bytes this connection holds (see the module docstring)."""
        return self._held

    def expired(self, now: float, body_timeout: float, stall_timeout: float) -> list[int]:
        """Streams whose request body has not completed within ``body_timeout`` of its
        last byte, or whose queued response has not moved for ``stall_timeout``."""
        out = []
        for st in self._streams.values():
            if not st.remote_closed:
                if now - st.since > body_timeout:
                    out.append(st.sid)
            elif st.out and now - st.since > stall_timeout:
                out.append(st.sid)
        return out

    def cancel(self, sid: int) -> None:
        """Give up on stream ``sid``: RST_STREAM CANCEL; its response, if any, is dropped."""
        st = self._streams.get(sid)
        if st is not None and not self.closed:
            self._reset(st, CANCEL)

    def poll_credit(self) -> None:
        """Give back connection credit held back while the server held too much, if it
        may be given now (call now and then: another connection's release does not)."""
        self._credit()

    def pending(self, sid: int) -> int:
        """Bytes of DATA queued on ``sid`` waiting for flow-control credit (0 if gone)."""
        st = self._streams.get(sid)
        return st.out_bytes if st is not None else 0

    def respond(self, sid: int, message: bytes) -> None:
        """Unary success: headers, one message, OK trailers."""
        self._reset_score = max(0, self._reset_score - 1)  # an answered call offsets a reset
        st = self._streams.get(sid)
        n = len(message) + 5
        if (st is not None and not st.out and not st.done and not self.closed
                and n <= self._send_window and n <= st.send_window and n <= self._peer_max_frame):
            # The usual case, in one piece: the three frames the queue would make.
            st.answered = True
            self._send_window -= n
            st.send_window -= n
            self._out.append(frame(HEADERS, END_HEADERS, sid, _RESPONSE_HEADERS)
                             + frame(DATA, 0, sid, b"\x00" + (n - 5).to_bytes(4, "big") + message)
                             + frame(HEADERS, END_STREAM | END_HEADERS, sid, _TRAILERS_OK))
            self._end_local(st)
            return
        self.start(sid)
        self.send_message(sid, message)
        self.finish(sid, 0, "")

    def start(self, sid: int) -> None:
        self._enqueue(sid, _OUT_HEADERS, _RESPONSE_HEADERS)

    def send_message(self, sid: int, message: bytes) -> None:
        self._enqueue(sid, _OUT_DATA, b"\x00" + len(message).to_bytes(4, "big") + message)

    def finish(self, sid: int, code: int, text: str) -> None:
        """Trailers after ``start``; ends our half of the stream."""
        block = _TRAILERS_OK if code == 0 and not text else _trailers(code, text)
        self._enqueue(sid, _OUT_TRAILERS, block)

    def fail(self, sid: int, code: int, text: str) -> None:
        """Trailers-only response (no ``start``): an error before any message."""
        self._enqueue(sid, _OUT_TRAILERS, _RESPONSE_HEADERS + _trailers(code, text))

    def goaway(self) -> None:
        """Graceful shutdown: no new streams; those started finish. Idempotent."""
        if not self._going_away and not self.closed:
            self._going_away = True
            self._out.append(frame(GOAWAY, 0, 0, struct.pack(">LL", self._last_sid, NO_ERROR)))

    def _enqueue(self, sid: int, kind: int, payload: bytes) -> None:
        st = self._streams.get(sid)
        if st is None or st.done or self.closed:
            return  # reset by the peer or connection gone: the response has no reader
        st.answered = True
        if not st.out:
            st.since = self.now  # the stall clock runs from when output first waits
        st.out.append((kind, payload))
        if kind == _OUT_DATA:
            st.out_bytes += len(payload)
        elif kind == _OUT_TRAILERS:
            st.done = True
        self._flush(st)

    def _flush(self, st: _Stream) -> None:
        while st.out:
            kind, payload = st.out[0]
            if kind == _OUT_DATA:
                n = min(len(payload), self._send_window, st.send_window, self._peer_max_frame)
                if n <= 0:
                    self._waiting[st.sid] = st
                    return
                self._out.append(frame(DATA, 0, st.sid, payload[:n]))
                self._send_window -= n
                st.send_window -= n
                st.out_bytes -= n
                st.since = self.now
                if n < len(payload):
                    st.out[0] = (kind, payload[n:])
                    continue
                st.out.popleft()
            else:
                st.out.popleft()
                self._headers(st.sid, payload, kind == _OUT_TRAILERS)
                if kind == _OUT_TRAILERS:
                    self._end_local(st)
                    return
        self._waiting.pop(st.sid, None)

    def _headers(self, sid: int, block: bytes, end: bool) -> None:
        size = self._peer_max_frame
        flags = END_STREAM if end else 0
        if len(block) <= size:
            self._out.append(frame(HEADERS, flags | END_HEADERS, sid, block))
            return
        self._out.append(frame(HEADERS, flags, sid, block[:size]))
        for i in range(size, len(block), size):
            last = i + size >= len(block)
            self._out.append(frame(CONTINUATION, END_HEADERS if last else 0, sid, block[i:i + size]))

    def _end_local(self, st: _Stream) -> None:
        del self._streams[st.sid]
        self._waiting.pop(st.sid, None)
        self._release(st)
        self._forget(st.sid, _PEER_ENDED if st.remote_closed else _WE_RESET)
        if not st.remote_closed:  # answered before the request ended: tell the client to stop
            self._out.append(frame(RST_STREAM, 0, st.sid, struct.pack(">L", NO_ERROR)))

    def _window_update(self, sid: int, increment: int) -> None:
        self._out.append(frame(WINDOW_UPDATE, 0, sid, struct.pack(">L", increment)))

    def _forget(self, sid: int, how: int) -> None:
        self._closed[sid] = how
        if len(self._closed) > _CLOSED_KEPT:
            del self._closed[next(iter(self._closed))]

    def _hold(self, st: _Stream | None, n: int) -> None:
        if st is not None and n:
            st.held += n
            self._held += n
            if self.budget is not None:
                self.budget.add(n)

    def _release(self, st: _Stream) -> None:
        """The stream is over: its request bytes are no longer held."""
        if st.held:
            self._held -= st.held
            if self.budget is not None:
                self.budget.add(-st.held)
            st.held = 0
            self._credit()

    def _credit(self) -> None:
        """Give back connection credit if it is owed and may be given (module docstring)."""
        if self._owed < self.limits.connection_window // 2 or self.closed:
            return  # the client still has half its window: no need to write
        if self._held > self.limits.max_held:
            return
        if (self.budget is not None and self._held > self.limits.stream_window
                and self.budget.over()):
            return
        self._window_update(0, self._owed)
        self._recv_window += self._owed
        self._owed = 0

    # --- input -----------------------------------------------------------------

    def receive(self, data: bytes) -> list[Event]:
        """Feed bytes read from the socket; returns what happened."""
        if self.closed:
            return []
        events: list[Event] = []
        buf = self._buf
        buf += data
        try:
            pos = 0
            if not self._preface_seen:
                n = min(len(buf), len(PREFACE))
                if buf[:n] != PREFACE[:n]:
                    raise ProtocolError(PROTOCOL_ERROR, "invalid connection preface")
                if n < len(PREFACE):
                    return events
                self._preface_seen = True
                pos = len(PREFACE)
            end = len(buf)
            head = _FRAME_HEAD.unpack_from
            while end - pos >= 9:
                hi, lo, ftype, flags, sid = head(buf, pos)
                length = hi << 16 | lo
                if length > _DEFAULT_FRAME:  # we never raise SETTINGS_MAX_FRAME_SIZE
                    raise ProtocolError(FRAME_SIZE_ERROR, f"frame of {length} bytes")
                if end - pos - 9 < length:
                    break
                sid &= 0x7FFFFFFF
                payload = bytes(buf[pos + 9:pos + 9 + length])
                pos += 9 + length
                self._frame(ftype, flags, sid, payload, events)
            del buf[:pos]
        except ProtocolError as err:
            self._terminate(err.code, str(err), events)
        except HpackError as err:
            self._terminate(COMPRESSION_ERROR, f"header block: {err}", events)
        return events

    def _terminate(self, code: int, reason: str, events: list[Event]) -> None:
        self._out.append(frame(GOAWAY, 0, 0, struct.pack(">LL", self._last_sid, code)
                               + reason.encode()[:256]))
        self.closed = True
        self._buf.clear()
        for st in self._streams.values():
            self._release(st)
        self._streams.clear()
        self._waiting.clear()
        events.append(Terminated(code, False, reason))

    def _frame(self, ftype: int, flags: int, sid: int, payload: bytes, events: list[Event]) -> None:
        if not self._settings_seen and (ftype != SETTINGS or flags & ACK):
            raise ProtocolError(PROTOCOL_ERROR, "the first frame must be SETTINGS")
        if self._cont is not None and ftype != CONTINUATION:
            raise ProtocolError(PROTOCOL_ERROR, "header block interrupted by another frame")
        if ftype == DATA:
            self._on_data(flags, sid, payload, events)
        elif ftype == HEADERS:
            self._on_headers(flags, sid, payload, events)
        elif ftype == CONTINUATION:
            if self._cont is None or self._cont[0] != sid:
                raise ProtocolError(PROTOCOL_ERROR, "unexpected CONTINUATION")
            csid, cflags, block, count = self._cont
            block += payload
            if len(block) > 2 * self.limits.max_header_list:
                raise ProtocolError(ENHANCE_YOUR_CALM, "header block too large")
            if count >= self.limits.max_continuations:
                raise ProtocolError(ENHANCE_YOUR_CALM,
                                    f"more than {count} CONTINUATION frames in a header block")
            self._cont = (csid, cflags, block, count + 1)
            if flags & END_HEADERS:
                first_flags = self._cont[1]
                self._cont = None
                self._on_header_block(sid, first_flags, bytes(block), events)
        elif ftype == SETTINGS:
            self._on_settings(flags, sid, payload)
        elif ftype == PING:
            if sid != 0 or len(payload) != 8:
                raise ProtocolError(PROTOCOL_ERROR if sid else FRAME_SIZE_ERROR, "bad PING")
            if not flags & ACK:
                self._acks.append(frame(PING, ACK, 0, payload))
        elif ftype == WINDOW_UPDATE:
            self._on_window_update(sid, payload)
        elif ftype == RST_STREAM:
            if sid == 0 or len(payload) != 4:
                raise ProtocolError(PROTOCOL_ERROR if not sid else FRAME_SIZE_ERROR, "bad RST_STREAM")
            if sid > self._last_sid:
                raise ProtocolError(PROTOCOL_ERROR, f"RST_STREAM on idle stream {sid}")
            st = self._streams.pop(sid, None)
            self._waiting.pop(sid, None)
            if st is not None:
                self._release(st)
                self._forget(sid, _PEER_RESET)
                events.append(StreamReset(sid, int.from_bytes(payload, "big")))
                if not st.answered:
                    self._reset_score += 1
                    if self._reset_score > self.limits.max_reset_score:
                        raise ProtocolError(ENHANCE_YOUR_CALM,
                                            "too many streams reset before they were answered")
        elif ftype == GOAWAY:
            if sid != 0 or len(payload) < 8:
                raise ProtocolError(PROTOCOL_ERROR, "bad GOAWAY")
            code = int.from_bytes(payload[4:8], "big")
            events.append(Terminated(code, True, payload[8:].decode("utf-8", "replace")))
        elif ftype == PRIORITY:
            if sid == 0 or len(payload) != 5:
                raise ProtocolError(PROTOCOL_ERROR if not sid else FRAME_SIZE_ERROR, "bad PRIORITY")
            if int.from_bytes(payload[:4], "big") & 0x7FFFFFFF == sid:
                self._stream_error(sid, PROTOCOL_ERROR)  # a stream cannot depend on itself
        elif ftype == PUSH_PROMISE:
            raise ProtocolError(PROTOCOL_ERROR, "PUSH_PROMISE from a client")
        # other frame types are extensions: ignored, as RFC 9113 requires

    def _on_settings(self, flags: int, sid: int, payload: bytes) -> None:
        if sid != 0:
            raise ProtocolError(PROTOCOL_ERROR, "SETTINGS on a stream")
        if flags & ACK:
            if payload:
                raise ProtocolError(FRAME_SIZE_ERROR, "SETTINGS ACK with a payload")
            return
        if len(payload) % 6:
            raise ProtocolError(FRAME_SIZE_ERROR, "SETTINGS length not a multiple of 6")
        self._settings_seen = True
        for i in range(0, len(payload), 6):
            ident, value = struct.unpack_from(">HL", payload, i)
            if ident == S_ENABLE_PUSH and value > 1:
                raise ProtocolError(PROTOCOL_ERROR, "ENABLE_PUSH must be 0 or 1")
            if ident == S_INITIAL_WINDOW_SIZE:
                if value > _MAX_WINDOW:
                    raise ProtocolError(FLOW_CONTROL_ERROR, "INITIAL_WINDOW_SIZE too large")
                delta = value - self._peer_initial_window
                self._peer_initial_window = value
                for st in self._streams.values():
                    st.send_window += delta
            elif ident == S_MAX_FRAME_SIZE:
                if not _DEFAULT_FRAME <= value <= 16_777_215:
                    raise ProtocolError(PROTOCOL_ERROR, "MAX_FRAME_SIZE out of range")
                self._peer_max_frame = value
        self._out.append(frame(SETTINGS, ACK, 0))
        self._resume()

    def _on_window_update(self, sid: int, payload: bytes) -> None:
        if len(payload) != 4:
            raise ProtocolError(FRAME_SIZE_ERROR, "WINDOW_UPDATE length")
        inc = int.from_bytes(payload, "big") & 0x7FFFFFFF
        if sid == 0:
            if inc == 0:
                raise ProtocolError(PROTOCOL_ERROR, "WINDOW_UPDATE of 0")
            self._send_window += inc
            if self._send_window > _MAX_WINDOW:
                raise ProtocolError(FLOW_CONTROL_ERROR, "connection window overflow")
            self._resume()
            return
        st = self._streams.get(sid)
        if st is None:
            if sid > self._last_sid:
                raise ProtocolError(PROTOCOL_ERROR, f"WINDOW_UPDATE on idle stream {sid}")
            return  # a stream we already finished or reset
        if inc == 0 or st.send_window + inc > _MAX_WINDOW:
            self._reset(st, PROTOCOL_ERROR if inc == 0 else FLOW_CONTROL_ERROR)
            return
        st.send_window += inc
        self._flush(st)

    def _resume(self) -> None:
        for st in list(self._waiting.values()):
            self._flush(st)

    def _reset(self, st: _Stream, code: int) -> None:
        self._out.append(frame(RST_STREAM, 0, st.sid, struct.pack(">L", code)))
        self._streams.pop(st.sid, None)
        self._waiting.pop(st.sid, None)
        self._release(st)
        self._forget(st.sid, _WE_RESET)

    def _stream_error(self, sid: int, code: int) -> None:
        """RST_STREAM ``code`` on ``sid``, tracked or not."""
        st = self._streams.get(sid)
        if st is not None:
            self._reset(st, code)
        else:
            self._out.append(frame(RST_STREAM, 0, sid, struct.pack(">L", code)))
            self._forget(sid, _WE_RESET)

    def _strip_padding(self, flags: int, payload: bytes) -> bytes:
        if flags & PADDED:
            if not payload or payload[0] >= len(payload):
                raise ProtocolError(PROTOCOL_ERROR, "padding exceeds the frame")
            return payload[1:len(payload) - payload[0]]
        return payload

    def _on_data(self, flags: int, sid: int, payload: bytes, events: list[Event]) -> None:
        if sid == 0:
            raise ProtocolError(PROTOCOL_ERROR, "DATA on stream 0")
        n = len(payload)  # padding counts against flow control too
        if n > self._recv_window:
            raise ProtocolError(FLOW_CONTROL_ERROR,
                                f"DATA of {n} bytes beyond the connection window ({self._recv_window})")
        self._recv_window -= n
        self._owed += n
        data = self._strip_padding(flags, payload)
        st = self._streams.get(sid)
        if st is None:
            if sid > self._last_sid:
                raise ProtocolError(PROTOCOL_ERROR, f"DATA on idle stream {sid}")
            self._credit()
            how = self._closed.get(sid)
            if how == _PEER_ENDED:  # the client ended it, then sent more: RFC 9113 5.1
                raise ProtocolError(STREAM_CLOSED, f"DATA on closed stream {sid}")
            if how == _PEER_RESET:
                self._stream_error(sid, STREAM_CLOSED)
            return  # late DATA for a stream we answered early or reset: ignored
        if st.remote_closed:
            self._reset(st, STREAM_CLOSED)
            self._credit()
            return
        if n > st.recv_window:
            self._reset(st, FLOW_CONTROL_ERROR)
            self._credit()
            return
        st.recv_window -= n
        st.since = self.now
        self._hold(st, n)
        self._credit()
        st.body += data
        if st.content_length is not None and len(st.body) > st.content_length:
            self._reset(st, PROTOCOL_ERROR)  # more than content-length said: malformed
            return
        declared = int.from_bytes(st.body[1:5], "big") if len(st.body) >= 5 else 0
        if max(declared, len(st.body) - 5) > self.limits.max_message:
            # Answered at once (the stream is then closed, with RST_STREAM NO_ERROR):
            # what is still on its way is dropped as late DATA.
            self.fail(sid, STATUS_CODES["RESOURCE_EXHAUSTED"],
                      f"request message larger than {self.limits.max_message} bytes")
            return
        if flags & END_STREAM:
            st.remote_closed = True
            self._request_complete(st, events)
            return
        st.recv_unacked += n
        if st.recv_unacked >= self.limits.stream_window // 2:
            self._window_update(sid, st.recv_unacked)
            st.recv_window += st.recv_unacked
            st.recv_unacked = 0

    def _on_headers(self, flags: int, sid: int, payload: bytes, events: list[Event]) -> None:
        if sid == 0:
            raise ProtocolError(PROTOCOL_ERROR, "HEADERS on stream 0")
        block = self._strip_padding(flags, payload)
        if flags & PRIORITY_FLAG:
            if len(block) < 5:
                raise ProtocolError(FRAME_SIZE_ERROR, "HEADERS priority fields missing")
            if int.from_bytes(block[:4], "big") & 0x7FFFFFFF == sid:
                flags |= _SELF_DEPENDENT
            block = block[5:]
        if flags & END_HEADERS:
            self._on_header_block(sid, flags, block, events)
        else:
            self._cont = (sid, flags, bytearray(block), 0)

    def _on_header_block(self, sid: int, flags: int, block: bytes, events: list[Event]) -> None:
        # Decode first, whatever happens to the stream: the HPACK table is per connection.
        headers = self._decoder.decode(block)
        st = self._streams.get(sid)
        if st is not None:  # trailers from the client end its half
            if st.remote_closed or not flags & END_STREAM:
                raise ProtocolError(PROTOCOL_ERROR, f"second HEADERS on stream {sid}")
            st.remote_closed = True
            if any(name[:1] == b":" for name, _ in headers):
                self._reset(st, PROTOCOL_ERROR)  # pseudo-headers in trailers: malformed
                return
            self._request_complete(st, events)
            return
        if sid % 2 == 0 or sid <= self._last_sid:
            raise ProtocolError(PROTOCOL_ERROR, f"HEADERS on stream {sid} (not a new odd id)")
        self._last_sid = sid
        st = _Stream(sid, self._peer_initial_window, self.limits.stream_window, self.now)
        if self._going_away or len(self._streams) >= self.limits.max_concurrent_streams:
            self._out.append(frame(RST_STREAM, 0, sid, struct.pack(">L", REFUSED_STREAM)))
            return
        self._streams[sid] = st
        if flags & _SELF_DEPENDENT or not self._request_headers(st, headers):
            self._reset(st, PROTOCOL_ERROR)  # a malformed request: RFC 9113 8.1.1
            return
        if flags & END_STREAM:
            st.remote_closed = True
            self._request_complete(st, events)

    @staticmethod
    def _request_headers(st: _Stream, headers: list[tuple[bytes, bytes]]) -> bool:
        """Take ``:path``, ``grpc-timeout`` and ``content-length`` into ``st``; False for a
        malformed request (RFC 9113 8.2-8.3: field names lowercase, the request
        pseudo-headers once each and first, no connection-specific fields, te only
        "trailers")."""
        seen = 0  # pseudo-headers met, as bits
        regular = False
        for name, value in headers:
            if name[:1] == b":":
                bit = 1 if name == b":path" else 2 if name == b":method" else \
                    4 if name == b":scheme" else 8 if name == b":authority" else 0
                if regular or not bit or seen & bit:
                    return False  # after a field, unknown, a response's, or repeated
                seen |= bit
                if bit == 1:
                    st.path = value.decode("utf-8", "replace")
                continue
            regular = True
            if name == b"grpc-timeout":
                st.timeout = parse_timeout(value)
            elif name == b"te":
                if value != b"trailers":
                    return False
            elif name == b"content-length":
                if not value.isdigit():
                    return False
                st.content_length = int(value)
            elif name in _CONNECTION_FIELDS or name != name.lower():
                return False
        return seen & 7 == 7 and bool(st.path)  # :path (not empty), :method, :scheme

    def _request_complete(self, st: _Stream, events: list[Event]) -> None:
        if st.content_length is not None and st.content_length != len(st.body):
            self._reset(st, PROTOCOL_ERROR)  # RFC 9113 8.1.1: content-length must match
            return
        body = st.body
        st.body = bytearray()
        if len(body) >= 5 and body[0] != 0:
            self.fail(st.sid, STATUS_CODES["UNIMPLEMENTED"],
                      "compressed request messages are not supported")
        elif len(body) < 5 or int.from_bytes(body[1:5], "big") != len(body) - 5:
            self.fail(st.sid, STATUS_CODES["INTERNAL"], "expected exactly one request message")
        else:
            events.append(Request(st.sid, st.path, bytes(body[5:]), st.timeout))

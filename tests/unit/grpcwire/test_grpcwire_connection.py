"""The sans-I/O HTTP/2 + gRPC core: bytes in, events and bytes out, never an exception."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pynydus.grpcwire import connection as w
from pynydus.grpcwire.connection import (
    H2Connection,
    HoldBudget,
    Limits,
    Request,
    StreamReset,
    Terminated,
)
from tests.integration.snapshotter.h2peer import STAT, Peer


def connected(limits: Limits | None = None, settings_payload: bytes = b"") -> H2Connection:
    conn = H2Connection(limits or Limits())
    assert conn.receive(w.PREFACE + w.frame(w.SETTINGS, 0, 0, settings_payload)) == []
    conn.data_to_send()
    return conn


def test_server_opens_with_settings_and_acks_the_clients() -> None:
    conn = H2Connection()
    first = Peer.frames(conn.data_to_send())
    assert first[0][0] == w.SETTINGS and first[0][1] == 0
    conn.receive(w.PREFACE + w.frame(w.SETTINGS, 0, 0))
    assert (w.SETTINGS, w.ACK, 0, b"") in Peer.frames(conn.data_to_send())


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=200), max_size=8))
def test_a_request_arrives_whole_whatever_the_byte_splits(cuts: list[int]) -> None:
    peer = Peer()
    data = w.PREFACE + w.frame(w.SETTINGS, 0, 0) + peer.request(1, b"key-1")
    conn = H2Connection()
    events = []
    last = 0
    for cut in sorted({min(c, len(data)) for c in cuts}) + [len(data)]:
        events += conn.receive(data[last:cut])
        last = cut
    assert events == [Request(1, STAT, b"key-1", None)]


def test_header_block_split_over_continuation_frames() -> None:
    peer, conn = Peer(), connected()
    block = peer.headers(extra=[("x-pad", "v" * 300)])
    frames = (w.frame(w.HEADERS, 0, 1, block[:10]) + w.frame(w.CONTINUATION, 0, 1, block[10:50])
              + w.frame(w.CONTINUATION, w.END_HEADERS, 1, block[50:])
              + w.frame(w.DATA, w.END_STREAM, 1, peer.body(b"m")))
    assert conn.receive(frames) == [Request(1, STAT, b"m", None)]


def test_another_frame_inside_a_header_block_is_a_protocol_error() -> None:
    peer, conn = Peer(), connected()
    block = peer.headers()
    events = conn.receive(w.frame(w.HEADERS, 0, 1, block[:5]) + w.frame(w.PING, 0, 0, bytes(8)))
    assert events == [Terminated(w.PROTOCOL_ERROR, False, "header block interrupted by another frame")]


def test_padding_is_stripped_from_headers_and_data() -> None:
    peer, conn = Peer(), connected()
    block = peer.headers(extra=[("grpc-timeout", "250m")])
    headers = bytes([3]) + bytes(5) + block + b"\0\0\0"  # pad length 3, priority fields
    body = peer.body(b"abc")
    data = bytes([7]) + body + bytes(7)
    events = conn.receive(w.frame(w.HEADERS, w.END_HEADERS | w.PADDED | w.PRIORITY_FLAG, 1, headers)
                          + w.frame(w.DATA, w.END_STREAM | w.PADDED, 1, data))
    assert events == [Request(1, STAT, b"abc", 0.25)]


def test_padding_longer_than_the_frame_is_a_protocol_error() -> None:
    conn = connected()
    events = conn.receive(w.frame(w.DATA, w.PADDED, 1, bytes([9, 1, 2])))
    assert isinstance(events[-1], Terminated) and conn.closed


def test_unary_response_is_headers_message_and_ok_trailers() -> None:
    peer, conn = Peer(), connected()
    conn.receive(peer.request(1, b"k"))
    conn.respond(1, b"answer")
    fields, msgs, ended = peer.response(conn.data_to_send(), 1)
    assert fields[":status"] == "200" and fields["content-type"] == "application/grpc"
    assert fields["grpc-status"] == "0" and msgs == [b"answer"] and ended
    assert not conn.is_open(1)


def test_error_is_a_trailers_only_response_with_percent_encoded_message() -> None:
    peer, conn = Peer(), connected()
    conn.receive(peer.request(1, b"k"))
    conn.fail(1, w.STATUS_CODES["NOT_FOUND"], 'stat snapshot "k": 100% gone ✗')
    fields, msgs, ended = peer.response(conn.data_to_send(), 1)
    assert fields["grpc-status"] == "5" and msgs == [] and ended
    assert fields["grpc-message"] == 'stat snapshot "k": 100%25 gone %E2%9C%97'


def test_sender_waits_for_window_update_before_sending_more() -> None:
    peer = Peer()
    conn = connected(settings_payload=struct.pack(">HL", w.S_INITIAL_WINDOW_SIZE, 10))
    conn.receive(peer.request(1, b"k"))
    conn.start(1)
    conn.send_message(1, b"x" * 100)
    first = Peer.frames(conn.data_to_send())
    assert sum(len(p) for t, _, _, p in first if t == w.DATA) == 10
    assert conn.pending(1) == 95
    conn.finish(1, 0, "")
    assert not any(t == w.HEADERS for t, *_ in Peer.frames(conn.data_to_send()))  # trailers wait
    conn.receive(w.frame(w.WINDOW_UPDATE, 0, 1, struct.pack(">L", 1000)))
    rest = conn.data_to_send()
    data = b"".join(p for t, _, _, p in first if t == w.DATA) + b"".join(
        p for t, _, _, p in Peer.frames(rest) if t == w.DATA)
    assert data == peer.body(b"x" * 100) and conn.pending(1) == 0
    assert Peer.frames(rest)[-1][:2] == (w.HEADERS, w.END_STREAM | w.END_HEADERS)


def test_connection_window_limits_a_large_list_until_the_client_grants_more() -> None:
    peer = Peer()
    conn = connected(settings_payload=struct.pack(">HL", w.S_INITIAL_WINDOW_SIZE, 1 << 20))
    conn.receive(peer.request(1, b"", "/containerd.services.snapshots.v1.Snapshots/List"))
    conn.start(1)
    for _ in range(20):
        conn.send_message(1, b"i" * 10_000)
    sent = sum(len(p) for t, _, _, p in Peer.frames(conn.data_to_send()) if t == w.DATA)
    assert sent == 65_535 and conn.pending(1) == 20 * 10_005 - 65_535
    conn.receive(w.frame(w.WINDOW_UPDATE, 0, 0, struct.pack(">L", 1 << 20)))
    frames = Peer.frames(conn.data_to_send())
    assert sum(len(p) for t, _, _, p in frames if t == w.DATA) == 20 * 10_005 - 65_535
    assert max(len(p) for t, _, _, p in frames if t == w.DATA) <= 16_384  # peer's max frame


def test_we_return_credit_for_what_we_receive() -> None:
    peer = Peer()
    conn = connected(Limits(stream_window=1000, connection_window=4000, max_message=10_000))
    conn.receive(w.frame(w.HEADERS, w.END_HEADERS, 1, peer.headers()))
    body = peer.body(b"z" * 3000)
    updates: dict[int, int] = {}
    for i in range(0, len(body), 500):
        conn.receive(w.frame(w.DATA, 0, 1, body[i:i + 500]))
        for t, _, sid, p in Peer.frames(conn.data_to_send()):
            if t == w.WINDOW_UPDATE:
                updates[sid] = updates.get(sid, 0) + int.from_bytes(p, "big")
    assert updates[1] >= 2500 and updates[0] >= 2000


def test_ping_is_acked_with_the_same_payload() -> None:
    conn = connected()
    conn.receive(w.frame(w.PING, 0, 0, b"bdp-ping"))
    assert Peer.frames(conn.data_to_send()) == [(w.PING, w.ACK, 0, b"bdp-ping")]


def test_bad_preface_is_goaway_protocol_error_not_an_exception() -> None:
    conn = H2Connection()
    conn.data_to_send()
    events = conn.receive(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert events == [Terminated(w.PROTOCOL_ERROR, False, "invalid connection preface")]
    ftype, _, _, payload = Peer.frames(conn.data_to_send())[-1]
    assert ftype == w.GOAWAY and int.from_bytes(payload[4:8], "big") == w.PROTOCOL_ERROR
    assert conn.closed and conn.receive(b"more") == []


def test_first_frame_must_be_settings() -> None:
    conn = H2Connection()
    events = conn.receive(w.PREFACE + w.frame(w.PING, 0, 0, bytes(8)))
    assert isinstance(events[0], Terminated) and events[0].error_code == w.PROTOCOL_ERROR


def test_oversized_message_is_resource_exhausted() -> None:
    peer = Peer()
    conn = connected(Limits(max_message=100))
    conn.receive(w.frame(w.HEADERS, w.END_HEADERS, 1, peer.headers())
                 + w.frame(w.DATA, 0, 1, peer.body(b"y" * 200)[:50]))
    fields, _, ended = peer.response(conn.data_to_send(), 1)
    assert fields["grpc-status"] == "8" and ended
    assert conn.receive(w.frame(w.DATA, w.END_STREAM, 1, b"rest")) == []  # late data ignored
    assert not conn.closed


def test_compressed_message_is_unimplemented() -> None:
    peer, conn = Peer(), connected()
    events = conn.receive(w.frame(w.HEADERS, w.END_HEADERS, 1, peer.headers())
                          + w.frame(w.DATA, w.END_STREAM, 1, peer.body(b"gz", compressed=1)))
    assert events == []
    assert peer.response(conn.data_to_send(), 1)[0]["grpc-status"] == "12"


def test_request_without_a_message_is_internal() -> None:
    peer, conn = Peer(), connected()
    assert conn.receive(w.frame(w.HEADERS, w.END_HEADERS | w.END_STREAM, 1, peer.headers())) == []
    assert peer.response(conn.data_to_send(), 1)[0]["grpc-status"] == "13"


def test_reset_stream_drops_its_queued_response() -> None:
    peer = Peer()
    conn = connected(settings_payload=struct.pack(">HL", w.S_INITIAL_WINDOW_SIZE, 0))
    conn.receive(peer.request(1, b"k"))
    conn.start(1)
    conn.send_message(1, b"q" * 50)
    conn.data_to_send()
    events = conn.receive(w.frame(w.RST_STREAM, 0, 1, struct.pack(">L", w.CANCEL)))
    assert events == [StreamReset(1, w.CANCEL)] and not conn.is_open(1) and conn.pending(1) == 0
    conn.send_message(1, b"late")
    conn.finish(1, 0, "")
    assert conn.data_to_send() == b""


def test_streams_beyond_the_advertised_maximum_are_refused() -> None:
    peer, conn = Peer(), connected(Limits(max_concurrent_streams=2))
    events = conn.receive(peer.request(1, b"a") + peer.request(3, b"b") + peer.request(5, b"c"))
    assert [e.stream_id for e in events if isinstance(e, Request)] == [1, 3]
    assert (w.RST_STREAM, 0, 5, struct.pack(">L", w.REFUSED_STREAM)) in Peer.frames(conn.data_to_send())


def test_stream_ids_must_be_new_and_odd() -> None:
    peer, conn = Peer(), connected()
    conn.receive(peer.request(3, b"a"))
    events = conn.receive(peer.request(1, b"b"))
    assert isinstance(events[-1], Terminated) and events[-1].error_code == w.PROTOCOL_ERROR


def test_goaway_refuses_new_streams_and_lets_open_ones_finish() -> None:
    peer, conn = Peer(), connected()
    conn.receive(peer.request(1, b"a"))
    conn.goaway()
    assert conn.receive(peer.request(3, b"b")) == []
    conn.respond(1, b"ok")
    frames = Peer.frames(conn.data_to_send())
    assert frames[0][0] == w.GOAWAY and int.from_bytes(frames[0][3][:4], "big") == 1
    assert (w.RST_STREAM, 0, 3, struct.pack(">L", w.REFUSED_STREAM)) in frames
    assert peer.response(b"".join(w.frame(*f) for f in frames), 1)[0]["grpc-status"] == "0"


def test_long_trailers_use_continuation_frames() -> None:
    peer, conn = Peer(), connected()
    conn.receive(peer.request(1, b"k"))
    conn.fail(1, 13, "e" * 40_000)
    frames = Peer.frames(conn.data_to_send())
    assert [f[0] for f in frames] == [w.HEADERS, w.CONTINUATION, w.CONTINUATION]
    assert peer.response(b"".join(w.frame(*f) for f in frames), 1)[0]["grpc-message"] == "e" * 40_000


def test_grpc_timeout_units() -> None:
    assert w.parse_timeout(b"5S") == 5.0 and w.parse_timeout(b"1H") == 3600.0
    assert w.parse_timeout(b"250u") == 250e-6
    assert w.parse_timeout(b"x") is None and w.parse_timeout(b"123456789S") is None


def test_repeated_indexed_header_blocks_decode_the_same_after_table_changes() -> None:
    peer, conn = Peer(), connected()
    paths = [STAT, "/containerd.services.snapshots.v1.Snapshots/Mounts", STAT]
    events = []
    for i, path in enumerate(paths * 3):
        events += conn.receive(peer.request(2 * i + 1, b"m", path))
        conn.respond(2 * i + 1, b"")
    assert [e.path for e in events if isinstance(e, Request)] == paths * 3


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300), st.booleans())
def test_random_bytes_only_ever_produce_our_protocol_errors(junk: bytes, after_preface: bool) -> None:
    conn = H2Connection(Limits(max_message=1000))
    head = w.PREFACE + w.frame(w.SETTINGS, 0, 0) if after_preface else b""
    events = conn.receive(head + junk)  # must not raise
    for ev in events:
        assert isinstance(ev, (Request, StreamReset, Terminated))
    out = conn.data_to_send()
    if conn.closed:
        assert Peer.frames(out)[-1][0] == w.GOAWAY


def test_deferred_ping_ack_leaves_after_the_next_response() -> None:
    peer, conn = Peer(), connected()
    conn.receive(w.frame(w.PING, 0, 0, b"12345678"))
    assert conn.data_to_send(defer_pings=True) == b"" and conn.pings_waiting
    conn.receive(peer.request(1, b"k"))
    conn.respond(1, b"r")
    frames = Peer.frames(conn.data_to_send(defer_pings=True))
    assert frames[-1] == (w.PING, w.ACK, 0, b"12345678") and not conn.pings_waiting
    assert peer.response(b"".join(w.frame(*f) for f in frames), 1)[0]["grpc-status"] == "0"


# --- abuse: flow control enforced, held bytes bounded, floods ended ------------------------

def _goaway_code(data: bytes) -> int | None:
    for t, _, _, p in Peer.frames(data):
        if t == w.GOAWAY:
            return int.from_bytes(p[4:8], "big")
    return None


def _credit(data: bytes, sid: int = 0) -> int:
    return sum(int.from_bytes(p, "big") for t, _, s, p in Peer.frames(data)
               if t == w.WINDOW_UPDATE and s == sid)


def test_data_beyond_the_connection_window_ends_the_connection() -> None:
    limits = Limits(connection_window=1 << 16, stream_window=1 << 20, max_held=1000)
    peer, conn = Peer(), connected(limits)
    conn.receive(w.frame(w.HEADERS, w.END_HEADERS, 1, peer.headers()))
    chunk = bytes(16_000)
    for _ in range(4):  # 64,000 bytes: within 65,536 (no credit back: it holds too much)
        assert not conn.receive(w.frame(w.DATA, 0, 1, chunk))
    assert _credit(conn.data_to_send()) == 0
    events = conn.receive(w.frame(w.DATA, 0, 1, chunk))
    assert isinstance(events[-1], Terminated) and conn.closed
    assert _goaway_code(conn.data_to_send()) == w.FLOW_CONTROL_ERROR


def test_data_beyond_a_stream_window_resets_that_stream_only() -> None:
    limits = Limits(stream_window=10_000)
    peer, conn = Peer(), connected(limits)
    conn.receive(w.frame(w.HEADERS, w.END_HEADERS, 1, peer.headers()))
    conn.receive(w.frame(w.DATA, 0, 1, bytes(12_000)))
    frames = Peer.frames(conn.data_to_send())
    assert (w.RST_STREAM, 0, 1, struct.pack(">L", w.FLOW_CONTROL_ERROR)) in frames
    assert not conn.closed
    assert conn.receive(peer.request(3, b"k")) == [Request(3, STAT, b"k", None)]


def test_credit_stops_while_the_connection_holds_too_much_and_resumes_when_calls_end() -> None:
    """Bodies of unanswered calls are held: past ``max_held`` the client gets no more
    connection credit (it must wait), and credit comes back as the calls are answered."""
    limits = Limits(connection_window=1 << 16, stream_window=1 << 20, max_held=100_000)
    peer, conn = Peer(), connected(limits)
    sent = credited = 0
    window = 1 << 16
    sid = 1
    while sid < 40:  # each stream: a 30,000-byte message, whole
        body = peer.body(bytes(30_000))
        if len(body) > window - sent + credited:
            break  # the client may not send: out of connection credit
        conn.receive(w.frame(w.HEADERS, w.END_HEADERS, sid, peer.headers())
                     + w.frame(w.DATA, 0, sid, body[:16_000])
                     + w.frame(w.DATA, w.END_STREAM, sid, body[16_000:]))
        sent += len(body)
        credited += _credit(conn.data_to_send())
        sid += 2
    assert conn.held <= limits.max_held + (1 << 16)
    assert sid < 40, "the client was never held back"
    for done in range(1, sid, 2):
        conn.respond(done, b"ok")
    assert _credit(conn.data_to_send()) > 0 and conn.held == 0


def test_a_budget_slows_only_connections_that_hold_a_lot() -> None:
    budget = HoldBudget(cap=10)
    budget.add(100)  # other connections hold more than the cap
    limits = Limits(connection_window=1 << 16, stream_window=1 << 14)
    peer = Peer()
    small = H2Connection(limits, budget)
    small.receive(w.PREFACE + w.frame(w.SETTINGS, 0, 0))
    small.data_to_send()
    for sid in range(1, 41, 2):  # many small calls, answered: credit keeps coming
        small.receive(peer.request(sid, bytes(3000)))
        small.respond(sid, b"")
    assert _credit(small.data_to_send()) > 0


def test_empty_continuation_frames_without_end_are_cut_off() -> None:
    peer, conn = Peer(), connected()
    flood = w.frame(w.HEADERS, 0, 1, peer.headers()[:5]) + w.frame(w.CONTINUATION, 0, 1) * 100
    events = conn.receive(flood)
    assert isinstance(events[-1], Terminated) and conn.closed
    assert _goaway_code(conn.data_to_send()) == w.ENHANCE_YOUR_CALM


def test_rapid_reset_ends_the_connection_but_answered_calls_offset_resets() -> None:
    peer, conn = Peer(), connected()
    sid = 1
    for _ in range(150):  # a client that cancels now and then, among answered calls
        conn.receive(peer.request(sid, b"k") + w.frame(w.RST_STREAM, 0, sid, struct.pack(">L", 8)))
        conn.receive(peer.request(sid + 2, b"k"))
        conn.respond(sid + 2, b"")
        sid += 4
    assert not conn.closed
    flood = b"".join(peer.request(s, b"k") + w.frame(w.RST_STREAM, 0, s, struct.pack(">L", 8))
                     for s in range(sid, sid + 2 * 300, 2))
    events = conn.receive(flood)
    assert isinstance(events[-1], Terminated) and conn.closed
    assert _goaway_code(conn.data_to_send()) == w.ENHANCE_YOUR_CALM


def test_expired_names_stalled_bodies_and_stalled_responses_and_cancel_resets() -> None:
    peer, conn = Peer(), connected()
    conn.now = 100.0
    conn.receive(w.frame(w.HEADERS, w.END_HEADERS, 1, peer.headers()))  # body never ends
    conn.receive(w.frame(w.WINDOW_UPDATE, 0, 0, struct.pack(">L", 1)))
    conn.receive(w.frame(w.SETTINGS, 0, 0, struct.pack(">HL", w.S_INITIAL_WINDOW_SIZE, 0))
                 + peer.request(3, b"k"))
    conn.respond(3, b"answer")  # no stream credit: waits
    assert conn.output_waiting and conn.expired(105.0, 10.0, 10.0) == []
    assert sorted(conn.expired(111.0, 10.0, 10.0)) == [1, 3]
    conn.data_to_send()
    conn.cancel(3)
    conn.cancel(1)
    frames = Peer.frames(conn.data_to_send())
    assert {(s, p) for t, _, s, p in frames if t == w.RST_STREAM} == {
        (1, struct.pack(">L", w.CANCEL)), (3, struct.pack(">L", w.CANCEL))}
    assert conn.open_streams == 0 and not conn.output_waiting and conn.held == 0


# --- RFC 9113 rules h2spec checks --------------------------------------------------------

def _rst(data: bytes, sid: int) -> int | None:
    for t, _, s, p in Peer.frames(data):
        if t == w.RST_STREAM and s == sid:
            return int.from_bytes(p, "big")
    return None


@pytest.mark.parametrize("fields", [
    [(":method", "POST"), (":scheme", "http"), (":path", STAT), ("Content-Type", "x")],
    [(":method", "POST"), (":scheme", "http"), (":path", STAT), (":status", "200")],
    [(":method", "POST"), ("te", "trailers"), (":scheme", "http"), (":path", STAT)],
    [(":method", "POST"), (":method", "POST"), (":scheme", "http"), (":path", STAT)],
    [(":scheme", "http"), (":path", STAT)],
    [(":method", "POST"), (":scheme", "http"), (":path", STAT), ("connection", "close")],
    [(":method", "POST"), (":scheme", "http"), (":path", STAT), ("te", "gzip")],
])
def test_malformed_request_headers_reset_the_stream(fields: list[tuple[str, str]]) -> None:
    peer, conn = Peer(), connected()
    block = peer.enc.encode(fields)
    events = conn.receive(w.frame(w.HEADERS, w.END_HEADERS | w.END_STREAM, 1, block))
    assert events == [] and _rst(conn.data_to_send(), 1) == w.PROTOCOL_ERROR
    assert conn.receive(peer.request(3, b"k")) == [Request(3, STAT, b"k", None)]


def test_content_length_must_match_the_body() -> None:
    peer, conn = Peer(), connected()
    block = peer.headers(extra=[("content-length", "3")])
    conn.receive(w.frame(w.HEADERS, w.END_HEADERS, 1, block) + w.frame(w.DATA, 0, 1, b"test"))
    assert _rst(conn.data_to_send(), 1) == w.PROTOCOL_ERROR
    body = peer.body(b"k")
    ok = peer.headers(extra=[("content-length", str(len(body)))])
    assert conn.receive(w.frame(w.HEADERS, w.END_HEADERS, 3, ok)
                        + w.frame(w.DATA, w.END_STREAM, 3, body)) == [Request(3, STAT, b"k", None)]


def test_a_stream_depending_on_itself_is_a_stream_error() -> None:
    peer, conn = Peer(), connected()
    conn.receive(w.frame(w.PRIORITY, 0, 1, struct.pack(">LB", 1, 16)))
    assert _rst(conn.data_to_send(), 1) == w.PROTOCOL_ERROR and not conn.closed
    block = struct.pack(">LB", 3, 16) + peer.headers()
    conn.receive(w.frame(w.HEADERS, w.END_HEADERS | w.END_STREAM | w.PRIORITY_FLAG, 3, block))
    assert _rst(conn.data_to_send(), 3) == w.PROTOCOL_ERROR and not conn.closed


def test_frames_on_closed_and_idle_streams() -> None:
    peer, conn = Peer(), connected()
    conn.receive(peer.request(1, b"k"))
    conn.respond(1, b"")  # closed: the client ended it and we answered
    conn.data_to_send()
    conn.receive(w.frame(w.WINDOW_UPDATE, 0, 1, struct.pack(">L", 1)))  # allowed late
    assert not conn.closed
    events = conn.receive(w.frame(w.DATA, 0, 1, b"more"))
    assert isinstance(events[-1], Terminated) and events[-1].error_code == w.STREAM_CLOSED
    peer, conn = Peer(), connected()
    events = conn.receive(w.frame(w.WINDOW_UPDATE, 0, 9, struct.pack(">L", 1)))
    assert isinstance(events[-1], Terminated) and events[-1].error_code == w.PROTOCOL_ERROR

"""The FUSE protocol codec: requests parse to values, values build replies, INIT negotiates.

Contract: ``parse_request`` takes exactly one message as read from /dev/fuse and either
returns a ``Request`` or raises ``ProtocolError`` (never anything else, whatever the
bytes); reply builders produce messages whose header length is their size; INIT agrees
on the intersection of what the kernel offers and what we want, at the older minor.
"""

from __future__ import annotations

import errno
import random
import struct

import pytest

from pynydus.daemon import fuseproto as P


def test_read_request_parses_to_its_values() -> None:
    raw = P.encode_request(P.READ, 77, 1234, P.read_request_body(1234, 8192, 131072), uid=5,
                           gid=6, pid=7)
    req = P.parse_request(raw)
    assert req == P.Request(P.READ, 77, 1234, 5, 6, 7, P.ReadIn(1234, 8192, 131072))


@pytest.mark.parametrize("opcode, body, arg", [
    (P.LOOKUP, b"name\0", b"name"),
    (P.OPEN, struct.pack("<II", 0o2, 0), 0o2),
    (P.OPENDIR, struct.pack("<II", 0, 0), 0),
    (P.RELEASE, struct.pack("<QIIQ", 9, 0, 0, 0), 9),
    (P.RELEASEDIR, struct.pack("<QIIQ", 10, 0, 0, 0), 10),
    (P.FLUSH, struct.pack("<QIIQ", 11, 0, 0, 0), 11),
    (P.GETXATTR, struct.pack("<II", 100, 0) + b"user.a\0", P.GetxattrIn(100, b"user.a")),
    (P.LISTXATTR, struct.pack("<II", 4096, 0), 4096),
    (P.ACCESS, struct.pack("<II", 4, 0), 4),
    (P.FORGET, struct.pack("<Q", 3), [(42, 3)]),
    (P.BATCH_FORGET, struct.pack("<II", 2, 0) + struct.pack("<QQQQ", 5, 1, 6, 2), [(5, 1), (6, 2)]),
    (P.INTERRUPT, struct.pack("<Q", 99), 99),
    (P.GETATTR, struct.pack("<IIQ", 0, 0, 0), None),
    (P.GETATTR, struct.pack("<IIQ", 1, 0, 17), 17),
    (P.READDIRPLUS, P.read_request_body(42, 3, 4096), P.ReadIn(42, 3, 4096)),
    (P.STATFS, b"", None),
    (P.SETATTR, b"\0" * 88, None),
    (999, b"whatever", None),
])
def test_each_request_parses(opcode: int, body: bytes, arg: object) -> None:
    req = P.parse_request(P.encode_request(opcode, 1, 42, body))
    assert (req.opcode, req.unique, req.nodeid, req.arg) == (opcode, 1, 42, arg)


def test_init_carries_flags2_only_with_init_ext() -> None:
    with_ext = P.parse_request(P.encode_request(
        P.INIT, 1, 0, P.init_request_body(45, P.INIT_EXT | P.HAS_RESEND | P.ASYNC_READ)))
    assert with_ext.arg == P.InitIn(7, 45, 128 << 10, P.INIT_EXT | P.HAS_RESEND | P.ASYNC_READ)
    without = P.parse_request(P.encode_request(P.INIT, 1, 0, P.init_request_body(45, P.HAS_RESEND)))
    assert without.arg.flags == 0  # flags2 is not read unless INIT_EXT says it is there


def test_resent_unique_is_kept_whole() -> None:
    unique = P.UNIQUE_RESEND | 1234
    req = P.parse_request(P.encode_request(P.GETATTR, unique, 1, b"\0" * 16))
    assert req.unique == unique
    assert P.parse_reply(P.reply_error(req.unique, errno.ENOENT))[1] == unique


@pytest.mark.parametrize("raw, match", [
    (b"\0" * 10, "shorter than its header"),
    (P.encode_request(P.LOOKUP, 1, 1, b"name\0")[:-1], "says 45 bytes"),
    (P.encode_request(P.LOOKUP, 1, 1, b"no-nul"), "NUL-terminated"),
    (P.encode_request(P.READ, 1, 1, b"\0" * 8), "too short"),
    (P.encode_request(P.BATCH_FORGET, 1, 1, struct.pack("<II", 1000, 0)), "overruns"),
])
def test_malformed_requests_are_protocol_errors(raw: bytes, match: str) -> None:
    with pytest.raises(P.ProtocolError, match=match):
        P.parse_request(raw)


def test_extension_longer_than_the_request_is_refused() -> None:
    raw = bytearray(P.encode_request(P.LOOKUP, 1, 1, b"a\0"))
    struct.pack_into("<H", raw, 36, 100)  # total_extlen in 8-byte units
    with pytest.raises(P.ProtocolError, match="extension length"):
        P.parse_request(bytes(raw))


def test_random_bytes_raise_only_protocol_errors() -> None:
    rng = random.Random(15)
    opcodes = [P.LOOKUP, P.READ, P.GETXATTR, P.BATCH_FORGET, P.INIT, P.OPEN, P.GETATTR,
               P.LISTXATTR, P.READDIRPLUS, P.FORGET, P.INTERRUPT]
    for _ in range(3000):
        body = bytes(rng.randrange(256) for _ in range(rng.randrange(0, 80)))
        raw = bytearray(P.encode_request(rng.choice(opcodes), rng.randrange(1 << 64), 1, body))
        if rng.random() < 0.3:  # corrupt the header too
            pos = rng.randrange(len(raw))
            raw[pos] = rng.randrange(256)
        try:
            P.parse_request(bytes(raw))
        except P.ProtocolError:
            pass


def test_negotiation_agrees_on_what_both_sides_have() -> None:
    offered = (P.ASYNC_READ | P.DO_READDIRPLUS | P.READDIRPLUS_AUTO | P.MAX_PAGES | P.INIT_EXT
               | P.WRITEBACK_CACHE | P.HAS_RESEND | P.SPLICE_READ)
    params, body = P.negotiate(P.InitIn(7, 45, 128 << 10, offered), P.InitWants())
    agreed = P.ASYNC_READ | P.DO_READDIRPLUS | P.MAX_PAGES | P.INIT_EXT
    # no writeback cache, no splice, and READDIRPLUS on every call, not AUTO: not asked for
    assert params.flags == agreed
    assert params.kernel_flags == offered and params.has(P.MAX_PAGES)
    assert params.minor == P.KERNEL_MINOR  # the older of the two
    out = P.parse_init_reply(body)
    assert len(body) == 64
    assert out == {"major": 7, "minor": P.KERNEL_MINOR, "max_readahead": 128 << 10,
                   "flags": agreed, "max_background": 0, "congestion_threshold": 0,
                   "max_write": 128 << 10, "time_gran": 1, "max_pages": 256,
                   "max_stack_depth": 0}


def test_negotiation_without_max_pages_or_init_ext() -> None:
    params, body = P.negotiate(P.InitIn(7, 30, 65536, P.ASYNC_READ | P.PASSTHROUGH),
                               P.InitWants(flags=P.ASYNC_READ | P.PASSTHROUGH))
    assert params.max_pages == 32 and params.minor == 30
    assert params.flags == P.ASYNC_READ  # bit 37 cannot be agreed without INIT_EXT
    assert P.parse_init_reply(body)["flags"] == P.ASYNC_READ


@pytest.mark.parametrize("major, minor, match", [(8, 0, "only major 7"), (7, 22, "older than")])
def test_negotiation_refuses_protocols_we_do_not_build(major: int, minor: int, match: str) -> None:
    with pytest.raises(P.ProtocolError, match=match):
        P.negotiate(P.InitIn(major, minor, 0, 0), P.InitWants())


def test_init_params_round_trip_and_validation() -> None:
    params, _ = P.negotiate(P.InitIn(7, 45, 1 << 20, P.MAX_PAGES | P.INIT_EXT | P.HAS_RESEND),
                            P.InitWants())
    assert P.InitParams.from_dict(params.to_dict()) == params
    assert params.buffer_size >= 256 * 4096
    bad = dict(params.to_dict(), max_pages=0)
    with pytest.raises(ValueError, match="max_pages"):
        P.InitParams.from_dict(bad)
    with pytest.raises(ValueError, match="protocol 7.10"):
        P.InitParams.from_dict(dict(params.to_dict(), minor=10))
    with pytest.raises(KeyError):
        P.InitParams.from_dict({"major": 7})


def test_entry_and_attr_round_trip() -> None:
    attr = P.Attr(ino=(3 << 56) | 99, mode=0o100644, nlink=2, uid=1000, gid=100, size=12345,
                  blocks=32, rdev=0, time_ns=1_700_000_000_123_456_789)
    body = P.entry_body(attr.ino, attr, float(1 << 32), 5.5)
    assert len(body) == P.ENTRY_OUT_SIZE == 128
    nodeid, timeout, back = P.parse_entry(body)
    assert (nodeid, timeout, back) == (attr.ino, float(1 << 32), attr)
    timeout, back = P.parse_attr(P.attr_body(attr, 2.25))
    assert (timeout, back) == (2.25, attr)


def test_negative_entry_has_node_id_zero_and_a_timeout() -> None:
    nodeid, timeout, _ = P.parse_entry(P.entry_body(0, None, 60.0, 0))
    assert (nodeid, timeout) == (0, 60.0)


def test_replies_say_their_length() -> None:
    assert P.parse_reply(P.reply(5, b"abc")) == (0, 5, b"abc")
    assert P.parse_reply(P.reply_error(6, errno.ENOENT)) == (errno.ENOENT, 6, b"")
    assert P.parse_reply(P.reply_error(6, 0))[0] == errno.EIO  # never a "successful" error
    hdr = P.header(7, 4096)
    assert struct.unpack("<IiQ", hdr) == (16 + 4096, 0, 7)


def test_dirents_are_padded_to_eight_bytes() -> None:
    one = P.pack_dirent(5, 1, 8, b"abc")
    assert len(one) == 32 == P.dirent_size(b"abc", plus=False)
    nine = P.pack_dirent(6, 2, 4, b"ninechars")
    assert len(nine) == 40
    plus = P.pack_direntplus(P.entry_body(6, P.Attr(ino=6, mode=0o40755), 1.0, 1.0), 6, 2, 4,
                             b"ninechars")
    assert len(plus) == 128 + 40 == P.dirent_size(b"ninechars", plus=True)
    assert P.parse_dirents(one + nine, plus=False) == [(b"abc", 5, 1, 8), (b"ninechars", 6, 2, 4)]
    assert P.parse_dirents(plus, plus=True) == [(b"ninechars", 6, 2, 4)]


@pytest.mark.parametrize("name", [b"a", b"seven77", b"eight888", b"x" * 255])
def test_direntplus_in_one_pack_is_entry_then_dirent(name: bytes) -> None:
    attr = P.Attr(ino=(2 << 56) | 77, mode=0o100640, nlink=3, uid=7, gid=8, size=99,
                  blocks=1, time_ns=1_600_000_000_000_000_001)
    one = P.direntplus(attr, float(1 << 32), 5, 8, name)
    assert one == P.pack_direntplus(P.entry_body(attr.ino, attr, float(1 << 32),
                                                 float(1 << 32)), attr.ino, 5, 8, name)
    assert len(one) == P.dirent_size(name, plus=True)


def test_notify_store_head_counts_the_data_that_follows() -> None:
    head = P.notify_store(42, 1 << 20, 4096)
    assert struct.unpack("<IiQQQII", head) == (16 + 24 + 4096, P.NOTIFY_STORE, 0, 42, 1 << 20,
                                               4096, 0)


def test_notifications() -> None:
    assert P.notify_resend() == struct.pack("<IiQ", 16, P.NOTIFY_RESEND, 0)
    inval = P.notify_inval_entry(1, b"img")
    assert struct.unpack_from("<IiQQII", inval) == (len(inval), P.NOTIFY_INVAL_ENTRY, 0, 1, 3, 0)
    assert inval.endswith(b"img\0")
    assert struct.unpack("<IiQQqq", P.notify_inval_inode(9)) == (40, P.NOTIFY_INVAL_INODE, 0, 9, 0, 0)


def test_opcode_names() -> None:
    assert P.opcode_name(P.READDIRPLUS) == "readdirplus"
    assert P.opcode_name(4242) == "opcode4242"
    assert P.OPCODE_NAMES[P.INIT] == "init"
    assert "async_read" not in P.OPCODE_NAMES.values()  # flags are not opcodes

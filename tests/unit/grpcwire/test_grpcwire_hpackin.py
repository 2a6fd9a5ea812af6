"""Our HPACK decoder against the ``hpack`` package's encoder (an independent implementation)."""

from __future__ import annotations

import hpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pynydus.grpcwire.hpackin import Decoder, HpackError

_token = st.text(alphabet="abcdefghijklmnopqrstuvwxyz-0123456789", min_size=1, max_size=20)
_value = st.binary(max_size=60)
_headers = st.lists(st.tuples(_token, _value), min_size=1, max_size=10)


@settings(max_examples=200, deadline=None)
@given(st.lists(_headers, min_size=1, max_size=8), st.booleans(), st.sampled_from([4096, 256, 0]))
def test_decodes_what_an_independent_encoder_wrote(blocks: list[list[tuple[str, bytes]]],
                                                   huffman: bool, table: int) -> None:
    enc = hpack.Encoder()
    enc.header_table_size = table  # emits a size update in the next block
    dec = Decoder()
    for headers in blocks:
        data = enc.encode([(n.encode(), v) for n, v in headers], huffman=huffman)
        assert dec.decode(data) == [(n.encode(), v) for n, v in headers]


def test_go_grpc_request_with_a_fresh_timeout_each_time() -> None:
    enc, dec = hpack.Encoder(), Decoder()
    base = [(b":method", b"POST"), (b":path", b"/containerd.services.snapshots.v1.Snapshots/Stat"),
            (b"content-type", b"application/grpc"), (b"te", b"trailers")]
    for ms in range(600_000, 599_000, -7):  # the table fills and evicts
        fields = [*base, (b"grpc-timeout", b"%dm" % ms)]
        assert dec.decode(enc.encode(fields)) == fields


@pytest.mark.parametrize("block", [
    b"\x80",  # index 0
    b"\xff\xff\xff\xff\xff\xff",  # integer runs off the end
    b"\xbf",  # dynamic index 62 in an empty table
    b"\x00\x05ab",  # string shorter than its length
    b"\x82\x3f\xe1\x1f",  # table size update after a field
    b"\x3f\xe2\x1f",  # table size update above 4096
    b"\x00\x81\xff\x01a",  # Huffman string with bad padding
])
def test_malformed_blocks_raise_hpack_error(block: bytes) -> None:
    with pytest.raises(HpackError):
        Decoder().decode(block)


def test_header_list_limit() -> None:
    enc = hpack.Encoder()
    with pytest.raises(HpackError):
        Decoder(max_header_list=100).decode(enc.encode([(b"x", b"y" * 100)]))


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=64))
def test_random_bytes_decode_or_raise_hpack_error(data: bytes) -> None:
    try:
        Decoder().decode(data)
    except HpackError:
        pass

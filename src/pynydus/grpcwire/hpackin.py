"""HPACK (RFC 7541) decoding of request header blocks, lean enough for a per-call path.

The ``hpack`` package decodes correctly but spends ~30-50 us on a typical block from
Go's gRPC client (eight fields, one a fresh ``grpc-timeout`` literal), most of it in
per-field objects and logging; through containerd that was a third of a proxied Stat.
This decoder keeps only what a server needs: the dynamic table, integer and string
primitives, and the field list as ``(name, value)`` bytes. The static table and the
Huffman decoder are the ``hpack`` package's (data and a table-driven decoder we need
not repeat).

Errors raise ``HpackError``; the connection treats them as COMPRESSION_ERROR.
"""

from __future__ import annotations

from collections import deque

from pynydus.errors import FormatError
from pynydus.grpcwire._hpack import STATIC_TABLE as _STATIC
from pynydus.grpcwire._hpack import decode_huffman

_NSTATIC = len(_STATIC)
_ENTRY_OVERHEAD = 32  # RFC 7541 4.1


class HpackError(FormatError):
    """A malformed header block (the connection answers COMPRESSION_ERROR)."""


class Decoder:
    """One connection's decoding context (the peer's encoder mirrors our table)."""

    def __init__(self, max_table_size: int = 4096, max_header_list: int = 64 << 10) -> None:
        self.max_allowed = max_table_size  # what we advertise (SETTINGS_HEADER_TABLE_SIZE)
        self.max_size = max_table_size
        self.max_header_list = max_header_list
        self._table: deque[tuple[bytes, bytes]] = deque()  # newest first
        self._size = 0

    def decode(self, block: bytes) -> list[tuple[bytes, bytes]]:
        fields: list[tuple[bytes, bytes]] = []
        pos, end, total = 0, len(block), 0
        while pos < end:
            b = block[pos]
            if b & 0x80:  # indexed field: Go's client sends most fields so, one byte each
                if b != 0xFF:
                    idx = b & 0x7F
                    pos += 1
                else:
                    idx, pos = _integer(block, pos, 7)
                field = _STATIC[idx - 1] if 0 < idx <= _NSTATIC else self._get(idx)
            elif b & 0xC0 == 0x40:  # literal, added to the table
                field, pos = self._literal(block, pos, 6)
                self._add(field)
            elif b & 0xE0 == 0x20:  # dynamic table size update
                if fields:
                    raise HpackError("table size update after a header field")
                size, pos = _integer(block, pos, 5)
                if size > self.max_allowed:
                    raise HpackError(f"table size {size} above the {self.max_allowed} allowed")
                self.max_size = size
                self._evict()
                continue
            else:  # literal without indexing (0x00) or never indexed (0x10)
                field, pos = self._literal(block, pos, 4)
            total += len(field[0]) + len(field[1]) + _ENTRY_OVERHEAD
            if total > self.max_header_list:
                raise HpackError(f"header list larger than {self.max_header_list} bytes")
            fields.append(field)
        return fields

    def _get(self, idx: int) -> tuple[bytes, bytes]:
        if 0 < idx <= _NSTATIC:
            return _STATIC[idx - 1]
        try:
            if idx > _NSTATIC:
                return self._table[idx - _NSTATIC - 1]
        except IndexError:
            pass
        raise HpackError(f"header table index {idx} out of range")

    def _literal(self, block: bytes, pos: int, bits: int) -> tuple[tuple[bytes, bytes], int]:
        idx, pos = _integer(block, pos, bits)
        if idx:
            name = self._get(idx)[0]
        else:
            name, pos = _string(block, pos)
        value, pos = _string(block, pos)
        return (name, value), pos

    def _add(self, field: tuple[bytes, bytes]) -> None:
        size = len(field[0]) + len(field[1]) + _ENTRY_OVERHEAD
        if size > self.max_size:  # RFC 7541 4.4: an oversized entry empties the table
            self._table.clear()
            self._size = 0
            return
        self._table.appendleft(field)
        self._size += size
        self._evict()

    def _evict(self) -> None:
        while self._size > self.max_size:
            name, value = self._table.pop()
            self._size -= len(name) + len(value) + _ENTRY_OVERHEAD


def _integer(block: bytes, pos: int, bits: int) -> tuple[int, int]:
    """RFC 7541 5.1: an N-bit prefix integer starting at ``block[pos]``."""
    mask = (1 << bits) - 1
    value = block[pos] & mask
    pos += 1
    if value < mask:
        return value, pos
    shift = 0
    while True:
        if pos >= len(block):
            raise HpackError("truncated integer")
        b = block[pos]
        pos += 1
        value += (b & 0x7F) << shift
        if not b & 0x80:
            return value, pos
        shift += 7
        if shift > 28:
            raise HpackError("integer too large")


def _string(block: bytes, pos: int) -> tuple[bytes, int]:
    """RFC 7541 5.2: a length-prefixed string literal, Huffman-coded when the H bit is set."""
    if pos >= len(block):
        raise HpackError("truncated string")
    huffman = block[pos] & 0x80
    length, pos = _integer(block, pos, 7)
    end = pos + length
    if end > len(block):
        raise HpackError("truncated string")
    raw = block[pos:end]
    if huffman:
        try:
            raw = decode_huffman(raw)
        except Exception as err:  # hpack's HPACKDecodingError for bad padding or EOS
            raise HpackError(f"bad Huffman string: {err}") from err
    return bytes(raw), end

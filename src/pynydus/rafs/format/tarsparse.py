"""GNU sparse tar members, parsed without I/O: header bytes and PAX records in, a
checked map of data extents out.

Theory of operation. A sparse member stores only its data extents, back to back;
a map says where each extent lies in the file, whose real size may be far larger
than what the archive holds (the rest reads as zeros). GNU tar has written the map
four ways: in the old GNU ``S`` header and its extension blocks (sparse format
0.0 of the header, :func:`old_gnu_extents`), and in PAX records -- format 0.0
(repeated ``GNU.sparse.offset``/``numbytes``, :func:`pax_00_extents`), 0.1
(``GNU.sparse.map``, :func:`pax_01_extents`) and 1.0 (decimal lines at the start
of the member's data, :func:`map_10`).

Every map is checked the way Go's archive/tar checks it (what containerd reads
layers with): extents in order, disjoint, inside the real size, and their lengths
adding up to exactly the data the member stores. The real size is a claim no
archive byte backs, so it is bounded too (``limit``): a 10 KB tar claiming 2^50
bytes of holes would otherwise keep a builder reading zeros for days.

Errors are ValueError naming the byte (offsets relative to the header block or
map start); the tar reader turns them into FormatError at the absolute offset.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

__all__ = [
    "DEFAULT_MAX_SPARSE_SIZE",
    "MAP_10_MAX",
    "SparseMap",
    "check_map",
    "is_sparse_pax",
    "map_10",
    "old_gnu_extension",
    "old_gnu_extents",
    "pax_00_extents",
    "pax_01_extents",
    "pax_real_size",
]

#: Default bound of a sparse member's real size. Holes cost no archive bytes but the
#: builder still chunks and digests them (zeros at ~1-2 GB/s); 64 GiB keeps that under
#: a minute or so while allowing the big sparse files real images carry (lastlog).
DEFAULT_MAX_SPARSE_SIZE = 64 << 30

#: A 1.0 map is read into memory before the data: bounded like PAX data.
MAP_10_MAX = 16 << 20

Extent = tuple[int, int]  # (offset in the file, length)


@dataclass(frozen=True)
class SparseMap:
    """A checked sparse map: ``extents`` sorted and disjoint, inside ``real_size``,
    their lengths summing to the member's stored data."""

    real_size: int
    extents: tuple[Extent, ...]


def _decimal(text: bytes, what: str) -> int:
    """A non-negative decimal number spelled in digits only (Go's strconv.ParseInt
    rules minus the sign: no blanks, no ``+``, no ``_``)."""
    if not text.isdigit() or not text.isascii():
        raise ValueError(f"{what} {text[:40]!r} is no decimal number")
    if len(text) > 20:  # more than an int64 holds: no file is that large
        raise ValueError(f"{what} {text[:40]!r} is out of range")
    return int(text)


def _octal_or_b256(field: bytes, what: str) -> int:
    """A numeric header field: octal digits (NUL/space ended) or GNU base-256."""
    lead = field[0]
    if lead == 0x80:
        return int.from_bytes(field[1:], "big")
    if lead == 0xFF:
        raise ValueError(f"{what} is negative (base-256 {field.hex()})")
    text = field.split(b"\0", 1)[0].strip(b" ")
    if not text:
        return 0
    if not all(0x30 <= c <= 0x37 for c in text):
        raise ValueError(f"{what} {field!r} is no octal number")
    return int(text, 8)


def _structs(block: bytes, start: int, count: int, where: str) -> list[Extent]:
    """``count`` (offset, numbytes) pairs of 12+12 bytes from ``start``; all-zero
    pairs are unused slots."""
    out: list[Extent] = []
    for i in range(count):
        at = start + 24 * i
        off = _octal_or_b256(block[at : at + 12], f"{where}: sparse offset at byte {at}")
        size = _octal_or_b256(block[at + 12 : at + 24],
                              f"{where}: sparse length at byte {at + 12}")
        if size:
            out.append((off, size))
    return out


def old_gnu_extents(header: bytes) -> tuple[int, list[Extent], bool]:
    """An old GNU ``S`` header block's (real size, extents, whether an extension
    block follows). The four sparse slots start at byte 386, the "is extended" flag is
    byte 482, the real size bytes 483-494 (octal or base-256)."""
    extents = _structs(header, 386, 4, "GNU sparse header")
    real = _octal_or_b256(header[483:495], "GNU sparse header: real size at byte 483")
    return real, extents, bool(header[482])


def old_gnu_extension(block: bytes) -> tuple[list[Extent], bool]:
    """One GNU sparse extension block: 21 more slots, "is extended" at byte 504."""
    return _structs(block, 0, 21, "GNU sparse extension block"), bool(block[504])


def is_sparse_pax(records: Mapping[bytes, bytes]) -> bool:
    """Whether PAX records make their member sparse (in tarfile's order of tests)."""
    return (
        b"GNU.sparse.map" in records
        or b"GNU.sparse.size" in records
        or (records.get(b"GNU.sparse.major") == b"1" and records.get(b"GNU.sparse.minor") == b"0")
    )


def pax_real_size(records: Mapping[bytes, bytes]) -> int:
    """The real size a sparse member's PAX records give (1.0: ``realsize``; 0.x: ``size``)."""
    value = records.get(b"GNU.sparse.realsize", records.get(b"GNU.sparse.size"))
    if value is None:
        raise ValueError("sparse member without GNU.sparse.realsize or GNU.sparse.size")
    return _decimal(value, "GNU.sparse real size")


def pax_01_extents(records: Mapping[bytes, bytes]) -> list[Extent]:
    """Format 0.1: ``GNU.sparse.map`` = ``offset,length,offset,length...``."""
    text = records[b"GNU.sparse.map"]
    numbers = [_decimal(n, f"GNU.sparse.map item {i}") for i, n in
               enumerate(text.split(b","))] if text else []
    if len(numbers) % 2:
        raise ValueError(f"GNU.sparse.map has an odd number of items ({len(numbers)})")
    extents = list(zip(numbers[::2], numbers[1::2], strict=True))
    _check_count(records, len(extents))
    return [e for e in extents if e[1]]


def pax_00_extents(payload: bytes, size: int, records: Mapping[bytes, bytes]) -> list[Extent]:
    """Format 0.0: ``GNU.sparse.offset`` and ``GNU.sparse.numbytes`` records, one pair
    per extent, in order, in the PAX data (``payload``, records already checked well
    formed by :func:`pax_records`, so each is ``LENGTH KEY=VALUE\\n``)."""
    extents: list[Extent] = []
    offset: int | None = None
    pos = 0
    while pos < size and payload[pos]:
        space = payload.index(b" ", pos)
        end = pos + int(payload[pos:space])
        key, _, value = payload[space + 1 : end - 1].partition(b"=")
        if key == b"GNU.sparse.offset":
            if offset is not None:
                raise ValueError(f"PAX record at byte {pos}: GNU.sparse.offset without "
                                 "GNU.sparse.numbytes before it")
            offset = _decimal(value, f"PAX record at byte {pos}: GNU.sparse.offset")
        elif key == b"GNU.sparse.numbytes":
            if offset is None:
                raise ValueError(f"PAX record at byte {pos}: GNU.sparse.numbytes without "
                                 "GNU.sparse.offset")
            length = _decimal(value, f"PAX record at byte {pos}: GNU.sparse.numbytes")
            if length:
                extents.append((offset, length))
            offset = None
        pos = end
    if offset is not None:
        raise ValueError("GNU.sparse.offset without GNU.sparse.numbytes at the end")
    _check_count(records, len(extents))
    return extents


def _check_count(records: Mapping[bytes, bytes], count: int) -> None:
    blocks = records.get(b"GNU.sparse.numblocks")
    if blocks is not None and _decimal(blocks, "GNU.sparse.numblocks") < count:
        raise ValueError(f"GNU.sparse.numblocks {blocks.decode('latin-1')} but the map has "
                         f"{count} extents")


def map_10(buf: bytes) -> tuple[list[Extent], int] | None:
    """Format 1.0: the map at the start of the member's data, decimal numbers each
    ended by a newline (count, then offset and length per extent), padded to 512
    bytes. ``buf`` is the data read so far (whole blocks): the extents and the map's
    padded length, or None if the map goes on past ``buf``.

    ValueError naming the byte for a number that is no decimal or a map longer than
    :data:`MAP_10_MAX`.
    """
    nl = buf.find(b"\n")
    if nl < 0:
        _need_more(buf)
        return None
    count = _decimal(buf[:nl], "sparse map at byte 0: extent count")
    if count > MAP_10_MAX // 4:  # each extent takes at least "0\n0\n"
        raise ValueError(f"sparse map at byte 0: {count} extents cannot fit in "
                         f"{MAP_10_MAX} bytes")
    numbers: list[int] = []
    pos = nl + 1
    while len(numbers) < 2 * count:
        nl = buf.find(b"\n", pos)
        if nl < 0:
            _need_more(buf)
            return None
        numbers.append(_decimal(buf[pos:nl], f"sparse map at byte {pos}: "
                                f"{'offset' if len(numbers) % 2 == 0 else 'length'}"))
        pos = nl + 1
    extents = [e for e in zip(numbers[::2], numbers[1::2], strict=True) if e[1]]
    return extents, (pos + 511) // 512 * 512


def _need_more(buf: bytes) -> None:
    if len(buf) >= MAP_10_MAX:
        raise ValueError(f"sparse map longer than {MAP_10_MAX} bytes")


def check_map(extents: list[Extent], real_size: int, stored: int, *, limit: int) -> SparseMap:
    """The checked map: ValueError if an extent starts before the previous one ends or
    ends past ``real_size``, if the extents' lengths do not add up to ``stored`` (the
    data bytes the member holds), or if ``real_size`` exceeds ``limit``."""
    if real_size > limit:
        raise ValueError(f"real size {real_size} exceeds the limit of {limit} bytes for a "
                         "sparse file")
    end = 0
    total = 0
    for i, (off, length) in enumerate(extents):
        if off < end:
            raise ValueError(f"sparse extent {i} at {off} overlaps or precedes the one "
                             f"before it (which ends at {end})")
        end = off + length
        if end > real_size:
            raise ValueError(f"sparse extent {i} ({off}+{length}) ends past the real size "
                             f"{real_size}")
        total += length
    if total != stored:
        raise ValueError(f"sparse extents hold {total} bytes but the member stores {stored}")
    return SparseMap(real_size, tuple(extents))

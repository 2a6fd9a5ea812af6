"""Tar header blocks and PAX records, parsed without I/O: bytes in, fields out.

Theory of operation. A tar member is a chain of 512-byte header blocks, each
maybe followed by data: PAX extended (``x``) and global (``g``) headers and GNU
long name / long link target (``L``/``K``) headers, whose data qualifies what
follows, then the member's own header. :func:`parse_header` reads one block and
:func:`pax_records` one PAX header's data; :func:`apply_pax` applies records to a
member's fields. The reader that walks the chain over a stream, and decides what
a block that does not parse means there, is :class:`pynydus.rafs.source.tarsource.TarSource`.

The parsers accept exactly what :mod:`tarfile` accepts for the header types in
:data:`PLAIN_TYPES` and :data:`EXT_TYPES` (same checksum rule, same number
spellings), and return None for well-formed input tarfile may read differently
(other typeflags, ``hdrcharset``), so that the caller can hand it to tarfile.
GNU sparse members (the ``S`` typeflag, ``GNU.sparse.*`` records) are read here
too, their maps by :mod:`pynydus.rafs.format.tarsparse`: tarfile loops forever
over an overlapping map and reads whatever real size a header claims. They exist because tarfile costs ~25 µs per member (a TarInfo, a
dozen nti/nts calls, two 512-element checksum sums), a large share of a big
layer's main-thread time. Damage is told apart, not handed on: after the first
member tarfile takes a damaged header for the end of the archive, and it reads
some malformed PAX records as something else; :func:`header_damage` says what is
wrong with a block and :func:`pax_records` rejects every malformed record, so
that the reader can fail instead of losing the rest of a layer.

Names, link targets and PAX values stay bytes: nothing is decoded here.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping

__all__ = [
    "BLOCK",
    "EXT_TYPES",
    "PLAIN_TYPES",
    "SPARSE_TYPE",
    "ZERO_BLOCK",
    "Header",
    "apply_pax",
    "cstr",
    "header_damage",
    "padded",
    "parse_header",
    "pax_records",
]

BLOCK = 512
ZERO_BLOCK = bytes(BLOCK)  # ends an archive (tarfile stops at the first one)

# Typeflags of members the parser reads headers of: tarfile's REGTYPE, AREGTYPE,
# CONTTYPE, LNKTYPE, SYMTYPE, CHRTYPE, BLKTYPE, DIRTYPE, FIFOTYPE ...
PLAIN_TYPES = frozenset((b"0", b"\0", b"7", b"1", b"2", b"3", b"4", b"5", b"6"))
# ... and the headers that qualify the member after them: PAX extended and global
# records, GNU long name and long link target.
EXT_TYPES = frozenset((b"x", b"g", b"L", b"K"))
# ... and the old GNU sparse member, whose map follows in its header (tarsparse).
SPARSE_TYPE = b"S"

_PARSED_TYPES = PLAIN_TYPES | EXT_TYPES | {SPARSE_TYPE}

# type, name, mode, uid, gid, size, mtime, linkname, devmajor, devminor, prefix
Header = tuple[bytes, bytes, int, int, int, int, int, bytes, int, int, bytes]


def padded(size: int) -> int:
    """``size`` rounded up to whole blocks (for any int, as tarfile rounds)."""
    return (size + BLOCK - 1) // BLOCK * BLOCK


def cstr(field: bytes) -> bytes:
    """A header text field up to its first NUL."""
    end = field.find(b"\0")
    return field if end < 0 else field[:end]


def _number(field: bytes) -> int:
    """A numeric header field as tarfile reads it; ValueError if it reads none.

    GNU base-256 when the lead byte is 0x80 (positive) or 0xFF (negative, two's
    complement); else ASCII octal up to the first NUL, blanks around it ignored,
    blank meaning 0.
    """
    lead = field[0]
    if lead == 0x80 or lead == 0xFF:
        n = int.from_bytes(field[1:], "big")
        return n - (1 << (8 * len(field) - 8)) if lead == 0xFF else n
    text = cstr(field).decode("ascii").strip()
    return int(text or "0", 8)


# mode+uid+gid, mtime and devmajor+devminor fields, as read: a layer repeats a few
# spellings thousands of times, and a dict lookup is cheaper than parsing them.
_IDS: dict[bytes, tuple[int, int, int]] = {}
_MTIMES: dict[bytes, int] = {}
_DEVS: dict[bytes, tuple[int, int]] = {}
_FIELD_CACHE_MAX = 4096


def _octal(field: bytes) -> int:
    """The usual spelling of a number (octal digits ended by NUL or space) fast;
    anything else through :func:`_number`."""
    try:
        return int(field.rstrip(b" \0") or b"0", 8)
    except ValueError:
        # An embedded NUL (text after the end) or base-256 land here: int() takes
        # neither, so whatever it does take reads the same as tarfile reads it.
        return _number(field)


def parse_header(buf: bytes) -> Header | None:
    """The fields of one tar header block, or None unless it is a well-formed
    header of a type in :data:`PLAIN_TYPES` or :data:`EXT_TYPES` or
    :data:`SPARSE_TYPE` with a non-negative size (for ``S`` the prefix field holds
    the sparse map: the caller ignores it).

    Well-formed as tarfile judges it: 512 bytes, not all zero, the checksum equal
    to the unsigned or the signed byte sum (the checksum field counted as spaces),
    every numeric field readable. Text fields are cut at their first NUL; nothing
    else is interpreted (no prefix joining, no V7 directory rule).
    """
    if len(buf) != BLOCK:
        return None
    # The byte sum through adler32's low half (1 + sum mod 65521): exact for 256
    # bytes (at most 65280), and a C call instead of a loop over 512 ints.
    total = (zlib.adler32(buf[:256]) & 0xFFFF) + (zlib.adler32(buf[256:]) & 0xFFFF) - 2
    if total == 0:
        return None  # the zero block that ends an archive
    flag = buf[156:157]
    if flag not in _PARSED_TYPES:
        return None
    try:
        key = buf[100:124]
        ids = _IDS.get(key)
        if ids is None:
            ids = _octal(buf[100:108]), _octal(buf[108:116]), _octal(buf[116:124])
            if len(_IDS) >= _FIELD_CACHE_MAX:
                _IDS.clear()
            _IDS[key] = ids
        key = buf[329:345]
        devs = _DEVS.get(key)
        if devs is None:
            devs = _octal(buf[329:337]), _octal(buf[337:345])
            if len(_DEVS) >= _FIELD_CACHE_MAX:
                _DEVS.clear()
            _DEVS[key] = devs
        key = buf[136:148]
        mtime = _MTIMES.get(key)
        if mtime is None:
            mtime = _octal(key)
            if len(_MTIMES) >= _FIELD_CACHE_MAX:
                _MTIMES.clear()
            _MTIMES[key] = mtime
        size = _octal(buf[124:136])
        key = buf[148:156]
        chksum = _octal(key)
    except ValueError:
        return None
    # the checksum field's own bytes out (their sum, at most 2040, again through adler32)
    unsigned = total - (zlib.adler32(key) & 0xFFFF) + 1 + 8 * 32
    if chksum != unsigned:
        high = sum(b >> 7 for b in buf[:148]) + sum(b >> 7 for b in buf[156:])
        if chksum != unsigned - 256 * high:
            return None
    if size < 0:
        return None
    end = buf.find(0, 0, 100)
    return (
        flag,
        buf[:end] if end >= 0 else buf[:100],
        *ids,
        size,
        mtime,
        cstr(buf[157:257]) if buf[157] else b"",
        *devs,
        cstr(buf[345:500]) if buf[345] else b"",
    )


def header_damage(buf: bytes) -> str | None:
    """Why ``buf`` is no header block tarfile would read (cut short, a numeric field
    it cannot read, a checksum mismatch), or None if it is one.

    For the blocks :func:`parse_header` declines, to tell damage from the zero
    block (which the caller tests for first: it is well-formed here) and from
    well-formed headers of other types, which tarfile reads.
    """
    if not buf:
        return "the data ends where a header should start"
    if len(buf) != BLOCK:
        return f"header cut short ({len(buf)} of {BLOCK} bytes)"
    for name, lo, hi in _NUMBER_FIELDS:
        try:
            _number(buf[lo:hi])
        except ValueError:
            return f"invalid {name} field {buf[lo:hi]!r}"
    chksum = _number(buf[148:156])
    unsigned = sum(buf) - sum(buf[148:156]) + 8 * 32
    signed = unsigned - 256 * (sum(b >> 7 for b in buf[:148]) + sum(b >> 7 for b in buf[156:]))
    if chksum != unsigned and chksum != signed:
        return f"checksum mismatch (field {chksum}, block sums to {unsigned})"
    return None


# The numeric fields tarfile reads from every header block (name, start, end).
_NUMBER_FIELDS = (
    ("mode", 100, 108),
    ("uid", 108, 116),
    ("gid", 116, 124),
    ("size", 124, 136),
    ("mtime", 136, 148),
    ("checksum", 148, 156),
    ("devmajor", 329, 337),
    ("devminor", 337, 345),
)


def pax_records(
    payload: bytes, size: int, *, charset_ok: bool = False
) -> dict[bytes, bytes] | None:
    """The ``LENGTH KEY=VALUE\\n`` records in the first ``size`` bytes of a PAX
    header's data (``payload``, at least ``size`` bytes); None if the header needs
    tarfile: ``hdrcharset`` (tarfile validates it) without ``GNU.sparse.*`` records
    (sparse members are read here whatever their charset: names stay bytes). A key
    given twice keeps its first place and its last value (sparse format 0.0 repeats
    keys: :func:`~pynydus.rafs.format.tarsparse.pax_00_extents` reads the payload).
    ``charset_ok`` returns the records of a ``hdrcharset`` header too.

    ValueError, naming the byte, for a record whose length does not end it at a
    newline (zero, past ``size``, too short), one with no length or no key, and
    bytes other than NUL after the last record. tarfile takes some of these as
    something else or stops reading the archive there; Go's archive/tar rejects
    them all. Both write exact records with ``size`` their total length (blocks are
    NUL-padded past it), which is all this accepts: NULs after the last record up
    to ``size`` are tolerated, the padding after ``size`` is not read.
    """
    if len(payload) < size:
        raise ValueError(f"PAX data cut short ({len(payload)} of {size} bytes)")
    records: dict[bytes, bytes] = {}
    pos = 0
    while pos < size and payload[pos]:
        space = payload.find(b" ", pos, min(pos + 24, size))
        digits = payload[pos:space]
        if space < 0 or not digits.isdigit():
            raise ValueError(f"PAX record at byte {pos}: no length: {payload[pos:pos + 24]!r}")
        end = pos + int(digits)
        if end > size:
            raise ValueError(f"PAX record at byte {pos}: length {int(digits)} runs past the "
                             f"{size} bytes of PAX data")
        equals = payload.find(b"=", space + 1, end - 1)
        if equals <= space + 1 or payload[end - 1] != 0x0A:
            raise ValueError(f"PAX record at byte {pos}: length {int(digits)} does not match "
                             f"the record {payload[pos:min(end, pos + 60)]!r}")
        records[payload[space + 1 : equals]] = payload[equals + 1 : end - 1]
        pos = end
    if payload.count(0, pos, size) != size - pos:
        raise ValueError(f"PAX data: bytes other than NUL after the last record, at byte {pos}")
    if (
        not charset_ok
        and payload.find(b"hdrcharset=", 0, size) >= 0
        and payload.find(b"GNU.sparse.", 0, size) < 0
    ):
        return None
    return records


def _pax_number(value: bytes, kind: type[int | float]) -> int | float:
    """A PAX number as tarfile applies it (as text; 0 if unreadable)."""
    try:
        return kind(value.decode("utf-8", "surrogateescape"))
    except ValueError:
        return 0


def apply_pax(
    pax: Mapping[bytes, bytes],
    name: bytes,
    link: bytes,
    size: int,
    mtime: float,
    uid: int,
    gid: int,
) -> tuple[bytes, bytes, int, float, int, int]:
    """A member's fields with PAX records applied (tarfile's ``_apply_pax_info``)."""
    if b"path" in pax:
        name = pax[b"path"]  # tarfile strips trailing "/"; normalize_path does too
    if b"linkpath" in pax:
        link = pax[b"linkpath"]
    if b"size" in pax:
        size = int(_pax_number(pax[b"size"], int))
    if b"mtime" in pax:
        mtime = _pax_number(pax[b"mtime"], float)
    if b"uid" in pax:
        uid = int(_pax_number(pax[b"uid"], int))
    if b"gid" in pax:
        gid = int(_pax_number(pax[b"gid"], int))
    return name, link, size, mtime, uid, gid

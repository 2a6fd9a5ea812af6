"""TarSource's own tar header parser against tarfile, the reader it replaced.

The reference below is TarSource as it was (tarfile.TarFile over the LayerStream,
TarInfo mapped to Entry). For fixture tars, tarfile-written tars of every format
and entry type, hand-made header chains (PAX global and extended records, GNU long
names, sparse members) and corrupted or truncated tars, both must yield the same
entries (every field, xattrs in the same order), the same file bytes, and fail
at the same member with FormatError. Where the reference let a ValueError out
(a PAX mtime that is no number), the parser now raises FormatError.

Where tarfile ends the archive in silence at a damaged header (anywhere after the
first member), the parser yields the same entries and then raises FormatError:
the reference below reports such a stop as an error. Malformed PAX records, which
tarfile takes in several ways, are a FormatError at their member.
"""

from __future__ import annotations

import base64
import gzip
import io
import random
import re
import tarfile
import zlib
from collections.abc import Iterator, Mapping
from typing import Any, BinaryIO, cast

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from pynydus.errors import FormatError
from pynydus.rafs.decoder import LayerStream, layerstream
from pynydus.rafs.format.tarheader import header_damage, parse_header, pax_records
from pynydus.rafs.source import Entry, EntryType, TarSource, normalize_path
from pynydus.rafs.source.tarsource import _pax_time, _peek
from tests.harness.paths import FIXTURES as SHARED_FIXTURES

FIXTURES = SHARED_FIXTURES / "tar"
SETTINGS = settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)

# --------------------------------------------------------------------------- reference


def _ref_normalize(raw: bytes) -> bytes:
    parts = [p for p in raw.split(b"/") if p not in (b"", b".")]
    if b".." in parts:
        raise FormatError(f"layer path {raw!r}: '..' component not allowed")
    return b"/".join(parts)


def _ref_enc(s: str) -> bytes:
    return s.encode("utf-8", "surrogateescape")


def _ref_xattrs(pax: Mapping[str, str]) -> dict[bytes, bytes]:
    out: dict[bytes, bytes] = {}
    for key, value in pax.items():
        if key.startswith("LIBARCHIVE.xattr."):
            name = _ref_enc(key[len("LIBARCHIVE.xattr.") :])
            b64 = value + "=" * (-len(value) % 4)
            try:
                out.setdefault(name, base64.b64decode(b64, altchars=b"-_"))
            except ValueError:
                continue
    for key, value in pax.items():
        if key.startswith("SCHILY.xattr."):
            out[_ref_enc(key[len("SCHILY.xattr.") :])] = _ref_enc(value)
    return out


def _ref_entry(m: tarfile.TarInfo) -> Entry | None:
    path = _ref_normalize(_ref_enc(m.name))
    pax = m.pax_headers
    if "mtime" in pax:
        mtime, nsec = _pax_time(pax["mtime"])
    else:
        mtime, nsec = int(m.mtime), 0
    common: dict[str, Any] = {
        "path": path, "mode": m.mode & 0o7777, "uid": m.uid, "gid": m.gid,
        "mtime": mtime, "mtime_nsec": nsec, "xattrs": _ref_xattrs(pax),
    }
    if m.isreg():
        return Entry(type=EntryType.REG, size=m.size,
                     data_offset=None if m.issparse() else m.offset_data, **common)
    if m.isdir():
        return Entry(type=EntryType.DIR, **common)
    if m.issym():
        return Entry(type=EntryType.SYMLINK, link=_ref_enc(m.linkname), **common)
    if m.islnk():
        return Entry(type=EntryType.HARDLINK, link=_ref_normalize(_ref_enc(m.linkname)),
                     **common)
    if m.ischr() or m.isblk():
        return Entry(type=EntryType.CHAR if m.ischr() else EntryType.BLOCK,
                     rdev_major=m.devmajor, rdev_minor=m.devminor, **common)
    if m.isfifo():
        return Entry(type=EntryType.FIFO, **common)
    return None


class _RefSlice:
    def __init__(self, stream: LayerStream, size: int) -> None:
        self._stream, self._left = stream, size

    def read(self, n: int = -1) -> bytes | memoryview:
        n = self._left if n < 0 else min(n, self._left)
        if n <= 0:
            return b""
        data = self._stream.read_view(n)
        self._left -= len(data)
        if len(data) < n:
            self._left = 0
        return data


class _SilentStop(tarfile.ReadError):
    """tarfile ended the archive at a block that is neither the end of the data nor
    a zero block: a damaged header it took for the end."""


def _plain(raw: bytes) -> bytes:
    return gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw


def _reference(raw: bytes, tee: io.BytesIO | None = None) -> Iterator[tuple[Entry, Any]]:
    f = io.BytesIO(raw)
    head = _peek(cast(BinaryIO, f), 4)
    if not head:
        return
    with LayerStream(cast(BinaryIO, f), head, tee=tee) as stream:
        tf = tarfile.TarFile(fileobj=stream, mode="r", encoding="utf-8",  # type: ignore[arg-type]
                             errors="surrogateescape")
        with tf:
            while True:
                member = tf.next()
                if member is None:
                    if tee is not None:
                        stream.drain()
                    block = _plain(raw)[tf.offset : tf.offset + 512]
                    if block and block != bytes(512):
                        raise _SilentStop(f"tarfile stopped at offset {tf.offset}")
                    return
                cast(Any, tf).members.clear()
                entry = _ref_entry(member)
                if entry is None:
                    continue
                reader = None
                if entry.type == EntryType.REG:
                    reader = (tf.extractfile(member) if member.issparse()
                              else _RefSlice(stream, member.size))
                yield entry, reader


# --------------------------------------------------------------------------- comparing


def _outcome(
    entries: Iterator[tuple[Entry, Any]], read: bool
) -> tuple[list[Any], Exception | None]:
    """Entries (with xattr order and file bytes) up to the end or the first error."""
    got: list[Any] = []
    try:
        for entry, reader in entries:
            data = None
            if reader is not None and read:
                parts = []
                while piece := reader.read(1000):
                    parts.append(bytes(piece))
                data = b"".join(parts)
            got.append((entry, list(entry.xattrs.items()), data))
    except Exception as err:  # noqa: BLE001 - the kind of failure is what is compared
        return got, err
    return got, None


def _old(raw: bytes, read: bool = True) -> tuple[list[Any], str | None]:
    got, err = _outcome(_reference(raw), read)
    if err is None:
        return got, None
    # The old TarSource wrapped these in FormatError; others (a ValueError for a PAX
    # mtime that is no number, seeking back over a negative size) escaped as they were.
    wrapped = (tarfile.TarError, EOFError, UnicodeError, *layerstream.DECODE_ERRORS)
    return got, "FormatError" if isinstance(err, (FormatError, *wrapped)) else type(err).__name__


def _new(raw: bytes, read: bool = True) -> tuple[list[Any], str | None]:
    got, err = _outcome(iter(TarSource(io.BytesIO(raw))), read)
    return got, None if err is None else type(err).__name__


def _same(raw: bytes, read: bool = True) -> tuple[list[Any], str | None]:
    old, new = _old(raw, read), _new(raw, read)
    assert new[0] == old[0]
    if old[1] in ("ValueError", "UnsupportedOperation", "OverflowError"):
        assert new[1] == "FormatError"  # what tarfile let out is malformed input too
    else:
        assert new[1] == old[1]
    return new


# --------------------------------------------------------------------------- tars


FORMATS = {"ustar": tarfile.USTAR_FORMAT, "gnu": tarfile.GNU_FORMAT, "pax": tarfile.PAX_FORMAT}

# name pieces: plain, UTF-8, bytes that are no UTF-8 (surrogateescape), dots
_pieces = st.sampled_from(["a", "bin", "caf\u00e9", "\udcff\udc80", ".", "..x", ".wh.f",
                           "x" * 60, "y" * 99, "d/"])
_names = st.lists(_pieces, min_size=1, max_size=6).map("/".join)
_kinds = st.sampled_from([tarfile.REGTYPE, tarfile.AREGTYPE, tarfile.CONTTYPE, tarfile.DIRTYPE,
                          tarfile.SYMTYPE, tarfile.LNKTYPE, tarfile.CHRTYPE, tarfile.BLKTYPE,
                          tarfile.FIFOTYPE])
_ids = st.one_of(st.integers(0, 70000), st.integers(0, 2**40), st.just(2**21))
_mtimes = st.one_of(st.integers(0, 2**33 - 1), st.integers(-(2**40), 2**40),
                    st.floats(-1e9, 1e10, allow_nan=False).filter(lambda t: t != int(t)))
_xattr_keys = st.sampled_from(["SCHILY.xattr.user.a", "SCHILY.xattr.security.capability",
                               "LIBARCHIVE.xattr.user.a", "LIBARCHIVE.xattr.user.b",
                               "SCHILY.xattr.user.\udcfe", "comment", "uname"])
_xattr_values = st.sampled_from(["", "v", "dmFsdWU", "dmFsdWU=", "%%%", "caf\u00e9", "\udcff"])


@st.composite
def _members(draw: st.DrawFn) -> tuple[tarfile.TarInfo, bytes | None]:
    info = tarfile.TarInfo(draw(_names))
    info.type = draw(_kinds)
    info.mode = draw(st.sampled_from([0o644, 0o755, 0o4755, 0o7777, 0o100644]))
    info.uid, info.gid = draw(_ids), draw(_ids)
    info.uname, info.gname = draw(st.sampled_from(["", "root", "\u00e9l\u00e8ve"])), "g"
    info.mtime = draw(_mtimes)
    data = None
    if info.type in tarfile.REGULAR_TYPES:
        size = draw(st.sampled_from([0, 1, 511, 512, 513, 4095, 7000, 7001, 20000]))
        data = random.Random(size).randbytes(size)
    elif info.type in (tarfile.SYMTYPE, tarfile.LNKTYPE):
        info.linkname = draw(st.one_of(_names, st.just("../up"), st.just("t" * 300)))
    elif info.type in (tarfile.CHRTYPE, tarfile.BLKTYPE):
        info.devmajor = draw(st.sampled_from([0, 1, 8, 259, 4095, 2**21 + 1]))
        info.devminor = draw(st.sampled_from([0, 3, 255, 2**20, 2**21 + 1]))
    if draw(st.booleans()):
        info.pax_headers = draw(st.dictionaries(_xattr_keys, _xattr_values, max_size=4))
    return info, data


def _write(members: list[tuple[tarfile.TarInfo, bytes | None]], fmt: int,
           glob: dict[str, str] | None = None) -> bytes:
    buf = io.BytesIO()
    with tarfile.TarFile(fileobj=buf, mode="w", format=fmt, encoding="utf-8",
                         errors="surrogateescape", pax_headers=glob) as tf:
        for info, data in members:
            info.size = len(data or b"")
            tf.addfile(info, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


@st.composite
def _tars(draw: st.DrawFn) -> bytes:
    fmt = draw(st.sampled_from(sorted(FORMATS)))
    members = draw(st.lists(_members(), max_size=8))
    glob = None
    if fmt == "pax" and draw(st.booleans()):
        glob = draw(st.dictionaries(st.sampled_from(["comment", "mtime", "uid", "SCHILY.xattr.g"]),
                                    st.sampled_from(["7", "12.25", "-3.5", "x"]), max_size=3))
    try:
        return _write(members, FORMATS[fmt], glob)
    except ValueError:  # a field the format cannot hold (a long name in USTAR, ...)
        assume(False)
        raise


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Layer stream blocks of a few KiB: headers and data cross block boundaries."""
    monkeypatch.setattr(layerstream, "_IN", 4096)
    monkeypatch.setattr(layerstream, "_OUT", 7000)


# --------------------------------------------------------------------------- raw headers


def _block(name: bytes = b"f", flag: bytes = b"0", size: int = 0, *, mode: bytes = b"0000644",
           uid: bytes = b"0000000", mtime: bytes = b"00000000000", prefix: bytes = b"",
           link: bytes = b"", chksum: int | None = None, signed: bool = False) -> bytes:
    """A header block spelled field by field (checksum computed unless given)."""
    h = bytearray(512)
    h[0:100] = name[:100].ljust(100, b"\0")
    h[100:108] = mode.ljust(8, b"\0")
    h[108:116] = uid.ljust(8, b"\0")
    h[116:124] = b"0000000\0"
    h[124:136] = (b"%011o" % size).ljust(12, b"\0") if size >= 0 else bytes(12)
    h[136:148] = mtime.ljust(12, b"\0")
    h[156:157] = flag
    h[157:257] = link.ljust(100, b"\0")
    h[257:265] = b"ustar\x0000"
    h[345:500] = prefix.ljust(155, b"\0")
    h[148:156] = b" " * 8
    if chksum is None:
        chksum = sum(h) if not signed else sum(b - 256 if b > 127 else b for b in h)
    h[148:156] = b"%06o\0 " % chksum
    return bytes(h)


def _data(payload: bytes) -> bytes:
    return payload + bytes(-len(payload) % 512)


def _ext(flag: bytes, payload: bytes) -> bytes:
    return _block(b"././@LongLink" if flag in b"LK" else b"pax", flag, len(payload)) + _data(payload)


def _rec(key: bytes, value: bytes) -> bytes:
    body = b" " + key + b"=" + value + b"\n"
    n = len(body) + 1
    while len(str(n).encode()) + len(body) != n:
        n += 1
    return str(n).encode() + body


END = bytes(1024)


# --------------------------------------------------------------------------- tests


@pytest.mark.parametrize("name", sorted(p.name for p in FIXTURES.glob("*.tar")))
@pytest.mark.parametrize("read", [True, False])
def test_fixture_tars_read_as_tarfile_reads_them(name: str, read: bool) -> None:
    raw = (FIXTURES / name).read_bytes()
    got, err = _same(raw, read)
    assert err is None
    if raw:
        assert got


@SETTINGS
@given(raw=_tars(), read=st.booleans(), out=st.sampled_from([512, 1000, 7000, 1 << 22]))
def test_tarfile_written_tars_read_as_tarfile_reads_them(raw: bytes, read: bool, out: int) -> None:
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(layerstream, "_OUT", out)
        _same(raw, read)  # FormatError for both where a hard link leaves the root


@SETTINGS
@given(raw=_tars())
def test_gzip_layer_and_tee_match_tarfile(raw: bytes) -> None:
    gz = gzip.compress(raw, mtime=0)
    assume(_same(gz)[1] is None)
    copy = io.BytesIO()
    assert len(list(TarSource(io.BytesIO(gz), tee=copy))) == len(_old(raw)[0])
    assert copy.getvalue() == raw


# PAX data with records whose length does not match them: FormatError, wherever
# tarfile ends the archive, raises or reads something.
_BAD_PAX = [
    b"0 path=x\n",  # zero length
    b"11 path=x\n",  # length past the record (and the data)
    b"11 path=x\nab",  # length past the record, within the data
    b"8 path=x\n",  # length short of the record
    b"9 path=x\n\n\n",  # junk after the last record
    b"5 =x\n9 a=b\n",  # no key
    b"path=x\n",  # no length
    b"30 hdrcharset=BINARY\n",  # wrong length with a record tarfile must judge
]

_chain_parts = st.sampled_from([
    ("x", [(b"path", b"pax/name"), (b"mtime", b"1.5")]),
    ("x", [(b"size", b"3"), (b"uid", b"77"), (b"SCHILY.xattr.user.x", b"1")]),
    ("x", [(b"linkpath", b"pax/target"), (b"gid", b"bad"), (b"mtime", b"-2.25")]),
    ("x", [(b"mtime", b"9")]),
    ("x", [(b"path", b"a"), (b"path", b"b"), (b"LIBARCHIVE.xattr.user.y", b"eHl6")]),
    ("g", [(b"mtime", b"100.000000001"), (b"SCHILY.xattr.user.g", b"G")]),
    ("g", [(b"path", b"global/path"), (b"size", b"5")]),
    ("L", b"long/" + b"n" * 150),
    ("L", b"dir/"),
    ("K", b"long/" + b"k" * 150),
    ("raw", b"21 hdrcharset=BINARY\n"),
    ("raw", b"16 hdrcharset=\xff\n"),
    ("raw", b"13 mtime=nan\n"),
    ("raw", b"9 path=x\n" + bytes(7)),  # NULs inside the size after the records
    *[("bad", rec) for rec in _BAD_PAX],
])


@SETTINGS
@given(
    chain=st.lists(_chain_parts, max_size=4),
    flag=st.sampled_from([b"0", b"\0", b"5", b"1", b"2", b"3", b"6", b"7", b"V", b"S"]),
    name=st.sampled_from([b"f", b"d/", b"p/x", b"./a/../b"]),
    prefix=st.sampled_from([b"", b"pre/fix"]),
    size=st.sampled_from([0, 3, 600]),
    after=st.booleans(),
)
def test_header_chains_apply_as_tarfile_applies_them(
    chain: list[tuple[str, Any]], flag: bytes, name: bytes, prefix: bytes, size: int, after: bool
) -> None:
    raw = b""
    for kind, value in chain:
        if kind in ("raw", "bad"):
            raw += _ext(b"x", value)
        elif kind in "xg":
            raw += _ext(kind.encode(), b"".join(_rec(k, v) for k, v in value))
        else:
            raw += _ext(kind.encode(), value)
    raw += _block(name, flag, size, prefix=prefix, link=b"lnk") + _data(bytes(range(7)) * (size // 7)
                                                                       + bytes(size % 7))
    if after:
        raw += _block(b"next", b"0", 4) + _data(b"tail")
    if any(kind == "bad" for kind, _ in chain):
        assert _new(raw + END) == ([], "FormatError")
        with pytest.raises(FormatError, match=r"PAX header at offset \d+: PAX"):
            list(TarSource(io.BytesIO(raw + END)))
        return
    if flag == b"S":
        # An old GNU sparse header whose map holds none of the data it stores (its size,
        # or a PAX size record's): tarfile drops the data unread; like Go's archive/tar
        # ("unreferenced data"), the reader refuses.
        _, message = _read_paths(raw + END)
        if re.search(r"sparse extents hold 0 bytes but the member stores [1-9]", message):
            return
        # tarfile skips the global records for an old GNU sparse member (they apply to
        # every member after them: test_global_records_apply_to_sparse_members).
        assume(not any(kind == "g" for kind, _ in chain))
    _same(raw + END)
    _same(raw + END, read=False)


def _sparse_gnu() -> bytes:
    """An old GNU sparse member ('S'): 2 data extents in a 3000-byte file."""
    h = bytearray(_block(b"sparse", b"S", 1024))
    h[386:410] = b"%011o\0%011o\0" % (0, 512)
    h[410:434] = b"%011o\0%011o\0" % (2048, 512)
    h[483:495] = b"%011o\0" % 3000
    h[148:156] = b" " * 8
    h[148:156] = b"%06o\0 " % sum(h)
    return bytes(h) + b"A" * 512 + b"B" * 512


def _sparse_pax(version: str) -> bytes:
    if version == "0.1":
        recs = [(b"GNU.sparse.map", b"0,512,2048,512"), (b"GNU.sparse.realsize", b"3000"),
                (b"GNU.sparse.name", b"sparse01")]
        return _ext(b"x", b"".join(_rec(k, v) for k, v in recs)) + _block(
            b"GNUSparseFile/x", b"0", 1024) + b"A" * 512 + b"B" * 512
    recs = [(b"GNU.sparse.major", b"1"), (b"GNU.sparse.minor", b"0"),
            (b"GNU.sparse.realsize", b"3000"), (b"GNU.sparse.name", b"sparse10")]
    data = _data(b"2\n0\n512\n2048\n512\n") + b"A" * 512 + b"B" * 512
    return _ext(b"x", b"".join(_rec(k, v) for k, v in recs)) + _block(
        b"GNUSparseFile/y", b"0", len(data)) + data


@pytest.mark.parametrize("sparse", [_sparse_gnu(), _sparse_pax("0.1"), _sparse_pax("1.0")],
                         ids=["gnu-S", "pax-0.1", "pax-1.0"])
def test_sparse_members_read_as_tarfile_reads_them(sparse: bytes) -> None:
    tail = _block(b"after", b"0", 5) + _data(b"after")
    got, err = _same(sparse + tail + END)
    assert err is None
    entry, _, data = got[0]
    assert entry.size == 3000 and entry.data_offset is None
    assert data == b"A" * 512 + bytes(1536) + b"B" * 512 + bytes(440)
    assert got[1][0].path == b"after" and got[1][2] == b"after"


def test_global_records_from_a_delegated_member_carry_on() -> None:
    # hdrcharset makes the fast path hand the 'g' header to tarfile
    g = _ext(b"g", _rec(b"hdrcharset", b"BINARY") + _rec(b"mtime", b"5.5")
             + _rec(b"SCHILY.xattr.user.k", b"v"))
    raw = g + _block(b"a", b"0", 1) + _data(b"1") + _block(b"b", b"5") + END
    got, err = _same(raw)
    assert err is None
    assert [(e.path, e.mtime, e.mtime_nsec, e.xattrs) for e, _, _ in got] == [
        (b"a", 5, 500_000_000, {b"user.k": b"v"}), (b"b", 5, 500_000_000, {b"user.k": b"v"})]


def test_checksums_signed_and_unsigned_and_numbers_in_every_spelling() -> None:
    hi = b"\xe9t\xe9"
    raw = (_block(hi, b"0", signed=True) + _block(hi + b"2", b"0")
           + _block(b"sp", b"0", mode=b"  644 \0", uid=b"\x80" + bytes(6) + b"\x07",
                    mtime=b"\xff" * 11 + b"\xfe")
           + _block(b"v7dir/", b"\0") + END)
    got, err = _same(raw)
    assert err is None
    assert [(e.path, e.type, e.mode, e.uid, e.mtime) for e, _, _ in got] == [
        (hi, EntryType.REG, 0o644, 0, 0), (hi + b"2", EntryType.REG, 0o644, 0, 0),
        (b"sp", EntryType.REG, 0o644, 7, -2), (b"v7dir", EntryType.DIR, 0o644, 0, 0)]


def _valid() -> bytes:
    pax = _ext(b"x", _rec(b"path", b"p" * 120) + _rec(b"mtime", b"3.5"))
    return (_block(b"first", b"0", 700) + _data(b"F" * 700) + pax + _block(b"x", b"0", 10)
            + _data(b"0123456789") + _block(b"d", b"5") + END)


def _damage_first_checksum(raw: bytes) -> bytes:
    return raw[:148] + b"0000001\0" + raw[156:]


def _damage_first_octal(raw: bytes) -> bytes:
    return _block(b"first", b"0", 700, mode=b"0009\0") + raw[512:]


def _damage_pax_length(raw: bytes) -> bytes:
    return _ext(b"x", b"0 path=zero\n") + raw


def _truncate_after_pax(raw: bytes) -> bytes:
    return raw[: 1536 + 1024 + 100]  # PAX header, records, then a cut header


def _truncate_data(raw: bytes) -> bytes:
    return raw[: 512 + 300]


def _damage_after_pax(raw: bytes) -> bytes:
    at = 1536 + 1024
    return raw[:at] + raw[at : at + 148] + b"7777777\0" + raw[at + 156 :]


@pytest.mark.parametrize("damage", [_damage_first_checksum, _damage_first_octal,
                                    _damage_pax_length, _truncate_after_pax, _truncate_data,
                                    _damage_after_pax, lambda raw: raw[:300],
                                    lambda raw: b"not a tar" * 100])
def test_corrupt_tars_fail_with_format_error_where_tarfile_failed(damage: Any) -> None:
    raw = damage(_valid())
    _, err = _same(raw)
    assert err == "FormatError"
    with pytest.raises(FormatError, match="layer tar"):
        for _, reader in TarSource(io.BytesIO(raw)):
            while reader is not None and reader.read(100):
                pass


def test_only_a_zero_block_or_the_end_of_data_at_a_header_ends_the_archive() -> None:
    valid = _valid()
    for raw in (valid[:1536], valid[:1536] + END + b"garbage after the end" * 50,
                valid[:1536] + bytes(512) + b"\x01" * 512):
        got, err = _same(raw)
        assert err is None and [e.path for e, _, _ in got] == [b"first"]


def _read_paths(raw: bytes) -> tuple[list[bytes], str]:
    """Paths read, and the FormatError's message ("" if none)."""
    got: list[bytes] = []
    try:
        for entry, reader in TarSource(io.BytesIO(raw)):
            got.append(entry.path)
            while reader is not None and reader.read(1000):
                pass
    except FormatError as err:
        return got, str(err)
    return got, ""


def _with_checksum(block: bytes, value: bytes) -> bytes:
    return block[:148] + value + block[156:]


def _four() -> tuple[bytes, list[int]]:
    """Four members (a PAX one and a GNU long name among them) and their header offsets."""
    members = [
        _block(b"one", b"0", 700) + _data(b"1" * 700),
        _ext(b"x", _rec(b"path", b"two") + _rec(b"mtime", b"1.5")) + _block(b"t", b"0", 3)
        + _data(b"two"),
        _ext(b"L", b"three/" + b"3" * 200) + _block(b"t", b"5"),
        _block(b"four", b"0", 4) + _data(b"four"),
    ]
    offsets = [sum(len(m) for m in members[:i]) for i in range(4)]
    return b"".join(members), offsets


@pytest.mark.parametrize("where", [0, 1, 2, 3], ids=["first", "pax", "gnu-long-name", "last"])
@pytest.mark.parametrize("damage", ["checksum", "octal", "cut"])
def test_a_damaged_header_is_a_format_error_naming_its_offset_wherever_it_is(
    where: int, damage: str
) -> None:
    raw, offsets = _four()
    at = offsets[where]  # the first header of the member (PAX or GNU one included)
    block = raw[at : at + 512]
    if damage == "checksum":
        bad = raw[:at] + _with_checksum(block, b"0000001\0") + raw[at + 512 :] + END
        want = "checksum mismatch"
    elif damage == "octal":
        bad = raw[:at] + block[:100] + b"0009\0\0\0\0" + block[108:] + raw[at + 512 :] + END
        want = "invalid mode field"
    else:
        bad, want = raw[: at + 300], "header cut short (300 of 512 bytes)"
    got, message = _read_paths(bad)
    assert got == [b"one", b"two", b"three/" + b"3" * 200, b"four"][:where]
    assert f"layer tar: header at offset {at}: {want}" in message
    if where:  # tarfile took it for the end of the archive
        assert _old(bad)[1] == "FormatError"  # the reference reports the silent stop


@pytest.mark.parametrize("kind", ["x", "L"])
@pytest.mark.parametrize("cut", [1, 100, 511, 512])
def test_data_of_a_pax_or_long_name_header_cut_short_is_a_format_error(kind: str, cut: int) -> None:
    raw, offsets = _four()
    at = offsets[1] if kind == "x" else offsets[2]
    got, message = _read_paths(raw[: at + 512 + cut - 512 * (cut == 512)])
    if cut == 512:  # the end of data right after the PAX or GNU header block
        assert "the data ends where a header should start" not in message
    assert got == [b"one", b"two"][: 1 if kind == "x" else 2]
    assert f"header at offset {at}" in message and "cut short" in message or \
        "ends right after" in message


@pytest.mark.parametrize("kind", ["x", "L"])
def test_the_end_right_after_a_pax_or_long_name_header_is_a_format_error(kind: str) -> None:
    raw, offsets = _four()
    start = offsets[1] if kind == "x" else offsets[2]
    nxt = offsets[2] - 1024 if kind == "x" else offsets[3] - 512  # the member's own header
    for tail in (b"", END):
        got, message = _read_paths(raw[:nxt] + tail)
        assert got == [b"one", b"two"][: 1 if kind == "x" else 2]
        name = "PAX" if kind == "x" else "GNU long name"
        assert message == f"layer tar: header at offset {nxt}: the archive ends right after a " \
            f"{name} header", start


@pytest.mark.parametrize("record", _BAD_PAX)
def test_a_pax_record_whose_length_does_not_match_is_a_format_error(record: bytes) -> None:
    raw, offsets = _four()
    bad = raw[: offsets[3]] + _ext(b"x", record) + raw[offsets[3] :] + END
    got, message = _read_paths(bad)
    assert got == [b"one", b"two", b"three/" + b"3" * 200]
    assert message.startswith(f"layer tar: PAX header at offset {offsets[3]}: PAX")


def test_a_valid_tar_cut_after_any_complete_member_reads_up_to_there() -> None:
    raw, offsets = _four()
    paths = [b"one", b"two", b"three/" + b"3" * 200, b"four"]
    ends = [*offsets[1:], len(raw)]
    for n, end in enumerate(ends, 1):
        got, err = _same(raw[:end])
        assert err is None and [e.path for e, _, _ in got] == paths[:n]
    for cut in range(512, len(raw), 512):  # anywhere else: inside a member
        if cut not in ends:
            got_paths, message = _read_paths(raw[:cut])
            assert message, cut
            assert got_paths == paths[: len(got_paths)]


# Written by Go 1.19's archive/tar (FormatPAX: a directory, a file with a 150-byte
# name and xattrs, a symlink with a long target and a uid past USTAR's range, then
# a USTAR member with a UTF-8 name), zlib-compressed.
_GO_TAR = (
    "eNrtmM9OwkAQh1ePfYp9grJ/Znfl0JMXTDyYePK4tFUaSiHtVvGRfA5fzFY0UggQE1rEzndhQ0gauvP7ZmejJB/c"
    "2eUotlGcFz4jLcBW7PpkTOqfdf09Z0ZwQpekA8rC2bx6POknktGZS2ZxwM33+/e5kKC0uRp6BPnnRFX+235GXVRG"
    "qd35r9YclABjGKzyz4QiVJ1T/jf/3Bnt/7r/B9nxOeR/YND0vxRaof+78f+Q3l+Pbm4f/KV1LveLOCzzxL36oV3Y"
    "cZJWy+Di0hOm+bOyiHN/GjyTF29/B+Ea6MK6SVAXWvYn8fru/7ZfcF0SGmC3/zlv+r8qHm4IZej/1pnEaTqnT3M8"
    "6vU3/43+n2adz39Cy435j0sJ2P+7gEugaZJNP3u0OxGHzhCKlkkUAB+CZICmOnb+W4j87+5/Nuc/aZiShIouaq/n"
    "/b/h/tA+nmT/+db9nzYC/d+J/7/Gs2rr399Qrb2jpchv5V/v9f/6+a++JzQacP7rBDsOMQQIgiA95APN27vU"
)


def test_pax_headers_written_by_go_and_by_tarfile_read_as_tarfile_reads_them() -> None:
    go = zlib.decompress(base64.b64decode(_GO_TAR))
    got, err = _same(go)
    assert err is None
    assert [(e.path, e.mtime, e.mtime_nsec, e.uid) for e, _, _ in got] == [
        (b"dir", 1700000000, 123456789, 0), (b"dir/" + b"n" * 150, 1700000000, 123456789, 0),
        (b"dir/ln", 1700000000, 123456789, 1 << 22), ("caf\u00e9".encode(), 5, 0, 0)]
    assert got[1][0].xattrs == {b"user.k": b"v\0w", b"security.capability": b"\x01\x02"}
    assert got[1][2] == b"hello go\n" and got[2][0].link == b"t" * 120
    info = tarfile.TarInfo("d/" + "p" * 150)
    info.size, info.mtime, info.uid = 2, 1.25, 1 << 22
    info.pax_headers = {"SCHILY.xattr.user.a": "\u00e9", "comment": "x" * 600}
    written = _write([(info, b"py")], tarfile.PAX_FORMAT, {"comment": "global"})
    got, err = _same(written)
    assert err is None and got[0][0].path == b"d/" + b"p" * 150 and got[0][2] == b"py"
    assert got[0][0].xattrs == {b"user.a": "\u00e9".encode()}


def test_a_pax_mtime_that_is_no_number_is_a_format_error() -> None:
    raw = _ext(b"x", _rec(b"mtime", b"soon")) + _block(b"f", b"0") + END
    assert _old(raw)[1] == "ValueError"  # what the tarfile-based reader let out
    with pytest.raises(FormatError, match="bad mtime"):
        list(TarSource(io.BytesIO(raw)))


@SETTINGS
@given(raw=_tars(), cuts=st.lists(st.tuples(st.integers(0, 1 << 16), st.integers(0, 255)),
                                  min_size=1, max_size=3), truncate=st.booleans())
def test_random_damage_gives_tarfiles_entries_then_format_error(
    raw: bytes, cuts: list[tuple[int, int]], truncate: bool
) -> None:
    assume(raw)
    data = bytearray(raw)
    for at, value in cuts:
        data[at % len(data)] = value
    if truncate:
        del data[cuts[0][0] % len(data) :]
    # tarfile's entries, up to where the parser, stricter about PAX records, may stop
    old, new = _old(bytes(data)), _new(bytes(data))
    assert new[0] == old[0][: len(new[0])]
    if new[1] is None:
        assert new == old
    elif old[1] in ("ValueError", "UnsupportedOperation", "OverflowError"):
        assert new[1] == "FormatError" and new[0] == old[0]
    else:
        assert new[1] == "FormatError"


@SETTINGS
@given(st.binary(max_size=40).map(lambda b: bytes(b"/.a"[x % 3] for x in b)))
def test_normalize_path_fast_path_is_the_general_rule(raw: bytes) -> None:
    try:
        want: bytes | None = _ref_normalize(raw)
    except FormatError:
        want = None
    if want is None:
        with pytest.raises(FormatError):
            normalize_path(raw)
    else:
        assert normalize_path(raw) == want


def test_header_and_pax_record_parsers_decline_what_tarfile_must_judge() -> None:
    good = _block(b"f", b"0", 5)
    assert parse_header(good) is not None and header_damage(good) is None
    assert parse_header(good[:511]) is None
    assert header_damage(good[:511]) == "header cut short (511 of 512 bytes)"
    assert parse_header(bytes(512)) is None
    assert parse_header(_block(b"f", b"S")) is not None  # GNU sparse: read here too
    assert header_damage(_block(b"f", b"S")) is None
    assert parse_header(_block(b"f", b"0", chksum=1)) is None
    assert (header_damage(_block(b"f", b"0", chksum=1)) or "").startswith("checksum mismatch")
    assert header_damage(_block(b"f", b"0", uid=b"12x")) == "invalid uid field b'12x\\x00\\x00\\x00\\x00\\x00'"
    recs = _rec(b"a", b"1") + _rec(b"a", b"2")
    assert pax_records(recs + bytes(100), len(recs)) == {b"a": b"2"}
    assert pax_records(recs + b"\0\0" + b"junk", len(recs) + 2) == {b"a": b"2"}  # padding unread
    with pytest.raises(ValueError, match="length 5 does not match"):
        pax_records(b"5 a=1\n", 6)
    with pytest.raises(ValueError, match="runs past"):
        pax_records(recs + b"7 a=1\n", len(recs) + 6)
    sparse = _rec(b"GNU.sparse.map", b"0,1")
    assert pax_records(sparse, len(sparse)) == {b"GNU.sparse.map": b"0,1"}
    charset = _rec(b"hdrcharset", b"BINARY")
    assert pax_records(charset, len(charset)) is None
    assert pax_records(charset + sparse, len(charset + sparse)) is not None
    assert pax_records(charset, len(charset), charset_ok=True) == {b"hdrcharset": b"BINARY"}


@pytest.mark.parametrize("tail", [b"", b"\x01" * 100, bytes(100)], ids=["none", "junk", "zeros"])
def test_a_gnu_sparse_header_cut_inside_its_extension_is_a_format_error(tail: bytes) -> None:
    h = bytearray(_block(b"sparse", b"S", 1024))
    h[386:410] = b"%011o\0%011o\0" % (0, 512)
    h[482] = 1  # an extension block follows
    h[483:495] = b"%011o\0" % 3000
    h[148:156] = b" " * 8
    h[148:156] = b"%06o\0 " % sum(h)
    first = _block(b"a", b"0", 1) + _data(b"1")
    got, message = _read_paths(first + bytes(h) + tail)
    assert got == [b"a"] and message.startswith(
        "layer tar: sparse member at offset 1024: extension block at offset 1536 cut short")


@pytest.mark.parametrize("flag", [b"x", b"L", b"K"])
def test_an_extended_header_claiming_more_than_its_cap_is_refused_before_reading(
    flag: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The payload size comes from a checksum-valid header alone: it must not size an
    allocation (a corrupt 8 GiB PAX header would read the rest of the layer)."""
    from pynydus.rafs.source import tarsource

    huge = _block(b"././@LongLink" if flag != b"x" else b"pax", flag, 8 << 30)
    got, message = _read_paths(_block(b"one", b"0", 3) + _data(b"one") + huge + bytes(4096))
    assert got == [b"one"] and "extended header data" in message and "offset 1024" in message
    # Many headers under the per-header cap still may not pile up past the chain cap.
    monkeypatch.setattr(tarsource, "_CHAIN_MAX", 3000)
    chain = b"".join(_ext(b"x", _rec(b"comment", b"c" * 1000)) for _ in range(4))
    got, message = _read_paths(chain + _block(b"two", b"0", 3) + _data(b"two"))
    assert got == [] and "per member" in message

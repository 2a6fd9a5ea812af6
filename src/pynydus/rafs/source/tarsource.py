"""An OCI layer tar (plain, gzip or zstd) as a build source: ``(Entry, DataReader | None)``.

Tar layers may be plain, gzip (any number of members) or zstd (any number of
frames); the codec is detected from the magic bytes, not from the file name, and
the bytes are decoded ahead by :class:`~pynydus.rafs.decoder.layerstream.LayerStream`.
PAX extended headers supply nanosecond mtimes, long names and xattrs
(``SCHILY.xattr.*``, falling back to libarchive's base64 ``LIBARCHIVE.xattr.*``).
Entries are the model of :mod:`pynydus.rafs.source.entry`; a regular file's reader
is invalid once the iterator has advanced (the stream cannot go back).
"""

from __future__ import annotations

import base64
import io
import os
import tarfile
from collections.abc import Iterator, Mapping
from typing import Any, BinaryIO, Protocol, cast

from pynydus.errors import FormatError, InvalidArgument
from pynydus.rafs.decoder import DECODE_ERRORS, LayerStream, absolute_seek
from pynydus.rafs.format import tarsparse
from pynydus.rafs.format.tarheader import (
    BLOCK,
    EXT_TYPES,
    SPARSE_TYPE,
    ZERO_BLOCK,
    Header,
    apply_pax,
    cstr,
    header_damage,
    padded,
    parse_header,
    pax_records,
)
from pynydus.rafs.source.entry import DataReader, Entry, EntryType, normalize_path

__all__ = ["TarSource"]


# --------------------------------------------------------------------------- tar
#
# Headers are parsed by pynydus.rafs.format.tarheader, not by tarfile (which costs ~25 µs a
# member). A member whose header chain (PAX ``x``/``g``, GNU ``L``/``K``, then the
# member's own header) parses and holds only ordinary PAX records is built here,
# applying the chain as tarfile does. GNU sparse members are built here too, from
# maps tarsparse checks (tarfile loops forever over an overlapping map and reads
# every byte of whatever real size a header claims). Well-formed members of other
# kinds -- vendor typeflags, ``hdrcharset`` -- are handed to tarfile together with
# the blocks already taken for them (:class:`_Replay`), and tarfile reads them as
# it always did.
#
# Damage is an error wherever it is, unlike in tarfile: a header block that is cut
# short, fails its checksum or has a number field that reads as none, a PAX or GNU
# long-name payload cut short, a malformed PAX record. tarfile takes a damaged
# header after the first member for the end of the archive and silently drops the
# rest of the layer (upstream's tar-rs builder fails: "archive header checksum
# mismatch"). The end is a zero block (nothing after it is read) or the end of the
# data exactly where a header would start (many writers omit the two zero blocks).
#
# Names, link targets and PAX values stay bytes: tarfile decodes them as UTF-8 with
# surrogateescape (TarSource's settings) and _enc encodes them back, which gives
# the original bytes for any input, so nothing is decoded on the fast path.

# What the member's own typeflag makes of it (tarheader.PLAIN_TYPES).
_ENTRY_TYPES: dict[bytes, EntryType] = {
    b"0": EntryType.REG,
    b"\0": EntryType.REG,
    b"7": EntryType.REG,
    b"1": EntryType.HARDLINK,
    b"2": EntryType.SYMLINK,
    b"3": EntryType.CHAR,
    b"4": EntryType.BLOCK,
    b"5": EntryType.DIR,
    b"6": EntryType.FIFO,
}


def _peek(f: BinaryIO, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        got = f.read(n - len(buf))
        if not got:
            break
        buf += got
    return buf


def _pax_time(value: str) -> tuple[int, int]:
    """Parse a PAX time ``[-]SECONDS[.FRACTION]`` exactly into (seconds, nanoseconds)."""
    neg = value.startswith("-")
    sec_s, _, frac = value.lstrip("-").partition(".")
    sec = int(sec_s or "0")
    nsec = int((frac + "000000000")[:9]) if frac else 0
    if neg:
        if nsec:
            sec, nsec = -sec - 1, 1_000_000_000 - nsec
        else:
            sec = -sec
    return sec, nsec


def _mtime(path: bytes, pax: Mapping[bytes, bytes], fallback: float) -> tuple[int, int]:
    """(seconds, nanoseconds): PAX ``mtime`` if given (exactly), else ``fallback``."""
    value = pax.get(b"mtime")
    try:
        if value is None:
            return int(fallback), 0
        return _pax_time(value.decode("utf-8", "surrogateescape"))
    except (ValueError, OverflowError) as err:
        raise FormatError(f"layer tar: {path!r}: bad mtime {value!r}: {err}") from err


def _enc(s: str) -> bytes:
    return s.encode("utf-8", "surrogateescape")


def _dec(b: bytes) -> str:
    return b.decode("utf-8", "surrogateescape")


def _tar_xattrs(pax: Mapping[bytes, bytes]) -> dict[bytes, bytes]:
    out: dict[bytes, bytes] = {}
    for key, value in pax.items():
        if key.startswith(b"LIBARCHIVE.xattr.") and value.isascii():
            b64 = value + b"=" * (-len(value) % 4)
            try:
                out.setdefault(key[len(b"LIBARCHIVE.xattr.") :], base64.b64decode(b64, b"-_"))
            except ValueError:
                continue
    for key, value in pax.items():
        if key.startswith(b"SCHILY.xattr."):
            out[key[len(b"SCHILY.xattr.") :]] = value
    return out


def _entry(
    etype: EntryType,
    path: bytes,
    mode: int,
    uid: int,
    gid: int,
    mtime: tuple[int, int],
    size: int,
    link: bytes,
    rdev: tuple[int, int],
    xattrs: dict[bytes, bytes],
    data_offset: int | None,
) -> Entry:
    """The Entry of one member; fields a type does not have are left at their defaults."""
    path = normalize_path(path)
    if etype is EntryType.REG:
        return Entry(path, etype, mode & 0o7777, uid, gid, *mtime, size, b"", 0, 0, xattrs,
                     data_offset)
    if etype is EntryType.HARDLINK:
        link = normalize_path(link)
    elif etype is not EntryType.SYMLINK:
        link = b""
    if etype is not EntryType.CHAR and etype is not EntryType.BLOCK:
        rdev = (0, 0)
    return Entry(path, etype, mode & 0o7777, uid, gid, *mtime, 0, link, *rdev, xattrs, None)


def _member_entry(m: tarfile.TarInfo, base: int) -> Entry | None:
    """The Entry of a member tarfile parsed (its offsets from ``base``); None for types
    a filesystem cannot show.

    Path and mtime are checked first, for every type, as TarSource always did."""
    name = _enc(m.name)
    normalize_path(name)
    pax = {_enc(k): _enc(v) for k, v in m.pax_headers.items()}
    mtime = _mtime(name, pax, m.mtime)
    if m.isreg():  # REGTYPE, AREGTYPE, CONTTYPE
        etype = EntryType.REG
    elif m.isdir():
        etype = EntryType.DIR
    elif m.issym():
        etype = EntryType.SYMLINK
    elif m.islnk():
        etype = EntryType.HARDLINK
    elif m.ischr() or m.isblk():
        etype = EntryType.CHAR if m.ischr() else EntryType.BLOCK
    elif m.isfifo():
        etype = EntryType.FIFO
    else:
        return None  # unknown vendor types carry nothing a filesystem can show
    return _entry(
        etype,
        name,
        m.mode,
        m.uid,
        m.gid,
        mtime,
        m.size,
        _enc(m.linkname),
        (m.devmajor, m.devminor),
        _tar_xattrs(pax),
        base + m.offset_data,
    )



# PAX and GNU long-name/long-link payloads are read into memory whole; a header that
# claims more is malformed (names are at most PATH_MAX, xattr values 64 KiB on Linux).
_EXT_MAX = 16 << 20
_CHAIN_MAX = 64 << 20

# What decoders and the tar parser raise for malformed input (gzip.BadGzipFile is
# an OSError; plain OSErrors from the source file itself are left alone).
_DECODE_ERRORS: tuple[type[BaseException], ...] = (
    tarfile.TarError,
    EOFError,
    UnicodeError,
    *DECODE_ERRORS,
)
# ... and what tarfile lets out for some malformed members (a GNU.sparse.size that is
# no number, say): a FormatError too when it parses a member for _TarReader.
_MEMBER_ERRORS: tuple[type[BaseException], ...] = (*_DECODE_ERRORS, ValueError, IndexError)

# Names of the headers that qualify a member, for messages.
_EXT_NAMES = {b"x": "PAX", b"g": "PAX global", b"L": "GNU long name", b"K": "GNU long link"}


def _check_header(buf: bytes, offset: int) -> None:
    """FormatError if ``buf``, the block at ``offset``, is a damaged header."""
    damage = header_damage(buf)
    if damage is not None:
        raise FormatError(f"layer tar: header at offset {offset}: {damage}")


class _Sink(Protocol):
    def write(self, data: bytes, /) -> object: ...


class _Slice:
    """The next ``size`` bytes of a layer stream (a member's file data), as zero-copy
    views where possible; a truncated or corrupt stream is a FormatError."""

    def __init__(self, stream: LayerStream, size: int, path: bytes) -> None:
        self._stream = stream
        self._left = size
        self._path = path

    def read(self, n: int = -1, /) -> bytes | memoryview:
        n = self._left if n < 0 else min(n, self._left)
        if n <= 0:
            return b""
        try:
            data = self._stream.read_view(n)
        except _DECODE_ERRORS as err:
            raise FormatError(f"layer tar: data of {self._path!r}: {err}") from err
        self._left -= len(data)
        if len(data) < n:
            self._left = 0  # the stream ended early: the caller sees a short file
        return data


# Holes read as views of this (a builder reads a chunk at a time).
_ZEROS = bytes(1 << 20)


class _SparseSlice:
    """A sparse member's file: its data extents, stored back to back at the stream's
    position, with zeros in between and after; a truncated or corrupt stream is a
    FormatError or a short file, as for :class:`_Slice`."""

    def __init__(self, stream: LayerStream, smap: tarsparse.SparseMap, path: bytes) -> None:
        self._stream = stream
        self._size = smap.real_size
        self._extents = smap.extents
        self._next = 0  # index of the extent at or after the position
        self._pos = 0
        self._path = path

    def read(self, n: int = -1, /) -> bytes | memoryview:
        left = self._size - self._pos
        n = left if n < 0 else min(n, left)
        if n <= 0:
            return b""
        if self._next < len(self._extents):
            off, length = self._extents[self._next]
            if self._pos >= off:  # inside the extent: its stored bytes
                n = min(n, off + length - self._pos)
                try:
                    data = self._stream.read_view(n)
                except _DECODE_ERRORS as err:
                    raise FormatError(f"layer tar: data of {self._path!r}: {err}") from err
                self._pos += len(data)
                if len(data) < n:
                    self._size = self._pos  # the stream ended early: a short file
                elif self._pos == off + length:
                    self._next += 1
                return data
            n = min(n, off - self._pos)  # a hole up to the extent
        self._pos += n
        return memoryview(_ZEROS)[:n] if n <= len(_ZEROS) else bytes(n)


class _Replay:
    """A layer stream from offset ``base`` on, with the bytes already taken from it
    put back in front.

    What tarfile reads a member through when the fast path declines it: ``read``,
    ``tell`` and forward ``seek``, at offsets from ``base``. tarfile so sees every
    member as the first of an archive, the one place where it reports a damaged
    header instead of ending the archive there."""

    def __init__(self, stream: LayerStream, head: bytes, base: int) -> None:
        self._stream = stream
        self.head = head
        self._base = base

    def read(self, n: int = -1, /) -> bytes:
        head = self.head
        if not head:
            return self._stream.read(n)
        if 0 <= n <= len(head):
            self.head = head[n:]
            return head[:n]
        self.head = b""
        return head + self._stream.read(n - len(head) if n >= 0 else -1)

    def tell(self) -> int:
        return self._stream.tell() - len(self.head) - self._base

    def seek(self, pos: int, whence: int = io.SEEK_SET) -> int:
        pos = absolute_seek(pos, whence, self.tell())
        drop = pos - self.tell()
        if 0 <= drop <= len(self.head):
            self.head = self.head[drop:]
            return pos
        self.head = b""
        return self._stream.seek(pos + self._base) - self._base


class _TarReader:
    """The members of the tar in a :class:`LayerStream`, one header chain at a time.

    Holds what carries from member to member: the offset of the next header (as
    tarfile's ``TarFile.offset``) and the PAX global records.
    """

    def __init__(self, stream: LayerStream, max_sparse_size: int) -> None:
        self._stream = stream
        self._offset = 0
        self._glob: dict[bytes, bytes] = {}
        self._max_sparse_size = max_sparse_size
        # What the sparse members read so far claimed beyond the data they store: one
        # bound for the whole archive, else each of a 10 KB tar's members could claim
        # the limit and the archive would cost the builder members x limit of zeros.
        self._holes = 0

    def next(self) -> tuple[Entry | None, DataReader | None] | None:
        """The next member (its Entry None for vendor types), or None at the end
        (a zero block, or no data where the next header would start).

        Like ``TarFile.next``: first skips what is left of the previous member
        (FormatError if the stream ends first). Unlike it, a damaged header chain
        is a FormatError wherever it is. The previous member's reader is invalid
        afterwards.
        """
        stream = self._stream
        start = self._offset
        pos = stream.tell()
        if pos != start:
            self._skip(pos, start)
        buf = stream.read(BLOCK)
        hdr = parse_header(buf)
        if hdr is None:
            if buf == ZERO_BLOCK or (not buf and start):
                return None  # the end of the archive
            _check_header(buf, start)
            return self._delegate([buf], start)
        if hdr[0] in EXT_TYPES or hdr[0] == SPARSE_TYPE or self._glob:
            return self._chain(hdr, [buf], start)
        # The common case: a plain header, no PAX records anywhere.
        flag, name, mode, uid, gid, size, mtime, link, major, minor, prefix = hdr
        etype = _ENTRY_TYPES[flag]
        if flag == b"\0" and name.endswith(b"/"):
            etype = EntryType.DIR  # V7 spelling of a directory
        if prefix:
            name = prefix + b"/" + name
        data = start + BLOCK
        if etype is EntryType.REG:
            self._offset = data + padded(size)
            path = normalize_path(name)
            entry = Entry(path, etype, mode & 0o7777, uid, gid, mtime, 0, size, b"", 0, 0, {},
                          data)
            return entry, _Slice(stream, size, path)
        self._offset = data
        return _entry(etype, name, mode, uid, gid, (mtime, 0), 0, link, (major, minor), {},
                      None), None

    def _chain(
        self, hdr: Header, chain: list[bytes], start: int
    ) -> tuple[Entry | None, DataReader | None] | None:
        """A member with PAX records (global or its own), GNU long names or a sparse map.

        tarfile applies a chain from the inside out: the global records when it
        parses the member's own header, then each qualifying header from the one
        nearest the member to the first; each ``x`` replaces the member's PAX
        records (its own on top of the globals as they stood when it was read).
        """
        stream = self._stream
        glob = self._glob
        # (flag, long name or records, PAX data and its size for a sparse 0.0 map)
        layers: list[tuple[bytes, bytes | dict[bytes, bytes], bytes, int]] = []
        # hdrcharset here: tarfile reads the member, once every header and record of
        # its chain proved well-formed.
        delegate = False
        bad_charset: str | None = None
        at = start  # the offset of hdr
        held = 0  # payload bytes of this chain in memory
        while hdr[0] in EXT_TYPES:
            flag, size = hdr[0], hdr[5]
            held += size
            if size > _EXT_MAX or held > _CHAIN_MAX:
                # Sized by the (checksum-valid) header alone: refuse before reading.
                raise FormatError(
                    f"layer tar: {_EXT_NAMES[flag]} header at offset {at}: {size} bytes of "
                    f"extended header data (at most {_EXT_MAX} per header, {_CHAIN_MAX} per "
                    "member)"
                )
            payload = stream.read(padded(size))
            chain.append(payload)
            if len(payload) < padded(size):
                raise FormatError(
                    f"layer tar: {_EXT_NAMES[flag]} header at offset {at}: data cut short at "
                    f"offset {at + BLOCK + len(payload)} ({len(payload)} of {padded(size)} bytes)"
                )
            if flag == b"L" or flag == b"K":
                layers.append((flag, cstr(payload), b"", 0))
            else:
                try:
                    records = pax_records(payload, size)
                except ValueError as err:
                    raise FormatError(
                        f"layer tar: {_EXT_NAMES[flag]} header at offset {at}: {err}"
                    ) from err
                if records is None:
                    # tarfile reads the member unless it proves sparse; its records are
                    # needed then.
                    delegate = True
                    records = pax_records(payload, size, charset_ok=True)
                    assert records is not None
                if bad_charset is None and b"hdrcharset" in records:
                    try:  # what tarfile checks of it, for a member it is not handed
                        records[b"hdrcharset"].decode("utf-8")
                    except UnicodeDecodeError as err:
                        bad_charset = (f"layer tar: {_EXT_NAMES[flag]} header at offset {at}: "
                                       f"hdrcharset is not UTF-8: {err}")
                if flag == b"g":
                    if any(k.startswith(b"GNU.sparse.") for k in records):
                        # tarfile applies them to every later member, most of them not
                        # sparse: no writer means that.
                        raise FormatError(f"layer tar: PAX global header at offset {at}: "
                                          "GNU.sparse records apply to one member only")
                    glob = {**glob, **records}
                else:
                    layers.append((flag, {**glob, **records}, payload, size))
            prev, at = flag, at + BLOCK + len(payload)
            buf = stream.read(BLOCK)
            chain.append(buf)
            nxt = parse_header(buf)
            if nxt is None:
                if buf == ZERO_BLOCK or not buf:
                    raise FormatError(
                        f"layer tar: header at offset {at}: the archive ends right after a "
                        f"{_EXT_NAMES[prev]} header"
                    )
                _check_header(buf, at)
                if any(isinstance(v, dict) and tarsparse.is_sparse_pax(v) for _, v, _, _ in layers):
                    raise FormatError(f"layer tar: member at offset {start}: GNU.sparse records "
                                      f"for a member of type {buf[156:157]!r}")
                return self._delegate(chain, start)
            hdr = nxt
        flag, name, mode, uid, gid, size, mtime_, link, major, minor, prefix = hdr
        sparse_pax: tuple[dict[bytes, bytes], bytes, int] | None = None
        for _, value, payload, psize in layers:
            if isinstance(value, dict):  # the first x header's records win, as in tarfile
                if tarsparse.is_sparse_pax(value):
                    sparse_pax = value, payload, psize
                break
        if delegate and sparse_pax is None and flag != SPARSE_TYPE:
            return self._delegate(chain, start)
        if bad_charset is not None:
            raise FormatError(bad_charset)
        if flag == SPARSE_TYPE:
            etype = EntryType.REG
            prefix = b""  # the old GNU header keeps its sparse map there
        else:
            etype = _ENTRY_TYPES[flag]
        if flag == b"\0" and name.endswith(b"/"):
            etype = EntryType.DIR
        if prefix:
            name = prefix + b"/" + name
        reg = etype is EntryType.REG
        data = stream.tell()
        offset = data + padded(size) if reg else data
        mtime: float = mtime_
        pax = glob
        if glob:
            name, link, size, mtime, uid, gid = apply_pax(glob, name, link, size, mtime, uid, gid)
        for flag_, value, _, _ in reversed(layers):
            if isinstance(value, dict):
                name, link, size, mtime, uid, gid = apply_pax(
                    value, name, link, size, mtime, uid, gid
                )
                pax = value
                if b"size" in value:
                    offset = data + padded(size) if reg else data
            elif flag_ == b"L":
                name = value
            else:
                link = value
        smap: tarsparse.SparseMap | None = None
        if flag == SPARSE_TYPE or sparse_pax is not None:
            if not reg or (flag == SPARSE_TYPE and sparse_pax is not None):
                raise FormatError(
                    f"layer tar: member at offset {start}: GNU.sparse records for a "
                    f"{'sparse' if reg else 'non-regular'} member of type {flag!r}"
                )
            if sparse_pax is not None:
                name = sparse_pax[0].get(b"GNU.sparse.name", name)
            smap, extra = self._sparse_map(chain[-1], sparse_pax, size, start, data)
            self._holes += smap.real_size - sum(n for _, n in smap.extents)
            if self._holes > self._max_sparse_size:
                raise FormatError(
                    f"layer tar: sparse member at offset {start}: the holes of the archive's "
                    f"sparse members add up to more than the limit of {self._max_sparse_size} "
                    "bytes")
            offset += extra
        self._glob = glob
        self._offset = offset
        entry = _entry(
            etype,
            name,
            mode,
            uid,
            gid,
            _mtime(name, pax, mtime),
            size if smap is None else smap.real_size,
            link,
            (major, minor),
            _tar_xattrs(pax) if pax else {},
            data if reg and smap is None else None,
        )
        if not reg:
            return entry, None
        if smap is not None:
            return entry, _SparseSlice(stream, smap, entry.path)
        return entry, _Slice(stream, size, entry.path)

    def _sparse_map(
        self,
        header: bytes,
        pax: tuple[dict[bytes, bytes], bytes, int] | None,
        stored: int,
        start: int,
        data: int,
    ) -> tuple[tarsparse.SparseMap, int]:
        """The checked map of the sparse member whose header block is at ``start``
        (``header``, ``stored`` bytes of data from ``data``, the stream's position),
        from ``pax`` (its records, PAX data and size) or the old GNU header; and the
        bytes of GNU extension blocks read before the data. Reads those blocks or the
        1.0 map, leaving the stream at the first extent. Every fault is a FormatError
        naming the offset."""
        stream = self._stream
        where = f"layer tar: sparse member at offset {start}"
        try:
            if pax is None:
                real, extents, more = tarsparse.old_gnu_extents(header)
                at = data
                while more:
                    if at - data >= tarsparse.MAP_10_MAX:
                        raise ValueError(f"more than {tarsparse.MAP_10_MAX} bytes of extension "
                                         "blocks")
                    block = stream.read(BLOCK)
                    if len(block) < BLOCK:
                        raise ValueError(f"extension block at offset {at} cut short "
                                         f"({len(block)} of {BLOCK} bytes)")
                    try:
                        got, more = tarsparse.old_gnu_extension(block)
                    except ValueError as err:
                        raise ValueError(f"extension block at offset {at}: {err}") from err
                    extents += got
                    at += BLOCK
                smap = tarsparse.check_map(extents, real, stored, limit=self._max_sparse_size)
                return smap, at - data
            records, payload, size = pax
            real = tarsparse.pax_real_size(records)
            if b"GNU.sparse.map" in records:
                extents = tarsparse.pax_01_extents(records)
            elif b"GNU.sparse.size" in records:
                extents = tarsparse.pax_00_extents(payload, size, records)
            else:
                buf = b""
                try:
                    while (got10 := tarsparse.map_10(buf)) is None:
                        if len(buf) >= stored:
                            raise ValueError(f"the map runs past the member's {stored} bytes")
                        block = stream.read(BLOCK)
                        if len(block) < BLOCK:
                            raise ValueError(f"cut short at byte {len(buf) + len(block)}")
                        buf += block
                    extents, maplen = got10
                    if maplen > stored:
                        raise ValueError(f"the map runs past the member's {stored} bytes")
                except ValueError as err:
                    raise ValueError(f"map at offset {data}: {err}") from err
                stored -= maplen
            smap = tarsparse.check_map(extents, real, stored, limit=self._max_sparse_size)
            return smap, 0
        except ValueError as err:
            raise FormatError(f"{where}: {err}") from err

    def _delegate(
        self, chain: list[bytes], start: int
    ) -> tuple[Entry | None, DataReader | None] | None:
        """Let tarfile parse the member whose header chain starts at ``start``
        (``chain``: the blocks taken from the stream for it so far)."""
        stream = self._stream
        replay = _Replay(stream, b"".join(chain), start)
        try:
            # One TarFile per member: its constructor reads the first member from
            # the stream's offset, with TarFile.next's rules for errors and the end.
            tf = tarfile.TarFile(
                fileobj=replay,  # type: ignore[arg-type]
                mode="r",
                encoding="utf-8",
                errors="surrogateescape",
                pax_headers={_dec(k): _dec(v) for k, v in self._glob.items()},
            )
        except _MEMBER_ERRORS as err:
            raise FormatError(
                f"layer tar: member at offset {start}: {type(err).__name__}: {err}"
            ) from err
        # The member the constructor read (tf.next() would read on past an end).
        member: tarfile.TarInfo | None = cast(Any, tf).firstmember
        if member is None:
            # Only a zero block, never handed to tarfile, makes it read none without
            # an error: whatever else did must not end the archive in silence.
            raise FormatError(f"layer tar: member at offset {start}: tarfile read no member")
        assert not replay.head, "tarfile read less than the fast path took"
        if member.issparse():
            # Never handed over on purpose (its map would go unchecked); a header the
            # fast path declines, a negative size say, still may be one.
            raise FormatError(f"layer tar: member at offset {start}: a sparse member the "
                              "tar reader does not accept")
        self._glob = {_enc(k): _enc(v) for k, v in tf.pax_headers.items()}
        self._offset = start + tf.offset
        entry = _member_entry(member, start)
        if entry is None or entry.type is not EntryType.REG:
            return entry, None
        return entry, _Slice(stream, member.size, entry.path)

    def _skip(self, pos: int, offset: int) -> None:
        """Skip to the next header at ``offset`` (TarFile.next's advance)."""
        if offset < pos:  # a negative size: tarfile would seek back
            raise FormatError(f"layer tar: next header at offset {offset} before {pos}")
        gap = offset - pos
        if self._stream.skip(gap) < gap:
            raise FormatError(f"layer tar: unexpected end of data before offset {offset}")


class TarSource:
    """Iterate an OCI layer tar (plain, gzip or zstd) as ``(Entry, DataReader | None)``.

    ``source`` is a path or a readable binary file object. With ``tee`` every
    uncompressed tar byte (up to its very end) is also written there, which is how
    a tarfs blob gets made in the same pass. The tar is read once,
    front to back; each regular file's reader must be consumed (or abandoned)
    before the iterator advances. Memory is bounded by one tar record buffer plus
    what the caller reads. Iterating twice re-opens a path source but raises
    :class:`InvalidArgument` for a file object.

    Members are read as :mod:`tarfile` reads them (same entries, malformed input a
    :class:`FormatError`), by :class:`_TarReader`, except that the archive ends
    only at a zero block or where the data ends at a header boundary: a damaged
    header or PAX record anywhere is a FormatError naming its offset, not the end
    of the archive (tarfile ends there after the first member, in silence). GNU
    sparse members are read here, not by tarfile: their maps are checked (in order,
    disjoint, inside the real size, adding up to the stored data) and neither a
    member's real size nor the holes of all of them together may exceed
    ``max_sparse_size``, whatever the headers claim.
    """

    def __init__(
        self,
        source: str | os.PathLike[str] | BinaryIO,
        *,
        tee: _Sink | None = None,
        max_sparse_size: int = tarsparse.DEFAULT_MAX_SPARSE_SIZE,
    ) -> None:
        self._source = source
        self._max_sparse_size = max_sparse_size
        self._consumed = False
        self._tee = tee
        self.compression: str | None = None

    def __iter__(self) -> Iterator[tuple[Entry, DataReader | None]]:
        if isinstance(self._source, (str, os.PathLike)):
            with open(self._source, "rb") as f:
                yield from self._iter(f)
        else:
            if self._consumed:
                raise InvalidArgument("tar stream already consumed")
            self._consumed = True
            yield from self._iter(self._source)

    def _iter(self, f: BinaryIO) -> Iterator[tuple[Entry, DataReader | None]]:
        try:
            yield from self._iter_entries(f)
        except _DECODE_ERRORS as err:
            # Decoder and tar-parser failures anywhere (header, data skip, end padding)
            # mean malformed input; consumer exceptions never pass through here.
            raise FormatError(f"layer tar: {type(err).__name__}: {err}") from err

    def _iter_entries(self, f: BinaryIO) -> Iterator[tuple[Entry, DataReader | None]]:
        head = _peek(f, 4)
        if not head:
            self.compression = None
            return  # an empty file is an empty layer (upstream's empty.tar fixture)
        with LayerStream(f, head, tee=self._tee) as stream:
            self.compression = stream.compression
            reader = _TarReader(stream, self._max_sparse_size)
            while (member := reader.next()) is not None:
                if member[0] is not None:
                    yield member  # type: ignore[misc]
            if self._tee is not None:
                stream.drain()  # the copy must be the whole tar, padding too

"""Filesystem entry sources for the RAFS builder: OCI layer tars and local directories.

Both sources produce the same :class:`Entry` model, one entry at a time, paired with
a :class:`DataReader` for regular-file data. Nothing is unpacked to disk and no file
is held in memory: the builder reads file data in chunk-size pieces while it
consumes the entry, before asking for the next one. For a tar stream that is a hard
rule (the stream cannot go back); :class:`TarSource` enforces nothing but the
reader of an entry is invalid once the iterator has advanced.

Tar layers may be plain, gzip (any number of members) or zstd (any number of
frames); the codec is detected from the magic bytes, not from the file name.
PAX extended headers supply nanosecond mtimes, long names and xattrs
(``SCHILY.xattr.*``, falling back to libarchive's base64 ``LIBARCHIVE.xattr.*``).

OCI whiteouts (``.wh.NAME`` removes NAME from lower layers, ``.wh..wh..opq`` makes the
directory opaque) are passed through as ordinary entries tagged with
:attr:`Entry.whiteout`; turning them into the overlayfs form (char 0/0 devices and
``trusted.overlay.opaque=y``) needs the parent directory, so the tree does it
(:mod:`pynydus.rafs.tree`).
"""

from __future__ import annotations

import base64
import enum
import errno
import io
import os
import stat
import tarfile
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, BinaryIO, Protocol, cast

from pynydus.errors import FormatError, InvalidArgument
from pynydus.rafs.chunker import _usable_cpus
from pynydus.rafs.layerstream import DECODE_ERRORS, LayerStream, absolute_seek
from pynydus.rafs.tarheader import (
    BLOCK,
    EXT_TYPES,
    ZERO_BLOCK,
    Header,
    apply_pax,
    cstr,
    header_damage,
    padded,
    parse_header,
    pax_records,
)

__all__ = [
    "DataReader",
    "DirSource",
    "Entry",
    "EntryType",
    "TarSource",
    "Whiteout",
    "normalize_path",
]

OCI_WHITEOUT_PREFIX = b".wh."
OCI_WHITEOUT_OPAQUE = b".wh..wh..opq"



class EntryType(enum.Enum):
    """What an entry is. HARDLINK points at an earlier path through :attr:`Entry.link`."""

    REG = "reg"
    DIR = "dir"
    SYMLINK = "symlink"
    HARDLINK = "hardlink"
    CHAR = "char"
    BLOCK = "block"
    FIFO = "fifo"
    SOCKET = "socket"


_S_IFMT_OF = {
    EntryType.REG: stat.S_IFREG,
    EntryType.HARDLINK: stat.S_IFREG,
    EntryType.DIR: stat.S_IFDIR,
    EntryType.SYMLINK: stat.S_IFLNK,
    EntryType.CHAR: stat.S_IFCHR,
    EntryType.BLOCK: stat.S_IFBLK,
    EntryType.FIFO: stat.S_IFIFO,
    EntryType.SOCKET: stat.S_IFSOCK,
}


class Whiteout(enum.Enum):
    """OCI whiteout kinds: REMOVAL for ``.wh.NAME``, OPAQUE for ``.wh..wh..opq``."""

    REMOVAL = "removal"
    OPAQUE = "opaque"


@dataclass(slots=True)
class Entry:
    """One filesystem object as found in a layer.

    ``path`` is relative, normalized, without leading ``/`` or ``./``; the root
    directory is ``b""``. ``mode`` holds only the permission bits (``0o7777``);
    the type is in ``type``. ``link`` is the symlink target (verbatim) or the
    normalized path of a hardlink's target. ``data_offset`` is the byte offset of
    the file data inside the *uncompressed* tar (tarfs needs it), else None.
    """

    path: bytes
    type: EntryType
    mode: int = 0o644
    uid: int = 0
    gid: int = 0
    mtime: int = 0
    mtime_nsec: int = 0
    size: int = 0
    link: bytes = b""
    rdev_major: int = 0
    rdev_minor: int = 0
    xattrs: dict[bytes, bytes] = field(default_factory=dict)
    data_offset: int | None = None

    @property
    def name(self) -> bytes:
        """The last path component (``b""`` for the root)."""
        return self.path.rsplit(b"/", 1)[-1]

    @property
    def parent(self) -> bytes:
        """The parent directory's path (``b""`` for top-level entries)."""
        return self.path.rsplit(b"/", 1)[0] if b"/" in self.path else b""

    @property
    def st_mode(self) -> int:
        """Full ``st_mode`` (type bits and permissions)."""
        return _S_IFMT_OF[self.type] | (self.mode & 0o7777)

    @property
    def whiteout(self) -> Whiteout | None:
        """The OCI whiteout kind this entry's name encodes, if any."""
        name = self.name
        if name == OCI_WHITEOUT_OPAQUE:
            return Whiteout.OPAQUE
        if name.startswith(OCI_WHITEOUT_PREFIX) and len(name) > len(OCI_WHITEOUT_PREFIX):
            return Whiteout.REMOVAL
        return None


class DataReader(Protocol):
    """File data of the current entry; ``read(n)`` returns at most n bytes, b"" at end.

    The result is bytes-like: a tar source hands out memoryviews of its decoded
    blocks (valid after the iterator advances, but they pin the block)."""

    def read(self, n: int = -1, /) -> bytes | memoryview: ...


def normalize_path(raw: bytes) -> bytes:
    """Normalize a layer path: strip ``/`` and ``./`` prefixes, empty and ``.`` components.

    Raises :class:`FormatError` for ``..`` components, which could escape the root.
    """
    if raw[:1] not in (b"/", b".") and b"//" not in raw and b"/." not in raw:
        # No empty, "." or ".." component, except an empty one after a trailing "/".
        return raw[:-1] if raw.endswith(b"/") else raw
    parts = [p for p in raw.split(b"/") if p not in (b"", b".")]
    if b".." in parts:
        raise FormatError(f"layer path {raw!r}: '..' component not allowed")
    return b"/".join(parts)


# --------------------------------------------------------------------------- tar
#
# Headers are parsed by pynydus.rafs.tarheader, not by tarfile (which costs ~25 µs a
# member). A member whose header chain (PAX ``x``/``g``, GNU ``L``/``K``, then the
# member's own header) parses and holds only ordinary PAX records is built here,
# applying the chain as tarfile does. Well-formed members of other kinds -- GNU
# sparse, vendor typeflags, ``hdrcharset`` -- are handed to tarfile together with
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
    if m.isreg():  # REGTYPE, AREGTYPE, CONTTYPE, GNU sparse
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
        None if m.issparse() else base + m.offset_data,
    )


# Directory read-ahead (_ReadAhead): files up to this size are read whole, at most
# this many entries ahead of the walk.
_AHEAD_MAX_FILE = 64 * 1024

# PAX and GNU long-name/long-link payloads are read into memory whole; a header that
# claims more is malformed (names are at most PATH_MAX, xattr values 64 KiB on Linux).
_EXT_MAX = 16 << 20
_CHAIN_MAX = 64 << 20
_AHEAD_ENTRIES = 512

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


# Gaps up to this size (block padding, small unread files) are skipped with one
# read; longer ones with a seek.
_SKIP_READ = 64 * 1024


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


class _TarData:
    """File data tarfile reads for a sparse member; corrupt data is a FormatError."""

    def __init__(self, f: BinaryIO, path: bytes) -> None:
        self._f = f
        self._path = path

    def read(self, n: int = -1, /) -> bytes | memoryview:
        try:
            return self._f.read(n)
        except _DECODE_ERRORS as err:
            raise FormatError(f"layer tar: data of {self._path!r}: {err}") from err


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

    def __init__(self, stream: LayerStream) -> None:
        self._stream = stream
        self._offset = 0
        self._glob: dict[bytes, bytes] = {}
        self._glob_sparse = False  # GNU.sparse.* global records: tarfile applies those

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
        if hdr[0] in EXT_TYPES or self._glob:
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
        """A member with PAX records (global or its own) or GNU long names.

        tarfile applies a chain from the inside out: the global records when it
        parses the member's own header, then each qualifying header from the one
        nearest the member to the first; each ``x`` replaces the member's PAX
        records (its own on top of the globals as they stood when it was read).
        """
        stream = self._stream
        glob = self._glob
        layers: list[tuple[bytes, bytes | dict[bytes, bytes]]] = []
        # GNU sparse global records, hdrcharset or sparse records here: tarfile reads
        # the member, once every header and record of its chain proved well-formed.
        delegate = self._glob_sparse
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
                layers.append((flag, cstr(payload)))
            else:
                try:
                    records = pax_records(payload, size)
                except ValueError as err:
                    raise FormatError(
                        f"layer tar: {_EXT_NAMES[flag]} header at offset {at}: {err}"
                    ) from err
                if records is None:
                    delegate = True
                elif flag == b"g":
                    glob = {**glob, **records}
                else:
                    layers.append((flag, {**glob, **records}))
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
                return self._delegate(chain, start)
            hdr = nxt
        if delegate:
            return self._delegate(chain, start)
        flag, name, mode, uid, gid, size, mtime_, link, major, minor, prefix = hdr
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
        for flag, value in reversed(layers):
            if isinstance(value, dict):
                name, link, size, mtime, uid, gid = apply_pax(
                    value, name, link, size, mtime, uid, gid
                )
                pax = value
                if b"size" in value:
                    offset = data + padded(size) if reg else data
            elif flag == b"L":
                name = value
            else:
                link = value
        self._glob = glob
        self._offset = offset
        entry = _entry(
            etype,
            name,
            mode,
            uid,
            gid,
            _mtime(name, pax, mtime),
            size,
            link,
            (major, minor),
            _tar_xattrs(pax) if pax else {},
            data if reg else None,
        )
        return entry, _Slice(stream, size, entry.path) if reg else None

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
        self._glob = {_enc(k): _enc(v) for k, v in tf.pax_headers.items()}
        self._glob_sparse = any(k.startswith(b"GNU.sparse.") for k in self._glob)
        self._offset = start + tf.offset
        entry = _member_entry(member, start)
        if entry is None or entry.type is not EntryType.REG:
            return entry, None
        if member.issparse():
            return entry, _TarData(cast(BinaryIO, tf.extractfile(member)), entry.path)
        return entry, _Slice(stream, member.size, entry.path)

    def _skip(self, pos: int, offset: int) -> None:
        """Skip to the next header at ``offset`` (TarFile.next's advance)."""
        if offset < pos:  # a negative size: tarfile would seek back
            raise FormatError(f"layer tar: next header at offset {offset} before {pos}")
        gap = offset - pos
        if gap <= _SKIP_READ:
            short = len(self._stream.read_view(gap)) < gap
        else:
            self._stream.seek(offset - 1)
            short = not self._stream.read(1)
        if short:
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
    of the archive (tarfile ends there after the first member, in silence).
    """

    def __init__(
        self, source: str | os.PathLike[str] | BinaryIO, *, tee: _Sink | None = None
    ) -> None:
        self._source = source
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
            reader = _TarReader(stream)
            while (member := reader.next()) is not None:
                if member[0] is not None:
                    yield member  # type: ignore[misc]
            if self._tee is not None:
                stream.drain()  # the copy must be the whole tar, padding too


# --------------------------------------------------------------------------- directory


class _LazyFile:
    """Opens the file on first read and closes it at EOF, so walking holds no fds.

    Plain ``os.read`` on a descriptor: a file object's buffering only adds a copy
    and a few microseconds per file, which a 50,000-file layer notices."""

    def __init__(self, path: bytes) -> None:
        self._path = path
        self._fd = -1
        self._done = False

    def read(self, n: int = -1, /) -> bytes:
        if self._done:
            return b""
        if self._fd < 0:
            self._fd = os.open(self._path, os.O_RDONLY | os.O_CLOEXEC)
        if n < 0:
            parts = []
            while data := os.read(self._fd, 1 << 20):
                parts.append(data)
            self.close()
            return b"".join(parts)
        data = os.read(self._fd, n)
        if not data:
            self.close()
        return data

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        self._done = True


class _Prefetched:
    """File data the read-ahead thread already read (small files only)."""

    def __init__(self, data: bytes) -> None:
        self._data = memoryview(data)
        self._pos = 0

    def read(self, n: int = -1, /) -> bytes | memoryview:
        end = len(self._data) if n < 0 else self._pos + n
        out = self._data[self._pos : end]
        self._pos += len(out)
        return out


class _NoReadAhead:
    """What :class:`_ReadAhead` offers, doing nothing (the walk reads every file itself)."""

    def take(self, path: bytes) -> None:
        return None

    def stop(self) -> None:
        pass


class _ReadAhead:
    """Reads a directory walk's small files ahead of it, on a thread of its own.

    The thread walks the tree in :class:`DirSource`'s order (names sorted, depth
    first) and reads every regular file of at most :data:`_AHEAD_MAX_FILE` bytes;
    larger files get their first MiB requested from the kernel
    (``posix_fadvise(WILLNEED)``, asynchronous). The walk then finds inodes, directory
    blocks and file data in memory: on a cold cache the disk serves many requests at
    once instead of one small file at a time, and the open/read/close system calls
    of small files run beside the builder instead of in it. It stays at most
    :data:`_AHEAD_ENTRIES` entries ahead (so at most ~32 MiB of data). Everything is
    best effort: a file it could not read is read by the walk itself.
    """

    def __init__(self, root: bytes) -> None:
        self._root = root
        self._ready: dict[bytes, bytes] = {}
        self._taken = 0  # entries the walk has passed; data for those is not kept
        self._room = threading.Semaphore(_AHEAD_ENTRIES)
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name="dir-read-ahead", daemon=True)
        self._thread.start()

    def take(self, path: bytes) -> bytes | None:
        """The data read ahead for ``path`` (once), or None; one call per walked entry."""
        self._taken += 1
        self._room.release()
        return self._ready.pop(path, None)

    def stop(self) -> None:
        self._done.set()
        self._room.release()
        self._thread.join()
        self._ready.clear()

    def _run(self) -> None:
        stack = [self._root]
        index = 0  # position of the entry in walk order (1-based, as _taken counts)
        try:
            while stack and not self._done.is_set():
                with os.scandir(stack.pop()) as it:
                    entries = sorted(it, key=lambda e: e.name)
                subdirs = []
                for e in entries:
                    while not self._room.acquire(timeout=0.5):
                        if self._done.is_set():
                            return
                    if self._done.is_set():
                        return
                    index += 1
                    if e.is_dir(follow_symlinks=False):
                        subdirs.append(e.path)
                    elif e.is_file(follow_symlinks=False) and index > self._taken:
                        self._read(e.path, index)
                stack.extend(reversed(subdirs))
        except OSError:
            return  # the walk itself will meet (and report) whatever went wrong

    def _read(self, path: bytes, index: int) -> None:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOATIME)
        except OSError:
            try:
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)  # O_NOATIME needs ownership
            except OSError:
                return
        try:
            data = os.read(fd, _AHEAD_MAX_FILE + 1)
            if len(data) <= _AHEAD_MAX_FILE:
                if index > self._taken:  # else the walk went past it meanwhile
                    self._ready[path] = data
            else:
                os.posix_fadvise(fd, 0, 1 << 20, os.POSIX_FADV_WILLNEED)
        except OSError:
            pass
        finally:
            os.close(fd)


def _read_xattrs(path: bytes) -> dict[bytes, bytes]:
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError as err:
        if err.errno in (errno.ENOTSUP, errno.EPERM):
            return {}
        raise
    out: dict[bytes, bytes] = {}
    for name in names:
        try:
            out[_enc(name)] = os.getxattr(path, name, follow_symlinks=False)
        except OSError as err:
            if err.errno in (errno.ENODATA, errno.ENOTSUP):
                continue
            raise
    return out


class DirSource:
    """Walk a local directory as ``(Entry, DataReader | None)``, root first.

    Children are visited in byte order of their names, parents before children.
    A non-directory seen a second time (same ``st_dev``/``st_ino``) is reported as
    HARDLINK to the first path. Sparse files read as zeros (dedup collapses the
    zero chunks). ``xattrs=False`` skips reading extended attributes.

    ``first`` lists normalized paths (files, or directories meaning every regular
    file below them) whose entries come right after the root, so that their data
    leads the blob, as upstream's directory builder does for prefetch files: a
    prefetch then reads one contiguous range. Their parent directories follow later
    in walk order (the tree fills in implied parents).
    """

    def __init__(
        self,
        root: str | os.PathLike[str] | bytes,
        *,
        xattrs: bool = True,
        first: Sequence[bytes] = (),
    ) -> None:
        self._root = os.fsencode(root)
        self._xattrs = xattrs
        self._first = [p for p in first if p]

    def __iter__(self) -> Iterator[tuple[Entry, DataReader | None]]:
        st = os.lstat(self._root)
        if not stat.S_ISDIR(st.st_mode):
            raise InvalidArgument(f"build source {self._root!r}: not a directory")
        seen: dict[tuple[int, int], bytes] = {}
        yield self._entry(self._root, b"", st, seen), None
        early: set[bytes] = set()
        for rel in self._early_files():
            if rel in early:
                continue
            early.add(rel)
            abs_path = os.path.join(self._root, rel)
            entry = self._entry(abs_path, rel, os.lstat(abs_path), seen)
            yield entry, _LazyFile(abs_path) if entry.type == EntryType.REG else None
        # On one CPU the read-ahead thread's own walk is pure overhead: nothing runs beside it.
        ahead: _ReadAhead | _NoReadAhead = _ReadAhead(self._root) if _usable_cpus() > 1 \
            else _NoReadAhead()
        try:
            stack: list[bytes] = [b""]
            while stack:
                rel_dir = stack.pop()
                abs_dir = os.path.join(self._root, rel_dir) if rel_dir else self._root
                with os.scandir(abs_dir) as it:
                    names = sorted(e.name for e in it)
                subdirs: list[bytes] = []
                for name in names:
                    rel = rel_dir + b"/" + name if rel_dir else name
                    abs_path = os.path.join(self._root, rel)
                    data = ahead.take(abs_path)
                    if rel in early:
                        continue
                    cst = os.lstat(abs_path)
                    entry = self._entry(abs_path, rel, cst, seen)
                    reader: DataReader | None = None
                    if entry.type == EntryType.REG:
                        reader = _LazyFile(abs_path) if data is None else _Prefetched(data)
                    yield entry, reader
                    if entry.type == EntryType.DIR:
                        subdirs.append(rel)
                stack.extend(reversed(subdirs))
        finally:
            ahead.stop()

    def _early_files(self) -> Iterator[bytes]:
        """Regular files named by ``first`` (directories expanded, sorted); missing ones skipped."""
        for rel in self._first:
            abs_path = os.path.join(self._root, rel)
            try:
                st = os.lstat(abs_path)
            except FileNotFoundError:
                continue
            if stat.S_ISREG(st.st_mode):
                yield rel
            elif stat.S_ISDIR(st.st_mode):
                for dirpath, dirnames, filenames in os.walk(abs_path):
                    dirnames.sort()
                    for name in sorted(filenames):
                        p = os.path.join(dirpath, name)
                        if stat.S_ISREG(os.lstat(p).st_mode):
                            yield os.path.relpath(p, self._root)

    def _entry(
        self, abs_path: bytes, rel: bytes, st: os.stat_result, seen: dict[tuple[int, int], bytes]
    ) -> Entry:
        m = st.st_mode
        e = Entry(
            path=rel,
            type=EntryType.REG,
            mode=stat.S_IMODE(m),
            uid=st.st_uid,
            gid=st.st_gid,
            mtime=st.st_mtime_ns // 1_000_000_000,
            mtime_nsec=st.st_mtime_ns % 1_000_000_000,
            xattrs=_read_xattrs(abs_path) if self._xattrs else {},
        )
        if not stat.S_ISDIR(m) and st.st_nlink > 1:
            key = (st.st_dev, st.st_ino)
            first = seen.get(key)
            if first is not None:
                e.type = EntryType.HARDLINK
                e.link = first
                return e
            seen[key] = rel
        if stat.S_ISREG(m):
            e.size = st.st_size
        elif stat.S_ISDIR(m):
            e.type = EntryType.DIR
        elif stat.S_ISLNK(m):
            e.type = EntryType.SYMLINK
            e.link = os.readlink(abs_path)
        elif stat.S_ISCHR(m) or stat.S_ISBLK(m):
            e.type = EntryType.CHAR if stat.S_ISCHR(m) else EntryType.BLOCK
            e.rdev_major, e.rdev_minor = os.major(st.st_rdev), os.minor(st.st_rdev)
        elif stat.S_ISFIFO(m):
            e.type = EntryType.FIFO
        elif stat.S_ISSOCK(m):
            e.type = EntryType.SOCKET
        else:
            raise FormatError(f"build source {abs_path!r}: unsupported file type {m:o}")
        return e

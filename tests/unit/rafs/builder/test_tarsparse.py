"""GNU sparse members: maps checked, real sizes bounded, every fault a FormatError
naming its offset, and a hostile 10 KB tar refused in well under a second.

Good maps of every format read as tarfile reads them (test_tarparse compares the
three common ones with tarfile); here the formats tarfile reads differently or not
at all (PAX 0.0, extension blocks, base-256 real sizes) and the hostile inputs.
"""

from __future__ import annotations

import io
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

from pynydus.errors import FormatError
from pynydus.rafs.format import tarsparse
from pynydus.rafs.source import EntryType, TarSource

HUGE = 1 << 50
END = bytes(1024)


def block(name: bytes, flag: bytes, size: int, *, sparse: list[tuple[int, int]] | None = None,
          real: bytes | None = None, extended: bool = False) -> bytes:
    """A header block; for ``S`` up to four sparse slots and the real size field."""
    h = bytearray(512)
    h[0 : len(name)] = name
    h[100:108] = b"0000644\0"
    h[108:116] = b"0000000\0"
    h[116:124] = b"0000000\0"
    h[124:136] = b"%011o\0" % size
    h[136:148] = b"00000000000\0"
    h[156:157] = flag
    h[257:265] = b"ustar  \0" if flag == b"S" else b"ustar\x0000"
    for i, (off, n) in enumerate(sparse or []):
        h[386 + 24 * i : 410 + 24 * i] = b"%011o\0%011o\0" % (off, n)
    h[482] = extended
    if real is not None:
        assert len(real) == 12
        h[483:495] = real
    h[148:156] = b" " * 8
    h[148:156] = b"%06o\0 " % sum(h)
    return bytes(h)


def extension(slots: list[tuple[int, int]], more: bool = False) -> bytes:
    b = bytearray(512)
    for i, (off, n) in enumerate(slots):
        b[24 * i : 24 * i + 24] = b"%011o\0%011o\0" % (off, n)
    b[504] = more
    return bytes(b)


def pad(data: bytes) -> bytes:
    return data + bytes(-len(data) % 512)


def rec(key: bytes, value: bytes) -> bytes:
    body = b" " + key + b"=" + value + b"\n"
    n = len(body) + 1
    while len(str(n)) + len(body) != n:
        n += 1
    return str(n).encode() + body


def pax(*records: tuple[bytes, bytes], flag: bytes = b"x") -> bytes:
    data = b"".join(rec(k, v) for k, v in records)
    return block(b"pax", flag, len(data)) + pad(data)


def pax10(real: int, map_text: bytes, data: bytes, name: bytes = b"f") -> bytes:
    body = pad(map_text) + data
    return (pax((b"GNU.sparse.major", b"1"), (b"GNU.sparse.minor", b"0"),
                (b"GNU.sparse.name", name), (b"GNU.sparse.realsize", str(real).encode()))
            + block(b"GNUSparseFile.0/" + name, b"0", len(body)) + pad(body))


def read_all(raw: bytes, **kw: int) -> list[tuple[bytes, int, bytes | None]]:
    out = []
    for entry, reader in TarSource(io.BytesIO(raw), **kw):
        data = None
        if reader is not None:
            parts = []
            while piece := reader.read(1 << 20):
                parts.append(bytes(piece))
            data = b"".join(parts)
        out.append((entry.path, entry.size, data))
    return out


def refused(raw: bytes, match: str, **kw: int) -> str:
    t0 = time.monotonic()
    with pytest.raises(FormatError, match=match) as err:
        read_all(raw, **kw)
    assert time.monotonic() - t0 < 1.0
    return str(err.value)


# --------------------------------------------------------------------------- huge real sizes

HOSTILE = {
    "pax-0.0": pax((b"GNU.sparse.size", str(HUGE).encode()), (b"GNU.sparse.numblocks", b"1"),
                   (b"GNU.sparse.offset", b"0"), (b"GNU.sparse.numbytes", b"512"),
                   (b"GNU.sparse.name", b"big")) + block(b"big", b"0", 512) + b"x" * 512,
    "pax-0.1": pax((b"GNU.sparse.size", str(HUGE).encode()), (b"GNU.sparse.map", b"0,512"),
                   (b"path", b"big")) + block(b"big", b"0", 512) + b"x" * 512,
    "pax-1.0": pax10(HUGE, b"1\n0\n512\n", b"x" * 512, b"big"),
    "gnu-base256": block(b"big", b"S", 512, sparse=[(0, 512)],
                         real=b"\x80" + HUGE.to_bytes(11, "big")) + b"x" * 512,
}


@pytest.mark.parametrize("raw", HOSTILE.values(), ids=HOSTILE.keys())
def test_a_real_size_past_the_limit_is_refused_before_any_data_is_read(raw: bytes) -> None:
    message = refused(raw + END, r"sparse member at offset \d+: real size \d+ exceeds the limit")
    assert str(tarsparse.DEFAULT_MAX_SPARSE_SIZE) in message


def test_the_limit_is_configurable() -> None:
    raw = block(b"f", b"S", 512, sparse=[(1 << 20, 512)], real=b"%011o\0" % (2 << 20))
    raw += b"y" * 512 + END
    refused(raw, "exceeds the limit of 1048576 bytes", max_sparse_size=1 << 20)
    [(path, size, data)] = read_all(raw, max_sparse_size=2 << 20)
    assert (path, size) == (b"f", 2 << 20)
    assert data == bytes(1 << 20) + b"y" * 512 + bytes((1 << 20) - 512)


def test_the_holes_of_all_sparse_members_share_the_limit() -> None:
    """Each member under the limit, together over it: a 10 KB tar of ten members each
    claiming the limit would have cost ten times the zeros one may."""
    limit, real = 4 << 20, 1 << 20
    member = [block(b"f%d" % i, b"S", 512, sparse=[(0, 512)], real=b"%011o\0" % real)
              + b"x" * 512 for i in range(10)]
    raw = b"".join(member) + END
    assert len(raw) < 12 << 10
    # four members' holes (4 x (1 MiB - 512)) fit; the fifth, at 4 x 1024, does not
    refused(raw, r"sparse member at offset 4096: the holes of the archive's sparse "
            r"members add up to more than the limit of 4194304 bytes", max_sparse_size=limit)
    got = read_all(b"".join(member[:4]) + END, max_sparse_size=limit)
    assert [(p, n) for p, n, _ in got] == [(b"f%d" % i, real) for i in range(4)]
    assert all(d == b"x" * 512 + bytes(real - 512) for _, _, d in got)


def test_a_hostile_tar_fails_the_build_cli_fast(tmp_path: Path) -> None:
    tar = tmp_path / "big.tar"
    tar.write_bytes(HOSTILE["gnu-base256"] + END)
    t0 = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "pynydus.cli.main", "image", "build", "--bootstrap",
         str(tmp_path / "boot"), "--blob-dir", str(tmp_path), "--progress", "quiet", str(tar)],
        check=False, capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 2, proc.stderr
    assert "sparse member at offset 0: real size 1125899906842624 exceeds" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert time.monotonic() - t0 < 30  # interpreter start-up on a busy machine
    assert not (tmp_path / "boot").exists()


# --------------------------------------------------------------------------- malformed maps

BAD_10_MAPS = {
    "no-newline": (b"3\n0\n512", r"map at offset 2560: the map runs past the member's"),
    "unpaired": (b"1\n0\n", r"map at offset 2560: the map runs past"),
    "letters": (b"1\nzero\n512\n", (r"map at offset 2560: sparse map at byte 2: offset b'zero' "
                                   r"is no decimal number")),
    "negative": (b"1\n-5\n512\n", r"map at offset 2560: sparse map at byte 2: offset b'-5'"),
    "signed-count": (b"+1\n0\n512\n", r"map at offset 2560: sparse map at byte 0: extent count"),
    "huge-count": (b"99999999999\n", (r"map at offset 2560: sparse map at byte 0: 99999999999 "
                                      r"extents cannot fit")),
    "blank-count": (b"\n", (r"map at offset 2560: sparse map at byte 0: extent count b'' is no "
                           r"decimal")),
}


@pytest.mark.parametrize("case", BAD_10_MAPS.values(), ids=BAD_10_MAPS.keys())
def test_a_malformed_1_0_map_is_a_format_error_naming_its_offset(case: tuple[bytes, str]) -> None:
    text, match = case
    first = block(b"a", b"0", 1) + pad(b"1")
    refused(first + pax10(1024, text, b"x" * 512) + END,
            r"^layer tar: sparse member at offset 1024: " + match)


def test_a_1_0_map_cut_short_by_the_archive_end_names_the_byte() -> None:
    raw = pax10(1024, b"1\n0\n512\n", b"x" * 512)
    refused(raw[: 512 * 3 + 100], r"sparse member at offset 0: map at offset 1536: cut short")


BAD_MAPS = {
    "overlap": ([(0, 512), (256, 512)], 2048, "sparse extent 1 at 256 overlaps or precedes"),
    "out-of-order": ([(1024, 512), (0, 512)], 2048, "sparse extent 1 at 0 overlaps"),
    "past-real": ([(0, 512), (1024, 512)], 1500, (r"sparse extent 1 \(1024\+512\) ends past the "
                                                 "real size 1500")),
    "too-little": ([(0, 256)], 2048, "sparse extents hold 256 bytes but the member stores 1024"),
    "too-much": ([(0, 1024), (1024, 1024)], 4096, "hold 2048 bytes but the member stores 1024"),
}


@pytest.mark.parametrize("case", BAD_MAPS.values(), ids=BAD_MAPS.keys())
@pytest.mark.parametrize("fmt", ["gnu", "pax-0.1", "pax-1.0"])
def test_maps_that_tarfile_would_loop_on_or_misread_are_refused(
    case: tuple[list[tuple[int, int]], int, str], fmt: str
) -> None:
    extents, real, match = case
    data = b"z" * 1024
    if fmt == "gnu":
        raw = block(b"f", b"S", 1024, sparse=extents, real=b"%011o\0" % real) + data
    elif fmt == "pax-0.1":
        text = b",".join(b"%d,%d" % e for e in extents)
        raw = pax((b"GNU.sparse.map", text), (b"GNU.sparse.size", b"%d" % real)) + block(
            b"f", b"0", 1024) + data
    else:
        text = b"%d\n" % len(extents) + b"".join(b"%d\n%d\n" % e for e in extents)
        raw = pax10(real, text, data)
    refused(raw + END, r"sparse member at offset 0: .*" + match)


def test_sparse_records_in_a_global_header_are_refused() -> None:
    raw = pax((b"GNU.sparse.map", b"0,1"), (b"GNU.sparse.size", b"9"), flag=b"g")
    refused(raw + block(b"f", b"0", 1) + pad(b"1") + END,
            "PAX global header at offset 0: GNU.sparse records apply to one member only")


@pytest.mark.parametrize("flag", [b"5", b"2", b"V", b"S"])
def test_sparse_records_before_a_member_that_is_no_plain_file_are_refused(flag: bytes) -> None:
    raw = pax((b"GNU.sparse.map", b"0,512"), (b"GNU.sparse.size", b"512")) + block(b"f", flag, 0)
    refused(raw + END, r"member at offset 0: GNU.sparse records for a")


def test_old_gnu_slots_that_are_no_numbers_are_refused() -> None:
    h = bytearray(block(b"f", b"S", 512, sparse=[(0, 512)], real=b"%011o\0" % 512))
    h[398:410] = b"12x45678901\0"  # the first slot's length
    h[148:156] = b" " * 8
    h[148:156] = b"%06o\0 " % sum(h)
    refused(bytes(h) + b"a" * 512 + END,
            r"sparse member at offset 0: GNU sparse header: sparse length at byte 398")


def test_negative_base256_real_size_is_refused() -> None:
    raw = block(b"f", b"S", 512, sparse=[(0, 512)], real=b"\xff" * 12) + b"a" * 512
    refused(raw + END, r"real size at byte 483 is negative")


# --------------------------------------------------------------------------- good maps


def test_extension_blocks_continue_the_old_gnu_map() -> None:
    slots = [(i * 1024, 512) for i in range(4)]
    ext1 = [(4096 + i * 1024, 512) for i in range(21)]
    ext2 = [(4096 + 21 * 1024, 512)]
    stored = 512 * 26
    data = bytes(range(256)) * (stored // 256)
    real = 4096 + 22 * 1024
    raw = (block(b"f", b"S", stored, sparse=slots, real=b"%011o\0" % real, extended=True)
           + extension(ext1, more=True) + extension(ext2) + data
           + block(b"after", b"0", 3) + pad(b"end") + END)
    got = read_all(raw)
    want = bytearray(real)
    for i, (off, n) in enumerate(slots + ext1 + ext2):
        want[off : off + n] = data[i * 512 : i * 512 + n]
    assert got == [(b"f", real, bytes(want)), (b"after", 3, b"end")]
    with tarfile.open(fileobj=io.BytesIO(raw)) as tf:  # the reference agrees
        member = tf.getmember("f")
        assert tf.extractfile(member).read() == bytes(want)  # type: ignore[union-attr]


def test_pax_0_0_pairs_are_read_in_order() -> None:
    raw = pax((b"GNU.sparse.size", b"5000"), (b"GNU.sparse.numblocks", b"2"),
              (b"GNU.sparse.offset", b"100"), (b"GNU.sparse.numbytes", b"3"),
              (b"GNU.sparse.offset", b"4000"), (b"GNU.sparse.numbytes", b"2"),
              (b"GNU.sparse.name", b"zero-zero"))
    raw += block(b"GNUSparseFile/x", b"0", 5) + pad(b"abcde") + END
    want = bytes(100) + b"abc" + bytes(3897) + b"de" + bytes(998)
    assert read_all(raw) == [(b"zero-zero", 5000, want)]
    with tarfile.open(fileobj=io.BytesIO(raw)) as tf:
        assert tf.extractfile("zero-zero").read() == want  # type: ignore[union-attr]


@pytest.mark.parametrize("pairs,match", [
    ([(b"GNU.sparse.offset", b"1")], "GNU.sparse.offset without GNU.sparse.numbytes at the end"),
    ([(b"GNU.sparse.numbytes", b"1")], r"PAX record at byte \d+: GNU.sparse.numbytes without"),
    ([(b"GNU.sparse.offset", b"1"), (b"GNU.sparse.offset", b"2")], "offset without"),
    ([(b"GNU.sparse.offset", b"0x10"), (b"GNU.sparse.numbytes", b"1")], "no decimal number"),
])
def test_malformed_pax_0_0_pairs_are_refused(pairs: list[tuple[bytes, bytes]], match: str) -> None:
    raw = pax((b"GNU.sparse.size", b"10"), *pairs) + block(b"f", b"0", 1) + pad(b"1") + END
    refused(raw, r"sparse member at offset 0: .*" + match)


def test_numblocks_smaller_than_the_map_is_refused() -> None:
    raw = pax((b"GNU.sparse.size", b"4000"), (b"GNU.sparse.numblocks", b"1"),
              (b"GNU.sparse.map", b"0,1,2000,1")) + block(b"f", b"0", 2) + pad(b"ab") + END
    refused(raw, "GNU.sparse.numblocks 1 but the map has 2 extents")


def test_global_records_apply_to_sparse_members() -> None:
    raw = pax((b"mtime", b"77.5"), (b"SCHILY.xattr.user.g", b"G"), flag=b"g")
    raw += block(b"f", b"S", 512, sparse=[(512, 512)], real=b"%011o\0" % 1024) + b"q" * 512
    raw += END
    [(entry, _reader)] = list(TarSource(io.BytesIO(raw)))
    assert (entry.mtime, entry.mtime_nsec, entry.xattrs) == (77, 500_000_000, {b"user.g": b"G"})
    assert entry.type is EntryType.REG and entry.data_offset is None


def test_hdrcharset_beside_sparse_records_keeps_names_as_bytes() -> None:
    raw = pax((b"hdrcharset", b"BINARY"), (b"GNU.sparse.map", b"0,2"),
              (b"GNU.sparse.size", b"2"), (b"GNU.sparse.name", b"n\xff"))
    raw += block(b"x", b"0", 2) + pad(b"hi") + END
    assert read_all(raw) == [(b"n\xff", 2, b"hi")]


def test_an_unread_sparse_member_is_skipped_whole() -> None:
    raw = pax10(3000, b"2\n0\n512\n2048\n512\n", b"A" * 512 + b"B" * 512)
    raw += block(b"next", b"0", 4) + pad(b"tail") + END
    assert [(e.path, e.size) for e, _ in TarSource(io.BytesIO(raw))] == [(b"f", 3000),
                                                                         (b"next", 4)]


def test_a_sparse_member_whose_data_is_cut_reads_short_then_fails() -> None:
    raw = block(b"f", b"S", 1024, sparse=[(0, 512), (2048, 512)], real=b"%011o\0" % 3000)
    raw += b"A" * 512 + b"B" * 100
    entries = iter(TarSource(io.BytesIO(raw)))
    entry, reader = next(entries)
    assert reader is not None and (entry.path, entry.size) == (b"f", 3000)
    data = b""
    while piece := reader.read(700):
        data += piece
    assert data == b"A" * 512 + bytes(1536) + b"B" * 100  # the builder reports the size
    with pytest.raises(FormatError, match="unexpected end of data before offset 1536"):
        next(entries)

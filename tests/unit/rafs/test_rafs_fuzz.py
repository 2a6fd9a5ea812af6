"""Mutated bootstraps must fail with FormatError (or read fine): no other exception,
no hang, no huge allocation.

Inputs: the two upstream fixtures and a synthetic v6 image with the features the
fixtures lack (xattrs, devices, inline/multi-block dirs, hard links).  Mutations
are deterministic (fixed seed): truncations, bit flips, and "interesting" integer
overwrites, biased towards the headers and the metadata actually reached.

``PYNYDUS_RAFS_FUZZ_CASES`` sets the number of cases per input (default 300);
bench/ or a nightly job can raise it.  Each case runs under a SIGALRM watchdog.
"""

from __future__ import annotations

import os
import random
import signal
import stat
import struct
import time
from collections.abc import Callable, Iterator
from types import FrameType

import pytest
import synth_v5 as S5
import synth_v6 as S

from pynydus.errors import FormatError, NotFound
from pynydus.rafs.format import BlobFeatures, Compressor, Digester, compress
from pynydus.rafs.format import blobmeta as M
from pynydus.rafs.read import BlobInfo, bootstrap_from_bytes
from tests.harness.paths import FIXTURES as SHARED_FIXTURES

FIXTURES = SHARED_FIXTURES / "snapshotter-testdata"
CASES = int(os.environ.get("PYNYDUS_RAFS_FUZZ_CASES", "300"))
#: Entries of the tree exercised per case; enough to reach every inode of the
#: synthetic image and the hot part of the fixtures without making a case slow.
MAX_ENTRIES = int(os.environ.get("PYNYDUS_RAFS_FUZZ_ENTRIES", "400"))
CASE_DEADLINE_S = 10.0

INTERESTING = [
    0,
    1,
    2,
    7,
    8,
    11,
    12,
    0x7F,
    0x80,
    0xFF,
    0x100,
    0xFFF,
    0x1000,
    0xFFFF,
    0x10000,
    0x7FFF_FFFF,
    0x8000_0000,
    0xFFFF_FFFF,
    1 << 32,
    1 << 40,
    (1 << 63) - 1,
    (1 << 64) - 1,
]


def synthetic() -> bytes:
    root = S.d()
    root.children[b"a"] = S.d(
        children={
            b"x\xff\xfe": S.f(
                5000,
                xattrs=[
                    (b"user.k", b"v"),
                    (b"security.selinux", b"ctx\0"),
                    (b"system.posix_acl_access", b"\x02\0\0\0"),
                ],
            ),
            b"fifo": S.Node(stat.S_IFIFO | 0o644),
            b"chr": S.Node(stat.S_IFCHR | 0o600, rdev=0x0501),
        }
    )
    big = S.d()
    for i in range(300):
        big.children[b"f%04d" % i] = S.f(i * 97)
    root.children[b"big"] = big
    root.children[b"long"] = S.ln(b"t" * 4096)
    root.children[b"short"] = S.ln(b"/a/fifo")
    h = S.f(3 << 20)
    root.children[b"h1"] = h
    big.children[b"h2"] = h
    return S.build(root, prefetch=[b"/a"]).data


def synthetic_v5(files: int = 60) -> bytes:
    """A v5 image with every kind of entry and ``files`` regular files in one directory
    (the fuzz seed has 4: each entry walked costs every input, and 60 cover no more)."""
    root = S5.Node(stat.S_IFDIR | 0o755)
    shared = S5.Node(stat.S_IFREG | 0o644, data_size=5)
    sub = S5.Node(stat.S_IFDIR | 0o755, xattrs=[(b"user.x", b"y")])
    for i in range(files):
        sub.children[b"f%02d" % i] = S5.Node(stat.S_IFREG | 0o644, data_size=i * 1000)
    sub.children[b"ln"] = S5.Node(stat.S_IFLNK | 0o777, target=b"f01")
    sub.children[b"dev"] = S5.Node(stat.S_IFBLK | 0o600, rdev=0x0801)
    sub.children[b"hl"] = shared
    root.children[b"sub"] = sub
    root.children[b"hl"] = shared
    root.children[b"holes"] = S5.Node(
        stat.S_IFREG | 0o644,
        data_size=3 << 20,
        chunk_spans=[(1 << 20, 10)],
        xattrs=[(b"user.a", b"b")],
    )
    return S5.build(root)[0]


def inputs() -> dict[str, bytes]:
    out = {"synthetic-v6": synthetic(), "synthetic-v5": synthetic_v5()}
    for name, rel in (
        ("fixture-v6", "v6-bootstrap-chunk-pos-438272/image/image.boot"),
        ("fixture-v5", "v5-bootstrap-file-size-736032/image/image.boot"),
    ):
        p = FIXTURES / rel
        if p.exists():
            out[name] = p.read_bytes()
    return out


INPUTS = inputs()


def exercise(data: bytes) -> None:
    """Use every read operation on whatever the bootstrap contains."""
    bs = bootstrap_from_bytes(data)
    for ino in bs.prefetch_list:
        bs.stat(ino)
    for blob in bs.blobs:
        assert len(blob.blob_id) > 0
    for n, (_path, ino) in enumerate(bs.walk(), start=1):
        st = bs.stat(ino)
        bs.xattrs(ino)
        if st.is_symlink:
            bs.readlink(ino)
        elif st.is_reg:
            bs.chunks(ino)
            bs.map_read(ino, max(0, st.size // 2 - 100), 1 << 21)
        elif st.is_dir:
            for entry in bs.readdir(ino):
                try:
                    assert bs.lookup(ino, entry.name) >= 0
                except NotFound:
                    pass  # an unsorted directory (rejected on full readdir) may hide names
                break
        if n >= MAX_ENTRIES:
            break
    bs.close()


def mutations(data: bytes, seed: int) -> Iterator[tuple[str, bytes]]:
    rng = random.Random(seed)
    size = len(data)
    # Offsets actually decoded (headers, tables, root inode, first dir blocks) get most flips.
    hot = [(0, min(size, 8192)), (min(size, 8192), min(size, 65536)), (0, size)]
    for i in range(CASES):
        kind = i % 5
        buf = bytearray(data)
        if kind == 0:
            cut = rng.randrange(0, size)
            if rng.random() < 0.5:
                cut -= cut % 4096
            yield f"truncate@{cut}", bytes(buf[:cut])
            continue
        lo, hi = hot[rng.randrange(3)] if kind != 4 else (0, size)
        if kind in (1, 4):
            for _ in range(rng.randint(1, 8)):
                off = rng.randrange(lo, hi)
                buf[off] ^= 1 << rng.randrange(8)
            yield f"flip@{lo}-{hi}", bytes(buf)
        elif kind == 2:
            width = rng.choice((1, 2, 4, 8))
            off = rng.randrange(lo, max(lo + 1, hi - width))
            value = rng.choice(INTERESTING) & ((1 << (8 * width)) - 1)
            buf[off : off + width] = value.to_bytes(width, "little")
            yield f"int{width * 8}@{off}={value:#x}", bytes(buf)
        else:
            off = rng.randrange(lo, hi)
            n = rng.randint(1, 64)
            buf[off : off + n] = rng.randbytes(n)
            yield f"garbage@{off}+{n}", bytes(buf)


class _Deadline(Exception):
    pass


def _with_deadline(fn: Callable[[], None], seconds: float) -> None:
    def on_alarm(signum: int, frame: FrameType | None) -> None:
        raise _Deadline()

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        fn()
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


@pytest.mark.parametrize("name", sorted(INPUTS))
def test_mutated_bootstraps_fail_only_with_format_error(name: str) -> None:
    data = INPUTS[name]
    exercise(data)  # the unmutated input reads cleanly
    outcomes = {"ok": 0, "format_error": 0}
    slowest = 0.0
    for label, mutated in mutations(data, seed=sum(name.encode())):
        t0 = time.perf_counter()
        try:
            _with_deadline(lambda m=mutated: exercise(m), CASE_DEADLINE_S)  # type: ignore[misc]
            outcomes["ok"] += 1
        except FormatError as err:
            assert " at offset " in str(err), str(err)  # every message names field and offset
            outcomes["format_error"] += 1
        except _Deadline:
            pytest.fail(f"{name} {label}: no result within {CASE_DEADLINE_S}s")
        except Exception as err:  # noqa: BLE001 - the point of the test
            pytest.fail(f"{name} {label}: {type(err).__name__}: {err}")
        slowest = max(slowest, time.perf_counter() - t0)
    assert outcomes["format_error"] > 0
    print(f"{name}: {outcomes}, slowest case {slowest:.3f}s")


def test_mutation_inputs_are_deterministic() -> None:
    data = INPUTS["synthetic-v6"]
    a = [m for _, m in zip(range(20), mutations(data, 7))]
    b = [m for _, m in zip(range(20), mutations(data, 7))]
    assert a == b
    assert struct.unpack_from("<I", data, 1024)[0] == 0xE0F5E1E2


def _blob_meta_inputs() -> list[tuple[str, bytes, BlobInfo, bool]]:
    """(label, bytes, blob, cached?) for a compressed V1 array and a cached V2 one."""
    v1 = [M.BlobChunkInfo(i * 3000, 3000, i * 4096, 4000, 1) for i in range(64)]
    ci = M.pack_chunk_info_array(v1, v2=False)
    packed, _ = compress(ci, Compressor.ZSTD)
    b1 = BlobInfo(
        0,
        "d" * 64,
        Compressor.ZSTD,
        Digester.BLAKE3,
        1 << 20,
        64,
        64 * 3000,
        64 * 4096,
        features=int(BlobFeatures.ALIGNED),
        ci_compressor=Compressor.ZSTD,
        ci_offset=64 * 3000,
        ci_compressed_size=len(packed),
        ci_uncompressed_size=len(ci),
    )
    h1 = M.BlobCompressionContextHeader(
        features=b1.features,
        ci_compressor=Compressor.ZSTD,
        ci_entries=64,
        ci_offset=b1.ci_offset,
        ci_compressed_size=len(packed),
        ci_uncompressed_size=len(ci),
    )
    v2 = [M.BlobChunkInfo(i * 10, 10, i * 4096, 100, 0x3, (i % 4) << 32 | 7) for i in range(40)]
    ctx = b"".join(M.ZranContext(i, i, 0, 10, 100, 0, 0, 0).pack() for i in range(4))
    ci2 = M.pack_chunk_info_array(v2, v2=True) + ctx
    f2 = int(
        BlobFeatures.ALIGNED
        | BlobFeatures.CHUNK_INFO_V2
        | BlobFeatures.ZRAN
        | BlobFeatures.SEPARATE
    )
    b2 = BlobInfo(
        1,
        "e" * 64,
        Compressor.GZIP,
        Digester.SHA256,
        1 << 20,
        40,
        400,
        40 * 4096,
        features=f2,
        ci_compressor=Compressor.NONE,
        ci_offset=0,
        ci_compressed_size=len(ci2),
        ci_uncompressed_size=len(ci2),
    )
    h2 = M.BlobCompressionContextHeader(
        features=f2,
        ci_entries=40,
        ci_compressed_size=len(ci2),
        ci_uncompressed_size=len(ci2),
        ci_zran_offset=40 * 24,
        ci_zran_size=len(ctx),
        ci_zran_count=4,
    )
    return [
        ("v1-zstd", packed + h1.pack(), b1, False),
        ("v2-zran-cached", M.pack_cached_blob_meta(h2, ci2), b2, True),
    ]


def _use_meta(cached: bool, blob: BlobInfo, buf: bytes) -> None:
    meta = M.parse_cached_blob_meta(buf, blob) if cached else M.parse_blob_meta(buf, blob)
    for i in range(meta.chunk_count):
        meta.chunk(i)
    meta.contexts()


def test_mutated_blob_meta_fails_only_with_format_error() -> None:
    for label, data, blob, cached in _blob_meta_inputs():
        _use_meta(cached, blob, data)
        rng = random.Random(len(data))
        for case in range(CASES):
            buf = bytearray(data)
            for _ in range(rng.randint(1, 6)):
                buf[rng.randrange(len(buf))] ^= 1 << rng.randrange(8)
            if case % 7 == 0:
                del buf[rng.randrange(len(buf)) :]
            try:
                _with_deadline(
                    lambda c=cached, b=blob, m=bytes(buf): _use_meta(c, b, m),  # type: ignore[misc]
                    CASE_DEADLINE_S,
                )
            except FormatError as err:
                assert " at offset " in str(err), str(err)
            except Exception as err:  # noqa: BLE001 - the point of the test
                pytest.fail(f"{label} case {case}: {type(err).__name__}: {err}")


def test_mutated_blob_tails_fail_only_with_format_error() -> None:
    entries = [
        M.TocEntry(1, name.encode().ljust(16, b"\0"), bytes(32), i * 10, 10, 10)
        for i, name in enumerate(["image.blob", "blob.meta", "blob.meta.header", "blob.digest"])
    ]
    body = b"".join(e.pack() for e in entries)
    tail = b"x" * 600 + body + M.pack_section_header(M.TOC_ENTRY_BLOB_TOC, len(body))
    assert len(M.unpack_toc(tail)) == 4
    rng = random.Random(5)
    for case in range(CASES):
        buf = bytearray(tail)
        for _ in range(rng.randint(1, 4)):
            buf[rng.randrange(len(buf) - 512, len(buf))] = rng.randrange(256)
        try:
            M.unpack_toc(bytes(buf))
        except FormatError as err:
            assert " at offset " in str(err), str(err)
        except Exception as err:  # noqa: BLE001 - the point of the test
            pytest.fail(f"tail case {case}: {type(err).__name__}: {err}")

"""What pynydusd fetches of a ZRAN layer: a chunk is the prefix of its inflate context
up to where the chunk's compressed bytes end (its chunk entry says so), and the
context's next chunk continues the kept inflate stream, fetching only what follows.

Contract (daemon/blobcache.py, rafs/read/spans.py): the bytes served are the file's;
a context is never fetched twice for chunks read in order; what a decode produced
on the way is stored (read later without a request); a chunk entry that understates
where its bytes end costs one more request for the whole context, not a wrong read.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import itertools
import json
import random
import shutil
import tarfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pynydus.daemon.blobcache import ChunkRef
from pynydus.daemon.config import parse_daemon_config
from pynydus.daemon.instance import RafsInstance
from pynydus.daemon.metrics import CacheStats
from pynydus.rafs.builder import build
from pynydus.rafs.read import spans as spans_mod
from pynydus.rafs.read.spans import ZRAN, Span, SpanMap
from tests.harness.counting import CountingBackend

WORDS = [b"alpha ", b"beta ", b"gamma\n", b"delta ", b"epsilon ", b"zeta "]
FILES = 90  # ~30 KB of text each: several files (one chunk each) per context


def _files() -> dict[str, bytes]:
    r = random.Random(7)
    return {f"f/{i:03d}.txt": b"".join(r.choice(WORDS) for _ in range(5000)) + b"%d\n" % i
            for i in range(FILES)}


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, bytes]:
    work = tmp_path_factory.mktemp("zran")
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for name, data in _files().items():
            ti = tarfile.TarInfo(name)
            ti.size, ti.mode, ti.mtime = len(data), 0o644, 1_600_000_000
            tf.addfile(ti, io.BytesIO(data))
    layer = gzip.compress(raw.getvalue(), compresslevel=6, mtime=0)
    src = work / "layer.tar.gz"
    src.write_bytes(layer)
    blobs = work / "blobs"
    build(src, work / "boot", blobs, type="targz-ref")
    shutil.copyfile(src, blobs / hashlib.sha256(layer).hexdigest())
    return work / "boot", blobs, layer


@pytest.fixture
def served(tmp_path: Path, image: tuple[Path, Path, bytes]
           ) -> Iterator[tuple[RafsInstance, CountingBackend]]:
    """The image served with an empty cache, over a backend that counts requests (no
    amplification: each read fetches what it needs)."""
    boot, blobs, _ = image
    be = CountingBackend(str(blobs))
    inst = _serve(boot, blobs, tmp_path / "cache", be)
    yield inst, be
    inst.close()


def _serve(boot: Path, blobs: Path, cache: Path, be: CountingBackend,
           amplify_io: int = 0) -> RafsInstance:
    cfg, _ = parse_daemon_config(json.dumps({"device": {
        "backend": {"type": "localfs", "config": {"dir": str(blobs)}},
        "cache": {"type": "blobcache", "config": {"work_dir": str(cache)}}},
        "amplify_io": amplify_io}))
    return RafsInstance(str(boot), cfg, be, CacheStats())


def _read(inst: RafsInstance, path: str) -> bytes:
    ino = inst.bs.lookup_path("/" + path)
    return bytes(inst.read(ino, 0, 1 << 20))


def _where(inst: RafsInstance, path: str) -> tuple[SpanMap, int, Span, int]:
    """(span map, chunk index, its context, its offset there) of a one-chunk file."""
    ino = inst.bs.lookup_path("/" + path)
    (piece,) = inst.bs.map_read(ino, 0, 1 << 20)
    spans = inst._spans(piece.chunk.blob_index)
    assert spans is not None
    at = spans.locate(piece.chunk.index)
    assert at is not None and at[0].kind == ZRAN
    return spans, piece.chunk.index, at[0], at[1]


def _layer_requests(be: CountingBackend, layer: bytes) -> list[tuple[int, int]]:
    digest = hashlib.sha256(layer).hexdigest()
    return [(off, n) for b, off, n in be.blob_requests if b == digest]


def _largest_context(inst: RafsInstance, files: dict[str, bytes]) -> list[str]:
    """The files of the context with the most chunks, in the context's order."""
    out: dict[int, list[str]] = {}
    for name in files:
        span = _where(inst, name)[2]
        out.setdefault(span.index, []).append(name)
    return sorted(max(out.values(), key=len), key=lambda n: _where(inst, n)[3])


def test_a_chunk_is_its_context_prefix_and_the_next_continues(
        served: tuple[RafsInstance, CountingBackend], image: tuple[Path, Path, bytes]) -> None:
    files, layer = _files(), image[2]
    inst, be = served
    members = _largest_context(inst, files)
    assert len(members) >= 8  # the image has contexts of many chunks
    a, b = members[2], members[6]
    spans, ia, span, _ = _where(inst, a)
    end_a = spans.compressed_end(ia, span)
    assert _read(inst, a) == files[a]
    # the prefix of the context up to a's end, not the whole context
    assert _layer_requests(be, layer) == [(span.offset, end_a - span.offset)]
    assert end_a - span.offset < span.size
    # b, later in the same context: only the bytes after a's end
    _, ib, _, _ = _where(inst, b)
    end_b = spans.compressed_end(ib, span)
    assert end_b > end_a
    assert _read(inst, b) == files[b]
    assert _layer_requests(be, layer)[1:] == [(end_a, end_b - end_a)]
    # what the two decodes produced on the way is in the cache: no request
    n = len(be.blob_requests)
    for name in members[:7]:
        assert _read(inst, name) == files[name]
    assert len(be.blob_requests) == n
    # every file reads back right, in any order; no context is fetched twice (they
    # overlap by the deflate block where one ends and the next begins)
    order = list(files)
    random.Random(3).shuffle(order)
    for name in order:
        assert _read(inst, name) == files[name]
    contexts = {_where(inst, name)[2] for name in files}
    assert sum(n for _, n in _layer_requests(be, layer)) <= sum(c.size for c in contexts)


def test_an_understated_chunk_end_reads_the_whole_context(
        served: tuple[RafsInstance, CountingBackend], image: tuple[Path, Path, bytes]) -> None:
    files, layer = _files(), image[2]
    inst, be = served
    name = _largest_context(inst, files)[-1]
    spans, index, span, inner = _where(inst, name)
    ci = spans.chunk_info(index)
    # the ref the cache is handed says the chunk's bytes end 100 bytes into its context
    ref = ChunkRef(index=index, c_off=span.offset, c_size=100,
                   u_off=ci.uncompressed_offset, u_size=ci.uncompressed_size,
                   compressed=True, span=span, span_offset=inner)
    got = inst.cache(0).read([(ref, 0, ci.uncompressed_size)])
    assert bytes(got) == files[name]
    assert _layer_requests(be, layer) == [(span.offset, 100), (span.offset, span.size)]


def test_a_prefetch_list_of_a_zran_image_serves_the_files_bytes(
        served: tuple[RafsInstance, CountingBackend], image: tuple[Path, Path, bytes]) -> None:
    """A prefetch list names chunks by index (``chunk_refs``): for a ZRAN blob they are
    fetched as their contexts' prefixes and inflated there, like a reader's misses; what
    the list put in the cache then reads back as the files' bytes, with no request."""
    files, layer = _files(), image[2]
    inst, be = served
    order = list(files)
    random.Random(5).shuffle(order)
    listed = [_where(inst, name)[1] for name in order[:40]]
    refs = inst.chunk_refs(0, listed)
    assert [r.index for r in refs] == listed
    assert all(r.span is not None for r in refs)
    assert inst.prefetch_refs(0, refs) > 0
    assert _layer_requests(be, layer)  # the list's chunks came from the layer itself
    n = len(be.blob_requests)
    for name in order[:40]:
        assert _read(inst, name) == files[name]
    assert len(be.blob_requests) == n
    for name in order[40:]:
        assert _read(inst, name) == files[name]


def test_a_layer_read_in_order_is_fetched_once_across_its_contexts(
        served: tuple[RafsInstance, CountingBackend], image: tuple[Path, Path, bytes]) -> None:
    """Contexts overlap by the deflate block where one ends and the next begins. A stream
    that has inflated its context to the end goes on into the next one: the files read
    in layer order cost each compressed byte once (every request starts where the one
    before ended), and no context after the first is inflated from its own start."""
    files, layer = _files(), image[2]
    inst, be = served
    names = sorted(files, key=lambda n: (_where(inst, n)[2].index, _where(inst, n)[3]))
    spans = _where(inst, names[0])[0]
    assert len({_where(inst, n)[2] for n in names}) >= 3
    for name in names:
        assert _read(inst, name) == files[name]
    got = _layer_requests(be, layer)
    assert got[0][0] == _where(inst, names[0])[2].offset
    assert all(off == prev_off + prev_n for (prev_off, prev_n), (off, _) in itertools.pairwise(got))
    last = max(spans.compressed_end(i, s) for i, s in
               ((_where(inst, n)[1], _where(inst, n)[2]) for n in names))
    assert sum(n for _, n in got) == last - got[0][0]


def test_a_mount_reads_the_chunk_info_before_the_first_read(
        served: tuple[RafsInstance, CountingBackend], image: tuple[Path, Path, bytes]) -> None:
    """``load_span_maps`` (a mount calls it) reads each ZRAN blob's chunk info in the
    background: the first read of a file then costs only its context's bytes."""
    files, layer = _files(), image[2]
    inst, be = served
    inst.load_span_maps()
    deadline = time.monotonic() + 30
    while 0 not in inst._span_maps and time.monotonic() < deadline:
        time.sleep(0.01)
    assert inst._span_maps.get(0) is not None
    loaded = len(be.blob_requests)
    assert loaded and not _layer_requests(be, layer)
    name = next(n for n in files if _where(inst, n)[2].index == 0)  # no window to read
    assert _read(inst, name) == files[name]
    assert len(be.blob_requests) == loaded + 1 and len(_layer_requests(be, layer)) == 1


def test_a_contexts_window_is_read_while_its_bytes_are(
        tmp_path: Path, image: tuple[Path, Path, bytes], monkeypatch: pytest.MonkeyPatch) -> None:
    """A miss in a context not inflated yet reads the context's window (from the meta
    blob) on another thread while the reader reads the context's bytes: one round trip
    before the inflate, not two in a row."""
    monkeypatch.setattr(spans_mod, "_PROBE", 1024)  # else the windows come with the head
    boot, blobs, layer = image
    files, digest = _files(), hashlib.sha256(layer).hexdigest()
    window_read = threading.Event()
    overlapped: list[bool] = []

    class Overlapping(CountingBackend):
        """Holds each layer read until a window read has begun (5 s at most)."""

        loaded = False

        def read_range(self, blob_id: str, offset: int, length: int) -> bytes:
            if blob_id == digest:
                overlapped.append(window_read.wait(5))
            elif self.loaded:
                window_read.set()
            return super().read_range(blob_id, offset, length)

    be = Overlapping(str(blobs))
    inst = _serve(boot, blobs, tmp_path / "cache", be)
    try:
        spans = inst._spans(0)
        assert spans is not None
        be.loaded = True
        name = next(n for n in files if _where(inst, n)[2].index > 0
                    and spans._zran is not None and spans._zran.contexts[_where(inst, n)[2].index].dict_size)
        assert _read(inst, name) == files[name]
        assert overlapped == [True]
    finally:
        inst.close()



def test_span_members_are_the_chunks_each_context_holds(
        served: tuple[RafsInstance, CountingBackend]) -> None:
    """``members`` (one pass over the raw entries) names the chunks ``locate`` puts in
    each context, no more and no fewer."""
    inst, _ = served
    spans = inst._spans(0)
    assert spans is not None
    by_locate: dict[Span, list[int]] = {}
    for i in range(spans.meta.chunk_count):
        at = spans.locate(i)
        assert at is not None
        by_locate.setdefault(at[0], []).append(i)
    assert len(by_locate) >= 3
    for span, indexes in by_locate.items():
        assert spans.members(span) == indexes

"""The build pipeline's threads: layer decoding ahead (LayerStream), the directory
read-ahead, the blob writer thread; each must give exactly the bytes of the serial
path, raise the decoder's errors where the data stops, and leave no thread behind."""

from __future__ import annotations

import gzip
import io
import os
import random
import tarfile
import threading
import zlib
from pathlib import Path

import pytest
import zstandard

from pynydus.rafs.builder import BlobWriter, blobwriter
from pynydus.rafs.builder.blobwriter import _HashingWriter
from pynydus.rafs.decoder import LayerStream, layerstream
from pynydus.rafs.format import Compressor
from pynydus.rafs.source import DirSource, TarSource

RNG = random.Random(7)
PAYLOAD = b"".join(RNG.randbytes(997) + b"text " * 300 for _ in range(300))  # ~740 KB


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Blocks of a few KiB, so every test crosses many block boundaries."""
    monkeypatch.setattr(layerstream, "_IN", 4096)
    monkeypatch.setattr(layerstream, "_OUT", 7000)
    monkeypatch.setattr(layerstream, "_AHEAD", 2)


@pytest.fixture(params=["isal", "zlib"])
def inflate(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Both gzip decoders: ISA-L (the default) and zlib (the fallback without isal)."""
    if request.param == "zlib":
        monkeypatch.setattr(layerstream, "_inflate_lib", zlib)
    return str(request.param)


def _stream(raw: bytes, **kw: object) -> LayerStream:
    f = io.BytesIO(raw)
    return LayerStream(f, f.read(4), **kw)  # type: ignore[arg-type]


def _no_threads(prefix: str) -> bool:
    return not [t for t in threading.enumerate() if t.name.startswith(prefix)]


def test_gzip_members_and_zero_padding_decode_like_gzip_module(inflate: str) -> None:
    raw = gzip.compress(PAYLOAD[:1000]) + bytes(700) + gzip.compress(PAYLOAD[1000:]) + bytes(3)
    assert gzip.decompress(raw) == PAYLOAD
    with _stream(raw) as s:
        assert s.compression == "gzip"
        assert s.read() == PAYLOAD
        assert s.read(10) == b""
    assert _no_threads("layer-decode")


@pytest.mark.parametrize(
    ("damage", "error"),
    [
        (lambda g: g[: len(g) // 2], EOFError),  # truncated
        (lambda g: g + b"garbage!", gzip.BadGzipFile),  # not a member after a member
        (lambda g: g[:-8] + bytes(4) + g[-4:], layerstream.DECODE_ERRORS),  # wrong CRC32
    ],
)
def test_gzip_errors_surface_at_the_read_where_data_stops(
    damage: object, error: type, inflate: str
) -> None:
    raw = damage(gzip.compress(PAYLOAD))  # type: ignore[operator]
    with _stream(raw) as s, pytest.raises(error):
        s.read()


@pytest.mark.parametrize("feed", [1, 7, 4096])
def test_zstd_truncated_inside_a_frame_is_an_error_not_a_short_tar(
    feed: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """zstandard's reader ends quietly when its input stops mid-frame; the frame walker
    must not (a layer cut at a tar entry boundary would lose files silently)."""
    monkeypatch.setattr(layerstream, "_IN", feed)  # headers split across inputs
    z = zstandard.ZstdCompressor().compress(PAYLOAD[:20_000])
    zc = zstandard.ZstdCompressor(write_checksum=True, write_content_size=False).compress(
        PAYLOAD[20_000:40_000]
    )
    skippable = b"\x50\x2a\x4d\x18" + (5).to_bytes(4, "little") + b"hello"
    whole = z + skippable + zc + skippable
    with _stream(whole) as s:
        assert s.read() == PAYLOAD[:40_000]
    for cut in (len(z) - 1, len(z) + 3, len(z) + len(skippable) + 8, len(whole) - 2):
        with _stream(whole[:cut]) as s, pytest.raises(EOFError, match="inside a frame"):
            s.read()
    with _stream(z + b"\0" * 8) as s, pytest.raises(zstandard.ZstdError):  # the reader or walker
        s.read()


def test_reads_views_seeks_and_tee_see_the_same_bytes() -> None:
    raw = b"".join(zstandard.ZstdCompressor().compress(PAYLOAD[i : i + 50_000])
                   for i in range(0, len(PAYLOAD), 50_000))  # many frames
    copy = io.BytesIO()
    got = bytearray()
    with _stream(raw, tee=copy) as s:
        assert s.compression == "zstd"
        got += s.read(10)
        got += s.read_view(20_000)  # spans blocks: joined
        got += s.read_view(100)  # inside one block: a view
        assert s.tell() == len(got)
        s.seek(len(got) + 5000)
        assert s.tell() == len(got) + 5000
        with pytest.raises(io.UnsupportedOperation):
            s.seek(0)
        rest = s.read(-1)
        s.drain()
    assert bytes(got) == PAYLOAD[: len(got)]
    assert rest == PAYLOAD[len(got) + 5000 :]
    assert copy.getvalue() == PAYLOAD


def test_skip_moves_over_bytes_inside_and_across_blocks_and_stops_at_the_end() -> None:
    raw = b"".join(zstandard.ZstdCompressor().compress(PAYLOAD[i : i + 50_000])
                   for i in range(0, len(PAYLOAD), 50_000))
    copy = io.BytesIO()
    with _stream(raw, tee=copy) as s:
        assert s.skip(0) == 0
        assert s.read(10) == PAYLOAD[:10]
        assert s.skip(502) == 502  # tar block padding: inside the current block
        assert s.read(4) == PAYLOAD[512:516]
        far = len(PAYLOAD) - 1000 - 516
        assert s.skip(far) == far  # across blocks
        assert s.tell() == len(PAYLOAD) - 1000
        assert s.read(10) == PAYLOAD[-1000:-990]
        assert s.skip(5000) == 990  # fewer only at the end
        assert s.read(1) == b""
        s.drain()
    assert copy.getvalue() == PAYLOAD  # what is skipped is still tee'd


def test_close_stops_a_decoder_blocked_on_a_full_queue() -> None:
    s = _stream(gzip.compress(PAYLOAD))
    assert s.read(1) == PAYLOAD[:1]
    s.close()
    s.close()  # idempotent
    assert s.read(5) == b""
    assert _no_threads("layer-decode")


def test_tar_source_over_small_blocks_and_abandoned_iteration(inflate: str) -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for i in range(40):
            data = PAYLOAD[i * 9000 : i * 9000 + 1000 + i * 331]
            t = tarfile.TarInfo(f"dir/file{i:02d}" + "x" * (120 if i % 7 == 0 else 0))
            t.size = len(data)
            tf.addfile(t, io.BytesIO(data))
    raw = gzip.compress(buf.getvalue())
    with tarfile.open(fileobj=io.BytesIO(buf.getvalue())) as tf:
        want = {m.name: tf.extractfile(m).read() for m in tf if m.isreg()}  # type: ignore[union-attr]
    got = {}
    for e, r in TarSource(io.BytesIO(raw)):
        assert r is not None
        data = b""
        while piece := r.read(777):
            data += bytes(piece)
        got[e.path.decode()] = data
    assert got == want
    it = iter(TarSource(io.BytesIO(raw)))
    next(it)
    it.close()  # type: ignore[attr-defined]  # a consumer that stops early
    assert _no_threads("layer-decode")


def test_dir_read_ahead_gives_file_content_and_stops_with_the_walk(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pynydus.rafs.source import dirsource

    monkeypatch.setattr(dirsource, "_AHEAD_ENTRIES", 8)
    monkeypatch.setattr(dirsource, "_AHEAD_MAX_FILE", 3000)
    want = {}
    for d in range(5):
        (tmp_path / f"d{d}").mkdir()
        for i in range(30):
            data = PAYLOAD[i * 100 : i * 100 + (i * 211) % 6000]  # some above 3000 bytes
            (tmp_path / f"d{d}" / f"f{i:02d}").write_bytes(data)
            want[f"d{d}/f{i:02d}".encode()] = data
    os.symlink("d0/f01", tmp_path / "link")
    got = {}
    for e, r in DirSource(tmp_path):
        if r is not None:
            got[e.path] = bytes(r.read(-1)) if e.size % 2 else b"".join(
                bytes(p) for p in iter(lambda r=r: r.read(500), b""))
    assert got == want
    assert _no_threads("dir-read-ahead")
    it = iter(DirSource(tmp_path))
    next(it), next(it)
    it.close()  # type: ignore[attr-defined]
    assert _no_threads("dir-read-ahead")


class _FailingFile(io.BytesIO):
    def write(self, data: object) -> int:  # type: ignore[override]
        raise OSError(28, "No space left on device")


def test_blob_writer_thread_raises_write_errors_on_the_callers_thread() -> None:
    w = _HashingWriter(_FailingFile(), threaded=True)  # type: ignore[arg-type]
    w.write(bytes(2 << 20))  # handed to the thread, which fails
    with pytest.raises(OSError, match="No space left"):
        w.sync()
    w.close()
    assert _no_threads("blob-writer")


@pytest.mark.parametrize("compressor", [Compressor.NONE, Compressor.LZ4_BLOCK, Compressor.ZSTD])
def test_one_cpu_and_threaded_pipelines_write_identical_blobs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, compressor: Compressor
) -> None:
    files = [PAYLOAD[: n] for n in (0, 1, 4095, 70_000, 300_000)] + [PAYLOAD * 3]
    ids = []
    for cpus in (1, 2):
        monkeypatch.setattr(blobwriter, "usable_cpus", lambda cpus=cpus: cpus)
        w = BlobWriter(tmp_path / f"cpu{cpus}", compressor=compressor, chunk_size=0x10000)
        for data in files:
            refs, n = w.add_file(io.BytesIO(data), len(data))
            assert n == len(data) and sum(r.uncompressed_size for r in refs) == n
        desc = w.finish()
        assert desc is not None
        ids.append(desc.blob_id)
    assert ids[0] == ids[1]
    assert _no_threads("blob-writer")


# -- decoder process (big layers in regular files, two CPUs) ------------------------------


@pytest.fixture
def in_process(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every compressed file stream is decoded by a child process, whatever its size."""
    monkeypatch.setenv("PYNYDUS_LAYER_DECODER", "process")


def _file_stream(tmp_path: Path, raw: bytes, prefix: bytes = b"", **kw: object) -> LayerStream:
    """A LayerStream over a real file whose layer starts after ``prefix`` (as a caller
    that read some bytes of a bigger file first would hand it over)."""
    p = tmp_path / "layer"
    p.write_bytes(prefix + raw)
    f = open(p, "rb")  # noqa: SIM115 - closed with the stream's owner below
    f.seek(len(prefix))
    s = LayerStream(f, f.read(4), **kw)  # type: ignore[arg-type]
    s._test_file = f  # type: ignore[attr-defined]  # keep it open as long as the stream
    return s


@pytest.mark.usefixtures("in_process")
def test_decoder_process_gives_the_in_process_bytes(tmp_path: Path) -> None:
    raw = gzip.compress(PAYLOAD[:1000]) + bytes(700) + gzip.compress(PAYLOAD[1000:])
    with _file_stream(tmp_path, raw, prefix=b"unrelated bytes before the layer") as s:
        assert s._decoder is not None  # the child really decodes
        assert s.compression == "gzip"
        assert s.read() == PAYLOAD
        proc = s._decoder.proc
    assert proc.returncode == 0
    assert _no_threads("layer-decode")
    zst = b"".join(zstandard.ZstdCompressor().compress(PAYLOAD[i : i + 50_000])
                   for i in range(0, len(PAYLOAD), 50_000))
    copy = io.BytesIO()
    with _file_stream(tmp_path, zst, tee=copy) as s:
        assert s._decoder is not None and s.compression == "zstd"
        assert s.read(10) == PAYLOAD[:10]
        s.drain()
    assert copy.getvalue() == PAYLOAD


@pytest.mark.usefixtures("in_process")
@pytest.mark.parametrize(
    ("damage", "error"),
    [
        (lambda g: g[: len(g) // 2], EOFError),
        (lambda g: g + b"garbage!", gzip.BadGzipFile),
        (lambda g: g[:-8] + bytes(4) + g[-4:], layerstream.DECODE_ERRORS),
    ],
)
def test_decoder_process_errors_are_the_in_process_ones(
    tmp_path: Path, damage: object, error: type
) -> None:
    raw = damage(gzip.compress(PAYLOAD))  # type: ignore[operator]
    with _file_stream(tmp_path, raw) as s, pytest.raises(error) as info:
        s.read()
    assert str(info.value)  # the child's message comes back
    zst = zstandard.ZstdCompressor().compress(PAYLOAD)
    for bad, kind in [(zst[:-5], EOFError), (zst + b"garbage!", zstandard.ZstdError)]:
        with _stream(bad) as s, pytest.raises(kind) as here:
            s.read()
        with _file_stream(tmp_path, bad) as s, pytest.raises(kind) as there:
            s.read()
        assert str(there.value) == str(here.value)


@pytest.mark.usefixtures("in_process")
def test_decoder_process_stopped_early_or_killed(tmp_path: Path) -> None:
    big = RNG.randbytes(3 << 20)  # more than a pipe and a few small blocks hold
    raw = gzip.compress(big, compresslevel=1)
    s = _file_stream(tmp_path, raw)
    assert s.read(5) == big[:5]
    proc = s._decoder.proc  # type: ignore[union-attr]
    s.close()  # the child is blocked writing to a full pipe: killed and reaped
    assert proc.returncode is not None
    assert _no_threads("layer-decode")
    with pytest.raises(OSError, match="status -9"), _file_stream(tmp_path, raw) as s:
        s.read(5)
        os.kill(s._decoder.proc.pid, 9)  # type: ignore[union-attr]
        s.read()


def test_decoder_process_only_for_big_files_with_a_descriptor(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    raw = gzip.compress(PAYLOAD)
    with _file_stream(tmp_path, raw) as s:  # far below _PROCESS_MIN: decoded here
        assert s._decoder is None and s.read() == PAYLOAD
    monkeypatch.setattr(layerstream, "_PROCESS_MIN", 1000)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    with _file_stream(tmp_path, raw) as s:
        assert s._decoder is not None and s.read() == PAYLOAD
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0})  # one CPU: no child
    with _file_stream(tmp_path, raw) as s:
        assert s._decoder is None
    monkeypatch.setenv("PYNYDUS_LAYER_DECODER", "process")
    with _stream(raw) as s:  # no descriptor (BytesIO): in-process even when forced
        assert s._decoder is None and s.read() == PAYLOAD


@pytest.mark.usefixtures("in_process")
def test_tar_source_from_a_file_through_the_decoder_process(tmp_path: Path) -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for i in range(30):
            data = PAYLOAD[i * 9000 : i * 9000 + 1000 + i * 2331]
            t = tarfile.TarInfo(f"d/f{i:02d}")
            t.size = len(data)
            tf.addfile(t, io.BytesIO(data))
    path = tmp_path / "layer.tar.gz"
    path.write_bytes(gzip.compress(buf.getvalue()))
    got = {e.path: b"".join(bytes(p) for p in iter(lambda r=r: r.read(5000), b""))
           for e, r in TarSource(str(path)) if r is not None}
    with tarfile.open(fileobj=io.BytesIO(buf.getvalue())) as tf:
        want = {m.name.encode(): tf.extractfile(m).read() for m in tf if m.isreg()}  # type: ignore[union-attr]
    assert got == want


def test_a_misspelt_decoder_setting_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    from pynydus.errors import InvalidArgument

    monkeypatch.setenv("PYNYDUS_LAYER_DECODER", "proces")
    with pytest.raises(InvalidArgument, match="expected auto, thread or process"):
        _stream(gzip.compress(PAYLOAD))
    monkeypatch.setenv("PYNYDUS_LAYER_DECODER", "auto")
    with _stream(gzip.compress(PAYLOAD)) as s:
        assert s.read() == PAYLOAD


@pytest.mark.usefixtures("in_process")
def test_no_decoder_process_to_be_had_decodes_in_process(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise OSError(11, "Resource temporarily unavailable")

    monkeypatch.setattr(layerstream.subprocess, "Popen", refuse)
    with _file_stream(tmp_path, gzip.compress(PAYLOAD)) as s:
        assert s._decoder is None and s.read() == PAYLOAD
    assert "decoding in-process" in caplog.text


@pytest.mark.usefixtures("in_process")
def test_a_decoder_process_that_dies_before_any_output_is_replaced_in_process(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A child that cannot start Python or import us fails before it sends a byte:
    the whole file is still there to decode here. One that fails later is an error."""
    import sys

    monkeypatch.setattr(sys, "executable", "/bin/false")
    with _file_stream(tmp_path, gzip.compress(PAYLOAD), prefix=b"x" * 10) as s:
        assert s._decoder is not None
        assert s.read() == PAYLOAD
    assert "decoding in-process" in caplog.text

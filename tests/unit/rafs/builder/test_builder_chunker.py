"""BlobWriter contract: blob-toc layout, ids, alignment, dedup, chunk dicts, cleanup."""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path

import pytest

from pynydus.errors import InvalidArgument
from pynydus.rafs.builder import BlobWriter
from pynydus.rafs.builder.blobwriter import BLOB_FEATURES_DEFAULT
from pynydus.rafs.format import Compressor, Digester, blobmeta, decompress, digest

CS = 0x10000


def _data(n: int, seed: int = 0) -> bytes:
    return (hashlib.sha256(b"%d" % seed).digest() * (n // 32 + 1))[:n]


def _rnd(n: int) -> bytes:
    return os.urandom(n)


def test_blob_is_named_by_sha256_of_its_bytes_and_parses_backwards(tmp_path: Path) -> None:
    w = BlobWriter(tmp_path, compressor=Compressor.ZSTD, chunk_size=CS)
    refs, n = w.add_file(io.BytesIO(_rnd(3 * CS + 5)), 3 * CS + 5)
    desc = w.finish()
    assert desc is not None and n == 3 * CS + 5 and len(refs) == 4
    blob = (tmp_path / desc.blob_id).read_bytes()
    assert hashlib.sha256(blob).hexdigest() == desc.blob_id
    assert os.listdir(tmp_path) == [desc.blob_id]  # no temp file left
    assert desc.compressed_size == len(blob)
    toc = blobmeta.unpack_toc(blob[-4096:])
    assert [e.entry_name for e in toc] == ["image.blob", "blob.meta", "blob.meta.header", "blob.digest"]
    assert desc.blob_toc_size == 4 * 128 + 512
    assert desc.blob_toc_digest == hashlib.sha256(blob[-desc.blob_toc_size :]).digest()
    # image.blob digest covers chunk data + its tar header
    img = toc[0]
    assert img.uncompressed_digest == hashlib.sha256(blob[: img.compressed_size + 512]).digest()
    assert blobmeta.unpack_section_header(blob, img.compressed_size) == ("image.blob", img.compressed_size)
    # chunk-info array and header agree with the descriptor
    hdr = blobmeta.BlobCompressionContextHeader.unpack(blob, desc.ci_offset + desc.ci_compressed_size)
    assert (hdr.ci_entries, hdr.ci_offset, hdr.features) == (4, desc.ci_offset, BLOB_FEATURES_DEFAULT)
    raw = blob[desc.ci_offset : desc.ci_offset + desc.ci_compressed_size]
    ci = decompress(raw, desc.ci_compressor, desc.ci_uncompressed_size)
    arr = blobmeta.ChunkInfoArray(ci, 4, v2=False)
    for r in refs:
        e = arr[r.ci_index]
        assert (e.compressed_offset, e.compressed_size) == (r.compressed_offset, r.compressed_size)
        assert (e.uncompressed_offset, e.uncompressed_size) == (r.uncompressed_offset, r.uncompressed_size)
        assert e.uncompressed_offset % 4096 == 0
    # digests section, in ci order
    dig = toc[3]
    digests = blob[dig.compressed_offset : dig.compressed_offset + dig.compressed_size]
    assert digests == b"".join(r.digest for r in sorted(refs, key=lambda r: r.ci_index))


def test_uncompressed_blob_data_section_is_the_uncompressed_address_space(tmp_path: Path) -> None:
    data = _rnd(CS + 100) + _rnd(1000)
    w = BlobWriter(tmp_path, compressor=Compressor.NONE, chunk_size=CS)
    refs, _ = w.add_file(io.BytesIO(data), len(data))
    desc = w.finish()
    assert desc is not None
    blob = (tmp_path / desc.blob_id).read_bytes()
    for r in refs:
        assert r.compressed_offset == r.uncompressed_offset and not r.compressed
    assert blob[: len(data)][:CS] == data[:CS]
    assert blob[refs[1].uncompressed_offset : refs[1].uncompressed_offset + 100] == data[CS : CS + 100]
    assert desc.uncompressed_size % 4096 == 0
    assert blobmeta.unpack_section_header(blob, desc.uncompressed_size)[1] == desc.uncompressed_size


@pytest.mark.parametrize("compressor", [Compressor.LZ4_BLOCK, Compressor.ZSTD])
def test_incompressible_chunks_are_stored_raw_and_compressible_ones_shrink(
    tmp_path: Path, compressor: Compressor
) -> None:
    w = BlobWriter(tmp_path, compressor=compressor, chunk_size=CS)
    raw_ref = w.add_chunk(_rnd(CS))
    zero_ref = w.add_chunk(bytes(CS))
    assert not raw_ref.compressed and raw_ref.compressed_size == CS
    assert zero_ref.compressed and zero_ref.compressed_size < 1000
    desc = w.finish()
    assert desc is not None
    blob = (tmp_path / desc.blob_id).read_bytes()
    payload = blob[zero_ref.compressed_offset : zero_ref.compressed_offset + zero_ref.compressed_size]
    assert decompress(payload, compressor, CS) == bytes(CS)


def test_dedup_within_blob_and_against_chunk_dict(tmp_path: Path) -> None:
    first = BlobWriter(tmp_path / "a", chunk_size=CS)
    a_refs, _ = first.add_file(io.BytesIO(_data(2 * CS, 1)), 2 * CS)
    a = first.finish()
    assert a is not None
    chunk_dict = {r.digest: r for r in a_refs}
    w = BlobWriter(tmp_path / "b", chunk_size=CS, chunk_dict=chunk_dict)
    refs, _ = w.add_file(io.BytesIO(_data(2 * CS, 1) + _data(CS, 2) + _data(CS, 2)), 4 * CS)
    assert [r.blob is a for r in refs] == [True, True, False, False]
    assert refs[2].ci_index == refs[3].ci_index == 0
    assert refs[3].file_offset == 3 * CS
    assert (w.stats.dict_chunks, w.stats.dedup_chunks, w.stats.chunks_written) == (2, 3, 1)
    assert w.stats.dedup_bytes == 3 * CS


def test_digests_are_of_uncompressed_data(tmp_path: Path) -> None:
    for dig in (Digester.BLAKE3, Digester.SHA256):
        w = BlobWriter(tmp_path, compressor=Compressor.ZSTD, digester=dig, chunk_size=CS)
        ref = w.add_chunk(b"abc" * 100)
        assert ref.digest == digest(b"abc" * 100, dig)
        w.abort()


def test_empty_blob_leaves_nothing_and_abort_is_idempotent(tmp_path: Path) -> None:
    w = BlobWriter(tmp_path / "blobs", chunk_size=CS)
    assert w.add_file(io.BytesIO(b""), 0) == ([], 0)
    assert w.finish() is None
    assert not (tmp_path / "blobs").exists() or os.listdir(tmp_path / "blobs") == []
    w2 = BlobWriter(tmp_path / "blobs", chunk_size=CS)
    w2.add_chunk(b"x")
    w2.abort()
    w2.abort()
    assert os.listdir(tmp_path / "blobs") == []


def test_short_reader_reports_bytes_actually_read(tmp_path: Path) -> None:
    w = BlobWriter(tmp_path, chunk_size=CS)
    refs, n = w.add_file(io.BytesIO(b"x" * 10), 100)
    assert n == 10 and len(refs) == 1
    w.abort()


@pytest.mark.parametrize("bad", [0, 0x800, 0x1800, 0x2000000])
def test_chunk_size_must_be_power_of_two_4k_to_16m(tmp_path: Path, bad: int) -> None:
    with pytest.raises(InvalidArgument):
        BlobWriter(tmp_path, chunk_size=bad)


def test_blob_cache_files_hold_uncompressed_chunks_and_cache_form_meta(tmp_path: Path) -> None:
    data = _data(CS + 10, 7) + _rnd(CS)
    w = BlobWriter(tmp_path / "blobs", compressor=Compressor.ZSTD, chunk_size=CS,
                   cache_dir=tmp_path / "cache")
    refs, _ = w.add_file(io.BytesIO(data), len(data))
    desc = w.finish()
    assert desc is not None
    cache = (tmp_path / "cache" / f"{desc.blob_id}.blob.data").read_bytes()
    assert len(cache) == desc.uncompressed_size
    for r in refs:
        start = r.file_offset
        assert cache[r.uncompressed_offset : r.uncompressed_offset + r.uncompressed_size] == (
            data[start : start + r.uncompressed_size]
        )
    meta = (tmp_path / "cache" / f"{desc.blob_id}.blob.meta").read_bytes()
    ci_len = desc.ci_uncompressed_size
    assert len(meta) == (ci_len + 4095) // 4096 * 4096 + 4096
    hdr = blobmeta.BlobCompressionContextHeader.unpack(meta, len(meta) - 4096)
    assert (hdr.ci_entries, hdr.ci_offset) == (desc.chunk_count, desc.ci_offset)
    arr = blobmeta.ChunkInfoArray(meta[:ci_len], desc.chunk_count, v2=False)
    assert arr[refs[0].ci_index].uncompressed_offset == refs[0].uncompressed_offset
    assert sorted(os.listdir(tmp_path / "cache")) == sorted(
        [f"{desc.blob_id}.blob.data", f"{desc.blob_id}.blob.meta"]
    )

"""The reader's chunk-table index: (blob, chunk index) -> record, first record wins; and a
blob's chunks by uncompressed offset and where its files begin (``blob_layout``)."""

from pynydus.rafs.format import RafsChunkInfo
from pynydus.rafs.read import ChunkIndex
from pynydus.rafs.read.chunkindex import blob_layout

BASE = 4096  # where the table starts in the "bootstrap"


def _table(*records: tuple[int, int, int]) -> bytes:
    """A bootstrap whose chunk table at BASE holds (blob, index, uncompressed offset)s."""
    return bytes(BASE) + b"".join(
        RafsChunkInfo(digest=bytes([i]) * 32, blob_index=b, index=ci, uncompressed_offset=uo).pack()
        for i, (b, ci, uo) in enumerate(records)
    )


def _at(pos: int) -> int:
    return BASE + pos * RafsChunkInfo.SIZE


def test_each_chunk_finds_its_record_in_dense_and_sparse_blobs() -> None:
    buf = _table((0, 2, 8192), (1, 70_000, 0), (0, 0, 0))
    index = ChunkIndex(buf, BASE, len(buf) - BASE, [3, 1_000_000])
    assert index.find(0, 2) == _at(0) and index.find(0, 0) == _at(2)
    assert index.find(1, 70_000) == _at(1)  # a big blob of a chunk dict: a dict, not an array
    assert isinstance(index.records[1], dict)
    assert index.find(0, 1) == -1 and index.find(1, 5) == -1
    assert index.find(2, 0) == -1 and index.find(0, 3) == -1 and index.find(0, -1) == -1


def test_the_first_record_of_a_chunk_wins_and_an_offset_selects_a_later_one() -> None:
    buf = _table((0, 1, 4096), (0, 1, 4096), (0, 1, 8192), (0, 1, 8192))
    index = ChunkIndex(buf, BASE, len(buf) - BASE, [2])
    assert index.find(0, 1) == _at(0)
    assert index.find(0, 1, 4096) == _at(0)
    assert index.find(0, 1, 8192) == _at(2)  # the first record at that offset
    assert index.find(0, 1, 12288) == -1


def test_records_outside_the_blob_table_are_ignored() -> None:
    buf = _table((5, 0, 0), (0, 9, 0), (0, 0, (1 << 64) - 1))
    index = ChunkIndex(buf, BASE, len(buf) - BASE, [1])
    assert index.find(5, 0) == -1 and index.find(0, 9) == -1
    assert index.find(0, 0) == _at(2)  # an offset beyond int64 still names its record
    assert index.find(0, 0, 0) == -1


def test_a_blob_layout_lists_its_chunks_by_offset_each_start_once() -> None:
    # (blob, chunk index, uncompressed offset, uncompressed size), in digest order
    rows = [(1, 3, 8192, 4096), (0, 0, 0, 4096), (1, 0, 0, 8192), (1, 7, 4096, 100),
            (1, 2, 8192, 4096), (2, 0, 0, 4096), (1, 9, 1 << 40, 1)]
    buf = bytes(BASE) + b"".join(
        RafsChunkInfo(digest=bytes([i]) * 32, blob_index=b, index=ci, uncompressed_offset=uo,
                      uncompressed_size=us, compressed_size=us // 2, file_offset=i << 20).pack()
        for i, (b, ci, uo, us) in enumerate(rows))
    layouts = [blob_layout(buf, BASE, len(buf) - BASE, b) for b in range(6)]
    starts, sizes, indexes, _ = layouts[1]
    # chunk 2 and chunk 3 both start at 8192 (deduplicated data): the lower index stays
    assert list(zip(starts, sizes, indexes, strict=True)) == \
        [(0, 8192, 0), (4096, 100, 7), (8192, 4096, 2), (1 << 40, 1, 9)]
    assert [list(a)[:1] for a in layouts[0][:3]] == [[0], [4096], [0]]
    assert [list(a) for a in layouts[2][:3]] == [[0], [4096], [0]]
    assert [list(a) for a in layouts[5]] == [[], [], [], []]
    assert [list(a) for a in blob_layout(buf, BASE, 0, 0)] == [[]] * 4


def test_a_blobs_files_begin_at_its_records_at_file_offset_zero() -> None:
    # (blob, uncompressed offset, file offset), in digest order: blob 1 holds a file of
    # three chunks at 0, a one-chunk file at 12288 and a chunk two files share, first at
    # file offset 4096 and then as another file's first chunk
    rows = [(1, 8192, 8192), (1, 0, 0), (0, 4096, 0), (1, 4096, 4096), (1, 12288, 0),
            (1, 16384, 4096), (1, 16384, 0)]
    buf = bytes(BASE) + b"".join(
        RafsChunkInfo(digest=bytes([i]) * 32, blob_index=b, index=i, uncompressed_offset=uo,
                      uncompressed_size=4096, file_offset=fo).pack()
        for i, (b, uo, fo) in enumerate(rows))
    layouts = [blob_layout(buf, BASE, len(buf) - BASE, b) for b in range(3)]
    assert list(layouts[1].file_starts) == [0, 12288, 16384]
    assert list(layouts[1].starts) == [0, 4096, 8192, 12288, 16384]
    assert list(layouts[0].file_starts) == [4096]
    assert list(layouts[2].file_starts) == []


def test_the_index_gives_a_blob_in_order_the_layout_a_sort_gives(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A built image's blobs have their chunks in order: the index's arrays give each
    blob's layout without a sort, equal to ``blob_layout``'s; a table whose offsets do
    not rise with the chunk index (or names a chunk twice) leaves it to the sort."""
    import os

    from pynydus.rafs.builder import build
    from pynydus.rafs.read import open_bootstrap

    src = tmp_path / "src"
    for name, size in (("a/big", 3 << 20), ("a/small", 3000), ("b/mid", 70_000), ("b/e", 0)):
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        (src / name).write_bytes(os.urandom(size))
    build(str(src), str(tmp_path / "boot"), str(tmp_path / "blobs"), chunk_size=1 << 20)
    bs = open_bootstrap(str(tmp_path / "boot"))
    try:
        ext = bs.ext_superblock
        where = (bs._buf, ext.chunk_table_offset, ext.chunk_table_size)
        for b in range(len(bs.blobs)):
            fast = bs.chunk_index().layout(*where, b)
            assert fast is not None and fast == blob_layout(*where, b)
            assert len(fast.file_starts) == 3  # big, small, mid
    finally:
        bs.close()
    # chunk 0 after chunk 1 in the blob; a chunk named twice
    for rows in ([(0, 0, 8192), (0, 1, 0)], [(0, 0, 0), (0, 1, 4096), (0, 1, 4096)]):
        buf = _table(*rows)
        index = ChunkIndex(buf, BASE, len(buf) - BASE, [2])
        assert index.layout(buf, BASE, len(buf) - BASE, 0) is None

"""Read plans of a mounted image: a read of chunks an earlier read of the file mapped is
planned from the chunks kept per inode, without decoding the inode again, and the plan
is the one the bootstrap's ``map_read`` gives (so the bytes are the same).

Contract: ``RafsInstance.plan_read(ino, offset, size)`` is pure; its pieces cover
``[offset, min(offset + size, file size))`` in file order, grouped by blob; plans from
mapped chunks equal plans from the bootstrap for every offset and size, across chunk
boundaries, at and past the end of the file (a v5 file's holes are never mapped: their
reads always go to ``map_read``); the chunks kept are
bounded (``_MAPPED_CHUNKS``), the files mapped first forgotten first.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest

from pynydus.daemon import instance as instance_mod
from pynydus.daemon.instance import RafsInstance, ReadPlan
from pynydus.rafs.builder import build
from tests.harness.rafs_instance import local_instance

MIB = 1 << 20
CHUNK = 256 << 10


def _key(plan: ReadPlan) -> tuple[Any, ...]:
    return (plan.ino, plan.offset, plan.end, plan.amplify,
            tuple((bi, pos, tuple((ref.index, ref.u_off, off, n) for ref, off, n in pieces))
                  for bi, pos, pieces in plan.groups))


@pytest.fixture
def image(tmp_path: Path) -> tuple[Path, Path, dict[str, bytes]]:
    rnd = random.Random(5)
    files = {"big": rnd.randbytes(3 * MIB + 12345),  # random: no chunk is deduplicated
             "one": rnd.randbytes(CHUNK),  # exactly one chunk
             "small": b"s" * 100}
    src = tmp_path / "src"
    src.mkdir()
    for name, data in files.items():
        (src / name).write_bytes(data)
    (tmp_path / "blobs").mkdir()
    build(str(src), str(tmp_path / "image.boot"), str(tmp_path / "blobs"),
          compressor="lz4_block", chunk_size=CHUNK)
    return tmp_path / "image.boot", tmp_path / "blobs", files


class _CountingBootstrap:
    """Counts ``map_read`` calls of a bootstrap (the decoding a mapped read avoids)."""

    def __init__(self, inst: RafsInstance) -> None:
        self.calls = 0
        self._map_read = inst.bs.map_read

        def counted(*args: Any) -> Any:
            self.calls += 1
            return self._map_read(*args)

        inst.bs.map_read = counted  # type: ignore[method-assign]


def test_mapped_plans_equal_the_bootstraps(tmp_path: Path, image: tuple[Path, Path, dict[str, bytes]]) -> None:
    boot, blobs, files = image
    mapped = local_instance(boot, blobs, tmp_path / "c1")
    fresh = local_instance(boot, blobs, tmp_path / "c2")
    mapped.readahead_bytes = 0  # no background map_read: the count below is the reads'
    rnd = random.Random(9)
    for name, data in files.items():
        ino = mapped.bs.lookup_path(f"/{name}")
        mapped.plan_read(ino, 0, len(data) + 1)  # maps every chunk of the file
        edges = [0, 1, CHUNK - 1, CHUNK, len(data) - 1, len(data), len(data) + 4096]
        cases = [(o, s) for o in edges for s in (0, 1, 4096, CHUNK, 2 * CHUNK + 7)]
        cases += [(rnd.randrange(len(data)), rnd.randrange(1, 2 * MIB)) for _ in range(200)]
        count = _CountingBootstrap(mapped)
        for offset, size in cases:
            plan = mapped.plan_read(ino, offset, size)
            expect = _fresh_plan(fresh, ino, offset, size)
            assert _key(plan) == _key(expect), (name, offset, size)
            got = bytes(mapped.read_planned(plan))
            assert got == data[offset:offset + size], (name, offset, size)
        assert count.calls == 0  # every plan came from the mapped chunks
    mapped.close()
    fresh.close()


def _fresh_plan(inst: RafsInstance, ino: int, offset: int, size: int) -> ReadPlan:
    """The plan the bootstrap gives (the instance's mapped chunks dropped first)."""
    inst._mapped.clear()
    inst._mapped_count = 0
    return inst.plan_read(ino, offset, size)


def test_a_read_maps_only_what_it_read(tmp_path: Path, image: tuple[Path, Path, dict[str, bytes]]) -> None:
    boot, blobs, files = image
    inst = local_instance(boot, blobs, tmp_path / "cache")
    count = _CountingBootstrap(inst)
    big = inst.bs.lookup_path("/big")
    inst.plan_read(big, CHUNK + 10, 4096)
    inst.plan_read(big, CHUNK + 5000, 4096)  # same chunk: mapped
    assert count.calls == 1
    inst.plan_read(big, CHUNK - 10, 4096)  # reaches into the chunk before: not mapped yet
    assert count.calls == 2
    inst.plan_read(big, CHUNK - 10, 4096)
    assert count.calls == 2
    assert bytes(inst.read(big, CHUNK - 10, 4096)) == files["big"][CHUNK - 10:CHUNK + 4086]
    inst.close()


def test_mapped_chunks_are_bounded(tmp_path: Path, image: tuple[Path, Path, dict[str, bytes]],
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    boot, blobs, files = image
    monkeypatch.setattr(instance_mod, "_MAPPED_CHUNKS", 14)
    inst = local_instance(boot, blobs, tmp_path / "cache")
    big, one = inst.bs.lookup_path("/big"), inst.bs.lookup_path("/one")
    small = inst.bs.lookup_path("/small")
    inst.plan_read(one, 0, CHUNK)
    inst.plan_read(big, 0, len(files["big"]))  # 13 chunks: 14 mapped in all, the bound
    inst.plan_read(big, 0, 1)  # mapped already: nothing added
    assert inst._mapped_count == 14 and set(inst._mapped) == {one, big}
    inst.plan_read(small, 0, 100)  # one more: the file mapped first goes
    assert inst._mapped_count == 14 and set(inst._mapped) == {big, small}
    assert bytes(inst.read(one, 0, 10)) == files["one"][:10]  # and is mapped again
    assert one in inst._mapped
    inst.close()


# --- file_cached: asked at every end of a cached open of a large file ----------------------


class _MappedRanges:
    """Records the ranges ``map_read`` is asked for (what ``file_cached`` decodes)."""

    def __init__(self, inst: RafsInstance) -> None:
        self.ranges: list[tuple[int, int]] = []
        map_read = inst.bs.map_read

        def recorded(ino: int, offset: int, size: int) -> Any:
            self.ranges.append((offset, size))
            return map_read(ino, offset, size)

        inst.bs.map_read = recorded  # type: ignore[method-assign]


def _brute_cached(inst: RafsInstance, ino: int) -> bool:
    reads = inst.bs.map_read(ino, 0, inst.bs.stat_fields(ino)[4])
    return all(inst.cache(r.chunk.blob_index).has(r.chunk.index) for r in reads)


def test_file_cached_agrees_with_every_chunk_and_maps_only_past_the_cached_prefix(
        tmp_path: Path, image: tuple[Path, Path, dict[str, bytes]],
        monkeypatch: pytest.MonkeyPatch) -> None:
    boot, blobs, files = image
    monkeypatch.setattr(instance_mod, "_CACHED_STEP", 2)  # 13 chunks: several steps
    inst = local_instance(boot, blobs, tmp_path / "cache")
    inst.readahead_bytes = 0
    inst._persist_thread.close()  # a closing instance writes its misses itself: no waiting
    big, size = inst.bs.lookup_path("/big"), len(files["big"])
    nchunks = -(-size // CHUNK)
    rec = _MappedRanges(inst)
    assert not inst.file_cached(big)
    assert rec.ranges == [(0, 2 * CHUNK)]  # the first step's first chunk is missing
    inst.read(big, 0, 5 * CHUNK)  # chunks 0-4 cached
    rec.ranges.clear()
    assert not inst.file_cached(big)
    assert rec.ranges == [(0, 2 * CHUNK), (2 * CHUNK, 2 * CHUNK), (4 * CHUNK, 2 * CHUNK)]
    rec.ranges.clear()
    assert not inst.file_cached(big)  # asked again: the cached prefix is not mapped again
    assert rec.ranges == [(5 * CHUNK, 2 * CHUNK)]
    # in any order, the answer is the brute force's (every chunk of the file checked)
    rnd = random.Random(3)
    for k in rnd.sample(range(5, nchunks), nchunks - 5):
        rec.ranges.clear()
        got = inst.file_cached(big)
        assert got == _brute_cached(inst, big) is False
        assert all(off >= 5 * CHUNK for off, _ in rec.ranges[:1])
        inst.read(big, k * CHUNK, 1)
    assert inst.file_cached(big) and _brute_cached(inst, big)
    rec.ranges.clear()
    assert inst.file_cached(big) and rec.ranges == []  # known whole: nothing decoded
    inst.close()


def test_file_cached_counts_landing_chunks_only_when_asked_and_never_keeps_them(
        tmp_path: Path, image: tuple[Path, Path, dict[str, bytes]],
        monkeypatch: pytest.MonkeyPatch) -> None:
    boot, blobs, _files = image
    inst = local_instance(boot, blobs, tmp_path / "cache")
    inst.readahead_bytes = 0
    inst._persist_thread.close()
    one = inst.bs.lookup_path("/one")
    cache = inst.cache(0)
    index = inst.bs.map_read(one, 0, 1)[0].chunk.index
    monkeypatch.setattr(cache, "_claims", {index: None})  # being fetched by a reader
    assert inst.file_cached(one, landing=True)
    assert not inst.file_cached(one)  # a landing chunk is not kept as cached
    assert inst._cached_upto.get(one, 0) == 0
    monkeypatch.setattr(cache, "_claims", {})
    assert not inst.file_cached(one, landing=True)  # the fetch failed: not cached after all
    inst.read(one, 0, 1)
    assert inst.file_cached(one) and inst._cached_upto[one] == CHUNK
    inst.close()


def test_file_cached_keeps_a_bounded_number_of_files(
        tmp_path: Path, image: tuple[Path, Path, dict[str, bytes]],
        monkeypatch: pytest.MonkeyPatch) -> None:
    boot, blobs, files = image
    monkeypatch.setattr(instance_mod, "_CACHED_FILES", 2)
    inst = local_instance(boot, blobs, tmp_path / "cache")
    inst._persist_thread.close()
    names = ["big", "one", "small"]
    inos = [inst.bs.lookup_path(f"/{n}") for n in names]
    for ino, n in zip(inos, names, strict=True):
        inst.read(ino, 0, 1)
        inst.file_cached(ino)
    assert len(inst._cached_upto) <= 2 and inos[2] in inst._cached_upto
    for ino, n in zip(inos, names, strict=True):  # a forgotten file is asked again
        inst.read(ino, 0, len(files[n]))
        assert inst.file_cached(ino)
    inst.close()

"""The FUSE operations count each request once, resolve its inode once, plan a read once.

Contract (nydusd's FsIoStats): every request is one hit or one error in its image's
``fop_hits``/``fop_errors``; a successful read adds its size to ``data_read``, one to its
size bucket of ``block_count_read`` and one to its latency bucket of ``read_latency_dist``,
and its latency to ``fop_cumulative_latency_total``; an open raises ``nr_opens`` and the
release lowers it. The operations are called as pyfuse3 calls them, without a mount.
"""

from __future__ import annotations

import errno
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyfuse3
import pytest
import trio

from pynydus.daemon.fusefs import RafsFs, Vfs
from pynydus.daemon.instance import RafsInstance
from pynydus.daemon.metrics import (
    FOPS,
    backend_json,
    backend_latency_bucket,
    fs_json,
    fs_latency_bucket,
    size_bucket,
)
from pynydus.rafs.builder import build
from tests.harness.rafs_instance import local_instance

READ = FOPS.index("read")
SMALL = b"x" * 100
BIG = bytes(range(256)) * 4096 * 3  # 3 MiB: several chunks


@pytest.fixture
def image(tmp_path: Path) -> tuple[Path, Path]:
    src = tmp_path / "src"
    src.mkdir()
    (src / "small").write_bytes(SMALL)
    (src / "big").write_bytes(BIG)
    (tmp_path / "blobs").mkdir()
    build(str(src), str(tmp_path / "image.boot"), str(tmp_path / "blobs"), compressor="lz4_block")
    return tmp_path / "image.boot", tmp_path / "blobs"


class Counted:
    """Wraps a callable and counts its calls."""

    def __init__(self, fn: Callable[..., Any]) -> None:
        self.fn, self.calls = fn, 0

    def __call__(self, *args: Any, **kw: Any) -> Any:
        self.calls += 1
        return self.fn(*args, **kw)


def _fs(tmp_path: Path, image: tuple[Path, Path]) -> tuple[RafsFs, RafsInstance, Counted, Counted]:
    inst = local_instance(*image, tmp_path / "cache")
    vfs = Vfs()
    vfs.dedicated = inst
    resolve = Counted(vfs.resolve)
    vfs.resolve = resolve  # type: ignore[method-assign]
    plan = Counted(inst.bs.map_read)
    inst.bs.map_read = plan  # type: ignore[method-assign]
    return RafsFs(vfs), inst, resolve, plan


def _ino(inst: RafsInstance, path: str) -> int:
    nid = inst.bs.lookup_path(path)
    root = inst.bs.root_ino
    return pyfuse3.ROOT_INODE if nid == root else (root if nid == pyfuse3.ROOT_INODE else nid)


def test_cold_read_resolves_plans_and_counts_once(tmp_path: Path, image: tuple[Path, Path]) -> None:
    fs, inst, resolve, plan = _fs(tmp_path, image)
    ino = _ino(inst, "/big")
    data = trio.run(fs.read, ino, 0, 128 << 10)  # a miss: served on a worker thread
    assert data == BIG[:128 << 10]
    assert (resolve.calls, plan.calls) == (1, 1)
    st = fs_json([inst.fs_stats])
    assert st["fop_hits"][READ] == 1 and sum(st["fop_hits"]) == 1
    assert sum(st["fop_errors"]) == 0
    assert st["data_read"] == 128 << 10
    assert st["block_count_read"] == [1 if i == size_bucket(128 << 10) else 0 for i in range(8)]
    assert sum(st["read_latency_dist"]) == 1
    assert st["fop_cumulative_latency_total"][READ] > 0
    inst.close()


def test_warm_read_counts_once(tmp_path: Path, image: tuple[Path, Path]) -> None:
    fs, inst, resolve, plan = _fs(tmp_path, image)
    ino = _ino(inst, "/small")
    assert trio.run(fs.read, ino, 0, 4096) == SMALL  # cold
    assert trio.run(fs.read, ino, 0, 4096) == SMALL  # warm: answered on the loop
    # resolved once per request; planned from the bootstrap once: the second read's chunk
    # is mapped already (RafsInstance.plan_read)
    assert (resolve.calls, plan.calls) == (2, 1)
    st = fs_json([inst.fs_stats])
    assert st["fop_hits"][READ] == 2 and st["data_read"] == 200
    assert st["block_count_read"][0] == 2  # 100 bytes: the <1K bucket
    assert sum(st["read_latency_dist"]) == 2
    inst.close()


def test_failed_read_is_one_error(tmp_path: Path, image: tuple[Path, Path]) -> None:
    boot, _ = image
    (tmp_path / "empty").mkdir()
    fs, inst, resolve, plan = _fs(tmp_path, (boot, tmp_path / "empty"))  # no blob anywhere
    with pytest.raises(pyfuse3.FUSEError) as err:
        trio.run(fs.read, _ino(inst, "/small"), 0, 4096)
    assert err.value.errno == errno.EIO
    assert (resolve.calls, plan.calls) == (1, 1)
    st = fs_json([inst.fs_stats])
    assert st["fop_errors"][READ] == 1 and sum(st["fop_errors"]) == 1
    assert sum(st["fop_hits"]) == 0 and st["data_read"] == 0
    assert sum(st["read_latency_dist"]) == 0
    backend = backend_json(inst.cache_stats, "localfs")
    assert backend["read_count"] == 1 and backend["read_errors"] == 1
    inst.close()


def test_other_operations_count_once(tmp_path: Path, image: tuple[Path, Path]) -> None:
    fs, inst, resolve, _ = _fs(tmp_path, image)
    ino = _ino(inst, "/small")

    async def session() -> None:
        await fs.lookup(pyfuse3.ROOT_INODE, b"small")
        await fs.getattr(ino)
        fi = await fs.open(ino, 0, None)
        assert fs_json([inst.fs_stats])["nr_opens"] == 1
        await fs.read(fi.fh, 0, 10)
        await fs.release(fi.fh)
        await fs.listxattr(ino, None)

    trio.run(session)
    assert resolve.calls == 6
    st = fs_json([inst.fs_stats])
    expect = {"lookup": 1, "getattr": 1, "open": 1, "read": 1, "release": 1, "listxattr": 1}
    assert st["fop_hits"] == [expect.get(op, 0) for op in FOPS]
    assert st["nr_opens"] == 0
    inst.close()


def test_backend_histograms_hold_the_requests(tmp_path: Path, image: tuple[Path, Path]) -> None:
    fs, inst, _, _ = _fs(tmp_path, image)
    trio.run(fs.read, _ino(inst, "/big"), 0, 4096)
    b = backend_json(inst.cache_stats, "localfs")
    assert b["read_count"] >= 1 and b["read_errors"] == 0
    assert sum(b["read_count_block_size_dist"]) == b["read_count"]
    assert sum(map(sum, b["read_latency_sizes_dist"])) == b["read_count"]
    assert sum(b["read_cumulative_latency_millis_dist"]) == b["read_cumulative_latency_millis_total"]
    inst.close()


@pytest.mark.parametrize("size, bucket", [(0, 0), (1023, 0), (1024, 1), (4095, 1), (4096, 2),
                                          (65535, 3), (65536, 4), (131072, 5), (524287, 5),
                                          (524288, 6), (1 << 20, 7), (1 << 40, 7)])
def test_size_buckets_are_nydusds(size: int, bucket: int) -> None:
    assert size_bucket(size) == bucket


def test_latency_buckets_are_nydusds() -> None:
    assert [fs_latency_bucket(us) for us in (0, 200, 201, 1000, 20_001, 2_000_000, 2_000_001)] == \
        [0, 0, 1, 1, 3, 6, 7]
    assert [backend_latency_bucket(ms) for ms in (0, 1, 2, 20, 21, 2000, 2001)] == \
        [0, 0, 1, 1, 2, 6, 7]

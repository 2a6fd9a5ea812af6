"""The RAFS FUSE server answers kernel requests, without a mount.

Contract: ``RafsServer.handle`` turns one parsed request into one reply (or none for
FORGET/INTERRUPT); nothing but INIT is answered before INIT; writes are EROFS, unknown
operations ENOSYS; handles are node ids, so a second server that only restored the INIT
parameters answers about nodes and handles the first one gave out (a takeover). Every
request is counted once in its image's FsStats (nydusd's FsIoStats).
"""

from __future__ import annotations

import errno
import os
import stat
import struct
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from pynydus.daemon import fuseproto as P
from pynydus.daemon.fuseops import FOREVER, RafsServer
from pynydus.daemon.instance import Fresh, RafsInstance, ReadPlan
from pynydus.daemon.metrics import FOPS, fs_json
from pynydus.daemon.vfs import SLOT_SHIFT, Vfs
from pynydus.rafs.builder import build
from tests.harness.rafs_instance import local_instance

SMALL = b"x" * 100
BIG = bytes(range(256)) * 4096 * 3  # 3 MiB: several chunks
MANY = 300  # entries in /many: several READDIR replies


@pytest.fixture
def image(tmp_path: Path) -> tuple[Path, Path, Path]:
    src = tmp_path / "src"
    (src / "many").mkdir(parents=True)
    (src / "small").write_bytes(SMALL)
    (src / "big").write_bytes(BIG)
    os.symlink("small", src / "link")
    for i in range(MANY):
        (src / "many" / f"entry-{i:04d}-with-a-longish-name").write_bytes(b"%d" % i)
    os.setxattr(src / "small", "user.colour", b"blue")
    (tmp_path / "blobs").mkdir()
    build(str(src), str(tmp_path / "image.boot"), str(tmp_path / "blobs"), compressor="lz4_block")
    return src, tmp_path / "image.boot", tmp_path / "blobs"


class Kernel:
    """Plays the kernel's side: numbers requests, sends them, decodes replies."""

    def __init__(self, server: RafsServer) -> None:
        self.server = server
        self.unique = 0

    def send(self, opcode: int, nodeid: int, body: bytes = b"") -> tuple[int, bytes] | None:
        self.unique += 2
        out = self.server.handle(P.parse_request(P.encode_request(opcode, self.unique, nodeid, body)))
        if out is None:
            return None
        raw = b"".join(bytes(b) for b in out)
        err, unique, payload = P.parse_reply(raw)
        assert unique == self.unique
        return err, payload

    def ok(self, opcode: int, nodeid: int, body: bytes = b"") -> bytes:
        got = self.send(opcode, nodeid, body)
        assert got is not None and got[0] == 0, got
        return got[1]

    def init(self) -> dict[str, int]:
        return P.parse_init_reply(self.ok(P.INIT, 0, P.init_request_body(
            45, P.INIT_EXT | P.MAX_PAGES | P.DO_READDIRPLUS | P.ASYNC_READ | P.HAS_RESEND)))

    def lookup(self, parent: int, name: bytes) -> tuple[int, float, P.Attr]:
        return P.parse_entry(self.ok(P.LOOKUP, parent, name + b"\0"))

    def read(self, nodeid: int, offset: int, size: int) -> bytes:
        return self.ok(P.READ, nodeid, P.read_request_body(nodeid, offset, size))

    def listing(self, nodeid: int, plus: bool, size: int = 4096) -> list[tuple[bytes, int, int, int]]:
        out: list[tuple[bytes, int, int, int]] = []
        offset = 0
        while True:
            body = self.ok(P.READDIRPLUS if plus else P.READDIR, nodeid,
                           P.read_request_body(nodeid, offset, size))
            got = P.parse_dirents(body, plus)
            if not got:
                return out
            assert len(body) <= size
            out += got
            offset = got[-1][2]


@pytest.fixture
def dedicated(tmp_path: Path, image: tuple[Path, Path, Path]):  # type: ignore[no-untyped-def]
    _, boot, blobs = image
    inst = local_instance(boot, blobs, tmp_path / "cache")
    vfs = Vfs()
    vfs.dedicated = inst
    kernel = Kernel(RafsServer(vfs))
    kernel.init()
    yield kernel, inst
    inst.close()


def test_nothing_but_init_before_init(tmp_path: Path, image: tuple[Path, Path, Path]) -> None:
    inst = local_instance(image[1], image[2], tmp_path / "cache")
    vfs = Vfs()
    vfs.dedicated = inst
    kernel = Kernel(RafsServer(vfs))
    assert kernel.send(P.GETATTR, P.ROOT_ID, b"\0" * 16) == (errno.EIO, b"")
    reply = kernel.init()
    assert reply["max_pages"] == 256 and reply["flags"] & P.DO_READDIRPLUS
    assert kernel.send(P.INIT, 0, P.init_request_body())[0] == errno.EIO  # only once
    inst.close()


def test_lookup_getattr_and_negative_entries(dedicated) -> None:  # type: ignore[no-untyped-def]
    kernel, inst = dedicated
    nodeid, timeout, attr = kernel.lookup(P.ROOT_ID, b"small")
    assert nodeid == attr.ino == inst.bs.lookup_path("/small")
    assert timeout == FOREVER and attr.size == len(SMALL) and stat.S_ISREG(attr.mode)
    t, root = P.parse_attr(kernel.ok(P.GETATTR, P.ROOT_ID, b"\0" * 16))
    assert root.ino == P.ROOT_ID and root.mode == stat.S_IFDIR | 0o755 and t == FOREVER
    nodeid, timeout, _ = kernel.lookup(P.ROOT_ID, b"absent")
    assert (nodeid, timeout) == (0, FOREVER)  # cached negatively: the image never changes
    assert kernel.lookup(P.ROOT_ID, b".")[0] == P.ROOT_ID


def test_read_open_readlink(dedicated) -> None:  # type: ignore[no-untyped-def]
    kernel, _inst = dedicated
    big = kernel.lookup(P.ROOT_ID, b"big")[0]
    fh, flags, backing = P.parse_open(kernel.ok(P.OPEN, big, struct.pack("<II", os.O_RDONLY, 0)))
    assert (fh, flags & P.FOPEN_KEEP_CACHE, backing) == (big, P.FOPEN_KEEP_CACHE, 0)
    assert kernel.read(big, 0, 1 << 20) == BIG[:1 << 20]
    assert kernel.read(big, len(BIG) - 10, 4096) == BIG[-10:]  # short at the end
    assert kernel.read(big, len(BIG) + 4096, 4096) == b""
    for flag in (os.O_WRONLY, os.O_RDWR, os.O_TRUNC):
        assert kernel.send(P.OPEN, big, struct.pack("<II", flag, 0))[0] == errno.EROFS
    link = kernel.lookup(P.ROOT_ID, b"link")[0]
    assert kernel.ok(P.READLINK, link) == b"small"
    assert kernel.send(P.READLINK, big)[0] == errno.EINVAL
    assert kernel.ok(P.RELEASE, big, struct.pack("<QIIQ", fh, 0, 0, 0)) == b""


@pytest.mark.parametrize("plus", [False, True])
def test_readdir_pages_through_every_entry(dedicated, image, plus: bool) -> None:  # type: ignore[no-untyped-def]
    kernel, inst = dedicated
    src = image[0]
    many = kernel.lookup(P.ROOT_ID, b"many")[0]
    fh, flags, _ = P.parse_open(kernel.ok(P.OPENDIR, many, b"\0" * 8))
    assert fh == many and flags & P.FOPEN_CACHE_DIR
    entries = kernel.listing(many, plus)
    assert sorted(e[0] for e in entries) == sorted(os.fsencode(n) for n in os.listdir(src / "many"))
    offsets = [e[2] for e in entries]
    assert offsets == sorted(set(offsets))  # each resumes after the one before
    for name, ino, _, dtype in entries[:3]:
        assert (ino, dtype) == (inst.bs.lookup_path(b"/many/" + name), 8)


def test_readdirplus_carries_the_lookup_answer(dedicated) -> None:  # type: ignore[no-untyped-def]
    kernel, _ = dedicated
    body = kernel.ok(P.READDIRPLUS, P.ROOT_ID, P.read_request_body(P.ROOT_ID, 0, 8192))
    first = P.parse_dirents(body, plus=True)[0]
    assert P.parse_entry(body[:P.ENTRY_OUT_SIZE]) == kernel.lookup(P.ROOT_ID, first[0])
    # every entry's entry_out, byte for byte (files, a directory, a symlink; the image
    # root's mode fixed to 0755 in both), in listings of the root and of /many
    for parent in (P.ROOT_ID, kernel.lookup(P.ROOT_ID, b"many")[0]):
        pos, body, seen = 0, kernel.ok(P.READDIRPLUS, parent,
                                       P.read_request_body(parent, 0, 1 << 16)), 0
        while pos < len(body):
            entry = body[pos:pos + P.ENTRY_OUT_SIZE]
            name = P.parse_dirents(body[pos:], plus=True)[0][0]
            assert entry == kernel.ok(P.LOOKUP, parent, name + b"\0"), name
            pos += P.dirent_size(name, plus=True)
            seen += 1
        assert seen == (4 if parent == P.ROOT_ID else MANY)


def test_xattrs(dedicated) -> None:  # type: ignore[no-untyped-def]
    kernel, _ = dedicated
    small = kernel.lookup(P.ROOT_ID, b"small")[0]
    ask = struct.pack("<II", 0, 0) + b"user.colour\0"
    assert struct.unpack("<II", kernel.ok(P.GETXATTR, small, ask)) == (4, 0)
    assert kernel.ok(P.GETXATTR, small, struct.pack("<II", 64, 0) + b"user.colour\0") == b"blue"
    assert kernel.send(P.GETXATTR, small, struct.pack("<II", 2, 0) + b"user.colour\0")[0] == errno.ERANGE
    assert kernel.send(P.GETXATTR, small, struct.pack("<II", 64, 0) + b"user.none\0")[0] == errno.ENODATA
    assert b"user.colour\0" in kernel.ok(P.LISTXATTR, small, struct.pack("<II", 4096, 0))


def test_statfs_writes_and_unknown_operations(dedicated) -> None:  # type: ignore[no-untyped-def]
    kernel, inst = dedicated
    files = struct.unpack_from("<QQQQQ", kernel.ok(P.STATFS, P.ROOT_ID))[3]
    assert files == inst.bs.inode_count
    assert kernel.send(P.MKDIR, P.ROOT_ID, b"\0" * 8 + b"d\0")[0] == errno.EROFS
    assert kernel.send(P.WRITE, P.ROOT_ID, b"\0" * 40)[0] == errno.EROFS
    assert kernel.send(P.FSYNC, P.ROOT_ID, b"\0" * 16)[0] == errno.ENOSYS
    assert kernel.send(P.STATX, P.ROOT_ID, b"\0" * 24)[0] == errno.ENOSYS
    assert kernel.send(P.FORGET, P.ROOT_ID, struct.pack("<Q", 1)) is None
    assert kernel.send(P.INTERRUPT, 0, struct.pack("<Q", 2)) is None
    assert kernel.send(P.ACCESS, P.ROOT_ID, struct.pack("<II", os.W_OK, 0))[0] == errno.EACCES
    assert kernel.ok(P.ACCESS, P.ROOT_ID, struct.pack("<II", os.R_OK, 0)) == b""


def test_a_successor_answers_for_handles_it_never_gave_out(tmp_path: Path, dedicated, image) -> None:  # type: ignore[no-untyped-def]
    kernel, _inst = dedicated
    big = kernel.lookup(P.ROOT_ID, b"big")[0]
    many = kernel.lookup(P.ROOT_ID, b"many")[0]
    first = kernel.listing(many, plus=False, size=1024)
    # a second server over a second instance of the image, with only the INIT parameters
    inst2 = local_instance(image[1], image[2], tmp_path / "cache")
    vfs = Vfs()
    vfs.dedicated = inst2
    successor = Kernel(RafsServer(vfs, params=kernel.server.params))
    successor.unique = kernel.unique
    assert successor.read(big, 4096, 4096) == BIG[4096:8192]
    assert successor.listing(many, plus=False, size=1024) == first
    inst2.close()


def test_shared_mode_pseudo_root_and_slots(tmp_path: Path, image: tuple[Path, Path, Path]) -> None:
    _, boot, blobs = image
    a, b = local_instance(boot, blobs, tmp_path / "cache"), local_instance(boot, blobs, tmp_path / "cache")
    vfs = Vfs()
    assert vfs.add(b"img-a", a) == 1 and vfs.add(b"img-b", b) == 2
    kernel = Kernel(RafsServer(vfs))
    kernel.init()
    nodeid, _timeout, attr = kernel.lookup(P.ROOT_ID, b"img-b")
    assert nodeid == (2 << SLOT_SHIFT) | b.bs.root_ino and attr.mode == stat.S_IFDIR | 0o755
    assert kernel.send(P.LOOKUP, P.ROOT_ID, b"img-c\0")[0] == errno.ENOENT  # not cached
    assert kernel.lookup(nodeid, b"..")[0] == P.ROOT_ID
    small = kernel.lookup(nodeid, b"small")[0]
    assert small >> SLOT_SHIFT == 2 and kernel.read(small, 0, 4096) == SMALL
    names = [e[0] for e in kernel.listing(P.ROOT_ID, plus=True)]
    assert names == [b"img-a", b"img-b"]
    _, root = P.parse_attr(kernel.ok(P.GETATTR, P.ROOT_ID, b"\0" * 16))
    assert root.nlink == 4
    assert kernel.send(P.GETATTR, 7 << SLOT_SHIFT | 5, b"\0" * 16)[0] == errno.ENOENT
    a.close()
    b.close()


# --- counting (nydusd's FsIoStats): once per request -------------------------------------------

READ = FOPS.index("read")


def test_read_counts_once_with_size_and_latency(dedicated) -> None:  # type: ignore[no-untyped-def]
    kernel, inst = dedicated
    big = kernel.lookup(P.ROOT_ID, b"big")[0]
    kernel.read(big, 0, 128 << 10)  # cold
    kernel.read(big, 0, 128 << 10)  # warm
    st = fs_json([inst.fs_stats])
    assert st["fop_hits"][READ] == 2 and st["data_read"] == 256 << 10
    assert sum(st["read_latency_dist"]) == 2 and st["fop_cumulative_latency_total"][READ] > 0


def test_a_read_resolves_its_inode_and_plans_once(dedicated, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """One READ: one inode resolution, one plan; the bootstrap is decoded for the first
    read of a chunk only (a miss used to resolve four times and plan twice)."""
    kernel, inst = dedicated
    big = kernel.lookup(P.ROOT_ID, b"big")[0]
    calls = {"resolve": 0, "plan_read": 0, "map_read": 0}

    def counted(owner: Any, name: str) -> None:
        real = getattr(owner, name)

        def spy(*args: Any) -> Any:
            calls[name] += 1
            return real(*args)

        monkeypatch.setattr(owner, name, spy)

    counted(kernel.server.vfs, "resolve")
    counted(inst, "plan_read")
    counted(inst.bs, "map_read")
    assert kernel.read(big, 0, 128 << 10) == BIG[:128 << 10]  # cold: a miss
    assert calls == {"resolve": 1, "plan_read": 1, "map_read": 1}
    assert kernel.read(big, 0, 128 << 10) == BIG[:128 << 10]  # warm
    assert calls == {"resolve": 2, "plan_read": 2, "map_read": 1}


def test_failed_read_is_one_error(tmp_path: Path, image: tuple[Path, Path, Path]) -> None:
    (tmp_path / "empty").mkdir()
    inst = local_instance(image[1], tmp_path / "empty", tmp_path / "cache")  # no blob anywhere
    vfs = Vfs()
    vfs.dedicated = inst
    kernel = Kernel(RafsServer(vfs))
    kernel.init()
    small = kernel.lookup(P.ROOT_ID, b"small")[0]
    assert kernel.send(P.READ, small, P.read_request_body(small, 0, 4096))[0] == errno.EIO
    st = fs_json([inst.fs_stats])
    assert st["fop_errors"][READ] == 1 and sum(st["fop_errors"]) == 1
    assert st["fop_hits"][READ] == 0 and st["data_read"] == 0
    assert not kernel.server.inflight
    inst.close()


def test_other_operations_count_once(dedicated) -> None:  # type: ignore[no-untyped-def]
    kernel, inst = dedicated
    small = kernel.lookup(P.ROOT_ID, b"small")[0]
    kernel.ok(P.GETATTR, small, b"\0" * 16)
    kernel.ok(P.OPEN, small, b"\0" * 8)
    assert fs_json([inst.fs_stats])["nr_opens"] == 1
    kernel.read(small, 0, 10)
    kernel.ok(P.RELEASE, small, b"\0" * 24)
    kernel.ok(P.LISTXATTR, small, struct.pack("<II", 0, 0))
    kernel.send(P.LOOKUP, P.ROOT_ID, b"absent\0")  # a negative entry is an answer, a hit
    st = fs_json([inst.fs_stats])
    expect = {"lookup": 2, "getattr": 1, "open": 1, "read": 1, "release": 1, "listxattr": 1}
    assert st["fop_hits"] == [expect.get(op, 0) for op in FOPS]
    assert sum(st["fop_errors"]) == 0 and st["nr_opens"] == 0


def test_a_read_that_missed_asks_the_session_to_store_its_chunks(dedicated) -> None:  # type: ignore[no-untyped-def]
    kernel, inst = dedicated
    stored: list[tuple[int, int, int]] = []
    kept: list[Any] = []

    def store(nodeid: int, i: RafsInstance, plan: ReadPlan, fresh: Fresh) -> None:
        stored.append((nodeid, *i.chunk_bounds(plan)))
        kept.append((plan, fresh))

    kernel.server.store = store
    big = kernel.lookup(P.ROOT_ID, b"big")[0]
    mib = 1 << 20
    assert kernel.read(big, mib + 8192, 4096) == BIG[mib + 8192:mib + 12288]
    assert stored == [(big, mib, 2 * mib)]  # the whole chunk around the read
    assert bytes(inst.read_range_quietly(big, mib, 2 * mib)) == BIG[mib:2 * mib]
    # the rest of the chunk is cut from the decoded bytes the read fetched: no copy
    plan, fresh = kept[0]
    rest = inst.chunk_range(plan, fresh, mib + 12288, 2 * mib)
    assert isinstance(rest, memoryview) and bytes(rest) == BIG[mib + 12288:2 * mib]
    assert bytes(inst.chunk_range(plan, {}, mib, mib + 8192)) == BIG[mib:mib + 8192]  # re-read
    # (BIG's chunks are one deduplicated chunk: the other reads hit; bounds of a plan)
    end = inst.plan_read(big, len(BIG) - 100, 4096)
    assert inst.chunk_bounds(end) == (2 * mib, len(BIG))  # capped at the file's end


def test_fill_page_cache_false_stores_nothing(tmp_path: Path, image: tuple[Path, Path, Path]) -> None:
    inst = local_instance(image[1], image[2], tmp_path / "cache")
    inst.config = replace(inst.config, rafs=replace(inst.config.rafs, fill_page_cache=False))
    vfs = Vfs()
    vfs.dedicated = inst
    kernel = Kernel(RafsServer(vfs))
    kernel.init()
    stored: list[int] = []
    kernel.server.store = lambda nodeid, i, plan, fresh: stored.append(nodeid)
    big = kernel.lookup(P.ROOT_ID, b"big")[0]
    assert kernel.read(big, 0, 4096) == BIG[:4096]
    assert stored == []
    inst.close()


def _drop_from_page_cache(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        with pytest.raises(BlockingIOError):  # the pages are gone: a NOWAIT read fails
            os.preadv(fd, [bytearray(4096)], 0, os.RWF_NOWAIT)
    finally:
        os.close(fd)


def test_a_cached_read_whose_cache_file_left_the_page_cache_reads_the_disk_and_stores_nothing(
        tmp_path: Path, dedicated) -> None:  # type: ignore[no-untyped-def]
    kernel, inst = dedicated
    stored: list[int] = []
    kernel.server.store = lambda nodeid, i, plan, fresh: stored.append(nodeid)
    big = kernel.lookup(P.ROOT_ID, b"big")[0]
    assert kernel.read(big, 0, 4096) == BIG[:4096]  # a miss: fetched, then persisted
    deadline = time.monotonic() + 30
    while inst.read_cached(inst.plan_read(big, 0, 4096)) is None:
        assert time.monotonic() < deadline, "the fetched chunk was never persisted"
        time.sleep(0.01)
    stored.clear()
    _drop_from_page_cache(Path(inst.cache(0).data_path))
    mib = 1 << 20
    assert kernel.read(big, mib, 128 << 10) == BIG[mib:mib + (128 << 10)]
    assert stored == []  # no backend wait: nothing to push into the kernel's page cache

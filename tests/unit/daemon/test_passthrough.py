"""FUSE passthrough without a kernel: the INIT codec, the open-mode table, materializing
and the OPEN/RELEASE answers (the kernel's side is in tests/integration/daemon/
test_passthrough.py)."""

from __future__ import annotations

import os
import struct
import time
from dataclasses import replace
from pathlib import Path

import pytest

from pynydus.daemon import fuseproto as P
from pynydus.daemon import materialize
from pynydus.daemon.fuseops import RafsServer
from pynydus.daemon.iomode import IoModes
from pynydus.daemon.materialize import FLOOR, Materializer
from pynydus.daemon.vfs import Vfs
from pynydus.manager.filesystem import blob_id_of, cache_usage, remove_unused
from tests.harness.rafs_instance import built_instance
from tests.unit.daemon.test_fuseops import Kernel

BIG = bytes(range(256)) * 4096 * 3  # 3 MiB: above the floor
SMALL = b"s" * (FLOOR - 1)
KERNEL_FLAGS = P.INIT_EXT | P.MAX_PAGES | P.ASYNC_READ | P.PASSTHROUGH


# --- INIT -------------------------------------------------------------------------------


def test_init_negotiates_passthrough_with_stack_depth_one_only_when_offered() -> None:
    params, body = P.negotiate(P.InitIn(7, 44, 1 << 20, KERNEL_FLAGS), P.PASSTHROUGH_WANTS)
    reply = P.parse_init_reply(body)
    assert params.has(P.PASSTHROUGH) and reply["flags"] & P.PASSTHROUGH
    assert params.max_stack_depth == reply["max_stack_depth"] == 1
    # a successor restores both from the saved state
    assert P.InitParams.from_dict(params.to_dict()) == params
    no, body = P.negotiate(P.InitIn(7, 44, 1 << 20, KERNEL_FLAGS & ~P.PASSTHROUGH),
                           P.PASSTHROUGH_WANTS)
    assert not no.has(P.PASSTHROUGH) and P.parse_init_reply(body)["max_stack_depth"] == 0
    # the blob-file mount's wants (the defaults) never ask for it
    plain, _ = P.negotiate(P.InitIn(7, 44, 1 << 20, KERNEL_FLAGS), P.InitWants())
    assert not plain.has(P.PASSTHROUGH) and plain.max_stack_depth == 0


def test_backing_ioctl_arguments() -> None:
    assert P.backing_map(7) == struct.pack("<iIQ", 7, 0, 0)
    assert P.backing_id(3) == struct.pack("<I", 3)
    assert P.parse_open(P.open_body(0, P.FOPEN_PASSTHROUGH, 5)) == (0, P.FOPEN_PASSTHROUGH, 5)


# --- the open-mode table -------------------------------------------------------------------


def test_an_inode_becomes_passthrough_only_without_cached_opens() -> None:
    t = IoModes.new(capacity=8)
    calls: list[int] = []

    def backing() -> int:
        calls.append(1)
        return 9

    try:
        assert t.open(11, None) == 0  # not materialized: cached, counted
        assert t.open(11, backing) == 0  # materialized now, but a cached open is alive
        assert t.entry(11) == (2, 0) and not calls
        t.release(11)
        t.release(11)
        assert t.open(11, backing) == 9 and calls == [1]  # eligible: registered once
        assert t.open(11, None) == 9 and t.open(11, backing) == 9 and calls == [1]
        t.release(11)  # a passthrough release changes nothing
        assert t.entry(11) == (0, 9)
        assert t.open(12, lambda: 0) == 0 and t.entry(12) == (1, 0)  # refused: cached
    finally:
        t.close()


def test_a_successor_sees_every_count_and_backing_id_and_locks_apart(tmp_path: Path) -> None:
    old = IoModes.new(capacity=8)
    old.open(1, None)
    old.open(2, lambda: 4)
    new = IoModes.adopt(os.dup(old.fd))  # as the supervisor hands it over
    try:
        assert new.entry(1) == (1, 0) and new.entry(2) == (0, 4)
        assert new.open(1, lambda: 5) == 0  # still open cached: stays cached
        assert old.entry(1) == (2, 0)  # one table: the predecessor sees it too
        assert new.fd != old.fd  # its own open: the flocks exclude each other
    finally:
        new.close()
        old.close()


def test_a_full_or_missing_table_turns_blind_and_keeps_what_is_eligible() -> None:
    t = IoModes.new(capacity=2)
    try:
        assert t.open(1, lambda: 3) == 3
        assert t.open(2, None) == 0
        assert t.open(5, lambda: 6) == 0 and t.blind  # no room: nobody can tell any more
        assert t.open(1, None) == 3  # already eligible: stays
        t.release(2)
        assert t.open(2, lambda: 6) == 0  # blind: nothing newly eligible
    finally:
        t.close()
    blind = IoModes.blind_table()
    try:
        assert blind.blind and blind.open(1, lambda: 3) == 0
    finally:
        blind.close()


def test_forget_drops_an_unmounted_slot_and_returns_its_backing_ids() -> None:
    t = IoModes.new(capacity=8)
    try:
        for nodeid, bid in ((1 << 56 | 5, 7), (1 << 56 | 6, 0), (2 << 56 | 5, 8)):
            t.open(nodeid, (lambda b=bid: b) if bid else None)
        assert t.forget(lambda n: n >> 56 == 1) == [7]
        assert t.entry(1 << 56 | 5) == (0, 0) and t.entry(2 << 56 | 5) == (0, 8)
        assert t.open(1 << 56 | 5, lambda: 9) == 9  # a new image in the slot starts afresh
    finally:
        t.close()


def test_a_foreign_fd_is_not_a_table() -> None:
    fd = os.memfd_create("x")
    os.ftruncate(fd, 4096)
    with pytest.raises(ValueError, match="not an open-mode table"):
        IoModes.adopt(fd)


# --- materializing and the answers ------------------------------------------------------------


@pytest.fixture
def served(tmp_path: Path):  # type: ignore[no-untyped-def]
    inst = built_instance(tmp_path, {"big": BIG, "small": SMALL})
    vfs = Vfs()
    vfs.dedicated = inst
    server = RafsServer(vfs, wants=P.PASSTHROUGH_WANTS)
    server.iomodes = IoModes.new()
    server.materializer = Materializer()
    registered: list[str] = []

    def backing_open(path: str) -> int:
        registered.append(path)
        return len(registered)

    server.backing_open = backing_open
    k = Kernel(server)
    k.ok(P.INIT, 0, P.init_request_body(44, KERNEL_FLAGS))
    yield k, inst, registered, tmp_path
    server.materializer.close()
    server.iomodes.close()
    inst.close()


def _open(k: Kernel, nodeid: int) -> tuple[int, int, int]:
    return P.parse_open(k.ok(P.OPEN, nodeid, struct.pack("<II", os.O_RDONLY, 0)))


def _release(k: Kernel, nodeid: int, fh: int) -> None:
    k.ok(P.RELEASE, nodeid, struct.pack("<QIIQ", fh, 0, 0, 0))


def _read_all(k: Kernel, nodeid: int, size: int) -> bytes:
    return b"".join(k.read(nodeid, off, 1 << 20) for off in range(0, size, 1 << 20))


def _wait_idle(server: RafsServer) -> None:
    assert server.materializer is not None
    deadline = time.monotonic() + 60
    while server.materializer.pending:
        assert time.monotonic() < deadline, "materializing did not finish"
        time.sleep(0.02)


def test_a_file_read_whole_is_materialized_and_opened_passthrough_after(served) -> None:  # type: ignore[no-untyped-def]
    k, inst, registered, tmp_path = served
    big = inst.bs.lookup_path("/big")
    fh, flags, bid = _open(k, big)
    assert (fh, flags & P.FOPEN_PASSTHROUGH, bid) == (big, 0, 0)  # nothing materialized
    _release(k, big, fh)  # chunks not cached yet: nothing to copy
    _wait_idle(k.server)
    assert k.server.materializer.done == 0
    fh, _, _ = _open(k, big)
    assert _read_all(k, big, len(BIG)) == BIG
    _release(k, big, fh)
    _wait_idle(k.server)
    assert k.server.materializer.done == 1
    copies = list((tmp_path / "cache").glob("*.file.*"))
    assert len(copies) == 1 and copies[0].read_bytes() == BIG
    assert blob_id_of(copies[0].name) == inst.bs.blobs[0].blob_id
    fh, flags, bid = _open(k, big)
    assert (fh, flags & P.FOPEN_PASSTHROUGH, bid) == (0, P.FOPEN_PASSTHROUGH, 1)
    assert registered == [str(copies[0])]
    _release(k, big, fh)
    # the small file is read whole too, but stays below the floor
    small = inst.bs.lookup_path("/small")
    fh, _, _ = _open(k, small)
    _read_all(k, small, len(SMALL))
    _release(k, small, fh)
    _wait_idle(k.server)
    assert _open(k, small)[1] & P.FOPEN_PASSTHROUGH == 0 and k.server.materializer.done == 1


def test_a_cached_open_keeps_the_inode_cached_until_released(served) -> None:  # type: ignore[no-untyped-def]
    k, inst, _registered, _ = served
    big = inst.bs.lookup_path("/big")
    first, _, _ = _open(k, big)
    _read_all(k, big, len(BIG))
    held, _, _ = _open(k, big)  # a second cached open, kept
    _release(k, big, first)
    _wait_idle(k.server)
    assert k.server.materializer.done == 1
    fh, flags, _ = _open(k, big)
    assert flags & P.FOPEN_PASSTHROUGH == 0 and fh == big  # "held" is open cached
    _release(k, big, fh)
    _release(k, big, held)
    assert _open(k, big)[1] & P.FOPEN_PASSTHROUGH


def test_a_later_daemon_finds_the_copy_and_the_cache_gc_removes_it(served) -> None:  # type: ignore[no-untyped-def]
    k, inst, _registered, tmp_path = served
    big = inst.bs.lookup_path("/big")
    fh, _, _ = _open(k, big)
    _read_all(k, big, len(BIG))
    _release(k, big, fh)
    _wait_idle(k.server)
    copy = next((tmp_path / "cache").glob("*.file.*"))
    assert Materializer().path(inst, big) == str(copy)  # a restart: found by its name
    copy.write_bytes(BIG[:-1])  # a copy of another size is not used
    assert Materializer().path(inst, big) == ""
    blob = inst.bs.blobs[0].blob_id
    size, files = cache_usage(str(tmp_path / "cache"), blob)  # the copy counts
    data = tmp_path / "cache" / f"{blob}.blob.data"
    assert files == 3 and size >= (copy.stat().st_blocks + data.stat().st_blocks) * 512
    removed = remove_unused(str(tmp_path / "cache"), set())
    assert removed == [inst.bs.blobs[0].blob_id] and not copy.exists()


def test_an_open_names_no_copy_while_none_of_the_images_blobs_has_one(  # type: ignore[no-untyped-def]
        served, monkeypatch: pytest.MonkeyPatch) -> None:
    k, inst, _registered, tmp_path = served
    named: list[int] = []
    layout_name = materialize._layout_name

    def counted(inst: object, nid: int) -> tuple[str, int]:
        named.append(nid)
        return layout_name(inst, nid)  # type: ignore[arg-type]

    monkeypatch.setattr(materialize, "_layout_name", counted)
    # another blob's copy in the work dir does not make this image's files worth naming
    (tmp_path / "cache").mkdir(exist_ok=True)
    (tmp_path / "cache" / f"{'e' * 64}.file.0123").write_bytes(b"x")
    big = inst.bs.lookup_path("/big")
    fh, _, _ = _open(k, big)
    _release(k, big, fh)
    _wait_idle(k.server)
    assert named == []  # the open named nothing (nor the release: nothing is cached)
    fh, _, _ = _open(k, big)
    _read_all(k, big, len(BIG))
    _release(k, big, fh)
    _wait_idle(k.server)
    assert named == [big] and k.server.materializer.done == 1  # named once, to copy it
    assert _open(k, big)[1] & P.FOPEN_PASSTHROUGH


def test_a_copy_another_daemon_made_after_the_listing_is_used_after_a_cached_open(  # type: ignore[no-untyped-def]
        served) -> None:
    k, inst, registered, tmp_path = served
    big = inst.bs.lookup_path("/big")
    fh, _, _ = _open(k, big)  # this daemon lists the work dir: no copy there
    _read_all(k, big, len(BIG))
    other = Materializer()  # another daemon over the same cache copies the file
    other.released(inst, big)
    while other.pending:
        time.sleep(0.02)
    other.close()
    copy = next((tmp_path / "cache").glob("*.file.*"))
    mtime = copy.stat().st_mtime_ns
    _release(k, big, fh)  # found by its name before copying: not copied again
    _wait_idle(k.server)
    assert copy.stat().st_mtime_ns == mtime
    fh, flags, _ = _open(k, big)
    assert flags & P.FOPEN_PASSTHROUGH and registered == [str(copy)]


def test_passthrough_false_keeps_the_image_on_fuse(served) -> None:  # type: ignore[no-untyped-def]
    k, inst, registered, tmp_path = served
    inst.config = replace(inst.config, rafs=replace(inst.config.rafs, passthrough=False))
    big = inst.bs.lookup_path("/big")
    for _ in range(2):
        fh, flags, _ = _open(k, big)
        _read_all(k, big, len(BIG))
        _release(k, big, fh)
        _wait_idle(k.server)
        assert (fh, flags & P.FOPEN_PASSTHROUGH) == (big, 0)
    assert k.server.materializer.done == 0 and not registered
    assert not list((tmp_path / "cache").glob("*.file.*"))

"""The reader on synthetic RAFS v6 images: xattrs, devices, odd names, big
directories, hard links, symlink storage, read mapping, malformed headers, scale."""

from __future__ import annotations

import stat
import struct
import subprocess
import time
from pathlib import Path

import pytest
import synth_v6 as S

from pynydus.errors import FormatError, InvalidArgument, NotFound
from pynydus.rafs.format import layout as L
from pynydus.rafs.read import BootstrapV6, bootstrap_from_bytes, describe
from tests.harness import tools

XATTRS = [
    (b"user.k", b"v"),
    (b"security.selinux", b"ctx\0"),
    (b"system.posix_acl_access", b"\x02\0\0\0"),
    (b"trusted.overlay.opaque", b"y"),
]


@pytest.fixture(scope="module")
def image() -> S.Image:
    root = S.d(uid=1000, gid=1001)
    root.children[b"a"] = S.d(
        children={
            b"x\xff\xfe": S.f(5000, xattrs=XATTRS),
            b"fifo": S.Node(stat.S_IFIFO | 0o644),
            b"sock": S.Node(stat.S_IFSOCK | 0o644),
            b"chr": S.Node(stat.S_IFCHR | 0o600, rdev=(5 << 8) | 1),
            b"blk": S.Node(stat.S_IFBLK | 0o600, rdev=(7 << 8) | 3),
        },
        xattrs=[(b"trusted.overlay.opaque", b"y")],
    )
    big = S.d()
    for i in range(2000):
        big.children[b"file%05d" % i] = S.f(i, mtime=1_600_000_000 + i, mtime_nsec=i)
    root.children[b"big"] = big
    root.children[b"long"] = S.ln(b"L" * 4096)
    root.children[b"short"] = S.ln(b"a/fifo")
    root.children[b"empty"] = S.d()
    root.children[b"\x01first"] = S.f(1)  # sorts before "." and ".."
    h = S.f(3 << 20)
    root.children[b"h1"] = h
    big.children[b"h2"] = h
    return S.build(root, prefetch=[b"/a", b"/big"])


@pytest.fixture(scope="module")
def bs(image: S.Image) -> BootstrapV6:
    b = bootstrap_from_bytes(image.data)
    assert isinstance(b, BootstrapV6)
    return b


def test_walk_lists_every_name_once_with_raw_bytes(bs: BootstrapV6, image: S.Image) -> None:
    paths = [p for p, _ in bs.walk()]
    assert len(paths) == len(set(paths)) == 1 + 5 + 1 + 2001 + 6
    assert b"/a/x\xff\xfe" in paths and b"/\x01first" in paths
    root_names = [e.name for e in bs.readdir(bs.root_ino)]
    assert root_names[:3] == [b"\x01first", b".", b".."]
    assert bs.lookup(bs.root_ino, b"\x01first") == image.root.children[b"\x01first"].nid


def test_xattrs_round_trip_with_every_prefix(bs: BootstrapV6) -> None:
    ino = bs.lookup_path(b"/a/x\xff\xfe")
    assert bs.xattrs(ino) == XATTRS
    assert bs.listxattr(ino) == [n for n, _ in XATTRS]
    assert bs.getxattr(ino, b"security.selinux") == b"ctx\0"
    assert bs.getxattr(ino, b"user.none") is None
    assert bs.xattrs(bs.lookup_path("/a")) == [(b"trusted.overlay.opaque", b"y")]
    assert bs.has_xattr
    assert bs.xattrs(bs.root_ino) == []


def test_special_files_report_type_and_rdev(bs: BootstrapV6) -> None:
    kinds = {e.name: e.file_type for e in bs.readdir(bs.lookup_path("/a"))}
    assert kinds[b"fifo"] == L.FileType.FIFO and kinds[b"sock"] == L.FileType.SOCK
    assert kinds[b"chr"] == L.FileType.CHRDEV and kinds[b"blk"] == L.FileType.BLKDEV
    assert bs.stat(bs.lookup_path("/a/chr")).rdev == (5 << 8) | 1
    assert bs.stat(bs.lookup_path("/a/blk")).rdev == (7 << 8) | 3
    assert bs.stat(bs.lookup_path("/a")).rdev == 0  # i_u is a block address there, not a device
    assert bs.chunks(bs.lookup_path("/a/fifo")) == []


def test_stat_fields(bs: BootstrapV6) -> None:
    st = bs.stat(bs.lookup_path("/big/file01234"))
    assert (st.size, st.mtime, st.mtime_nsec, st.nlink, st.blocks) == (
        1234,
        1_600_001_234,
        1234,
        1,
        3,
    )
    root = bs.stat(bs.root_ino)
    assert (root.uid, root.gid, root.nlink) == (1000, 1001, 5)
    assert bs.explicit_uidgid


def test_multi_block_directory_lookup_of_every_name(bs: BootstrapV6, image: S.Image) -> None:
    big = image.root.children[b"big"]
    assert bs.stat(big.nid).size > 8 * 4096
    for name, node in big.children.items():
        assert bs.lookup(big.nid, name) == node.nid
    for missing in (b"file", b"file99999", b"a", b"zzz", b"file00000\0", b"\xff"):
        with pytest.raises(NotFound):
            bs.lookup(big.nid, missing)
    names = [e.name for e in bs.readdir(big.nid)]
    assert names == sorted(names) and len(names) == 2003


def test_empty_directory_has_only_dot_entries(bs: BootstrapV6) -> None:
    ino = bs.lookup_path("/empty")
    assert [(e.name, e.ino) for e in bs.readdir(ino)] == [(b".", ino), (b"..", bs.root_ino)]


def test_symlinks_inline_and_in_a_block(bs: BootstrapV6) -> None:
    assert bs.readlink(bs.lookup_path("/short")) == b"a/fifo"
    assert bs.readlink(bs.lookup_path("/long")) == b"L" * 4096
    assert bs.raw_inode(bs.lookup_path("/long")).format >> 1 == L.EROFS_INODE_FLAT_PLAIN
    with pytest.raises(InvalidArgument):
        bs.readlink(bs.root_ino)


def test_hard_links_share_one_nid(bs: BootstrapV6) -> None:
    a, b = bs.lookup_path("/h1"), bs.lookup_path("/big/h2")
    assert a == b and bs.stat(a).nlink == 2


def test_chunks_and_map_read_follow_file_geometry(bs: BootstrapV6, image: S.Image) -> None:
    ino = bs.lookup_path("/h1")
    chunks = bs.chunks(ino)
    assert [(c.index, c.uncompressed_offset, c.uncompressed_size) for c in chunks] == image.chunks[
        ino
    ]
    assert all(c.compressed and c.compressor == L.Compressor.ZSTD for c in chunks)
    mb = 1 << 20
    reads = bs.map_read(ino, mb - 1, mb + 2)
    assert [(r.chunk.file_offset, r.offset, r.length) for r in reads] == [
        (0, mb - 1, 1),
        (mb, 0, mb),
        (2 * mb, 0, 1),
    ]
    assert bs.map_read(ino, 0, 0) == []
    with pytest.raises(InvalidArgument):
        bs.map_read(ino, -1, 1)
    small = bs.lookup_path("/big/file00777")
    assert [(r.offset, r.length) for r in bs.map_read(small, 100, 10**9)] == [(100, 677)]


def test_prefetch_table_holds_nids(bs: BootstrapV6, image: S.Image) -> None:
    assert bs.prefetch_list == [image.root.children[b"a"].nid, image.root.children[b"big"].nid]
    assert not bs.prefetch_all


def test_describe_counts_the_tree(bs: BootstrapV6) -> None:
    d = describe(bs)
    s = d["stats"]
    assert (s["entries"], s["inodes"], s["directories"], s["symlinks"]) == (2014, 2013, 4, 2)
    assert (s["fifos"], s["sockets"], s["char_devices"], s["block_devices"]) == (1, 1, 1, 1)
    assert s["xattr_inodes"] == 2 and s["hardlinked_inodes"] == 1
    assert d["prefetch_paths"] == ["/a", "/big"]
    assert d["compressor"] == "zstd" and "HAS_XATTR" in d["flag_names"]


# -- malformed headers: each check names its field and offset ---------------------------


def _patch(data: bytes, off: int, fmt: str, value: int) -> bytes:
    buf = bytearray(data)
    struct.pack_into("<" + fmt, buf, off, value)
    return bytes(buf)


@pytest.mark.parametrize(
    "off,fmt,value,field",
    [
        (1024 + 4, "I", 1, "s_checksum"),
        (1024 + 8, "I", 0, "s_feature_compat"),
        (1024 + 12, "B", 10, "s_blkszbits"),
        (1024 + 13, "B", 1, "s_extslots"),
        (1024 + 16, "Q", 0, "s_inos"),
        (1024 + 44, "I", 3, "s_xattr_blkaddr"),
        (1024 + 80, "I", 0x1C, "s_feature_incompat"),
        (1024 + 84, "H", 1, "s_u"),
        (1024 + 88, "H", 12, "s_devt_slotoff"),
        (1024 + 40, "I", 10**6, "s_meta_blkaddr"),
        (1152, "Q", 0x3, "s_flags"),  # two compressors
        (1152, "Q", 0x84, "s_flags"),  # replaced below by two digesters
        (1152 + 20, "I", 3000, "s_chunk_size"),
        (1152 + 8, "Q", 4000, "blob table"),
        (1152 + 16, "I", 512, "s_blob_table_size"),
        (1152 + 24, "Q", 4096, "chunk table"),
        (1152 + 40, "Q", 1 << 40, "prefetch table"),
        (1408 + 64, "I", 0, "device slot blocks"),
        (1408, "B", ord("/"), "device slot blob id"),
        (4096 + 64, "I", 1, "blob_index"),
        (4096 + 68, "I", 1 << 21, "chunk_size"),
        (4096 + 76, "I", 9, "compression_algo"),
        (4096 + 84, "I", 0, "features"),
        (4096 + 84, "I", 0x1001, "features"),
        (4096 + 128, "Q", 10**9, "ci_uncompressed_size"),
    ],
)
def test_each_header_check_rejects_with_field_and_offset(
    image: S.Image, off: int, fmt: str, value: int, field: str
) -> None:
    data = _patch(image.data, off, fmt, value)
    if field == "s_flags" and value == 0x84:
        data = _patch(image.data, off, fmt, 0x80 | 0x4 | 0x8)  # two digesters
    with pytest.raises(FormatError, match=rf"{field}.* at offset \d+") as err:
        bootstrap_from_bytes(data)
    assert "offset" in str(err.value)


def test_root_must_be_a_directory(image: S.Image) -> None:
    root_off = 8192 + 128 * 32
    data = _patch(image.data, root_off + 4, "H", stat.S_IFREG | 0o644)
    with pytest.raises(FormatError, match="root inode"):
        bootstrap_from_bytes(data)


def test_directory_loop_is_detected(image: S.Image, bs: BootstrapV6) -> None:
    """Point a dirent of /a at the root: the walk must stop with FormatError."""
    a = image.root.children[b"a"]
    node = bs._node(a.nid)
    boff, _ = bs._flat_blocks(node)[0]
    buf = bytearray(image.data)
    count = struct.unpack_from("<H", buf, boff + 8)[0] // 12
    for j in range(count):
        _nid, nameoff, ftype = struct.unpack_from("<QHB", buf, boff + 12 * j)
        if ftype == L.FileType.FIFO:
            struct.pack_into("<QHB", buf, boff + 12 * j, bs.root_ino, nameoff, L.FileType.DIR)
    looped = bootstrap_from_bytes(bytes(buf))
    with pytest.raises(FormatError, match="reachable twice"):
        list(looped.walk())


def test_unsorted_directory_is_rejected_by_readdir(image: S.Image, bs: BootstrapV6) -> None:
    empty = image.root.children[b"empty"]
    node = bs._node(empty.nid)
    boff, _blen = bs._flat_blocks(node)[0]
    buf = bytearray(image.data)
    # entries are [".", ".."]; renaming "." to "0" puts "0" before "..", out of order
    buf[boff + 24 : boff + 25] = b"0"
    with pytest.raises(FormatError, match="dirent order"):
        list(bootstrap_from_bytes(bytes(buf)).readdir(empty.nid))


def test_chunk_pointing_at_a_missing_blob_is_rejected(image: S.Image, bs: BootstrapV6) -> None:
    ino = image.root.children[b"h1"].nid
    node = bs._node(ino)
    arr, _ = bs._chunk_addrs(node)
    data = _patch(image.data, arr + 2, "H", 2)  # device id 2 in a 1-blob image
    with pytest.raises(FormatError, match="device id.* at offset"):
        bootstrap_from_bytes(data).chunks(ino)
    data = _patch(image.data, arr, "H", 0xFFFF)  # ci index beyond chunk_count
    with pytest.raises(FormatError, match="chunk 0 index"):
        bootstrap_from_bytes(data).chunks(ino)


def test_huge_sizes_fail_before_allocating(image: S.Image, bs: BootstrapV6) -> None:
    for name, field_off in ((b"h1", 8), (b"big", 8), (b"long", 8)):
        ino = image.root.children[name].nid
        data = _patch(image.data, 8192 + ino * 32 + field_off, "Q", (1 << 64) - 1)
        b = bootstrap_from_bytes(data)
        with pytest.raises(FormatError):
            if name == b"h1":
                b.chunks(ino)
            elif name == b"big":
                list(b.readdir(ino))
            else:
                b.readlink(ino)


def test_unknown_nids_are_not_found(bs: BootstrapV6) -> None:
    with pytest.raises(NotFound):
        bs.stat(len(bs._buf))
    with pytest.raises(NotFound):
        bs.lookup_path("/a/nope")


# -- scale ------------------------------------------------------------------------------


def test_a_50000_file_bootstrap_opens_in_well_under_100ms() -> None:
    root = S.d()
    for d_i in range(50):
        sub = S.d()
        for f_i in range(1000):
            sub.children[b"f%04d" % f_i] = S.f(f_i % 7)
        root.children[b"d%02d" % d_i] = sub
    data = S.build(root).data
    bootstrap_from_bytes(data)  # warm imports
    # This thread's CPU time, the best of five: what the open costs, not how long a loaded
    # machine kept the test from running.
    opened, per_lookup = float("inf"), float("inf")
    for _ in range(5):
        t0 = time.thread_time()
        b = bootstrap_from_bytes(data)
        opened = min(opened, time.thread_time() - t0)
        t0 = time.thread_time()
        for i in range(1000):
            b.stat(b.lookup_path(b"/d%02d/f%04d" % (i % 50, (i * 37) % 1000)))
        per_lookup = min(per_lookup, (time.thread_time() - t0) / 1000)
    assert opened < 0.02, opened
    assert per_lookup < 0.002, per_lookup
    print(
        f"50k files: {len(data)} bytes, open {opened * 1e3:.2f} ms, path lookup+stat {per_lookup * 1e6:.0f} us"
    )


def test_synthetic_image_is_valid_erofs_for_fsck(
    image: S.Image, bs: BootstrapV6, tmp_path: Path
) -> None:
    """The test writer follows the same rules the reader enforces; erofs-utils agrees."""
    tools.require("fsck.erofs")
    boot = tmp_path / "image.boot"
    boot.write_bytes(image.data)
    dev = tmp_path / "blob.data"
    with dev.open("wb") as f:
        f.truncate(bs.blobs[0].uncompressed_size)
    run = subprocess.run(
        ["fsck.erofs", f"--device={dev}", str(boot)],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 0, run.stderr


def test_lookup_in_a_30000_entry_directory_touches_few_blocks() -> None:
    root = S.d()
    flat = S.d()
    for i in range(30000):
        flat.children[b"entry-%06d" % i] = S.f(0)
    root.children[b"flat"] = flat
    b = bootstrap_from_bytes(S.build(root).data)
    ino = b.lookup_path("/flat")
    assert b.stat(ino).size > 150 * 4096
    t0 = time.perf_counter()
    for i in range(0, 30000, 30):
        assert b.lookup(ino, b"entry-%06d" % i) == flat.children[b"entry-%06d" % i].nid
    per_lookup = (time.perf_counter() - t0) / 1000
    assert per_lookup < 0.002, per_lookup


def test_names_with_a_separator_are_rejected(image: S.Image, bs: BootstrapV6) -> None:
    """A dirent name like b"a/../x" would escape its directory when joined into a path."""
    a = image.root.children[b"a"]
    boff, blen = bs._flat_blocks(bs._node(a.nid))[0]
    data = bytearray(image.data)
    pos = bytes(data[boff : boff + blen]).find(b"fifo")
    data[boff + pos + 1] = ord(
        "/"
    )  # "f/fo": still sorted after "chr", so only the name check fires
    b = bootstrap_from_bytes(bytes(data))
    with pytest.raises(FormatError, match="is not a file name"):
        list(b.readdir(a.nid))

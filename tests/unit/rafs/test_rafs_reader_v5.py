"""The v5 reader on a synthetic image: xattrs, special files, hard links, holes."""

from __future__ import annotations

import stat

import pytest
import synth_v5 as S5

from pynydus.errors import FormatError, InvalidArgument, NotFound
from pynydus.rafs.format import Digester, FileType
from pynydus.rafs.read import BootstrapV5, bootstrap_from_bytes

XATTRS = [(b"user.a", b"1"), (b"security.capability", b"\x01\x02")]
MB = 1 << 20


@pytest.fixture(scope="module")
def built() -> tuple[bytes, dict[bytes, int]]:
    shared = S5.Node(stat.S_IFREG | 0o755, data_size=10)
    root = S5.Node(stat.S_IFDIR | 0o755)
    etc = S5.Node(stat.S_IFDIR | 0o755, xattrs=[(b"trusted.overlay.opaque", b"y")])
    etc.children[b"conf"] = S5.Node(stat.S_IFREG | 0o644, data_size=3 * MB + 5, xattrs=XATTRS)
    etc.children[b"link"] = S5.Node(stat.S_IFLNK | 0o777, target=b"../bin/tool")
    etc.children[b"tty"] = S5.Node(stat.S_IFCHR | 0o620, rdev=(4 << 8) | 1)
    root.children[b"etc"] = etc
    bin_ = S5.Node(stat.S_IFDIR | 0o755)
    bin_.children[b"tool"] = shared
    root.children[b"bin"] = bin_
    root.children[b"tool2"] = shared
    # 4 MiB file with data only in [1 MiB, 2 MiB) and a 100-byte tail at 4 MiB - 100.
    root.children[b"sparse"] = S5.Node(
        stat.S_IFREG | 0o644, data_size=4 * MB, chunk_spans=[(MB, MB), (4 * MB - 100, 100)]
    )
    return S5.build(root)


@pytest.fixture(scope="module")
def bs(built: tuple[bytes, dict[bytes, int]]) -> BootstrapV5:
    b = bootstrap_from_bytes(built[0])
    assert isinstance(b, BootstrapV5)
    return b


def test_tree_paths_and_inode_numbers(
    bs: BootstrapV5, built: tuple[bytes, dict[bytes, int]]
) -> None:
    walked = dict(bs.walk())
    assert walked == built[1]
    assert bs.digester == Digester.SHA256


def test_xattrs_and_special_files(bs: BootstrapV5) -> None:
    conf = bs.lookup_path("/etc/conf")
    assert bs.xattrs(conf) == XATTRS
    assert bs.getxattr(conf, b"user.a") == b"1"
    assert bs.xattrs(bs.lookup_path("/etc")) == [(b"trusted.overlay.opaque", b"y")]
    tty = bs.lookup_path("/etc/tty")
    assert bs.stat(tty).rdev == (4 << 8) | 1
    kinds = {e.name: e.file_type for e in bs.readdir(bs.lookup_path("/etc"))}
    assert kinds == {
        b".": FileType.DIR,
        b"..": FileType.DIR,
        b"conf": FileType.REG,
        b"link": FileType.SYMLINK,
        b"tty": FileType.CHRDEV,
    }
    assert bs.readlink(bs.lookup_path("/etc/link")) == b"../bin/tool"
    with pytest.raises(InvalidArgument):
        bs.readlink(conf)


def test_hard_links_report_one_inode(bs: BootstrapV5) -> None:
    a, b = bs.lookup_path("/bin/tool"), bs.lookup_path("/tool2")
    assert a == b and bs.stat(a).nlink == 2


def test_dense_file_map_read(bs: BootstrapV5) -> None:
    conf = bs.lookup_path("/etc/conf")
    reads = bs.map_read(conf, MB - 1, 2)
    assert [(r.chunk.file_offset, r.offset, r.length) for r in reads] == [
        (0, MB - 1, 1),
        (MB, 0, 1),
    ]
    assert sum(r.length for r in bs.map_read(conf, 0, 10 * MB)) == 3 * MB + 5


def test_holes_are_left_to_the_caller(bs: BootstrapV5) -> None:
    sparse = bs.lookup_path("/sparse")
    assert [(c.file_offset, c.uncompressed_size) for c in bs.chunks(sparse)] == [
        (MB, MB),
        (4 * MB - 100, 100),
    ]
    reads = bs.map_read(sparse, 0, 4 * MB)
    assert [(r.chunk.file_offset + r.offset, r.length) for r in reads] == [
        (MB, MB),
        (4 * MB - 100, 100),
    ]
    assert bs.map_read(sparse, 2 * MB, 100) == []


def test_dot_entries_and_missing_names(bs: BootstrapV5) -> None:
    etc = bs.lookup_path("/etc")
    assert bs.lookup(etc, b"..") == 1 and bs.lookup(etc, b".") == etc
    with pytest.raises(NotFound):
        bs.lookup(etc, b"nope")
    with pytest.raises(NotFound):
        bs.stat(10**6)
    with pytest.raises(InvalidArgument):
        list(bs.readdir(bs.lookup_path("/etc/conf")))


def test_v5_header_checks(built: tuple[bytes, dict[bytes, int]]) -> None:
    data = built[0]
    for off, value, field in (
        (4, b"\x00\x04\x00\x00", "s_fs_version"),
        (8, b"\x00\x10\x00\x00", "s_sb_size"),
        (12, b"\x00\x30\x00\x00", "s_block_size"),
        (16, b"\x03\x00\x00\x00", "s_flags"),
        (20, b"\x00\x04\x00\x00", "s_flags"),
        (32, b"\xff\xff\xff\x7f", "inode table"),
    ):
        bad = bytearray(data)
        bad[off : off + len(value)] = value
        with pytest.raises(FormatError, match=field):
            bootstrap_from_bytes(bytes(bad))
    with pytest.raises(FormatError, match="bootstrap size"):
        bootstrap_from_bytes(data[:-4])

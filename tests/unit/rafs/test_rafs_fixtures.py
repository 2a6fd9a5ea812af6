"""The reader against real upstream bootstraps (nydus-snapshotter testdata, spec §6.1)."""

from __future__ import annotations

import json
import tarfile
import time
from pathlib import Path

import pytest

from pynydus.errors import FormatError, InvalidArgument, NotFound
from pynydus.rafs.format import Compressor, Digester, FileType
from pynydus.rafs.format.layout import RafsV6InodeExtended
from pynydus.rafs.read import (
    Bootstrap,
    BootstrapV5,
    BootstrapV6,
    bootstrap_from_bytes,
    inspect_bootstrap,
    open_bootstrap,
)
from tests.harness.paths import FIXTURES as SHARED_FIXTURES

FIXTURES = SHARED_FIXTURES / "snapshotter-testdata"
V6 = FIXTURES / "v6-bootstrap-chunk-pos-438272/image/image.boot"
V5 = FIXTURES / "v5-bootstrap-file-size-736032/image/image.boot"
GOLDEN = FIXTURES / "v6-bootstrap-chunk-pos-438272.golden.tsv"
SUMMARY = FIXTURES / "v6-bootstrap-chunk-pos-438272.summary.json"
ARCHIVES = FIXTURES / "archives"



@pytest.fixture(scope="module")
def v6() -> BootstrapV6:
    bs = open_bootstrap(V6)
    assert isinstance(bs, BootstrapV6)
    return bs


@pytest.fixture(scope="module")
def v5() -> BootstrapV5:
    bs = open_bootstrap(V5)
    assert isinstance(bs, BootstrapV5)
    return bs


def golden_row(bs: BootstrapV6, path: bytes, ino: int) -> str:
    """One line in the golden TSV's format (see its header)."""
    st = bs.stat(ino)
    raw = bs.raw_inode(ino)
    target = bs.readlink(ino).decode() if st.is_symlink else ""
    chunks = ",".join(
        f"{c.blob_index}:{c.index}:{c.uncompressed_offset // bs.block_size}" for c in bs.chunks(ino)
    )
    return "\t".join(
        [
            path.decode(),
            str(ino),
            "e" if isinstance(raw, RafsV6InodeExtended) else "c",
            str((raw.format >> 1) & 7),
            f"{st.mode:o}",
            str(st.size),
            str(st.nlink),
            str(st.uid),
            str(st.gid),
            str(st.mtime),
            str(st.mtime_nsec),
            str(raw.ino),
            ",".join(n.decode() for n in bs.listxattr(ino)),
            target,
            chunks,
        ]
    )


def test_v6_walk_reproduces_every_line_of_the_golden_listing_in_order(v6: BootstrapV6) -> None:
    golden = GOLDEN.read_text().splitlines()
    assert golden[0].startswith("# path")
    rows = [golden_row(v6, path, ino) for path, ino in v6.walk()]
    assert len(rows) == len(golden) - 1 == 3517
    for got, want in zip(rows, golden[1:]):
        assert got == want


def test_v6_headers_match_the_summary(v6: BootstrapV6) -> None:
    summary = json.loads(SUMMARY.read_text())
    sb, ext = v6.superblock, v6.ext_superblock
    for key, want in summary["superblock"].items():
        got = getattr(sb, "u" if key == "s_u" else key)
        if key == "uuid":
            assert got.hex() == want
        elif key == "volume_name":
            assert repr(got) == want
        elif isinstance(want, str):
            assert hex(got) == want
        else:
            assert got == want, key
    for key, want in summary["ext_superblock"].items():
        got = getattr(ext, key)
        assert (hex(got) if isinstance(want, str) else got) == want, key
    [dev] = summary["devslots"]
    assert v6.devices[0].blob_id.decode() == dev["blob_id"]
    assert (v6.devices[0].blocks, v6.devices[0].mapped_blkaddr) == (
        dev["blocks"],
        dev["mapped_blkaddr"],
    )
    [want_blob] = summary["blobs"]
    [blob] = v6.blobs
    assert blob.blob_id == want_blob["blob_id"]
    assert blob.index == want_blob["blob_index"]
    assert blob.chunk_size == want_blob["chunk_size"]
    assert blob.chunk_count == want_blob["chunk_count"]
    assert blob.compressor == want_blob["compression_algo"] == Compressor.LZ4_BLOCK
    assert blob.digester == want_blob["digest_algo"] == Digester.BLAKE3
    assert hex(blob.features) == want_blob["features"]
    for key in (
        "compressed_size",
        "uncompressed_size",
        "blob_toc_size",
        "ci_offset",
        "ci_compressed_size",
        "ci_uncompressed_size",
        "blob_meta_size",
        "cipher_algo",
    ):
        assert getattr(blob, key) == want_blob[key], key
    assert blob.ci_compressor == want_blob["ci_compressor"]
    assert blob.blob_toc_digest.hex() == want_blob["blob_toc_digest"]
    assert v6.prefetch_list == summary["prefetch_table"] == [142]
    table = list(v6.chunk_table())
    assert len(table) == summary["chunk_table_entries"]
    for got_c, want_c in zip(table, summary["first_chunk_table_entries"]):
        assert got_c.digest.hex() == want_c.pop("digest")
        for key, want in want_c.items():
            assert getattr(got_c, key) == want, key


def test_v6_image_properties(v6: BootstrapV6) -> None:
    assert (v6.version, v6.root_ino, v6.block_size, v6.chunk_size) == (6, 128, 4096, 1 << 20)
    assert v6.inode_count == 3517
    assert v6.compressor == Compressor.LZ4_BLOCK and v6.digester == Digester.BLAKE3
    assert not v6.explicit_uidgid and not v6.has_xattr
    assert not v6.prefetch_all  # [/bin], not [root]
    assert v6.lookup_path("/bin") == 142


def test_v6_lookup_finds_every_walked_path_and_dot_entries(v6: BootstrapV6) -> None:
    for path, ino in v6.walk():
        assert v6.lookup_path(path) == ino
    etc = v6.lookup_path(b"/etc")
    assert v6.lookup(etc, b".") == etc
    assert v6.lookup(etc, b"..") == v6.root_ino
    assert v6.lookup(v6.root_ino, b"..") == v6.root_ino
    with pytest.raises(NotFound):
        v6.lookup_path("/etc/no-such-file")
    with pytest.raises(NotFound):
        v6.lookup(etc, b"")
    with pytest.raises(InvalidArgument):
        v6.lookup(v6.lookup_path("/etc/adduser.conf"), b"x")


def test_v6_readdir_lists_dot_entries_in_sorted_position(v6: BootstrapV6) -> None:
    entries = list(v6.readdir(v6.root_ino))
    assert [e.name for e in entries[:4]] == [b".", b"..", b"bin", b"boot"]
    assert entries[0].ino == entries[1].ino == 128
    assert entries[2].file_type == FileType.SYMLINK
    assert len(entries) == 23 and entries[-1].name == b"var" and entries[-1].ino == 11092


def test_v6_map_read_and_chunk_records(v6: BootstrapV6) -> None:
    ino = v6.lookup_path("/usr/lib/x86_64-linux-gnu/libcrypto.so.3")
    st = v6.stat(ino)
    chunks = v6.chunks(ino)
    assert [c.index for c in chunks] == [510, 511, 512, 513, 514]
    assert all(c.compressed_size and c.digest and len(c.digest) == 32 for c in chunks)
    assert sum(c.uncompressed_size for c in chunks) == st.size
    reads = v6.map_read(ino, (1 << 20) - 10, 30)
    assert [(r.chunk.index, r.offset, r.length) for r in reads] == [
        (510, (1 << 20) - 10, 10),
        (511, 0, 20),
    ]
    tail = v6.map_read(ino, st.size - 5, 100)
    assert [(r.chunk.index, r.offset, r.length) for r in tail] == [
        (514, st.size - 5 - 4 * (1 << 20), 5)
    ]
    assert v6.map_read(ino, st.size, 10) == []
    assert v6.map_read(v6.lookup_path("/etc/.pwd.lock"), 0, 10) == []
    with pytest.raises(InvalidArgument):
        v6.map_read(v6.root_ino, 0, 1)


def test_v6_unknown_nid_is_not_found(v6: BootstrapV6) -> None:
    with pytest.raises(NotFound):
        v6.stat(10**9)
    with pytest.raises(NotFound):
        v6.stat(-1)


def test_v6_and_v5_fixtures_hold_the_same_tree(v5: BootstrapV5, v6: BootstrapV6) -> None:
    """Spec §6.1: same Ubuntu tree built twice; directory sizes differ by format (v5
    records 4096, v6 the dirent bytes) and blob ids differ, the rest must agree."""

    def tree(bs: Bootstrap) -> dict[bytes, tuple[object, ...]]:
        out: dict[bytes, tuple[object, ...]] = {}
        for path, ino in bs.walk():
            st = bs.stat(ino)
            chunks = bs.chunks(ino)
            out[path] = (
                st.mode,
                st.uid,
                st.gid,
                st.mtime,
                st.mtime_nsec,
                st.nlink,
                None if st.is_dir else st.size,
                bs.readlink(ino) if st.is_symlink else None,
                tuple(
                    (c.digest, c.uncompressed_size, c.compressed_size, c.compressed_offset)
                    for c in chunks
                ),
            )
        return out

    t5, t6 = tree(v5), tree(v6)
    assert len(t5) == 3517
    assert t5 == t6


def test_v5_image_properties(v5: BootstrapV5) -> None:
    assert (v5.version, v5.root_ino, v5.chunk_size) == (5, 1, 1 << 20)
    assert v5.inode_count == 3515 and v5.superblock.inode_table_entries == 3517
    assert v5.flags == 0x16 and v5.explicit_uidgid
    assert v5.compressor == Compressor.LZ4_BLOCK and v5.digester == Digester.BLAKE3
    [blob] = v5.blobs
    assert blob.blob_id == "02fef4a13a311de4adc5b34ca152d3a87c9371c76a5f720451c8b9602859b780"
    assert blob.chunk_count == 2515
    assert v5.prefetch_list == [1] and v5.prefetch_all
    entries = list(v5.readdir(1))
    assert [e.name for e in entries[:3]] == [b".", b"..", b"bin"]
    assert len(entries) == 23
    usr = v5.lookup_path("/usr")
    assert v5.lookup(usr, b"..") == 1 and v5.lookup(1, b"..") == 1
    for path, ino in v5.walk():
        assert v5.lookup_path(path) == ino


def test_v5_map_read_uses_chunk_records(v5: BootstrapV5) -> None:
    ino = v5.lookup_path("/usr/bin/perl")
    st = v5.stat(ino)
    reads = v5.map_read(ino, 0, st.size)
    assert sum(r.length for r in reads) == st.size
    assert all(
        r.chunk.compressed_size and r.chunk.compressor == Compressor.LZ4_BLOCK for r in reads
    )


def test_open_is_fast_and_lazy() -> None:
    open_bootstrap(V6).close()  # warm imports
    for path in (V6, V5):
        t0 = time.perf_counter()
        with open_bootstrap(path) as bs:
            bs.stat(bs.root_ino)
        assert time.perf_counter() - t0 < 0.05


@pytest.mark.parametrize("archive", ["invalid-bootstrap-file-size-133513.tar.gz", "invalid.tar.gz"])
def test_invalid_archives_are_rejected(archive: str, tmp_path: Path) -> None:
    with tarfile.open(ARCHIVES / archive) as tf:
        tf.extractall(tmp_path, filter="data")
    boot = tmp_path / "image" / "image.boot"
    if archive == "invalid.tar.gz":
        # No bootstrap in it at all: the caller finds nothing to open.
        assert not boot.exists()
        candidates = [p for p in tmp_path.rglob("*") if p.is_file()]
        assert candidates
        for p in candidates:
            with pytest.raises(FormatError, match="bootstrap magic at offset 0"):
                open_bootstrap(p)
        return
    with pytest.raises(FormatError, match="bootstrap magic at offset 0"):
        open_bootstrap(boot)


@pytest.mark.parametrize(
    "archive,size",
    [
        ("v6-bootstrap-chunk-pos-438272.tar.gz", 643072),
        ("v5-bootstrap-file-size-736032.tar.gz", 736032),
    ],
)
def test_valid_archives_extract_to_the_fixtures(archive: str, size: int, tmp_path: Path) -> None:
    with tarfile.open(ARCHIVES / archive) as tf:
        tf.extractall(tmp_path, filter="data")
    boot = tmp_path / "image" / "image.boot"
    assert boot.stat().st_size == size
    with open_bootstrap(boot) as bs:
        assert sum(1 for _ in bs.walk()) == 3517


def test_empty_and_tiny_files_are_format_errors(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    with pytest.raises(FormatError):
        open_bootstrap(empty)
    for data in (b"", b"RAFS", b"\x53\x46\x41\x52", bytes(1024) + b"\xe2\xe1\xf5\xe0"):
        with pytest.raises(FormatError):
            bootstrap_from_bytes(data)


def test_inspect_reports_what_dump_erofs_reports_and_is_json() -> None:
    """Spec §7.4: dump.erofs -S on the v6 fixture counts 3517 files (2627 regular,
    678 directories, 212 symlinks) of 81619065 bytes in total."""
    d = inspect_bootstrap(V6)
    json.dumps(d)
    s = d["stats"]
    assert (s["inodes"], s["regular"], s["directories"], s["symlinks"]) == (3517, 2627, 678, 212)
    assert s["total_file_size"] == 81619065 and s["unique_chunks"] == 2515
    assert d["version"] == 6 and d["flags"] == "0x6" and d["compressor"] == "lz4_block"
    assert d["prefetch_paths"] == ["/bin"] and d["devices"][0]["blocks"] == 20451
    d5 = inspect_bootstrap(V5)
    json.dumps(d5)
    assert d5["version"] == 5 and d5["stats"]["entries"] == 3517 and d5["prefetch_all"]


def test_inspect_of_a_malformed_bootstrap_is_a_format_error(tmp_path: Path) -> None:
    bad = tmp_path / "image.boot"
    bad.write_bytes(V6.read_bytes()[:8192])
    with pytest.raises(FormatError):
        inspect_bootstrap(bad)

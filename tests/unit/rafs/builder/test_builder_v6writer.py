"""Bootstrap file map and field values (spec §1.1–§1.14), decoded with the layout module."""

from __future__ import annotations

import io
import json
import stat
import tarfile
from pathlib import Path

import pytest

from pynydus.errors import FormatError, InvalidArgument, NotImplementedFeature
from pynydus.rafs.builder import build
from pynydus.rafs.format import layout as L
from pynydus.rafs.read import open_bootstrap


def _layer(tmp_path: Path, files: dict[str, bytes], dirs: tuple[str, ...] = ()) -> Path:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for d in dirs:
            t = tarfile.TarInfo(d)
            t.type, t.mode, t.mtime = tarfile.DIRTYPE, 0o755, 1
            tf.addfile(t)
        for name, data in files.items():
            t = tarfile.TarInfo(name)
            t.size, t.mtime = len(data), 2
            tf.addfile(t, io.BytesIO(data))
    p = tmp_path / "layer.tar"
    p.write_bytes(buf.getvalue())
    return p


def test_superblocks_tables_and_devslots(tmp_path: Path) -> None:
    layer = _layer(tmp_path, {"a": b"A" * 5000, "b": b"B" * 10, "c": b"A" * 5000})
    res = build(layer, tmp_path / "boot", tmp_path / "blobs", type="tar-rafs", compressor="zstd",
                prefetch_files=["/b", "/a", "/missing"], output_json=tmp_path / "out.json")
    boot = (tmp_path / "boot").read_bytes()
    assert len(boot) % 4096 == 0
    sb = L.RafsV6SuperBlock.unpack(boot, 1024)
    assert (sb.magic, sb.checksum, sb.feature_compat, sb.blkszbits) == (0xE0F5E1E2, 0, 0x40000000, 12)
    assert (sb.feature_incompat, sb.extra_devices, sb.devt_slotoff, sb.root_nid) == (0xC, 1, 11, 128)
    assert sb.inos == 3 + 1 and sb.xattr_blkaddr == 0
    ext = L.RafsV6SuperBlockExt.unpack(boot, 1152)
    assert ext.flags == 0x80 | 0x4 | 0x10 | 0x100 | 0x0100_0000  # zstd blake3 explicit digest enc-none
    assert (ext.blob_table_offset, ext.blob_table_size, ext.chunk_size) == (4096, 256, 0x100000)
    assert ext.prefetch_table_offset == 4096 + 256 and ext.prefetch_table_size == 8
    assert ext.chunk_table_offset % 4096 == 0 and ext.chunk_table_size == 2 * 80  # A-chunk dedups
    assert sb.meta_blkaddr * 4096 >= ext.prefetch_table_offset + ext.prefetch_table_size
    blob = L.RafsV6Blob.unpack(boot, 4096)
    desc = res.blobs[0]
    assert blob.blob_id.decode() == desc.blob_id and blob.blob_index == 0
    assert (blob.compression_algo, blob.digest_algo, blob.features) == (3, 0, 0x70000021)
    assert blob.compressed_size == (tmp_path / "blobs" / desc.blob_id).stat().st_size
    dev = L.RafsV6Device.unpack(boot, 1408)
    assert dev.blob_id == blob.blob_id and dev.blocks == blob.uncompressed_size // 4096
    assert dev.mapped_blkaddr * 4096 == (len(boot) + 0x7FFFF) // 0x80000 * 0x80000
    assert sb.blocks == dev.blocks
    with open_bootstrap(tmp_path / "boot") as bs:
        assert bs.prefetch_list == [bs.lookup_path(b"/b"), bs.lookup_path(b"/a")]
        ents = [e.name for e in bs.readdir(bs.root_ino)]
        assert ents == sorted(ents) and ents[:2] == [b".", b".."]
    report = json.loads((tmp_path / "out.json").read_text())
    assert report["blob_ids"] == [desc.blob_id] and report["dedup_chunks"] == 1


def test_chunk_table_sorted_by_digest_and_indexes_point_into_the_blob(tmp_path: Path) -> None:
    files = {f"f{i}": bytes([i]) * (3 * 4096 + i) for i in range(6)}
    build(_layer(tmp_path, files), tmp_path / "boot", tmp_path / "blobs", type="tar-rafs",
          chunk_size=0x1000)
    boot = (tmp_path / "boot").read_bytes()
    ext = L.RafsV6SuperBlockExt.unpack(boot, 1152)
    recs = [L.RafsChunkInfo.unpack(boot, ext.chunk_table_offset + 80 * i)
            for i in range(ext.chunk_table_size // 80)]
    assert [r.digest for r in recs] == sorted(r.digest for r in recs)
    with open_bootstrap(tmp_path / "boot") as bs:
        for i in range(6):
            chunks = bs.chunks(bs.lookup_path(f"/f{i}"))
            assert [c.file_offset for c in chunks] == [0, 4096, 8192, 12288][: len(chunks)]
            assert all(c.uncompressed_offset % 4096 == 0 and c.blob_index == 0 for c in chunks)


def test_large_directories_use_plain_blocks_and_small_ones_inline(tmp_path: Path) -> None:
    files = {f"big/{'n' * 40}{i:04d}": b"" for i in range(300)}
    files["small/x"] = b""
    build(_layer(tmp_path, files), tmp_path / "boot", tmp_path / "blobs", type="tar-rafs")
    boot = (tmp_path / "boot").read_bytes()
    sb = L.RafsV6SuperBlock.unpack(boot, 1024)
    with open_bootstrap(tmp_path / "boot") as bs:
        for path, layouts in (("/big", {L.EROFS_INODE_FLAT_PLAIN, L.EROFS_INODE_FLAT_INLINE}),
                              ("/small", {L.EROFS_INODE_FLAT_INLINE})):
            nid = bs.lookup_path(path)
            ino = L.unpack_v6_inode(boot, sb.meta_blkaddr * 4096 + nid * 32)
            assert L.inode_datalayout(ino) in layouts and ino.format & 1
        assert len(list(bs.readdir(bs.lookup_path("/big")))) == 302
        assert bs.stat(bs.lookup_path("/big")).size > 4096


def test_image_without_file_data_has_no_blob(tmp_path: Path) -> None:
    res = build(_layer(tmp_path, {"empty": b""}, dirs=("d",)), tmp_path / "boot",
                tmp_path / "blobs", type="tar-rafs")
    assert res.blobs == [] and res.chunk_count == 0
    sb = L.RafsV6SuperBlock.unpack((tmp_path / "boot").read_bytes(), 1024)
    assert sb.extra_devices == 0 and sb.blocks == 0


def test_build_rejects_what_it_cannot_do(tmp_path: Path) -> None:
    layer = _layer(tmp_path, {"a": b"x"})
    with pytest.raises(NotImplementedFeature):
        build(layer, tmp_path / "b", tmp_path / "blobs", type="tar-rafs", fs_version=5)
    with pytest.raises(InvalidArgument):
        build(layer, tmp_path / "b", tmp_path / "blobs", type="tar-rafs", compressor="brotli")
    with pytest.raises(InvalidArgument):
        build(layer, tmp_path / "b", tmp_path / "blobs", type="tar-rafs", whiteout_spec="aufs")
    assert not (tmp_path / "b").exists()


def test_failed_build_leaves_no_blob_and_no_bootstrap(tmp_path: Path) -> None:
    good = _layer(tmp_path, {"a": b"x" * 100000})
    truncated = tmp_path / "trunc.tar"
    truncated.write_bytes(good.read_bytes()[:60000])  # some chunks get written first
    with pytest.raises(FormatError):
        build(truncated, tmp_path / "boot", tmp_path / "blobs", type="tar-rafs", chunk_size=0x1000)
    assert not (tmp_path / "boot").exists()
    assert list((tmp_path / "blobs").iterdir()) == []


def test_symlink_and_special_files_layouts(tmp_path: Path) -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for name, kind, link in (("short", tarfile.SYMTYPE, "t"), ("long", tarfile.SYMTYPE, "x" * 4095),
                                 ("blk", tarfile.BLKTYPE, "")):
            t = tarfile.TarInfo(name)
            t.type, t.linkname = kind, link
            t.devmajor, t.devminor = 8, 1
            tf.addfile(t)
    (tmp_path / "l.tar").write_bytes(buf.getvalue())
    build(tmp_path / "l.tar", tmp_path / "boot", tmp_path / "blobs", type="tar-rafs")
    with open_bootstrap(tmp_path / "boot") as bs:
        assert bs.readlink(bs.lookup_path("/long")) == b"x" * 4095
        assert bs.readlink(bs.lookup_path("/short")) == b"t"
        st = bs.stat(bs.lookup_path("/blk"))
        assert stat.S_ISBLK(st.mode) and st.rdev == (8 << 8 | 1)


def test_directory_build_puts_prefetch_files_first_in_the_blob(tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "a").mkdir(parents=True)
    (src / "z").mkdir()
    for name in ("a/1", "a/2", "z/hot", "z/warm/x"):
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        (src / name).write_bytes(name.encode() * 1000)
    res = build(src, tmp_path / "boot", tmp_path / "blobs", prefetch_files=["/z/warm", "/z/hot"])
    with open_bootstrap(tmp_path / "boot") as bs:
        def first_offset(p: str) -> int:
            return bs.chunks(bs.lookup_path(p))[0].uncompressed_offset

        order = sorted(["/a/1", "/a/2", "/z/hot", "/z/warm/x"], key=first_offset)
        assert order == ["/z/warm/x", "/z/hot", "/a/1", "/a/2"]
        assert bs.prefetch_list == [bs.lookup_path("/z/warm"), bs.lookup_path("/z/hot")]
        # implied-first parents still carry their own metadata in the end
        assert bs.stat(bs.lookup_path("/z/warm")).mtime == int((src / "z/warm").stat().st_mtime)
    assert res.inodes == 8


def test_failed_bootstrap_write_keeps_an_identical_blob_other_images_use(tmp_path: Path) -> None:
    layer = _layer(tmp_path, {"a": b"shared" * 1000})
    first = build(layer, tmp_path / "boot", tmp_path / "blobs", type="tar-rafs")
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "x").write_bytes(b"")  # a non-empty dir cannot be replaced by a file
    with pytest.raises(OSError):
        build(layer, tmp_path / "taken", tmp_path / "blobs", type="tar-rafs")
    assert (tmp_path / "blobs" / first.blob_ids[0]).exists()

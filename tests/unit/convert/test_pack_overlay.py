"""Inline blobs and bootstrap layers (bytes), the overlay view of layer tars, the layer
cache key, and the cross-layer chunk sharing of the image bootstrap."""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
from pathlib import Path

import pytest

from pynydus.convert.bootstrap import merge_layers
from pynydus.convert.layer import BuildOptions, cache_key
from pynydus.convert.overlay_view import OverlayView
from pynydus.convert.pack import (
    bootstrap_from_layer,
    bootstrap_layer,
    extract_inline_bootstrap,
    inline_bootstrap,
    read_toc,
)
from pynydus.errors import FormatError
from pynydus.rafs.builder import build
from pynydus.rafs.read import open_bootstrap


def _tar(entries: list[tuple[str, str, bytes | str]]) -> bytes:
    """(kind, path, data-or-target) → PAX tar bytes; kinds: file dir link sym."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for kind, path, data in entries:
            ti = tarfile.TarInfo(path)
            if kind == "file":
                raw = data.encode() if isinstance(data, str) else data
                ti.size = len(raw)
                tf.addfile(ti, io.BytesIO(raw))
                continue
            if kind == "dir":
                ti.type, ti.mode = tarfile.DIRTYPE, 0o755
            elif kind == "link":
                ti.type, ti.linkname = tarfile.LNKTYPE, str(data)
            elif kind == "sym":
                ti.type, ti.linkname = tarfile.SYMTYPE, str(data)
            tf.addfile(ti)
    return buf.getvalue()


def _layer_build(tmp: Path, name: str, tar: bytes) -> tuple[str, str | None]:
    boot = tmp / f"{name}.boot"
    res = build(io.BytesIO(tar), boot, tmp / "blobs", type="tar-rafs", compressor="zstd",
                whiteout_spec="none", chunk_size=0x1000)
    new = [b for b in res.blobs if b.new]
    return str(boot), new[0].path if new else None


def test_inline_bootstrap_appends_image_boot_to_the_toc(tmp_path: Path) -> None:
    boot, blob = _layer_build(tmp_path, "l", _tar([("file", "a", os.urandom(9000))]))
    assert blob is not None
    raw_boot = Path(boot).read_bytes()
    out = inline_bootstrap(blob, raw_boot, str(tmp_path / "out"))
    data = Path(out.path).read_bytes()
    assert out.digest == "sha256:" + hashlib.sha256(data).hexdigest()
    assert out.size == len(data)
    assert data[: out.data_end] == Path(blob).read_bytes()[: out.data_end]
    _, entries = read_toc(io.BytesIO(data), len(data))
    names = [e.entry_name for e in entries]
    assert names[-1] == "image.boot" and "image.blob" in names and "blob.meta" in names
    assert extract_inline_bootstrap(data) == raw_boot
    assert out.toc_digest == hashlib.sha256(data[-out.toc_size:]).digest()


def test_inline_bootstrap_without_data_blob(tmp_path: Path) -> None:
    boot, blob = _layer_build(tmp_path, "meta", _tar([("dir", "d", ""), ("sym", "d/s", "x")]))
    assert blob is None
    out = inline_bootstrap(None, Path(boot).read_bytes(), str(tmp_path / "out"))
    assert out.data_end == 0
    assert extract_inline_bootstrap(Path(out.path).read_bytes()) == Path(boot).read_bytes()


def test_bootstrap_layer_is_deterministic_and_round_trips() -> None:
    a, b = bootstrap_layer(b"BOOT" * 100), bootstrap_layer(b"BOOT" * 100)
    assert a == b
    assert bootstrap_from_layer(a.data) == b"BOOT" * 100
    import gzip
    assert a.diff_id == "sha256:" + hashlib.sha256(gzip.decompress(a.data)).hexdigest()


def test_a_bootstrap_layer_from_a_registry_is_checked_not_trusted() -> None:
    """A sparse ``image.boot`` (98 bytes claiming 16 GiB: tarfile read that many zeros into
    memory), a cut layer and a layer without the file are FormatErrors."""
    import gzip

    from tests.unit.rafs.builder.test_tarsparse import END, block

    sparse = block(b"image/image.boot", b"S", 512, sparse=[(0, 512)],
                   real=b"\x80" + (16 << 30).to_bytes(11, "big")) + b"x" * 512 + END
    with pytest.raises(FormatError, match="sparse member at offset 0: real size 17179869184"):
        bootstrap_from_layer(gzip.compress(sparse))
    good = bootstrap_layer(b"BOOT" * 100).data
    with pytest.raises(FormatError):
        bootstrap_from_layer(gzip.compress(gzip.decompress(good)[:700]))
    with pytest.raises(FormatError, match="has no image/image.boot"):
        bootstrap_from_layer(gzip.compress(_tar([("file", "image/other", "x")])))


def test_check_images_view_bounds_sparse_members_as_the_builder_does() -> None:
    """check-image's reference side reads source layers with tarfile, which hashes a
    sparse member's holes as zeros and does not check its map: a 10 KB layer claiming
    2^50 bytes kept it hashing for days. Maps are checked and holes bounded now."""
    import time

    from tests.unit.rafs.builder.test_tarsparse import END, HOSTILE, block

    t0 = time.monotonic()
    with pytest.raises(ValueError, match="real size 1125899906842624 exceeds the limit"):
        OverlayView().apply_layer(io.BytesIO(HOSTILE["gnu-base256"] + END))
    assert time.monotonic() - t0 < 10
    overlap = block(b"f", b"S", 1024, sparse=[(0, 512), (256, 512)], real=b"%011o\0" % 4096)
    with pytest.raises(ValueError, match="sparse extent 1 at 256 overlaps"):
        OverlayView().apply_layer(io.BytesIO(overlap + b"z" * 1024 + END))
    members = b"".join(block(b"f%d" % i, b"S", 512, sparse=[(0, 512)], real=b"%011o\0" % (1 << 20))
                       + b"x" * 512 for i in range(3))
    with pytest.raises(ValueError, match="holes of the layer's sparse members"):
        OverlayView().apply_layer(io.BytesIO(members + END), max_sparse_size=2 << 20)
    view = OverlayView()
    view.apply_layer(io.BytesIO(members + END))
    want = hashlib.sha256(b"x" * 512 + bytes((1 << 20) - 512)).hexdigest()
    assert [view.paths[f"f{i}"].sha256 for i in range(3)] == [want] * 3


def test_overlay_view_applies_whiteouts_opaque_dirs_and_hardlinks() -> None:
    view = OverlayView()
    view.apply_layer(io.BytesIO(_tar([
        ("dir", "app", ""), ("file", "app/keep", "k"), ("file", "app/gone", "g"),
        ("dir", "app/opq", ""), ("file", "app/opq/old", "o"), ("dir", "app/sub", ""),
        ("file", "app/sub/x", "x"), ("file", "app/h1", "hard"), ("link", "app/h2", "app/h1")])))
    view.apply_layer(io.BytesIO(_tar([
        ("file", "app/.wh.gone", ""), ("file", "app/.wh.sub", ""),
        ("file", "app/opq/new", "n"), ("file", "app/opq/.wh..wh..opq", ""),
        ("file", "app/.wh.readd", ""), ("file", "app/readd", "same layer wins")])))
    paths = dict(view.items())
    assert sorted(paths) == ["", "app", "app/h1", "app/h2", "app/keep", "app/opq",
                             "app/opq/new", "app/readd"]
    assert paths["app/h1"] is paths["app/h2"] and paths["app/h1"].group
    assert paths["app/readd"].sha256 == hashlib.sha256(b"same layer wins").hexdigest()


def test_cache_key_covers_every_output_changing_option() -> None:
    d = "sha256:" + "1" * 64
    base = BuildOptions()
    keys = {cache_key(d, base), cache_key("sha256:" + "2" * 64, base),
            cache_key(d, BuildOptions(compressor="lz4_block")),
            cache_key(d, BuildOptions(chunk_size=0x10000)),
            cache_key(d, BuildOptions(chunk_dict_digest="x")),
            cache_key(d, BuildOptions(prefetch_files=("/bin",)))}
    assert len(keys) == 6
    assert cache_key(d, base) == cache_key(d, BuildOptions())


def test_merge_layers_shares_chunks_with_lower_layers(tmp_path: Path) -> None:
    data = os.urandom(3 * 0x1000)
    b1, _ = _layer_build(tmp_path, "l1", _tar([("file", "lib/a.so", data)]))
    b2, _ = _layer_build(tmp_path, "l2", _tar([("file", "usr/lib/a.so", data),
                                               ("file", "lib/.wh.a.so", ""),
                                               ("file", "new", os.urandom(100))]))
    merged = merge_layers([b1, b2], str(tmp_path / "image.boot"))
    assert merged.shared_bytes == [0, len(data)]
    with open_bootstrap(merged.path) as bs:
        ino = bs.lookup_path("/usr/lib/a.so")
        assert {c.blob_id for c in bs.chunks(ino)} == {bs.blobs[0].blob_id}
        # the lower file is gone, its chunks live on through the upper path
        assert [p for p, _ in bs.walk()] == [b"/", b"/lib", b"/new", b"/usr", b"/usr/lib",
                                             b"/usr/lib/a.so"]


def test_inline_bootstrap_consume_gives_the_same_blob_without_a_copy(tmp_path: Path) -> None:
    boot, blob = _layer_build(tmp_path, "c", _tar([("file", "a", os.urandom(20000))]))
    assert blob is not None
    raw_boot = Path(boot).read_bytes()
    copied = inline_bootstrap(blob, raw_boot, str(tmp_path / "copied"))
    moved = inline_bootstrap(blob, raw_boot, str(tmp_path / "moved"), consume=True)
    assert not os.path.exists(blob)
    assert moved.digest == copied.digest and moved.size == copied.size
    assert Path(moved.path).read_bytes() == Path(copied.path).read_bytes()

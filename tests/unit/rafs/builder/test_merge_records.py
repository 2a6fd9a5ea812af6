"""The record-level merge against the tree merge and against an independent model.

``merge()`` copies leaf records between bootstraps; ``merge_trees()`` (the former
implementation) rebuilds everything from decoded inodes. On layers made by our
builder both must write the same bytes, and the merged listing must equal OCI
layer application computed from the layers' own entries
(:mod:`tests.harness.rafs_layers`). Upstream's fixture bootstraps, v5 layers and
malformed layers are covered at the end.
"""

from __future__ import annotations

import functools
import io
import random
import shutil
import struct
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pynydus.errors import FormatError, InvalidArgument, NotFound
from pynydus.rafs.builder import build
from pynydus.rafs.merge import merge, merge_trees
from pynydus.rafs.read import BootstrapV6, open_bootstrap
from tests.harness.paths import FIXTURES as SHARED_FIXTURES
from tests.harness.rafs_layers import (
    bootstrap_listing,
    expected_listing,
    layer_tar,
    random_layers,
)

FIXTURES = SHARED_FIXTURES / "snapshotter-testdata"
V6 = FIXTURES / "v6-bootstrap-chunk-pos-438272/image/image.boot"
V5 = FIXTURES / "v5-bootstrap-file-size-736032/image/image.boot"


def _build_layers(
    work: Path, layers: list, spec: str, chunk_dict: bool = False, **build_kw: object
) -> list[Path]:
    """Build each layer; with ``chunk_dict`` a layer reuses the chunks of the one below,
    so its files point into the lower layer's blob too. ``build_kw`` goes to ``build``."""
    boots: list[Path] = []
    for i, ents in enumerate(layers):
        boot = work / f"l{i}.boot"
        build(
            io.BytesIO(layer_tar(ents)),
            boot,
            work / "blobs",
            type="tar-rafs",
            whiteout_spec=spec,
            chunk_dict=boots[-1] if chunk_dict and boots else None,
            **build_kw,
        )
        boots.append(boot)
    return boots


def _both(work: Path, boots: list[Path], **kw: object) -> tuple[bytes, bytes]:
    new = merge(boots, work / "new.boot", **kw)  # type: ignore[arg-type]
    old = merge_trees(boots, work / "old.boot", **kw)  # type: ignore[arg-type]
    assert new.to_json() | {"elapsed_seconds": 0, "bootstrap": ""} == old.to_json() | {
        "elapsed_seconds": 0,
        "bootstrap": "",
    }
    return (work / "new.boot").read_bytes(), (work / "old.boot").read_bytes()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**32), n=st.integers(1, 4), spec=st.sampled_from(["overlayfs", "none"]))
def test_merge_listing_equals_oci_layer_application(seed: int, n: int, spec: str) -> None:
    layers = random_layers(random.Random(seed), n, explicit_dirs=True)
    with tempfile.TemporaryDirectory() as d:
        work = Path(d)
        new, old = _both(work, _build_layers(work, layers, spec))
        assert new == old
        assert bootstrap_listing(work / "new.boot") == expected_listing(layers)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 2**32),
    n=st.integers(1, 4),
    spec=st.sampled_from(["overlayfs", "none"]),
    chunk_dict=st.booleans(),
)
def test_merge_is_byte_identical_to_the_tree_merge_with_implied_directories(
    seed: int, n: int, spec: str, chunk_dict: bool
) -> None:
    layers = random_layers(random.Random(seed), n, explicit_dirs=False)
    with tempfile.TemporaryDirectory() as d:
        work = Path(d)
        boots = _build_layers(work, layers, spec, chunk_dict)
        new, old = _both(work, boots, prefetch_files=["a", "b/c", "/"])
        assert new == old


def test_merge_of_the_benchmark_shape_is_byte_identical(tmp_path: Path) -> None:
    """Directories named alike in every layer overlay, the rest are adopted whole."""
    layers = []
    for k in range(3):
        src = tmp_path / f"src{k}"
        for d in ("shared1", "shared2", f"own{k}"):
            (src / d).mkdir(parents=True)
            for i in range(40):
                (src / d / f"f{i:02d}").write_bytes(b"%d %d %s" % (k, i, d.encode()) * (i + 1))
        boot = tmp_path / f"l{k}.boot"
        build(src, boot, tmp_path / "blobs")
        layers.append(boot)
    r = merge(layers, tmp_path / "new.boot")
    merge_trees(layers, tmp_path / "old.boot")
    assert (tmp_path / "new.boot").read_bytes() == (tmp_path / "old.boot").read_bytes()
    assert r.inodes == 1 + 5 + 5 * 40 and not r.warnings


@pytest.mark.parametrize("copies", [1, 2])
def test_upstream_v6_bootstrap_merges_like_the_tree_merge(tmp_path: Path, copies: int) -> None:
    """nydus-image's own output (a whole image, so one layer or the same layer twice:
    its blob appears once in the table)."""
    new = merge([V6] * copies, tmp_path / "new.boot")
    old = merge_trees([V6] * copies, tmp_path / "old.boot")
    assert new.blob_ids == old.blob_ids and len(new.blob_ids) == 1
    got = bootstrap_listing(tmp_path / "new.boot", data="map")
    assert got == bootstrap_listing(tmp_path / "old.boot", data="map")
    assert got == bootstrap_listing(V6, data="map")


def test_v5_layers_go_through_the_tree_merge(tmp_path: Path) -> None:
    """This v5 image's blob is not 4 KiB-sized, so no v6 device table can hold it:
    both paths refuse it the same way (the record path never sees it)."""
    with pytest.raises(InvalidArgument, match="multiple of 4096") as new:
        merge([V5], tmp_path / "new.boot")
    with pytest.raises(InvalidArgument, match="multiple of 4096") as old:
        merge_trees([V5], tmp_path / "old.boot")
    assert str(new.value) == str(old.value)
    assert "merge_trees" in [t.name for t in new.traceback]


def test_layers_with_other_chunk_sizes_are_refused(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(b"x")
    build(src, tmp_path / "a.boot", tmp_path / "blobs")
    build(src, tmp_path / "b.boot", tmp_path / "blobs", chunk_size=0x200000)
    with pytest.raises(InvalidArgument, match="chunk size"):
        merge([tmp_path / "a.boot", tmp_path / "b.boot"], tmp_path / "m.boot")


def _corrupt_root_dirents(boot: Path, out: Path, mutate) -> None:  # type: ignore[no-untyped-def]
    data = bytearray(boot.read_bytes())
    with open_bootstrap(boot) as bs:
        ((off, length),) = bs.dir_blocks(bs.root_ino)
    mutate(data, off, length)
    out.write_bytes(bytes(data))


def test_malformed_directories_are_format_errors(tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "d").mkdir(parents=True)
    (src / "e").write_bytes(b"e")
    build(src, tmp_path / "ok.boot", tmp_path / "blobs")
    with open_bootstrap(tmp_path / "ok.boot") as bs:
        root = bs.root_ino

    def unsorted(data: bytearray, off: int, length: int) -> None:
        # swap the first bytes of the names "d" and "e"
        i = data.index(b"de", off, off + length)
        data[i : i + 2] = b"ed"

    def loop(data: bytearray, off: int, length: int) -> None:
        # entry "d" (the third, after . and ..) points back at the root
        struct.pack_into("<Q", data, off + 24, root)

    for name, mutate in (("unsorted", unsorted), ("loop", loop)):
        bad = tmp_path / f"{name}.boot"
        _corrupt_root_dirents(tmp_path / "ok.boot", bad, mutate)
        with pytest.raises(FormatError):
            merge([bad], tmp_path / "m.boot")
    assert not (tmp_path / "m.boot").exists()
    shutil.rmtree(tmp_path / "blobs")


def test_a_few_chunks_of_a_large_lower_blob_are_found(tmp_path: Path) -> None:
    """Layer 2 dedups one file against the 5,000th chunk of layer 1's blob: its chunk
    table has one record at a high chunk index (the sparse lookup)."""
    lower, upper = tmp_path / "lower", tmp_path / "upper"
    lower.mkdir()
    upper.mkdir()
    for i in range(5000):
        (lower / f"f{i:04d}").write_bytes(b"file %d" % i)
    (upper / "same-as-last").write_bytes(b"file 4999")
    build(lower, tmp_path / "l1.boot", tmp_path / "blobs")
    r2 = build(upper, tmp_path / "l2.boot", tmp_path / "blobs", chunk_dict=tmp_path / "l1.boot")
    assert r2.dict_chunks == 1
    boots = [tmp_path / "l1.boot", tmp_path / "l2.boot"]
    new, old = _both(tmp_path, boots)
    assert new == old
    assert (
        bootstrap_listing(tmp_path / "l2.boot", data="map")["/same-as-last"][10]
        == (bootstrap_listing(tmp_path / "new.boot", data="map")["/same-as-last"][10])
    )


@functools.cache
def _fuzz_layers() -> tuple[bytes, bytes]:
    with tempfile.TemporaryDirectory() as d:
        layers = random_layers(random.Random(5), 2, explicit_dirs=True, tries=30)
        lower, upper = _build_layers(Path(d), layers, "none")
        return lower.read_bytes(), upper.read_bytes()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_mutated_layers_fail_with_format_errors_only(data: st.DataObject) -> None:
    """Bit flips and integer overwrites in a layer's inodes, dirents and chunk table:
    the merge writes an image or raises InvalidArgument/FormatError/NotFound, nothing
    else, and leaves no output behind when it fails."""
    layers = list(_fuzz_layers())
    target = data.draw(st.integers(0, 1))
    victim = bytearray(layers[target])
    meta_base = BootstrapV6(bytes(victim)).superblock.meta_blkaddr * 4096
    for _ in range(data.draw(st.integers(1, 4))):
        pos = data.draw(st.integers(meta_base, len(victim) - 4))
        if data.draw(st.booleans()):
            victim[pos] ^= 1 << data.draw(st.integers(0, 7))
        else:
            value = data.draw(st.sampled_from([0, 1, 0xFF, 0xFFFF, 0x7FFF_FFFF, 0xFFFF_FFFF]))
            struct.pack_into("<I", victim, pos, value)
    layers[target] = bytes(victim)
    with tempfile.TemporaryDirectory() as d:
        boots = [Path(d) / "l0.boot", Path(d) / "l1.boot"]
        for boot, content in zip(boots, layers):
            boot.write_bytes(content)
        try:
            merge(boots, Path(d) / "m.boot")
        except (FormatError, NotFound):
            assert not (Path(d) / "m.boot").exists()


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_compact_inodes_are_widened_like_the_tree_merge(tmp_path: Path, seed: int) -> None:
    """Layers built with compact inodes (one mtime, small ids): the record merge widens
    each copied record to an extended one, as the tree merge re-encodes it."""
    layers = random_layers(random.Random(seed), 3, explicit_dirs=True, tries=20)
    for ents in layers:
        for e in ents:
            e.mtime, e.uid = 1_600_000_000, e.uid % 1000
    boots = _build_layers(tmp_path, layers, "none", compact_inodes=True)
    with open_bootstrap(boots[-1]) as bs:
        assert any(not bs.raw_inode(ino).format & 1 for _, ino in bs.walk())
    new, old = _both(tmp_path, boots)
    assert new == old

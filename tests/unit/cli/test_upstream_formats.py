"""The drop-in CLIs print numbers, JSON values, times and names as upstream's Rust does."""

from __future__ import annotations

import logging

import pytest

from pynydus.cli.nydus_image import blob_features, build_parser
from pynydus.cli.nydus_inspect import _feature_names, rust_debug
from pynydus.cli.nydusctl import offset_datetime_display
from pynydus.cli.upstream import hex_int, json_value, rust_f64, setup_logging
from pynydus.logs import NYDUSD_LEVELS, level_of
from pynydus.rafs.format import Compressor, Digester
from pynydus.rafs.read import BlobInfo
from tests.harness.util import root_logging_of


@pytest.mark.parametrize(("x", "shown"), [(0.0, "0"), (1024.0, "1024"), (1.5, "1.5"),
                                          (0.0000057220458984375, "0.0000057220458984375"),
                                          (1e21, "1000000000000000000000"),
                                          (float("nan"), "NaN"), (float("inf"), "inf")])
def test_f64_display_is_rusts(x: float, shown: str) -> None:
    assert rust_f64(x) == shown


def test_json_values_are_compact_sorted_and_keep_unicode() -> None:
    assert json_value({"b": [1, "x"], "a": "é"}) == '{"a":"é","b":[1,"x"]}'
    assert json_value("localfs") == '"localfs"'


def test_mount_time_displays_like_the_time_crate() -> None:
    assert offset_datetime_display("2026-12-07 05:36:07.183990879 +00:00:00") == \
        "2026-12-07 5:36:07.183990879 +00:00:00"
    assert offset_datetime_display("2026-12-07 15:00:00.500000000 +00:00:00") == \
        "2026-12-07 15:00:00.5 +00:00:00"


def test_blob_features_and_names() -> None:
    assert blob_features(0x4000_0001) == "aligned cap_toc"
    assert blob_features(0x7000_0021) == "aligned cap_toc chunk-digest tar-header toc"
    assert rust_debug(b'a"b\n') == '"a\\"b\\n"'


def test_inspect_names_feature_bits_as_bitflags_debug() -> None:
    assert _feature_names(0x4000_0001) == "ALIGNED | CAP_TAR_TOC"
    assert _feature_names(0x8000_0010) == "SEPARATE | _V5_NO_EXT_BLOB_TABLE"
    assert _feature_names(0) == "(empty)"


def _blob(features: int, **sizes: int) -> BlobInfo:
    return BlobInfo(index=0, blob_id="b", compressor=Compressor.ZSTD, digester=Digester.SHA256,
                    chunk_size=1 << 20, chunk_count=1, uncompressed_size=1 << 20,
                    features=features, **sizes)


@pytest.mark.parametrize(("features", "sizes", "data"), [
    (0, {"compressed_size": 5000}, 5000),                                   # no TOC: all data
    (0x10 | 0x4000_0000, {"compressed_size": 5000, "ci_offset": 100}, 5000),  # SEPARATE
    (0x4000_0000 | 0x1000_0000,                                             # TOC, tar headers
     {"compressed_size": 9000, "ci_offset": 4608, "ci_compressed_size": 10,
      "ci_uncompressed_size": 24}, 4096),
    (0x4000_0000, {"compressed_size": 9000, "ci_offset": 4608, "ci_compressed_size": 10,
                   "ci_uncompressed_size": 24}, 4608),
    (0x4000_0000 | 0x1000_0000, {"compressed_size": 9000}, 9000 - 512),      # TOC, no ci array
])
def test_compressed_data_size_is_upstreams(features: int, sizes: dict[str, int], data: int) -> None:
    """upstream's ``BlobInfo::compressed_data_size``, which ``check`` and the inspector print."""
    assert _blob(features, **sizes).compressed_data_size == data


def test_chunk_size_is_hexadecimal_with_or_without_prefix() -> None:
    assert hex_int("0x100000", "chunk size") == hex_int("100000", "chunk size") == 0x100000
    with pytest.raises(ValueError, match="invalid chunk size zz"):
        hex_int("zz", "chunk size")


def test_create_defaults_are_upstreams() -> None:
    args = build_parser().parse_args(["create", "src", "-D", "d"])
    assert (args.type, args.compressor, args.digester, args.fs_version, args.whiteout_spec,
            args.prefetch_policy) == ("dir-rafs", "zstd", "blake3", "6", "oci", "none")
    assert build_parser().parse_args(["create", "--source-type", "tar-rafs", "x",
                                      "-D", "d"]).type == "tar-rafs"
    with pytest.raises(SystemExit) as exc:  # no abbreviations, as clap
        build_parser().parse_args(["create", "src", "-D", "d", "--compress", "zstd"])
    assert exc.value.code == 2


def test_log_level_takes_rusts_names_and_the_shared_level_map() -> None:
    """nydus-image's ``-l`` accepts the Rust ``log`` names nydusd does, and each sets the
    root level pynydusd and the snapshotter set for that name (one map: pynydus.logs)."""
    parser = build_parser()
    assert {parser.parse_args(["-l", n, "check", "-B", "b"]).log_level for n in NYDUSD_LEVELS} \
        == set(NYDUSD_LEVELS)
    with pytest.raises(SystemExit):
        parser.parse_args(["-l", "verbose", "check", "-B", "b"])
    for name in NYDUSD_LEVELS:
        with root_logging_of(lambda n=name: setup_logging(n, None)) as root:
            assert root.level == level_of(name)
    with root_logging_of(lambda: setup_logging("warn", None)) as root:
        assert root.level == logging.WARNING

"""Progress reporting: one log line per layer start/end when not at a terminal."""

from __future__ import annotations

import io

from pynydus.convert.progress import LogReporter, NullReporter, RichReporter, make_reporter

SUMMARY = {"source_digest": "sha256:" + "a" * 64, "blob_digest": "sha256:" + "b" * 64,
           "blob_size": 2_500_000, "source_size": 3_000_000, "chunks": 3, "seconds": 1.25,
           "cached": False}


def test_log_reporter_lines() -> None:
    out = io.StringIO()
    rep = LogReporter(out)
    rep.layer_started("k", SUMMARY["source_digest"], 3_000_000)
    rep.layer_bytes("k", 1000)  # silent
    rep.layer_done("k", SUMMARY)
    rep.layer_done("k", {**SUMMARY, "cached": True})
    lines = out.getvalue().splitlines()
    assert len(lines) == 3
    assert lines[0].endswith("layer aaaaaaaaaaaa: converting (3.0 MB)")
    assert lines[1].endswith("layer aaaaaaaaaaaa: done (1.25s), blob bbbbbbbbbbbb 2.5 MB, 3 chunks")
    assert "done (cached)" in lines[2]


def test_make_reporter_modes() -> None:
    assert isinstance(make_reporter("quiet"), NullReporter)
    assert isinstance(make_reporter("plain"), LogReporter)
    rich = make_reporter("rich")
    assert isinstance(rich, RichReporter)
    rich.layer_started("k", SUMMARY["source_digest"], 3_000_000)
    rich.layer_bytes("k", 1_000_000)
    rich.layer_done("k", SUMMARY)
    rich.close()

"""Corrupt layers fail with the project's errors, never with a stray exception.

A valid layer (plain, gzip, zstd) has random bytes overwritten or is cut short;
``build()`` must then either succeed or raise a :class:`~pynydus.errors.NydusError`
(FormatError for malformed input), and leave no partial blob behind.
"""

from __future__ import annotations

import gzip
import io
import os
import tarfile
import tempfile
from pathlib import Path

import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pynydus.errors import NydusError
from pynydus.rafs.builder import build


def _layer() -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for i in range(6):
            t = tarfile.TarInfo(f"d{i % 2}/f{i}")
            data = bytes([i]) * (3000 * i)
            t.size = len(data)
            t.pax_headers = {"SCHILY.xattr.user.k": "v" * i}
            tf.addfile(t, io.BytesIO(data))
        link = tarfile.TarInfo("d0/link")
        link.type, link.linkname = tarfile.LNKTYPE, "d0/f2"
        tf.addfile(link)
    return buf.getvalue()


LAYER = _layer()
CODECS = {
    "plain": LAYER,
    "gzip": gzip.compress(LAYER),
    "zstd": zstandard.ZstdCompressor().compress(LAYER),
}


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    codec=st.sampled_from(sorted(CODECS)),
    edits=st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.binary(min_size=1, max_size=8)),
                   max_size=4),
    cut=st.one_of(st.none(), st.floats(0, 1)),
)
def test_corrupt_layers_raise_project_errors(
    codec: str, edits: list[tuple[float, bytes]], cut: float | None
) -> None:
    data = bytearray(CODECS[codec])
    for where, junk in edits:
        pos = int(where * len(data))
        data[pos : pos + len(junk)] = junk
    if cut is not None:
        del data[int(cut * len(data)) :]
    with tempfile.TemporaryDirectory() as d:
        work = Path(d)
        try:
            build(io.BytesIO(bytes(data)), work / "boot", work / "blobs", type="tar-rafs",
                  chunk_size=0x1000)
        except NydusError:
            assert not (work / "boot").exists()
            assert not (work / "blobs").exists() or os.listdir(work / "blobs") == []

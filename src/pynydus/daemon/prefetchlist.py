"""Prefetch lists: a start-up's reads, learned from an access trace, in a shareable form.

A list is a small JSON document (``MEDIA_TYPE``)::

    {"version": 1,
     "blobs": ["<blob id>", ...],
     "ranges": [[blob, first chunk index, chunk count, compressed offset, compressed size], ...],
     "files": ["/usr/bin/python3", ...]}

``ranges`` are runs of chunks in the order a start-up first read them: a run is chunks of
one blob with consecutive indexes read one after the other (``blob`` indexes ``blobs``).
The compressed extent lets a reader without the bootstrap fetch them; pynydusd looks the
chunks up in the bootstrap's chunk table by (blob id, index). ``files`` is the list
upstream's ``--prefetch-files`` takes (nydusd and nydusify use it), in first-read order.

It is pushed to the registry as an OCI artifact whose ``subject`` is the image manifest
(``pynydus optimize``), found at pull through the referrers API or its fallback tag, and
handed to the image's daemon, which prefetches in this order. Sans-I/O: values in, values
out.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from pynydus.errors import FormatError

MEDIA_TYPE = "application/vnd.pynydus.prefetch-list.v1+json"
ARTIFACT_TYPE = "application/vnd.pynydus.prefetch-list.v1"
VERSION = 1
# A list is read by the snapshotter and the daemon from the registry: bound what they take.
MAX_BYTES = 8 << 20
MAX_RANGES = 262144
MAX_FILES = 65536


@dataclass(frozen=True)
class PrefetchList:
    """Chunk runs ``(blob, first index, count, compressed offset, compressed size)`` and
    files, both in first-read order."""

    blobs: tuple[str, ...] = ()
    ranges: tuple[tuple[int, int, int, int, int], ...] = ()
    files: tuple[str, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.ranges or self.files)

    @property
    def compressed_bytes(self) -> int:
        return sum(r[4] for r in self.ranges)

    def to_json(self) -> bytes:
        doc = {"version": VERSION, "blobs": list(self.blobs),
               "ranges": [list(r) for r in self.ranges], "files": list(self.files)}
        return json.dumps(doc, separators=(",", ":")).encode()


@dataclass
class _Run:
    """A run of a trace's chunks in one blob (its index in the list's blobs), ``count``
    consecutive chunk indexes from ``first``, covering compressed bytes ``start:end``."""

    blob: int
    first: int
    count: int
    start: int
    end: int
    chunks: list[tuple[int, int, int]] = field(default_factory=list)


def from_trace(trace: Mapping[str, Any]) -> PrefetchList:
    """The list of an access trace (``GET /api/v1/metrics/trace``): its chunks in
    first-read order, a chunk following the previous one in the same blob (next index)
    extending its run; its files' paths in first-read order."""
    blobs: list[str] = []
    where: dict[str, int] = {}
    runs: list[_Run] = []
    for c in _list(trace, "chunks"):
        blob_id, index, off, size = (_get(c, "blob_id", str), _get(c, "index", int),
                                     _get(c, "offset", int), _get(c, "size", int))
        if not blob_id:
            continue
        b = where.get(blob_id)
        if b is None:
            b = where[blob_id] = len(blobs)
            blobs.append(blob_id)
        last = runs[-1] if runs else None
        if last is not None and last.blob == b and index == last.first + last.count:
            last.count += 1
            last.start, last.end = min(last.start, off), max(last.end, off + size)
            continue
        runs.append(_Run(b, index, 1, off, off + size))
    files = tuple(p for p in (_get(f, "path", str) for f in _list(trace, "files")) if p)
    return PrefetchList(tuple(blobs),
                        tuple((r.blob, r.first, r.count, r.start, r.end - r.start) for r in runs),
                        files)


def parse(data: bytes, what: str = "prefetch list") -> PrefetchList:
    """A list from its JSON; FormatError naming ``what`` for anything malformed."""
    if len(data) > MAX_BYTES:
        raise FormatError(f"{what}: {len(data)} bytes, more than {MAX_BYTES}")
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError) as err:
        raise FormatError(f"{what}: not JSON: {err}") from err
    if not isinstance(doc, dict) or doc.get("version") != VERSION:
        raise FormatError(f"{what}: not a version {VERSION} prefetch list")
    blobs = doc.get("blobs", [])
    ranges = doc.get("ranges", [])
    files = doc.get("files", [])
    if not (isinstance(blobs, list) and all(isinstance(b, str) and b for b in blobs)):
        raise FormatError(f"{what}: blobs: expected a list of blob ids")
    if not isinstance(ranges, list) or len(ranges) > MAX_RANGES:
        raise FormatError(f"{what}: ranges: expected a list of at most {MAX_RANGES}")
    if not (isinstance(files, list) and len(files) <= MAX_FILES
            and all(isinstance(f, str) and f.startswith("/") for f in files)):
        raise FormatError(f"{what}: files: expected at most {MAX_FILES} absolute paths")
    out: list[tuple[int, int, int, int, int]] = []
    for i, r in enumerate(ranges):
        if (not isinstance(r, list) or len(r) != 5
                or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in r)
                or r[0] >= len(blobs) or r[2] == 0):
            raise FormatError(f"{what}: ranges[{i}]: expected [blob, index, count, offset, "
                              f"size] with blob < {len(blobs)} and count > 0")
        out.append((r[0], r[1], r[2], r[3], r[4]))
    return PrefetchList(tuple(blobs), tuple(out), tuple(files))


def chunks_in_order(plist: PrefetchList, blob_index_of: Mapping[str, int]
                    ) -> list[tuple[int, list[int]]]:
    """The list's runs as (blob index in the image, chunk indexes), in order, for the
    blobs the image has (``blob_index_of``: blob id -> index); runs of other blobs (a
    list of another version of the image) are left out."""
    out: list[tuple[int, list[int]]] = []
    for b, first, count, _, _ in plist.ranges:
        bi = blob_index_of.get(plist.blobs[b])
        if bi is not None:
            out.append((bi, list(range(first, first + count))))
    return out


def _list(doc: Mapping[str, Any], key: str) -> Sequence[Mapping[str, Any]]:
    v = doc.get(key, [])
    if not isinstance(v, list) or not all(isinstance(e, dict) for e in v):
        raise FormatError(f"trace: {key}: expected a list of objects")
    return v


def _get(d: Mapping[str, Any], key: str, kind: type) -> Any:
    v = d.get(key)
    if not isinstance(v, kind) or isinstance(v, bool):
        raise FormatError(f"trace: {key}: expected {kind.__name__}, got {v!r}")
    return v

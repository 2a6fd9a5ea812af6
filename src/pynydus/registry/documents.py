"""Registry documents as we read them (sans-I/O): manifests, indexes, configs and the
descriptors in them, checked for their shape before anything reads a field.

A registry is untrusted input: a layer that is a number or an index entry that is a
list must end in a FormatError naming the place, never in an AttributeError deep in
whoever reads it (the converter, the snapshotter's Nydus detection, the referrers of
prefetch lists). Fuzzed by the ``manifest`` and ``index`` targets (docs/fuzzing.md).
"""

from __future__ import annotations

import json
from typing import Any

from pynydus.errors import FormatError

__all__ = ["check_descriptor", "load_document", "parse_index"]


def load_document(data: bytes, what: str) -> dict[str, Any]:
    """A registry document (manifest, index, config): a JSON object, else FormatError."""
    try:
        doc = json.loads(data)
    except (ValueError, RecursionError) as err:
        raise FormatError(f"{what}: not JSON: {err}") from err
    if not isinstance(doc, dict):
        raise FormatError(f"{what}: not a JSON object")
    return doc


def _strings(value: Any, what: str) -> None:
    """FormatError unless ``value`` (if given) is an object of strings (labels,
    annotations) or a platform (strings, ``os.features`` a list of strings)."""
    if value is None:
        return
    if not isinstance(value, dict):
        raise FormatError(f"{what} is not an object")
    for k, v in value.items():
        ok = (isinstance(v, list) and all(isinstance(x, str) for x in v)) if k in (
            "os.features", "features") else isinstance(v, str)
        if not ok:
            raise FormatError(f"{what}.{k} is not a string")


def check_descriptor(d: Any, what: str, *, size: bool = True) -> dict[str, Any]:
    """An OCI descriptor as we read it: an object with a string ``digest`` and
    ``mediaType``, an integer ``size`` >= 0 (when ``size``), string annotations and a
    platform of strings where given; FormatError naming ``what`` otherwise."""
    if not isinstance(d, dict):
        raise FormatError(f"{what} is not an object")
    for key in ("digest", "mediaType"):
        if key in d and not isinstance(d[key], str):
            raise FormatError(f"{what}.{key} is not a string")
    if not isinstance(d.get("digest"), str):
        raise FormatError(f"{what} has no digest")
    if "artifactType" in d and not isinstance(d["artifactType"], str):
        raise FormatError(f"{what}.artifactType is not a string")
    n = d.get("size", 0)
    if size and (isinstance(n, bool) or not isinstance(n, int) or n < 0):
        raise FormatError(f"{what}.size {n!r} is not a size")
    _strings(d.get("annotations"), f"{what}.annotations")
    _strings(d.get("platform"), f"{what}.platform")
    return d


def parse_index(data: bytes, what: str) -> dict[str, Any]:
    """An image index whose ``manifests`` are descriptors (objects with a string
    ``digest``; ``platform`` an object and ``mediaType``/``artifactType`` strings where
    given): what the converter (``select_manifests``, ``merged_index``), the
    snapshotter's detection and the referrers client read. FormatError
    otherwise, naming the entry."""
    doc = load_document(data, what)
    manifests = doc.get("manifests")
    if manifests is None:
        manifests = doc["manifests"] = []
    if not isinstance(manifests, list):
        raise FormatError(f"{what}: manifests is not a list")
    for i, d in enumerate(manifests):
        check_descriptor(d, f"{what}: manifests[{i}]")
    return doc

"""Referrers fallback-tag bookkeeping (sans-I/O)."""

from __future__ import annotations

import json

import pytest

from pynydus.errors import FormatError
from pynydus.registry import media
from pynydus.registry.documents import parse_index
from pynydus.registry.referrers import (
    add_referrer,
    empty_index,
    fallback_tag,
    filter_artifact_type,
    referrer_descriptor,
    subject_of,
)

SUBJ = "sha256:" + "a" * 64


def test_fallback_tag_replaces_the_colon_and_fits_a_tag() -> None:
    assert fallback_tag(SUBJ) == "sha256-" + "a" * 64
    assert len(fallback_tag("sha512:" + "b" * 128)) == 128


def test_descriptor_takes_artifact_type_then_config_media_type() -> None:
    m = json.dumps({"artifactType": "x/y", "config": {"mediaType": "c/d"},
                    "annotations": {"k": "v"}, "subject": {"digest": SUBJ}}).encode()
    d = referrer_descriptor(m, media.OCI_MANIFEST, "sha256:" + "1" * 64)
    assert d == {"mediaType": media.OCI_MANIFEST, "digest": "sha256:" + "1" * 64,
                 "size": len(m), "artifactType": "x/y", "annotations": {"k": "v"}}
    m2 = json.dumps({"config": {"mediaType": "c/d"}}).encode()
    assert referrer_descriptor(m2, media.OCI_MANIFEST, "sha256:" + "2" * 64)[
        "artifactType"] == "c/d"
    assert subject_of(m) == SUBJ
    assert subject_of(m2) is None
    assert subject_of(b"not json") is None


def test_add_referrer_is_idempotent_per_digest() -> None:
    idx = empty_index()
    a = {"digest": "sha256:" + "1" * 64, "artifactType": "x"}
    b = {"digest": "sha256:" + "2" * 64, "artifactType": "y"}
    idx = add_referrer(add_referrer(add_referrer(idx, a), b), a)
    assert [m["digest"] for m in idx["manifests"]] == [b["digest"], a["digest"]]
    assert filter_artifact_type(idx, "y")["manifests"] == [b]
    assert filter_artifact_type(idx, None) is idx


def test_parse_index_rejects_non_indexes() -> None:
    assert parse_index(b'{"schemaVersion": 2}', "w")["manifests"] == []
    for bad in (b"[]", b"nope", b'{"manifests": {}}', b'{"manifests": [1]}',
                b'{"manifests": [{"digest": 1}]}',
                b'{"manifests": [{"digest": "d", "artifactType": []}]}'):
        with pytest.raises(FormatError):
            parse_index(bad, "w")

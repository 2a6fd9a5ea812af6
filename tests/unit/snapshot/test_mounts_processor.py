"""Mount specs (containerd overlay parity) and the label decision table."""

from pynydus import labels as L
from pynydus.snapshot import processor
from pynydus.snapshot.metastore import Kind
from pynydus.snapshot.mounts import Mount, native_mounts


def test_parentless_active_is_rw_bind() -> None:
    assert native_mounts(Kind.ACTIVE, "/r/1/fs", "/r/1/work", []) == [Mount("bind", "/r/1/fs", ("rw", "rbind"))]


def test_parentless_view_is_ro_bind() -> None:
    assert native_mounts(Kind.VIEW, "/r/1/fs", "", []) == [Mount("bind", "/r/1/fs", ("ro", "rbind"))]


def test_view_of_one_parent_binds_parent_readonly() -> None:
    assert native_mounts(Kind.VIEW, "/r/2/fs", "", ["/r/1/fs"]) == [Mount("bind", "/r/1/fs", ("ro", "rbind"))]


def test_active_overlay_extra_first_then_lowerdir_newest_first() -> None:
    (m,) = native_mounts(Kind.ACTIVE, "/r/3/fs", "/r/3/work", ["/r/2/fs", "/r/1/fs"],
                         volatile=True, extra_options=("index=off",))
    assert m.type == "overlay" and m.source == "overlay"
    assert m.options == ("index=off", "workdir=/r/3/work", "upperdir=/r/3/fs", "volatile",
                         "lowerdir=/r/2/fs:/r/1/fs")


def test_view_of_two_parents_is_lowerdir_only() -> None:
    (m,) = native_mounts(Kind.VIEW, "/r/3/fs", "", ["/r/2/fs", "/r/1/fs"])
    assert m.options == ("lowerdir=/r/2/fs:/r/1/fs",)


NYDUS = processor.Features(nydus=True)


def test_without_remote_fs_everything_is_default() -> None:
    pulled = {L.TARGET_SNAPSHOT_REF: "sha256:x", L.NYDUS_BLOB: "true"}
    assert processor.choose(pulled, [], processor.Features()).handler is processor.Handler.DEFAULT
    meta = processor.Layer("1", {L.NYDUS_BOOTSTRAP: "true"})
    assert processor.choose({}, [meta], processor.Features()).handler is processor.Handler.DEFAULT


def test_nydus_layers() -> None:
    ref = {L.TARGET_SNAPSHOT_REF: "sha256:x"}
    assert processor.choose({**ref, L.NYDUS_BOOTSTRAP: "true"}, [], NYDUS).handler is processor.Handler.DEFAULT
    assert processor.choose({**ref, L.NYDUS_BLOB: "true"}, [], NYDUS).handler is processor.Handler.SKIP
    assert processor.choose(ref, [], NYDUS).handler is processor.Handler.DEFAULT


def test_container_layer_over_nydus_image_is_remote_at_meta_layer() -> None:
    chain = [processor.Layer("3", {}), processor.Layer("2", {L.NYDUS_BOOTSTRAP: "true"}),
             processor.Layer("1", {L.NYDUS_BLOB: "true"})]
    d = processor.choose({}, chain, NYDUS)
    assert d.handler is processor.Handler.REMOTE and d.remote == chain[1]
    assert processor.bootstrap_layer(chain) == chain[1]


def test_bootstrap_layer_is_the_nearest_and_none_for_an_oci_image() -> None:
    near = processor.Layer("5", {L.NYDUS_BOOTSTRAP: "true"})
    far = processor.Layer("2", {L.NYDUS_BOOTSTRAP: "true"})
    assert processor.bootstrap_layer([processor.Layer("6", {}), near, far]) is near
    assert processor.bootstrap_layer([processor.Layer("1", {})]) is None
    assert processor.bootstrap_layer([]) is None


def test_a_manifests_bootstrap_is_its_last_layer_when_annotated_so() -> None:
    """What the snapshotter's detection and the converter ask of a manifest: the same
    predicate as a snapshot's labels (``is_nydus_meta_layer``), on the last layer."""
    blob = {"digest": "sha256:b", "annotations": {L.NYDUS_BLOB: "true"}}
    boot = {"digest": "sha256:m", "annotations": {L.NYDUS_BOOTSTRAP: "true"}}
    assert L.bootstrap_descriptor({"layers": [blob, boot]}) is boot
    assert L.bootstrap_descriptor({"layers": [boot, blob]}) is None  # only the last counts
    assert L.bootstrap_descriptor({"layers": [{"digest": "sha256:o"}]}) is None
    for bad in ({}, {"layers": []}, {"layers": ["x"]}, {"layers": {"a": 1}}, [], None,
                {"layers": [{"annotations": ["x"]}]}):
        assert L.bootstrap_descriptor(bad) is None

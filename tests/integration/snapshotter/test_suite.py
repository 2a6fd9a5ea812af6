"""containerd's snapshotter test suite, as scenarios against ``pynydus snapshotter``.

Each scenario of containerd's ``snapshots/testsuite`` (Basic, StatActive, … 128LayersMount)
is restated here in pytest over the gRPC wire: prepare an active snapshot, mount what the
snapshotter answers with the real mount(2), write files into it (an applier), commit, and
check the combined view of a child against a plain directory that received the same
changes (a checker). Then the parts of containerd's overlayfs snapshotter the suite does
not cover: the exact mounts, Usage and Cleanup.

The reference for every expectation is containerd v1.6 ``snapshots/overlay`` over
``snapshots/storage``; where this file asserts an error code, that is the code containerd's
errdefs maps to over gRPC.
"""

from __future__ import annotations

import itertools
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import grpc
import pytest

from pynydus.api import mount_pb2, snapshots_pb2

from .support import (
    GC_ROOT,
    KIND_ACTIVE,
    KIND_COMMITTED,
    KIND_VIEW,
    OVERLAY_VOLATILE,
    SNAPSHOTTER_NAME,
    SnapshotterClient,
    SnapshotterProcess,
    apply_all,
    assert_trees_equal,
    check_snapshots,
    chown,
    create_dir,
    create_file,
    disk_usage,
    info_copy,
    info_tuple,
    link,
    make_base,
    mount_options,
    remove_all,
    snapshot_id_of,
    symlink,
    teardown_base,
    ts_ns,
    upper_dir,
)

pytestmark = pytest.mark.root


Mount = mount_pb2.Mount
Labels = Mapping[str, str] | None


class NamespacedClient:
    """A client confined to one key prefix of a snapshotter shared by several tests.

    containerd itself runs every namespace on one snapshotter, with keys like
    ``default/12/<key>``; doing the same here saves a process start per test and
    exercises keys with slashes. Names and parents come back without the prefix. List
    takes no filters here (tests of filters get a snapshotter of their own).
    """

    def __init__(self, proc: SnapshotterProcess, ns: str) -> None:
        assert proc.client is not None
        self.proc = proc
        self.inner: SnapshotterClient = proc.client
        self.ns = ns

    def _k(self, key: str) -> str:
        return self.ns + key if key else ""

    def _strip(self, info: snapshots_pb2.Info) -> snapshots_pb2.Info:
        assert info.name.startswith(self.ns), info.name
        out = info_copy(info, name=info.name[len(self.ns) :])
        if info.parent:
            assert info.parent.startswith(self.ns), info.parent
            out.parent = info.parent[len(self.ns) :]
        return out

    def prepare(self, key: str, parent: str = "", labels: Labels = None) -> list[Mount]:
        return self.inner.prepare(self._k(key), self._k(parent), labels)

    def view(self, key: str, parent: str = "", labels: Labels = None) -> list[Mount]:
        return self.inner.view(self._k(key), self._k(parent), labels)

    def mounts(self, key: str) -> list[Mount]:
        return self.inner.mounts(self._k(key))

    def commit(self, name: str, key: str, labels: Labels = None) -> None:
        self.inner.commit(self._k(name), self._k(key), labels)

    def remove(self, key: str) -> None:
        self.inner.remove(self._k(key))

    def stat(self, key: str) -> snapshots_pb2.Info:
        return self._strip(self.inner.stat(self._k(key)))

    def update(
        self, info: snapshots_pb2.Info, paths: Sequence[str] | None = None
    ) -> snapshots_pb2.Info:
        return self._strip(self.inner.update(info_copy(info, name=self._k(info.name)), paths))

    def list(self, *filters: str) -> list[snapshots_pb2.Info]:
        assert not filters, "filter tests use a snapshotter of their own"
        return [self._strip(i) for i in self.inner.list() if i.name.startswith(self.ns)]

    def names(self) -> set[str]:
        return {i.name for i in self.list()}

    def usage(self, key: str) -> snapshots_pb2.UsageResponse:
        return self.inner.usage(self._k(key))

    def cleanup(self) -> None:
        self.inner.cleanup()


@pytest.fixture(scope="module")
def _shared_snapshotter() -> Iterator[SnapshotterProcess]:
    base = make_base()
    proc = SnapshotterProcess(base=base)
    try:
        proc.start()
        yield proc
    finally:
        teardown_base(base, [proc])


_namespaces = itertools.count(1)


@pytest.fixture
def sn(_shared_snapshotter: SnapshotterProcess) -> NamespacedClient:
    """A fresh namespace on the module's shared snapshotter (restarted if it died)."""
    proc = _shared_snapshotter
    if proc.proc is None or proc.proc.poll() is not None:
        proc.start()
    return NamespacedClient(proc, f"suite/{next(_namespaces)}/")


# containerd's suite labels every snapshot as a GC root; so do we (labels must round-trip)
OPT = {GC_ROOT: time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}

# Storage may keep timestamps at micro- or millisecond precision; allow that much below a
# wall-clock lower bound taken in this process.
TS_SLACK_NS = 1_000_000

# mount options containerd's overlayfs snapshotter may add on its own (kernel features)
ALLOWED_EXTRA_OVERLAY_OPTIONS = {"index=off", "userxattr"}


def rpc_code(excinfo: pytest.ExceptionInfo[grpc.RpcError]) -> grpc.StatusCode:
    return excinfo.value.code()  # type: ignore[no-any-return]


def now_ns() -> int:
    return time.time_ns()


# ======================================================================================
# containerd testsuite scenarios


def test_basic(sn, mounter, scratch):
    """Basic: prepare → apply → commit; a child sees the parent's files and adds its own
    diff; committed names and parents are right; Walk agrees with Stat; a view of the
    top shows both diffs; a parent with children cannot be removed ("remove" in the error)."""
    initial = apply_all(
        create_file("/foo", b"foo\n", 0o777),
        create_dir("/a", 0o755),
        create_dir("/a/b", 0o755),
        create_dir("/a/b/c", 0o755),
    )
    diff = apply_all(
        create_file("/bar", b"bar\n", 0o777),
        create_file("/foo", b"bar\n", 0o777),  # change the content of foo
        remove_all("/a/b"),
    )
    # containerd's own keys carry slashes; so do these
    preparing, committed = "testsuite/1/preparing", "testsuite/1/committed"
    nextlayer, committed_next = "testsuite/2/nextlayer", "testsuite/2/committed-next"
    nextnext = "testsuite/3/nextnextlayer"

    mounts = sn.prepare(preparing, "", OPT)
    assert len(mounts) >= 1
    target = mounter.mount(mounts)
    initial(target)
    mounter.unmount(target)  # unmount before commit, as containerd's suite does

    sn.commit(committed, preparing, OPT)
    si = sn.stat(committed)
    assert si.name == committed
    assert si.parent == ""
    assert si.kind == KIND_COMMITTED
    with pytest.raises(grpc.RpcError) as e:
        sn.stat(preparing)
    assert rpc_code(e) == grpc.StatusCode.NOT_FOUND, "the key is gone after Commit"

    target = mounter.mount(sn.prepare(nextlayer, committed, OPT))
    expected = scratch / "initial"
    expected.mkdir()
    initial(expected)
    assert_trees_equal(expected, target, "child of the first layer")
    diff(target)
    mounter.unmount(target)

    ni = sn.stat(nextlayer)
    assert ni.parent == committed
    assert ni.kind == KIND_ACTIVE

    sn.commit(committed_next, nextlayer, OPT)
    si2 = sn.stat(committed_next)
    assert si2.parent == committed
    assert si2.kind == KIND_COMMITTED
    with pytest.raises(grpc.RpcError) as e:
        sn.stat(nextlayer)
    assert rpc_code(e) == grpc.StatusCode.NOT_FOUND

    walked = {i.name: i for i in sn.list()}
    assert set(walked) == {committed, committed_next}
    assert info_tuple(walked[committed]) == info_tuple(si)
    assert info_tuple(walked[committed_next]) == info_tuple(si2)

    target = mounter.mount(sn.view(nextnext, committed_next, OPT))
    diff(expected)
    assert_trees_equal(expected, target, "view of the top layer")
    mounter.unmount(target)

    sn.remove(nextnext)
    with pytest.raises(grpc.RpcError) as e:
        sn.remove(committed)
    assert rpc_code(e) == grpc.StatusCode.FAILED_PRECONDITION
    assert "remove" in (e.value.details() or "")
    sn.remove(committed_next)
    sn.remove(committed)
    assert sn.list() == []


def test_stat_active(sn, mounter):
    """StatActive: a prepared, written-to snapshot stats as active, by its key, no parent."""
    target = mounter.mount(sn.prepare("preparing", "", OPT))
    (target / "foo").write_bytes(b"foo\n")
    si = sn.stat("preparing")
    assert si.name == "preparing"
    assert si.kind == KIND_ACTIVE
    assert si.parent == ""
    assert dict(si.labels) == OPT


def test_stat_committed(sn, mounter):
    """StatCommitted: after Commit the name stats as committed with no parent."""
    target = mounter.mount(sn.prepare("preparing", "", OPT))
    (target / "foo").write_bytes(b"foo\n")
    sn.commit("committed", "preparing", OPT)
    si = sn.stat("committed")
    assert si.name == "committed"
    assert si.kind == KIND_COMMITTED
    assert si.parent == ""


def test_transitivity(sn, mounter):
    """Transitivity: A ← B; B's parent is A and A's parent is empty, via Stat of B.parent."""
    target = mounter.mount(sn.prepare("preparing", "", OPT))
    (target / "foo").write_bytes(b"foo\n")
    sn.commit("snapA", "preparing", OPT)
    target = mounter.mount(sn.prepare("next", "snapA", OPT))
    (target / "foo").write_bytes(b"foo bar\n")
    sn.commit("snapB", "next", OPT)

    si_a, si_b = sn.stat("snapA"), sn.stat("snapB")
    si_parent_b = sn.stat(si_b.parent)
    assert si_a.parent == ""
    assert si_b.parent == "snapA"
    assert si_parent_b.parent == ""


def test_prepare_view_with_an_existing_key_fails(sn, mounter):
    """PrepareView: Prepare then View, Prepare twice, View twice with one key all fail
    with ALREADY_EXISTS; the first snapshot stays as it was."""
    mounter.mount(sn.prepare("preparing", "", OPT))
    sn.commit("snapA", "preparing", OPT)

    sn.prepare("newlayer", "snapA", OPT)
    with pytest.raises(grpc.RpcError) as e:
        sn.view("newlayer", "snapA", OPT)
    assert rpc_code(e) == grpc.StatusCode.ALREADY_EXISTS

    sn.prepare("prepLayer", "snapA", OPT)
    with pytest.raises(grpc.RpcError) as e:
        sn.prepare("prepLayer", "snapA", OPT)
    assert rpc_code(e) == grpc.StatusCode.ALREADY_EXISTS

    sn.view("viewLayer", "snapA", OPT)
    with pytest.raises(grpc.RpcError) as e:
        sn.view("viewLayer", "snapA", OPT)
    assert rpc_code(e) == grpc.StatusCode.ALREADY_EXISTS

    assert sn.stat("newlayer").kind == KIND_ACTIVE
    assert sn.stat("prepLayer").kind == KIND_ACTIVE
    assert sn.stat("viewLayer").kind == KIND_VIEW
    assert sn.names() == {"snapA", "newlayer", "prepLayer", "viewLayer"}


def _base_test_snapshots(sn) -> None:
    """c1 (committed) ← c2 (committed) ← a1 (active), v1 (view); a2, v2 without parent."""
    sn.prepare("c1-a", "", OPT)
    sn.commit("c1", "c1-a", OPT)
    sn.prepare("c2-a", "c1", OPT)
    sn.commit("c2", "c2-a", OPT)
    sn.prepare("a1", "c2", OPT)
    sn.prepare("a2", "", OPT)
    sn.view("v1", "c2", OPT)
    sn.view("v2", "", OPT)


def test_update(sn):
    """Update: created_at == updated_at at creation; an Update with no mask replaces the
    labels and ignores the parent; ``labels.KEY`` sets or deletes one label; ``labels``
    replaces all; updated_at moves, created_at never; ``parent`` in the mask is
    INVALID_ARGUMENT."""
    t1 = now_ns()
    _base_test_snapshots(sn)
    t2 = now_ns()
    cases = [
        ("c1", KIND_COMMITTED, ""),
        ("c2", KIND_COMMITTED, "c1"),
        ("a1", KIND_ACTIVE, "c2"),
        ("a2", KIND_ACTIVE, ""),
        ("v1", KIND_VIEW, "c2"),
        ("v2", KIND_VIEW, ""),
    ]
    for name, kind, parent in cases:
        st = sn.stat(name)
        created = ts_ns(st.created_at)
        assert t1 - TS_SLACK_NS <= created <= t2, f"{name}: created_at outside the call"
        assert ts_ns(st.updated_at) == created, f"{name}: updated_at != created_at at creation"
        assert (st.kind, st.parent, st.name) == (kind, parent, name)

        root_time = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        expected = {"l1": "v1", "l2": "v2", "l3": "v3", GC_ROOT: root_time}
        time.sleep(0.005)  # make "updated_at moved" observable at ms precision
        u1 = now_ns()
        st = sn.update(info_copy(st, parent="doesnotexist", labels=expected))
        u2 = now_ns()
        assert ts_ns(st.created_at) == created, f"{name}: created_at changed by Update"
        assert u1 - TS_SLACK_NS <= ts_ns(st.updated_at) <= u2, f"{name}: updated_at not now"
        assert ts_ns(st.updated_at) > created, f"{name}: updated_at did not advance"
        assert (st.kind, st.parent, st.name) == (kind, parent, name)
        assert dict(st.labels) == expected
        assert info_tuple(sn.stat(name)) == info_tuple(st), f"{name}: Update not persisted"

        st = sn.update(
            info_copy(st, labels={"l1": "updated", "l4": "v4"}), ["labels.l1", "labels.l2"]
        )
        assert dict(st.labels) == {"l1": "updated", "l3": "v3", GC_ROOT: root_time}

        expected = {"l4": "v4", GC_ROOT: root_time}
        st = sn.update(info_copy(st, labels=expected), ["labels"])
        assert dict(st.labels) == expected
        assert dict(sn.stat(name).labels) == expected

        with pytest.raises(grpc.RpcError) as e:
            sn.update(info_copy(st, parent="doesnotexist"), ["parent"])
        assert rpc_code(e) == grpc.StatusCode.INVALID_ARGUMENT, name
        assert sn.stat(name).parent == parent


def test_update_of_one_label_whose_key_has_dots_and_slashes(sn):
    """``labels.KEY`` takes everything after the first ``labels.`` as the key, dots and
    slashes included (containerd trims the prefix, it does not split the path)."""
    sn.prepare("a", "", {"containerd.io/gc.root": "old", "keep": "1"})
    info = sn.stat("a")
    new = info_copy(info, labels={"containerd.io/gc.root": "new", "a.b.c": "d"})
    got = sn.update(new, ["labels.containerd.io/gc.root", "labels.a.b.c"])
    assert dict(got.labels) == {"containerd.io/gc.root": "new", "a.b.c": "d", "keep": "1"}
    got = sn.update(info_copy(info, labels={}), ["labels.containerd.io/gc.root"])
    assert dict(got.labels) == {"a.b.c": "d", "keep": "1"}
    assert dict(sn.stat("a").labels) == dict(got.labels)


def test_labels_round_trip_and_empty_values_are_dropped(snapshotter):
    """Label keys and values are opaque UTF-8; a label with an empty value is not stored
    (containerd's label writer skips it), at Prepare, Commit and Update alike."""
    sn = snapshotter.client
    labels = {"ünï/cödé": "välue ✓", "spaces in key": " v ", "empty": "", "q'\"": "';--"}
    stored = {k: v for k, v in labels.items() if v}
    sn.prepare("a", "", labels)
    assert dict(sn.stat("a").labels) == stored
    sn.commit("c", "a", labels)
    assert dict(sn.stat("c").labels) == stored
    got = sn.update(info_copy(sn.stat("c"), labels={"x": "", "y": "1"}))
    assert dict(got.labels) == {"y": "1"}
    assert dict(sn.stat("c").labels) == {"y": "1"}
    assert [i.name for i in sn.list("labels.x")] == []


KEYS = [
    "default/12/sha256:3f4b2c1d0e",
    "extract-123456789-abcd sha256:0123",
    "ключ/ünïcode/✓",
    "a'; DROP TABLE snapshots; --",
    "k" * 1000,
    "with\nnewline",
    "%s%d{}",
]


def test_keys_are_opaque_strings(snapshotter, mounter):
    """containerd's keys carry slashes, colons, spaces; any string works as key and
    name, and filters on name find it."""
    sn = snapshotter.client
    for i, key in enumerate(KEYS):
        target = mounter.mount(sn.prepare(key, "", {"i": str(i)}))
        (target / "f").write_text(str(i))
        mounter.unmount(target)
        assert sn.stat(key).name == key
        sn.commit(key + "@c", key, {"i": str(i)})
        sn.view(key + "@v", key + "@c")
    assert sn.names() == {k + "@c" for k in KEYS} | {k + "@v" for k in KEYS}
    for i, key in enumerate(KEYS):
        assert sn.stat(key + "@v").parent == key + "@c"
        assert [x.name for x in sn.list(f"labels.i=={i},kind==committed")] == [key + "@c"]
        target = mounter.mount(sn.mounts(key + "@v"))
        assert (target / "f").read_text() == str(i)
        mounter.unmount(target)
        sn.remove(key + "@v")
        sn.remove(key + "@c")
    assert sn.list() == []


def test_remove(sn):
    """Remove: a removed key is free again at once, for Prepare and View alike, and a
    removed committed name can be committed to again."""
    sn.prepare("committed-a", "", OPT)
    sn.commit("committed-1", "committed-a", OPT)
    sn.prepare("reuse-1", "committed-1", OPT)
    sn.remove("reuse-1")
    sn.view("reuse-1", "committed-1", OPT)
    sn.remove("reuse-1")
    sn.prepare("reuse-1", "", OPT)
    sn.remove("committed-1")
    sn.commit("committed-1", "reuse-1", OPT)
    assert sn.names() == {"committed-1"}
    info = sn.stat("committed-1")
    assert info.kind == KIND_COMMITTED and info.parent == ""


WALK_ROOT = {GC_ROOT: "check-walk"}


def _walk_fixture(sn) -> None:
    sn.prepare("a-np", "", WALK_ROOT)  # no parent, active
    sn.prepare("p-tmp", "", WALK_ROOT)
    sn.commit("p", "p-tmp", WALK_ROOT)  # base parent
    sn.prepare("a", "p", WALK_ROOT)
    sn.view("v", "p", WALK_ROOT)
    sn.prepare("p-wl-tmp", "", WALK_ROOT)
    sn.commit("p-wl", "p-wl-tmp", {"l": "1", **WALK_ROOT})
    sn.prepare("a-wl", "p-wl", {"l": "2", **WALK_ROOT})
    sn.view("v-wl", "p-wl", {"l": "3", **WALK_ROOT})
    sn.prepare("a-np-wl", "", {"l": "2", **WALK_ROOT})


GC = 'labels."containerd.io/gc.root"==check-walk'

WALK_CASES = [
    ([GC], {"a-np", "p", "a", "v", "p-wl", "a-wl", "v-wl", "a-np-wl"}),
    ([f"kind==active,{GC}"], {"a-np", "a", "a-wl", "a-np-wl"}),
    ([f"kind==view,{GC}"], {"v", "v-wl"}),
    ([f"kind==committed,{GC}"], {"p", "p-wl"}),
    (["name==p", "name==a-np-wl"], {"p", "a-np-wl"}),
    (["name==a-wl,labels.l"], {"a-wl"}),
    (["parent==p"], {"a", "v"}),
    ([f'parent!="",{GC}'], {"a", "v", "a-wl", "v-wl"}),
    (["labels.l"], {"p-wl", "a-wl", "v-wl", "a-np-wl"}),
    (["labels.l==2"], {"a-wl", "a-np-wl"}),
]


def test_walk(snapshotter):
    """Walk: List with containerd's filters (kinds, names, parents, labels, presence,
    ``!=``; ``,`` is AND inside one filter, several filters are OR)."""
    sn = snapshotter.client
    _walk_fixture(sn)
    failures = []
    for filters, expected in WALK_CASES:
        got = [i.name for i in sn.list(*filters)]
        if sorted(got) != sorted(expected):
            failures.append(f"{filters}: expected {sorted(expected)}, got {sorted(got)}")
    assert not failures, "\n".join(failures)


EXTRA_WALK_CASES = [
    (["name!=p"], {"a-np", "a", "v", "p-wl", "a-wl", "v-wl", "a-np-wl", "dotted"}),
    (["name~=^a-"], {"a-np", "a-wl", "a-np-wl"}),
    (["name~=wl$,kind==view"], {"v-wl"}),
    (['name=="a-wl"'], {"a-wl"}),
    (["labels.l!=2,kind==active"], {"a-np", "a"}),
    (["labels.l~=^[13]$"], {"p-wl", "v-wl"}),
    (["kind==view", "name==p"], {"v", "v-wl", "p"}),
    (["name==a,name==v"], set()),
    (["parent==p,kind==view"], {"v"}),
    (["parent==p-wl", "parent==p"], {"a", "v", "a-wl", "v-wl"}),
    (["kind==bogus"], set()),
    (["name~=/^a-/"], {"a-np", "a-wl", "a-np-wl"}),  # ~= also takes /re/ and |re|
    (["name~=|wl$|"], {"p-wl", "a-wl", "v-wl", "a-np-wl"}),
    (['parent==""'], {"a-np", "p", "p-wl", "a-np-wl", "dotted"}),  # parent is always present
    (['labels.l==""'], set()),  # == needs the label present
    (["labels.x.y==z"], {"dotted"}),  # unquoted label path: the rest joined with "."
    (["labels.nothere"], set()),
    (['labels."x.y"==z'], {"dotted"}),
    (['labels."x.y"'], {"dotted"}),
    ([], {"a-np", "p", "a", "v", "p-wl", "a-wl", "v-wl", "a-np-wl", "dotted"}),
    ([""], {"a-np", "p", "a", "v", "p-wl", "a-wl", "v-wl", "a-np-wl", "dotted"}),
]


def test_walk_filter_operators(snapshotter):
    """List filters beyond containerd's suite: ``!=``, ``~=`` (regular expressions, also
    quoted as /re/ or |re|), quoted values and label keys with dots, an unknown kind
    (matches nothing, not an error), ``==`` on an absent label (no match), ``parent==""``
    (parentless ones), no filter and the empty filter (match everything)."""
    sn = snapshotter.client
    _walk_fixture(sn)
    sn.prepare("dotted-a", "")
    sn.commit("dotted", "dotted-a", {"x.y": "z"})
    failures = []
    for filters, expected in EXTRA_WALK_CASES:
        try:
            got = sorted(i.name for i in sn.list(*filters))
        except grpc.RpcError as err:
            failures.append(f"{filters}: {err.code()} {err.details()}")
            continue
        if got != sorted(expected):
            failures.append(f"{filters}: expected {sorted(expected)}, got {got}")
    assert not failures, "\n".join(failures)


def test_walk_with_a_regexp_that_does_not_compile(snapshotter):
    """containerd 1.6 compiles ``~=`` regexps lazily and a broken one matches nothing;
    refusing it as INVALID_ARGUMENT at parse time is accepted too (both leave the caller
    with no match and no partial answer)."""
    sn = snapshotter.client
    _walk_fixture(sn)
    try:
        got = sn.list("name~=[")
    except grpc.RpcError as err:
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err
    else:
        assert got == []


def test_list_is_streamed_and_complete_with_many_snapshots(snapshotter):
    """List returns every snapshot exactly once, however the stream is chunked."""
    sn = snapshotter.client
    names = {f"many-{i:03d}" for i in range(200)}
    for n in sorted(names):
        sn.view(n, "", {"pad": "x" * 200})
    req = snapshots_pb2.ListSnapshotsRequest(snapshotter=SNAPSHOTTER_NAME)
    seen = []
    for chunk in sn.stub.List(req, timeout=30):
        seen.extend(i.name for i in chunk.info)
    assert sorted(seen) == sorted(names)


def test_layer_file_update(sn, mounter, scratch):
    """LayerFileUpdate: overwriting a lower file (content and mode) in an upper layer
    shows the new file, not the old (docker#21555). Run twice, as containerd does."""
    l1 = apply_all(
        create_dir("/etc", 0o700),
        create_file("/etc/hosts", b"mydomain 10.0.0.1", 0o644),
        create_file("/etc/profile", b"PATH=/usr/bin", 0o644),
    )
    l2 = apply_all(
        create_file("/etc/hosts", b"mydomain 10.0.0.2", 0o644),
        create_file("/etc/profile", b"PATH=/usr/bin", 0o666),
        create_dir("/root", 0o700),
        create_file("/root/.bashrc", b"PATH=/usr/sbin:/usr/bin", 0o644),
    )
    for i in range(2):
        check_snapshots(sn, mounter, scratch / f"flat{i}", l1, l2)


def test_remove_directory_in_lower_layer(sn, mounter, scratch):
    """RemoveDirectoryInLowerLayer: a directory removed and recreated in an upper layer
    hides the lower one's files (opaque directory, docker#25244)."""
    l1 = apply_all(create_dir("/lib", 0o700), create_file("/lib/hidden", b"", 0o644))
    l2 = apply_all(
        remove_all("/lib"),
        create_dir("/lib", 0o700),
        create_file("/lib/not-hidden", b"", 0o644),
    )
    l3 = create_file("/lib/newfile", b"", 0o644)
    check_snapshots(sn, mounter, scratch / "flat", l1, l2, l3)


def test_chown(sn, mounter, scratch):
    """Chown: ownership changed in an upper layer shows through (docker#20240/#24913)."""
    l1 = apply_all(
        create_dir("/opt", 0o700),
        create_dir("/opt/a", 0o700),
        create_dir("/opt/a/b", 0o700),
        create_file("/opt/a/b/file.txt", b"hello", 0o644),
    )
    l2 = apply_all(
        chown("/opt", 1, 1),
        chown("/opt/a", 1, 1),
        chown("/opt/a/b", 1, 1),
        chown("/opt/a/b/file.txt", 1, 1),
    )
    check_snapshots(sn, mounter, scratch / "flat", l1, l2)


def test_directory_permission_on_commit(sn, mounter, scratch):
    """DirectoryPermissionOnCommit: owners of directories survive commit, removal and
    re-creation across three layers (docker#27298)."""
    l1 = apply_all(
        create_dir("/dir1", 0o700),
        create_dir("/dir2", 0o700),
        create_dir("/dir3", 0o700),
        create_dir("/dir4", 0o700),
        create_file("/dir4/f1", b"...", 0o644),
        create_dir("/dir5", 0o700),
        create_file("/dir5/f1", b"...", 0o644),
        chown("/dir1", 1, 1),
        chown("/dir2", 1, 1),
        chown("/dir3", 1, 1),
        chown("/dir5", 1, 1),
        chown("/dir5/f1", 1, 1),
    )
    l2 = apply_all(
        chown("/dir2", 0, 0),
        remove_all("/dir3"),
        chown("/dir4", 1, 1),
        chown("/dir4/f1", 1, 1),
    )
    l3 = apply_all(
        create_dir("/dir3", 0o700),
        chown("/dir3", 1, 1),
        remove_all("/dir5"),
        create_dir("/dir5", 0o700),
        chown("/dir5", 1, 1),
    )
    check_snapshots(sn, mounter, scratch / "flat", l1, l2, l3)


def test_remove_intermediate_snapshot(sn, mounter):
    """RemoveIntermediateSnapshot: base ← inter ← top; removing inter fails while top
    exists (FAILED_PRECONDITION); top-down removal succeeds."""
    base = mounter.mount(sn.prepare("base", "", OPT))
    sn.commit("committed-base", "base", OPT)
    sn.prepare("intermediate", "committed-base", OPT)
    sn.commit("committed-inter", "intermediate", OPT)
    sn.prepare("toplayer", "committed-inter", OPT)

    with pytest.raises(grpc.RpcError) as e:
        sn.remove("committed-inter")
    assert rpc_code(e) == grpc.StatusCode.FAILED_PRECONDITION
    assert "remove" in (e.value.details() or "")
    assert sn.names() == {"committed-base", "committed-inter", "toplayer"}

    sn.remove("toplayer")
    sn.remove("committed-inter")
    mounter.unmount(base)
    sn.remove("committed-base")
    assert sn.list() == []


def test_deleted_files_in_child_snapshot(sn, mounter, scratch):
    """DeletedFilesInChildSnapshot: a file deleted in a child stays deleted in the
    grandchild (whiteouts are inherited)."""
    l1 = apply_all(
        create_file("/foo", b"foo\n", 0o777),
        create_file("/foobar", b"foobar\n", 0o777),
    )
    l2 = remove_all("/foobar")
    l3 = apply_all()
    check_snapshots(sn, mounter, scratch / "flat", l1, l2, l3)


def test_move_file_from_lower_layer(sn, mounter, scratch):
    """MoveFileFromLowerLayer: removing a lower directory, hard-linking a lower file to a
    new place and removing the original leave exactly the new file."""
    l1 = apply_all(
        create_dir("/dir1", 0o700),
        create_file("/dir1/f1", b"Hello", 0o644),
        create_dir("dir2", 0o700),
        create_file("dir2/f2", b"...", 0o644),
    )
    l2 = apply_all(
        create_dir("/dir3", 0o700),
        create_file("/dir3/f1", b"Hello", 0o644),
        remove_all("/dir1"),
        link("dir2/f2", "dir3/f2"),
        remove_all("dir2/f2"),
    )
    check_snapshots(sn, mounter, scratch / "flat", l1, l2)


def test_hard_links_and_symlinks_survive_layers(sn, mounter, scratch):
    """Hard links inside one layer stay one inode in the view; symlinks keep targets."""
    l1 = apply_all(
        create_file("/f", b"data", 0o640),
        link("/f", "/g"),
        symlink("f", "/s"),
        symlink("/nonexistent/target", "/dangling"),
    )
    l2 = apply_all(create_file("/h", b"other", 0o600), link("/h", "/i"))
    check_snapshots(sn, mounter, scratch / "flat", l1, l2)


def test_view_readonly(sn, mounter):
    """ViewReadonly: writing into a mounted view fails (the mount, not just its options,
    is read-only)."""
    sn.prepare("preparing", "", OPT)
    sn.commit("committed", "preparing", OPT)
    target = mounter.mount(sn.view("view", "committed", OPT))
    with pytest.raises(OSError):
        (target / "testfile").write_bytes(b"testcontent")
    mounter.unmount(target)
    sn.remove("view")
    sn.remove("committed")
    assert sn.list() == []


def test_stat_in_walk(snapshotter, mounter):
    """StatInWalk: Stat answers while a List stream is still open, and agrees with it."""
    sn = snapshotter.client
    prefix = "stats-in-walk-"
    c1, c2 = f"{prefix}c1", f"{prefix}c2"
    mounter.unmount(mounter.mount(sn.prepare(c1 + "-a", "", OPT)))
    sn.commit(c1, c1 + "-a", OPT)
    sn.prepare(c2 + "-a", c1, OPT)
    sn.commit(c2, c2 + "-a", OPT)
    sn.prepare(f"{prefix}a1", c2, OPT)
    sn.view(f"{prefix}v1", c2, OPT)
    sn.prepare("other-snapshot", "", OPT)

    req = snapshots_pb2.ListSnapshotsRequest(snapshotter=SNAPSHOTTER_NAME)
    checked = set()
    for chunk in sn.stub.List(req, timeout=15):
        for info in chunk.info:
            if not info.name.startswith(prefix):
                continue
            assert info_tuple(sn.stat(info.name)) == info_tuple(info), info.name
            checked.add(info.name)
    assert checked == {c1, c2, f"{prefix}a1", f"{prefix}v1"}


@pytest.mark.parametrize("umask", [0o022, 0o000], ids=["umask022", "umask000"])
def test_root_permission(start_snapshotter, mounter, umask):
    """RootPermission: the root of a new parentless active snapshot is mode 0755,
    whatever the snapshotter's umask."""
    proc = start_snapshotter(umask=umask)
    target = mounter.mount(proc.client.prepare("preparing", "", OPT))
    mode = os.stat(target).st_mode & 0o7777
    assert mode == 0o755, f"expected 0755, got {mode:04o}"


def test_128_layers_mount(sn, mounter, scratch):
    """128LayersMount: a chain of 128 committed layers (longer lowerdir than one page of
    mount options) mounts, and every intermediate active equals the flat reference."""
    flat = scratch / "flat"
    flat.mkdir()
    appliers = [
        apply_all(
            create_file("/bottom", b"way at the bottom\n", 0o777),
            create_file("/overwriteme", b"FIRST!\n", 0o777),
            create_dir("/ADDHERE", 0o755),
            create_dir("/ONLYME", 0o755),
            create_file("/ONLYME/bottom", b"bye!\n", 0o777),
        )
    ]
    for i in range(1, 128):
        appliers.append(
            apply_all(
                create_file("/overwriteme", f"{i} WAS HERE!\n".encode(), 0o777),
                create_file(f"/ADDHERE/file-{i}", b"same\n", 0o755),
                remove_all("/ONLYME"),
                create_dir("/ONLYME", 0o755),
                create_file(f"/ONLYME/file-{i}", b"only me!\n", 0o777),
            )
        )
    parent = ""
    for i, applier in enumerate(appliers):
        key = f"prepare-layer-{i}"
        target = mounter.mount(sn.prepare(key, parent, OPT))
        try:
            assert_trees_equal(flat, target, f"layer {i} before apply")
            applier(flat)
            applier(target)
            assert_trees_equal(flat, target, f"layer {i} after apply")
        finally:
            mounter.unmount(target)
        parent = f"committed-{i}"
        sn.commit(parent, key, OPT)

    mounts = sn.view("fullview", parent, OPT)
    assert mounts[0].type == "overlay"
    lower = mount_options(mounts[0])["lowerdir"].split(":")
    assert len(lower) == 128
    target = mounter.mount(mounts)
    assert_trees_equal(flat, target, "full view of 128 layers")


# ======================================================================================
# mounts: the exact answers of containerd's overlayfs snapshotter


def _assert_snapshot_path(path: str, root: Path, leaf: str = "fs") -> str:
    p = Path(path)
    assert p.is_absolute() and p.name == leaf, path
    sid = snapshot_id_of(p, root)
    assert p.is_dir(), f"{path} does not exist"
    return sid


def _same_mounts(a, b) -> bool:
    return [(m.type, m.source, list(m.options)) for m in a] == [
        (m.type, m.source, list(m.options)) for m in b
    ]


def _extra_overlay_options(m) -> set[str]:
    return {o for o in m.options if not o.startswith(("lowerdir=", "upperdir=", "workdir="))}


def test_mounts_parentless_active_is_rw_bind_of_its_fs(sn, mounter):
    mounts = sn.prepare("a", "", OPT)
    assert len(mounts) == 1
    m = mounts[0]
    assert m.type == "bind"
    assert sorted(m.options) == ["rbind", "rw"]
    sid = _assert_snapshot_path(m.source, sn.proc.root)
    assert (sn.proc.root / "snapshots" / sid / "work").is_dir(), "an active has work/"
    assert _same_mounts(sn.mounts("a"), mounts), "Mounts(key) differs from Prepare's answer"

    target = mounter.mount(mounts)
    (target / "hello").write_bytes(b"hi")
    assert (Path(m.source) / "hello").read_bytes() == b"hi"


def test_mounts_parentless_view_is_ro_bind_of_its_own_fs(sn, mounter):
    mounts = sn.view("v", "", OPT)
    assert len(mounts) == 1
    m = mounts[0]
    assert m.type == "bind"
    assert sorted(m.options) == ["rbind", "ro"]
    sid = _assert_snapshot_path(m.source, sn.proc.root)
    assert not (sn.proc.root / "snapshots" / sid / "work").exists(), "a view has no work/"
    assert _same_mounts(sn.mounts("v"), mounts)
    target = mounter.mount(mounts)
    with pytest.raises(OSError):
        (target / "x").write_bytes(b"x")


def test_mounts_view_with_one_parent_is_ro_bind_of_the_parent_fs(snapshotter):
    sn = snapshotter.client
    parent_fs = sn.prepare("p-a", "", OPT)[0].source
    sn.commit("p", "p-a", OPT)
    mounts = sn.view("v", "p", OPT)
    assert len(mounts) == 1
    m = mounts[0]
    assert m.type == "bind"
    assert sorted(m.options) == ["rbind", "ro"]
    assert m.source == parent_fs, "a view of one layer binds the parent's fs read-only"
    assert _same_mounts(sn.mounts("v"), mounts)
    # the view still owns a directory of its own (containerd creates snapshots/<id>/fs)
    assert len(snapshotter.snapshot_dirs()) == 2


def _chain(sn, mounter, n: int) -> tuple[list[str], list[str]]:
    """n committed layers l1..ln, each with file ``layer`` = its number and its own file;
    returns (names, fs paths), oldest first."""
    names, paths, parent = [], [], ""
    for i in range(1, n + 1):
        key = f"l{i}-a"
        mounts = sn.prepare(key, parent, OPT)
        paths.append(str(upper_dir(mounts)))
        target = mounter.mount(mounts)
        (target / "layer").write_text(str(i))
        (target / f"only-{i}").write_text(str(i))
        mounter.unmount(target)
        sn.commit(f"l{i}", key, OPT)
        names.append(f"l{i}")
        parent = f"l{i}"
    return names, paths


def test_mounts_active_with_parents_is_overlay_newest_lower_first(sn, mounter):
    _, paths = _chain(sn, mounter, 3)
    mounts = sn.prepare("top", "l3", OPT)
    assert len(mounts) == 1
    m = mounts[0]
    assert m.type == "overlay"
    assert m.source == "overlay"
    opts = mount_options(m)
    assert opts["lowerdir"].split(":") == list(reversed(paths)), "lowerdir must be newest:…:oldest"
    upper_id = _assert_snapshot_path(opts["upperdir"], sn.proc.root)
    work_id = _assert_snapshot_path(opts["workdir"], sn.proc.root, leaf="work")
    assert upper_id == work_id, "upperdir and workdir belong to one snapshot directory"
    assert opts["upperdir"] not in paths
    extra = _extra_overlay_options(m)
    assert extra <= ALLOWED_EXTRA_OVERLAY_OPTIONS, f"unexpected options {extra}"
    assert "volatile" not in extra
    assert _same_mounts(sn.mounts("top"), mounts)

    target = mounter.mount(mounts)
    assert (target / "layer").read_text() == "3", "the newest layer wins"
    assert sorted(p.name for p in target.iterdir()) == ["layer", "only-1", "only-2", "only-3"]
    (target / "new").write_text("new")
    assert (Path(opts["upperdir"]) / "new").read_text() == "new", "writes land in upperdir"
    for p in paths:
        assert not (Path(p) / "new").exists()


def test_mounts_view_with_several_parents_is_overlay_with_lowerdir_only(sn, mounter):
    _, paths = _chain(sn, mounter, 2)
    mounts = sn.view("v", "l2", OPT)
    assert len(mounts) == 1
    m = mounts[0]
    assert m.type == "overlay"
    opts = mount_options(m)
    assert "upperdir" not in opts and "workdir" not in opts
    assert opts["lowerdir"].split(":") == list(reversed(paths))
    assert _extra_overlay_options(m) <= ALLOWED_EXTRA_OVERLAY_OPTIONS
    assert _same_mounts(sn.mounts("v"), mounts)
    target = mounter.mount(mounts)
    assert (target / "layer").read_text() == "2"
    with pytest.raises(OSError):
        (target / "x").write_text("x")


def test_mounts_volatile_label_adds_volatile_to_an_overlay_active(sn, mounter):
    _chain(sn, mounter, 1)
    plain = sn.prepare("plain", "l1", OPT)
    assert "volatile" not in plain[0].options
    vol = sn.prepare("vol", "l1", {OVERLAY_VOLATILE: "true", **OPT})
    assert vol[0].type == "overlay"
    assert "volatile" in vol[0].options
    assert "volatile" in sn.mounts("vol")[0].options
    target = mounter.mount(vol)
    (target / "x").write_text("x")
    # a parentless active stays a plain rw bind mount even when labelled volatile
    bind = sn.prepare("vol-np", "", {OVERLAY_VOLATILE: "true"})
    assert bind[0].type == "bind" and sorted(bind[0].options) == ["rbind", "rw"]


def test_mounts_of_a_committed_snapshot_is_failed_precondition(sn):
    sn.prepare("a", "", OPT)
    sn.commit("c", "a", OPT)
    with pytest.raises(grpc.RpcError) as e:
        sn.mounts("c")
    assert rpc_code(e) == grpc.StatusCode.FAILED_PRECONDITION


def test_new_snapshot_root_inherits_the_owner_of_the_parent_root(sn, mounter):
    """containerd chowns a child's fs/ to the owner of its parent's fs/, so the merged
    root keeps the owner the image gave it."""
    target = mounter.mount(sn.prepare("p-a", "", OPT))
    os.chown(target, 1000, 1001)
    mounter.unmount(target)
    sn.commit("p", "p-a", OPT)
    mounts = sn.prepare("child", "p", OPT)
    st = os.stat(upper_dir(mounts))
    assert (st.st_uid, st.st_gid) == (1000, 1001)
    target = mounter.mount(mounts)
    st = os.stat(target)
    assert (st.st_uid, st.st_gid) == (1000, 1001)


def test_commit_replaces_labels_and_resets_times(sn):
    """Commit: the committed snapshot carries the commit's labels (the active's are not
    inherited), keeps the parent, and its created_at == updated_at ≥ the active's."""
    sn.prepare("a", "", {"from-active": "1"})
    active = sn.stat("a")
    time.sleep(0.005)
    sn.commit("c", "a", {"from-commit": "2"})
    c = sn.stat("c")
    assert dict(c.labels) == {"from-commit": "2"}
    assert ts_ns(c.created_at) == ts_ns(c.updated_at)
    assert ts_ns(c.created_at) > ts_ns(active.created_at)
    sn.prepare("b", "c")
    sn.commit("d", "b")
    d = sn.stat("d")
    assert d.parent == "c" and dict(d.labels) == {}


# ======================================================================================
# usage


def test_usage_of_an_active_snapshot_is_live_du_of_its_upper_dir(sn, mounter):
    """Active: size = allocated bytes, inodes = distinct inodes of the upper dir,
    including the dir itself, computed at each call (hard links count once)."""
    mounts = sn.prepare("a", "", OPT)
    upper = upper_dir(mounts)
    u = sn.usage("a")
    assert (u.size, u.inodes) == disk_usage(upper)
    assert u.inodes == 1

    target = mounter.mount(mounts)
    (target / "d").mkdir()
    (target / "d" / "f1").write_bytes(os.urandom(10_000))
    (target / "f2").write_bytes(b"x" * 5000)
    os.link(target / "f2", target / "f3")
    os.symlink("f2", target / "s")
    os.sync()
    u = sn.usage("a")
    assert u.inodes == 5, "root, d, d/f1, f2 (= f3) and s"
    assert (u.size, u.inodes) == disk_usage(upper)
    assert u.size >= 15_000

    # an active with a parent counts only its own upper dir
    mounter.unmount(target)
    sn.commit("c", "a", OPT)
    mounts = sn.prepare("b", "c", OPT)
    target = mounter.mount(mounts)
    (target / "mine").write_bytes(b"y" * 3000)
    os.sync()
    u = sn.usage("b")
    assert (u.size, u.inodes) == disk_usage(upper_dir(mounts))
    assert u.inodes == 2
    # deleting a lower file leaves a whiteout in the upper dir: one more inode
    (target / "f2").unlink()
    u = sn.usage("b")
    assert (u.size, u.inodes) == disk_usage(upper_dir(mounts))
    assert u.inodes == 3


def test_usage_of_a_committed_snapshot_is_recorded_at_commit(sn, mounter):
    mounts = sn.prepare("a", "", OPT)
    fs = upper_dir(mounts)
    target = mounter.mount(mounts)
    (target / "f").write_bytes(b"z" * 20_000)
    mounter.unmount(target)
    os.sync()
    expected = disk_usage(fs)
    sn.commit("c", "a", OPT)
    u = sn.usage("c")
    assert (u.size, u.inodes) == expected
    # not recomputed: change the committed layer's directory behind the snapshotter's back
    (fs / "late").write_bytes(b"q" * 8192)
    os.sync()
    u = sn.usage("c")
    assert (u.size, u.inodes) == expected


def test_usage_of_a_view_is_zero(sn):
    sn.prepare("a", "", OPT)
    sn.commit("c", "a", OPT)
    sn.view("v", "c", OPT)
    sn.view("v0", "", OPT)
    for key in ("v", "v0"):
        u = sn.usage(key)
        assert (u.size, u.inodes) == (0, 0), key


# ======================================================================================
# cleanup


def test_remove_defers_directories_to_cleanup_by_default(snapshotter):
    """Default (``sync_remove = false``): Remove only forgets the snapshot; Cleanup
    deletes its directory; live snapshots keep theirs."""
    sn = snapshotter.client
    fs_a = Path(sn.prepare("a", "", OPT)[0].source)
    fs_v = Path(sn.view("v", "", OPT)[0].source)
    sn.commit("c", "a", OPT)
    fs_b = Path(upper_dir(sn.prepare("b", "c", OPT)))
    sn.remove("b")
    sn.remove("v")
    assert fs_b.parent.exists() and fs_v.parent.exists(), "removed at Remove despite async mode"
    sn.cleanup()
    assert not fs_b.parent.exists()
    assert not fs_v.parent.exists()
    assert fs_a.is_dir(), "Cleanup removed a live (committed) snapshot's directory"
    assert snapshotter.snapshot_dirs() == {fs_a.parent.name}
    sn.cleanup()  # idempotent
    assert snapshotter.snapshot_dirs() == {fs_a.parent.name}


def test_sync_remove_deletes_the_directory_at_remove(start_snapshotter):
    proc = start_snapshotter("version = 1\n[snapshot]\nsync_remove = true\n")
    sn = proc.client
    fs_a = Path(sn.prepare("a", "", OPT)[0].source)
    fs_b = Path(sn.prepare("b", "", OPT)[0].source)
    sn.remove("a")
    assert not fs_a.parent.exists(), "sync_remove: the directory must go at Remove"
    assert fs_b.is_dir()
    assert proc.snapshot_dirs() == {fs_b.parent.name}


def test_cleanup_removes_orphan_directories(snapshotter):
    """Anything under ``<root>/snapshots`` that no snapshot owns goes at Cleanup
    (e.g. left by a crash between mkdir and the metadata transaction)."""
    sn = snapshotter.client
    live = Path(sn.prepare("a", "", OPT)[0].source).parent
    snapshots = snapshotter.root / "snapshots"
    orphan = snapshots / "987654"
    (orphan / "fs" / "deep").mkdir(parents=True)
    (orphan / "fs" / "deep" / "file").write_text("x")
    stray = snapshots / "new-123456"
    (stray / "fs").mkdir(parents=True)
    sn.cleanup()
    assert not orphan.exists()
    assert not stray.exists()
    assert live.is_dir()
    assert snapshotter.snapshot_dirs() == {live.name}


def test_cleanup_with_nothing_to_do_is_harmless(snapshotter):
    sn = snapshotter.client
    sn.cleanup()
    sn.prepare("a", "", OPT)
    before = snapshotter.snapshot_dirs()
    sn.cleanup()
    sn.cleanup()
    assert snapshotter.snapshot_dirs() == before
    assert sn.names() == {"a"}

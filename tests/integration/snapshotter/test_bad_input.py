"""Bad input: every refusal has containerd's gRPC code and leaves no trace.

Each test starts from the same small population of snapshots, sends something wrong,
checks the status code (and, where containerd's message is part of the contract, the
message), and then proves the snapshotter is exactly as before: List returns the same
set, Stat of each agrees with List, and after Cleanup there is one directory per
snapshot under ``<root>/snapshots`` and nothing else.

Also here: start-up with a bad configuration file (wrong type: exit non-zero naming the
key; unknown key: a warning naming the key, and the snapshotter serves).
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator

import grpc
import pytest

from .support import (
    KIND_ACTIVE,
    KIND_VIEW,
    SnapshotterClient,
    SnapshotterProcess,
    assert_consistent,
    info_copy,
    info_tuple,
    make_base,
    teardown_base,
)

pytestmark = pytest.mark.root

POPULATION = {"c1", "c2", "a1", "v1", "a0"}


def _build_population(proc: SnapshotterProcess) -> None:
    """c1 ← c2 ← {a1 (active), v1 (view)}; a0 an active without parent."""
    sn = _client(proc)
    sn.prepare("c1-a", "", {"layer": "1"})
    sn.commit("c1", "c1-a", {"layer": "1"})
    sn.prepare("c2-a", "c1")
    sn.commit("c2", "c2-a", {"layer": "2"})
    sn.prepare("a1", "c2", {"role": "container"})
    sn.view("v1", "c2")
    sn.prepare("a0", "")
    assert_consistent(proc, POPULATION)


class _Shared:
    """One snapshotter for the tests that must not change anything (fast: no start-up
    per test). Each test proves it changed nothing; if one did, the next test gets a
    fresh process instead of inheriting the damage."""

    def __init__(self) -> None:
        self.proc: SnapshotterProcess | None = None
        self.state: dict[str, tuple[object, ...]] = {}

    def fresh(self) -> SnapshotterProcess:
        self.close()
        self.proc = SnapshotterProcess(base=make_base())
        self.proc.start()
        _build_population(self.proc)
        self.state = snapshot_state(_client(self.proc))
        return self.proc

    def intact(self) -> bool:
        if self.proc is None or self.proc.client is None:
            return False
        try:
            return snapshot_state(self.proc.client) == self.state and len(
                self.proc.snapshot_dirs()
            ) == len(POPULATION)
        except grpc.RpcError:
            return False

    def close(self) -> None:
        if self.proc is not None:
            teardown_base(self.proc.base, [self.proc])
            self.proc = None


@pytest.fixture(scope="module")
def _shared() -> Iterator[_Shared]:
    shared = _Shared()
    try:
        yield shared
    finally:
        shared.close()


@pytest.fixture
def population(_shared: _Shared) -> SnapshotterProcess:
    """The population on a shared process, unchanged by earlier tests."""
    if _shared.intact():
        assert _shared.proc is not None
        return _shared.proc
    return _shared.fresh()


@pytest.fixture
def own_population(snapshotter: SnapshotterProcess) -> SnapshotterProcess:
    """The population on a process of this test's own (for tests that change it)."""
    _build_population(snapshotter)
    return snapshotter


def _client(proc: SnapshotterProcess) -> SnapshotterClient:
    assert proc.client is not None
    return proc.client


def expect_code(code: grpc.StatusCode, fn, *args, **kwargs) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as e:
        fn(*args, **kwargs)
    assert e.value.code() == code, (
        f"{getattr(fn, '__name__', fn)}{args}: expected {code}, got {e.value.code()} "
        f"({e.value.details()!r})"
    )
    return e.value


def snapshot_state(sn: SnapshotterClient) -> dict[str, tuple[object, ...]]:
    return {i.name: info_tuple(i) for i in sn.list()}


# --------------------------------------------------------------------------------------
# parents


@pytest.mark.parametrize("op", ["prepare", "view"])
def test_unknown_parent_is_not_found(population, op):
    sn = _client(population)
    before = snapshot_state(sn)
    expect_code(grpc.StatusCode.NOT_FOUND, getattr(sn, op), "k-new", "no-such-parent")
    expect_code(grpc.StatusCode.NOT_FOUND, sn.stat, "k-new")
    assert snapshot_state(sn) == before
    assert_consistent(population, POPULATION)


@pytest.mark.parametrize("parent", ["a1", "a0", "v1"])
@pytest.mark.parametrize("op", ["prepare", "view"])
def test_parent_that_is_not_committed_is_invalid_argument(population, op, parent):
    """containerd: ``parent "x" is not committed snapshot`` (InvalidArgument)."""
    sn = _client(population)
    err = expect_code(grpc.StatusCode.INVALID_ARGUMENT, getattr(sn, op), "k-new", parent)
    assert "committed" in (err.details() or "").lower()
    expect_code(grpc.StatusCode.NOT_FOUND, sn.stat, "k-new")
    assert_consistent(population, POPULATION)


# --------------------------------------------------------------------------------------
# keys


@pytest.mark.parametrize(
    "op,key,parent",
    [
        ("prepare", "a1", "c2"),  # active exists
        ("view", "a1", "c2"),
        ("prepare", "v1", ""),  # view exists
        ("view", "v1", "c2"),
        ("prepare", "c1", ""),  # committed names share the key space
        ("view", "c2", "c1"),
        ("prepare", "a0", ""),
        ("prepare", "c1", "c1"),  # key == parent
    ],
)
def test_duplicate_key_is_already_exists(population, op, key, parent):
    sn = _client(population)
    before = snapshot_state(sn)
    expect_code(grpc.StatusCode.ALREADY_EXISTS, getattr(sn, op), key, parent, {"new": "1"})
    assert snapshot_state(sn) == before, "the existing snapshot must be untouched"
    assert_consistent(population, POPULATION)


def test_empty_key_or_name_is_refused(own_population):
    """Not in containerd's suite: an empty key or committed name is an error (any code)
    and leaves nothing behind."""
    sn = _client(own_population)
    for call in (
        lambda: sn.prepare("", ""),
        lambda: sn.view("", "c1"),
        lambda: sn.commit("", "a0"),
    ):
        with pytest.raises(grpc.RpcError):
            call()
    assert sn.stat("a0").kind == KIND_ACTIVE
    assert_consistent(own_population, POPULATION)


@pytest.mark.parametrize(
    "call",
    [
        ("stat", ("nope",)),
        ("mounts", ("nope",)),
        ("remove", ("nope",)),
        ("usage", ("nope",)),
        ("commit", ("new-name", "nope")),
    ],
    ids=lambda c: c[0],
)
def test_missing_key_is_not_found(population, call):
    sn = _client(population)
    name, args = call
    expect_code(grpc.StatusCode.NOT_FOUND, getattr(sn, name), *args)
    expect_code(grpc.StatusCode.NOT_FOUND, sn.stat, "new-name")
    assert_consistent(population, POPULATION)


def test_update_of_a_missing_snapshot_is_not_found(population):
    sn = _client(population)
    info = info_copy(sn.stat("c1"), name="nope", labels={"x": "y"})
    expect_code(grpc.StatusCode.NOT_FOUND, sn.update, info)
    expect_code(grpc.StatusCode.NOT_FOUND, sn.update, info, ["labels.x"])
    assert_consistent(population, POPULATION)


def test_remove_twice_is_not_found_the_second_time(own_population):
    sn = _client(own_population)
    sn.remove("a0")
    expect_code(grpc.StatusCode.NOT_FOUND, sn.remove, "a0")
    assert_consistent(own_population, POPULATION - {"a0"})


# --------------------------------------------------------------------------------------
# removing parents


@pytest.mark.parametrize("key", ["c1", "c2"])
def test_removing_a_parent_is_failed_precondition(population, key):
    sn = _client(population)
    err = expect_code(grpc.StatusCode.FAILED_PRECONDITION, sn.remove, key)
    assert "remove" in (err.details() or "")
    assert_consistent(population, POPULATION)


def test_a_view_alone_keeps_its_parent(own_population):
    sn = _client(own_population)
    sn.remove("a1")
    err = expect_code(grpc.StatusCode.FAILED_PRECONDITION, sn.remove, "c2")
    assert "remove" in (err.details() or "")
    sn.remove("v1")
    sn.remove("c2")
    assert_consistent(own_population, {"c1", "a0"})


# --------------------------------------------------------------------------------------
# commit


@pytest.mark.parametrize("key", ["v1", "c2"], ids=["view", "committed"])
def test_commit_of_a_non_active_snapshot_is_failed_precondition(population, key):
    sn = _client(population)
    before = snapshot_state(sn)
    expect_code(grpc.StatusCode.FAILED_PRECONDITION, sn.commit, "fresh-name", key)
    expect_code(grpc.StatusCode.NOT_FOUND, sn.stat, "fresh-name")
    assert snapshot_state(sn) == before
    assert sn.stat("v1").kind == KIND_VIEW
    assert_consistent(population, POPULATION)


@pytest.mark.parametrize("name", ["c1", "a1", "v1", "a0"])
def test_commit_to_an_existing_name_is_already_exists(population, name):
    """Including committing ``a0`` under its own key: containerd creates the name
    first, finds it taken, and leaves the active as it was."""
    sn = _client(population)
    before = snapshot_state(sn)
    expect_code(grpc.StatusCode.ALREADY_EXISTS, sn.commit, name, "a0")
    assert snapshot_state(sn) == before, "neither the key nor the name may change"
    assert_consistent(population, POPULATION)


@pytest.mark.parametrize("key, parent, code", [
    ("a0", "c1", grpc.StatusCode.UNIMPLEMENTED),  # a rebase: containerd 2.x's "rebase" cap
    ("a1", "c1", grpc.StatusCode.INVALID_ARGUMENT),  # a1 has parent c2: containerd refuses
], ids=["rebase", "other-parent"])
def test_commit_with_a_new_parent_is_refused(population, key, parent, code):
    """containerd 2.x sends a parent with Commit to snapshotters that declare "rebase";
    we do not (docs/decisions.md), so a parent other than the snapshot's own is refused
    with nothing changed, never silently dropped."""
    sn = _client(population)
    before = snapshot_state(sn)
    err = expect_code(code, sn.commit, "fresh-name", key, None, parent)
    assert key in err.details() and parent in err.details()
    if code == grpc.StatusCode.UNIMPLEMENTED:
        assert "rebase" in err.details()
    assert snapshot_state(sn) == before
    assert_consistent(population, POPULATION)


def test_commit_with_its_own_parent_commits(own_population):
    sn = _client(own_population)
    sn.commit("c3", "a1", {"k": "v"}, "c2")
    info = sn.stat("c3")
    assert info.parent == "c2" and dict(info.labels) == {"k": "v"}


# --------------------------------------------------------------------------------------
# filters


MALFORMED_FILTERS = [
    "==x",
    "name==",
    "name==x,",
    ",kind==active",
    "name==a,,kind==view",
    'labels."unterminated==x',
    "labels.",
    ".name==x",
    "name x",
    "name=x",
    "name!x",
    "name<>x",
    "name==/a-wl/",  # /…/ quoting is for ~= only
]


@pytest.mark.parametrize("flt", MALFORMED_FILTERS)
def test_malformed_filter_is_invalid_argument(population, flt):
    sn = _client(population)
    expect_code(grpc.StatusCode.INVALID_ARGUMENT, sn.list, flt)
    # one bad filter among good ones spoils the request (containerd parses all first)
    expect_code(grpc.StatusCode.INVALID_ARGUMENT, sn.list, "kind==active", flt)
    assert_consistent(population, POPULATION)


# --------------------------------------------------------------------------------------
# labels: key + value at most 4096 bytes (containerd's labels.Validate)


MAX = 4096


def _label_of(total_bytes: int, multibyte: bool = False) -> dict[str, str]:
    key = "big"
    room = total_bytes - len(key)
    if multibyte:
        # bytes, not characters: 'é' is two bytes in UTF-8
        value = "é" * (room // 2) + "v" * (room % 2)
    else:
        value = "v" * room
    assert len((key + value).encode()) == total_bytes
    return {key: value}


@pytest.mark.parametrize("multibyte", [False, True], ids=["ascii", "utf8"])
def test_label_of_exactly_4096_bytes_is_accepted(population, multibyte):
    sn = _client(population)
    ok = _label_of(MAX, multibyte)
    sn.prepare("fits", "c2", ok)
    assert dict(sn.stat("fits").labels) == ok
    sn.commit("fits-c", "fits", ok)
    assert dict(sn.stat("fits-c").labels) == ok
    assert_consistent(population, POPULATION | {"fits-c"})
    sn.remove("fits-c")
    assert_consistent(population, POPULATION)


@pytest.mark.parametrize("multibyte", [False, True], ids=["ascii", "utf8"])
def test_oversized_label_is_invalid_argument_everywhere(population, multibyte):
    sn = _client(population)
    big = _label_of(MAX + 1, multibyte)
    before = snapshot_state(sn)

    expect_code(grpc.StatusCode.INVALID_ARGUMENT, sn.prepare, "too-big", "c2", big)
    expect_code(grpc.StatusCode.INVALID_ARGUMENT, sn.view, "too-big", "c2", big)
    expect_code(grpc.StatusCode.INVALID_ARGUMENT, sn.prepare, "too-big", "", big)
    expect_code(grpc.StatusCode.NOT_FOUND, sn.stat, "too-big")

    expect_code(grpc.StatusCode.INVALID_ARGUMENT, sn.commit, "too-big-c", "a0", big)
    expect_code(grpc.StatusCode.NOT_FOUND, sn.stat, "too-big-c")
    assert sn.stat("a0").kind == KIND_ACTIVE, "a refused Commit must leave the active"

    info = sn.stat("c1")
    expect_code(grpc.StatusCode.INVALID_ARGUMENT, sn.update, info_copy(info, labels=big))
    expect_code(
        grpc.StatusCode.INVALID_ARGUMENT, sn.update, info_copy(info, labels=big), ["labels"]
    )
    expect_code(
        grpc.StatusCode.INVALID_ARGUMENT, sn.update, info_copy(info, labels=big), ["labels.big"]
    )
    assert snapshot_state(sn) == before
    assert_consistent(population, POPULATION)


# --------------------------------------------------------------------------------------
# update


@pytest.mark.parametrize(
    "path", ["parent", "name", "kind", "created_at", "updated_at", "labelsx", "bogus"]
)
def test_update_of_an_immutable_or_unknown_field_is_invalid_argument(population, path):
    sn = _client(population)
    for key in ("c2", "a1", "v1"):
        info = sn.stat(key)
        changed = info_copy(
            info, parent="c1" if info.parent != "c1" else "", kind=KIND_VIEW, labels={"x": "1"}
        )
        expect_code(grpc.StatusCode.INVALID_ARGUMENT, sn.update, changed, [path])
        assert info_tuple(sn.stat(key)) == info_tuple(info), f"{key} changed by a refused Update"
    assert_consistent(population, POPULATION)


def test_refused_update_applies_none_of_its_paths(population):
    """An Update mixing a valid and an invalid path changes nothing (one transaction)."""
    sn = _client(population)
    info = sn.stat("a1")
    expect_code(
        grpc.StatusCode.INVALID_ARGUMENT,
        sn.update,
        info_copy(info, labels={"x": "1", "role": "changed"}),
        ["labels.x", "labels.role", "parent"],
    )
    assert info_tuple(sn.stat("a1")) == info_tuple(info)
    assert_consistent(population, POPULATION)


# --------------------------------------------------------------------------------------
# configuration


@pytest.mark.parametrize(
    "config,key",
    [
        ('version = 1\n[snapshot]\nsync_remove = "yes"\n', "sync_remove"),
        ('version = 1\ncleanup_on_close = "no"\n', "cleanup_on_close"),
        ("version = 1\n[log]\nlevel = 3\n", "level"),
        ('version = 1\n[snapshot]\nsync_remove = ["a"]\n', "sync_remove"),
        ('version = "1"\n', "version"),
        ("[snapshot]\nsync_remove = true\n", "version"),  # upstream: version = 1 is required
        ("version = 1\n[experimental]\nenable_stargz = true\n",
         "experimental.enable_stargz: true is not supported"),
    ],
    ids=[
        "sync_remove-str",
        "cleanup_on_close-str",
        "log-level-int",
        "sync_remove-list",
        "version-str",
        "version-missing",
        "unsupported-key",
    ],
)
def test_config_type_error_exits_non_zero_naming_the_key(start_snapshotter, config, key):
    proc = start_snapshotter(config, wait=False)
    assert proc.proc is not None
    try:
        status = proc.proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        pytest.fail(f"snapshotter kept running with a wrong-typed {key!r}\n" + proc.logs())
    assert status != 0, "a wrong type must fail start-up\n" + proc.logs()
    stderr = proc.stderr_path.read_text(errors="replace")
    assert key in stderr, f"exit status {status}; stderr does not name {key!r}:\n{proc.logs()}"
    # nothing serves on the socket
    assert not proc.address.exists() or not _answers(proc)


def _answers(proc: SnapshotterProcess) -> bool:
    client = SnapshotterClient(proc.address, timeout=1)
    try:
        client.list()
        return True
    except grpc.RpcError:
        return False
    finally:
        client.close()


def test_config_unknown_key_warns_and_still_serves(start_snapshotter):
    config = (
        'version = 1\nmystery_knob = "x"\n[snapshot]\nsync_remove = false\nfrobnicate_widgets = 3\n'
    )
    proc = start_snapshotter(config)
    sn = _client(proc)
    sn.prepare("a", "")
    assert sn.names() == {"a"}
    text = proc.all_log_text()
    for key in ("mystery_knob", "frobnicate_widgets"):
        lines = [ln for ln in text.splitlines() if key in ln]
        assert lines, f"no log line names the unknown key {key!r}:\n{text[-4000:]}"
        assert any("warn" in ln.lower() for ln in lines), (
            f"the line naming {key!r} is not a warning: {lines}"
        )
    assert_consistent(proc, {"a"})


def test_config_values_are_used(start_snapshotter):
    """A well-typed config is honoured: ``sync_remove = true`` from the file, a
    ``[log] level`` and ``cleanup_on_close`` accepted."""
    config = 'version = 1\ncleanup_on_close = false\n[log]\nlevel = "debug"\n[snapshot]\nsync_remove = true\n'
    proc = start_snapshotter(config)
    sn = _client(proc)
    fs = sn.prepare("a", "")[0].source
    sn.remove("a")
    assert proc.snapshot_dirs() == set(), f"{fs} kept although sync_remove = true"
    assert_consistent(proc, set())


def test_root_longer_than_70_bytes_is_refused():
    """Upstream refuses a root over 70 bytes (daemon sockets live below it and must fit
    in sun_path); the process exits non-zero and says why."""
    base = make_base()
    proc = SnapshotterProcess(base=base)
    try:
        proc.root = base / ("r" * (80 - len(str(base)) - 1))
        assert len(str(proc.root)) == 80
        popen = proc.spawn()
        try:
            status = popen.wait(timeout=20)
        except subprocess.TimeoutExpired:
            pytest.fail("snapshotter accepted an 80-byte root\n" + proc.logs())
        assert status != 0
        stderr = proc.stderr_path.read_text(errors="replace")
        assert "root" in stderr and "70" in stderr, stderr
    finally:
        teardown_base(base, [proc])


def test_module_entry_point_and_log_level_flag(start_snapshotter):
    """``python -m pynydus.cli.main snapshotter … --log-level debug`` serves too."""
    proc = start_snapshotter(extra_args=["--log-level", "debug"], as_module=True)
    sn = _client(proc)
    sn.prepare("a", "")
    assert sn.names() == {"a"}
    assert proc.stop() == 0


def test_root_and_address_from_the_config_file():
    """Without --root/--address the config's ``root`` and ``address`` are used."""
    base = make_base()
    proc = SnapshotterProcess(base=base, path_flags=False)
    try:
        proc.config = base / "config.toml"
        proc.config.write_text(f'version = 1\nroot = "{proc.root}"\naddress = "{proc.address}"\n')
        sn = proc.start()
        sn.prepare("a", "")
        assert (proc.root / "snapshots").is_dir()
        assert_consistent(proc, {"a"})
    finally:
        teardown_base(base, [proc])


def test_command_line_wins_over_the_config_file(start_snapshotter):
    """Upstream: flags override the file. The file's root and address stay unused."""
    other = make_base()
    try:
        config = f'version = 1\nroot = "{other / "root"}"\naddress = "{other / "sn.sock"}"\n'
        proc = start_snapshotter(config)
        _client(proc).prepare("a", "")
        assert (proc.root / "snapshots").is_dir()
        assert not (other / "root").exists() and not (other / "sn.sock").exists()
    finally:
        teardown_base(other)

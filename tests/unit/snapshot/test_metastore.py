"""Metastore contract: containerd storage semantics, atomicity, persistence."""

import sqlite3
from pathlib import Path

import pytest

from pynydus.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from pynydus.snapshot.metastore import Kind, MetaStore, Usage


@pytest.fixture
def ms(tmp_path: Path) -> MetaStore:
    return MetaStore(tmp_path / "metadata.db")


def create(ms: MetaStore, kind: Kind, key: str, parent: str = "", labels: dict[str, str] | None = None):
    with ms.transaction() as db:
        return ms.create(db, kind, key, parent, labels or {})


def commit(ms: MetaStore, key: str, name: str, labels: dict[str, str] | None = None) -> str:
    with ms.transaction() as db:
        return ms.commit_active(db, key, name, Usage(10, 2), labels or {})


def test_create_commit_chain_and_ids_never_reused(ms: MetaStore) -> None:
    a = create(ms, Kind.ACTIVE, "a")
    assert commit(ms, "a", "A") == a.id
    b = create(ms, Kind.ACTIVE, "b", "A")
    assert b.parent_ids == (a.id,)
    commit(ms, "b", "B")
    c = create(ms, Kind.VIEW, "c", "B")
    assert c.parent_ids == (b.id, a.id)
    with ms.transaction() as db:
        ms.remove(db, "c")
    d = create(ms, Kind.ACTIVE, "d", "B")
    assert int(d.id) > int(c.id)


def test_create_errors_in_containerd_order(ms: MetaStore) -> None:
    create(ms, Kind.ACTIVE, "a")
    with pytest.raises(NotFound, match='parent snapshot "missing"'):
        create(ms, Kind.ACTIVE, "x", "missing")
    with pytest.raises(InvalidArgument, match="not a committed"):
        create(ms, Kind.ACTIVE, "x", "a")
    with pytest.raises(AlreadyExists):
        create(ms, Kind.ACTIVE, "a")
    with pytest.raises(InvalidArgument):
        create(ms, Kind.COMMITTED, "y")
    assert [i.name for i in ms.walk()] == ["a"]


def test_a_taken_key_is_checked_after_the_parent_and_leaves_the_store_usable(ms: MetaStore) -> None:
    a = create(ms, Kind.ACTIVE, "a", labels={"l": "1"})
    commit(ms, "a", "A", {"l": "2"})
    create(ms, Kind.ACTIVE, "b", "A")
    with pytest.raises(NotFound, match='parent snapshot "missing"'):
        create(ms, Kind.ACTIVE, "b", "missing")
    with pytest.raises(InvalidArgument, match="not a committed"):
        create(ms, Kind.ACTIVE, "b", "b")
    with pytest.raises(AlreadyExists, match='snapshot "b" already exists'):
        create(ms, Kind.VIEW, "b", "A")
    v = create(ms, Kind.VIEW, "v", "A")  # the refused insert rolled back, nothing else
    assert (v.parent_ids, [dict(x) for x in v.parent_labels]) == ((a.id,), [{"l": "2"}])
    assert [i.name for i in ms.walk()] == ["A", "b", "v"]


def test_commit_replaces_labels_and_records_usage(ms: MetaStore) -> None:
    create(ms, Kind.ACTIVE, "a", labels={"old": "1"})
    commit(ms, "a", "A", {"new": "2"})
    _sid, info, usage = ms.get_info("A")
    assert info.kind == Kind.COMMITTED and dict(info.labels) == {"new": "2"}
    assert info.created_ns == info.updated_ns
    assert usage == Usage(10, 2)
    with pytest.raises(NotFound):
        ms.get_info("a")


def test_commit_errors(ms: MetaStore) -> None:
    create(ms, Kind.ACTIVE, "a")
    commit(ms, "a", "A")
    create(ms, Kind.VIEW, "v", "A")
    create(ms, Kind.ACTIVE, "b", "A")
    with pytest.raises(AlreadyExists):
        commit(ms, "b", "A")
    with pytest.raises(FailedPrecondition):
        commit(ms, "v", "V")
    with pytest.raises(FailedPrecondition):
        commit(ms, "A", "A2")
    with pytest.raises(NotFound):
        commit(ms, "nope", "N")


def test_remove_with_children_fails_and_changes_nothing(ms: MetaStore) -> None:
    create(ms, Kind.ACTIVE, "a")
    commit(ms, "a", "A")
    create(ms, Kind.ACTIVE, "b", "A")
    with pytest.raises(FailedPrecondition, match="child"), ms.transaction() as db:
        ms.remove(db, "A")
    assert {i.name for i in ms.walk()} == {"A", "b"}


def test_update_paths(ms: MetaStore) -> None:
    create(ms, Kind.ACTIVE, "a", labels={"x": "1", "y": "2"})
    before = ms.get_info("a")[1]
    info = ms.update_info("a", {"y": "20", "z": "3"}, ["labels.y", "labels.x"])
    assert dict(info.labels) == {"y": "20"}  # x absent from the request: deleted
    assert info.updated_ns > before.updated_ns and info.created_ns == before.created_ns
    assert dict(ms.update_info("a", {"q": "1"}, []).labels) == {"q": "1"}
    assert dict(ms.update_info("a", {"r": "1"}, ["labels"]).labels) == {"r": "1"}
    with pytest.raises(InvalidArgument, match='"name"'):
        ms.update_info("a", {}, ["name"])
    with pytest.raises(NotFound):
        ms.update_info("nope", {}, [])


def test_transaction_rolls_back_on_error(ms: MetaStore) -> None:
    with pytest.raises(RuntimeError), ms.transaction() as db:
        ms.create(db, Kind.ACTIVE, "a", "", {})
        raise RuntimeError("boom")
    assert list(ms.walk()) == []


def test_persists_across_reopen(tmp_path: Path) -> None:
    ms = MetaStore(tmp_path / "m.db")
    create(ms, Kind.ACTIVE, "a", labels={"k": "v"})
    commit(ms, "a", "A", {"k": "v"})
    ms.close()
    ms2 = MetaStore(tmp_path / "m.db")
    assert dict(ms2.get_info("A")[1].labels) == {"k": "v"}


def test_newer_schema_is_refused(tmp_path: Path) -> None:
    MetaStore(tmp_path / "m.db").close()
    db = sqlite3.connect(tmp_path / "m.db")
    db.execute("UPDATE meta SET value='99' WHERE name='schema'")
    db.commit()
    db.close()
    with pytest.raises(FailedPrecondition, match="newer"):
        MetaStore(tmp_path / "m.db")


def test_busy_while_another_thread_holds_a_transaction(ms: MetaStore) -> None:
    import threading

    seen: list[bool] = []
    assert not ms.busy()
    with ms.transaction():
        t = threading.Thread(target=lambda: seen.append(ms.busy()))
        t.start()
        t.join()
    assert seen == [True] and not ms.busy()


def test_chain_is_nearest_parent_first_and_labels_follow_ids(ms: MetaStore) -> None:
    parent = ""
    for i in range(4):
        create(ms, Kind.ACTIVE, f"l{i}-a", parent, labels={"n": str(i)})
        commit(ms, f"l{i}-a", f"l{i}", {"n": str(i)})
        parent = f"l{i}"
    create(ms, Kind.ACTIVE, "top", "l3")
    snap = ms.get_snapshot("top")
    assert snap.parent_ids == tuple(ms.get_info(f"l{i}")[0] for i in (3, 2, 1, 0))
    assert [lb["n"] for lb in ms.labels_by_ids(snap.parent_ids)] == ["3", "2", "1", "0"]
    assert [lb["n"] for lb in snap.parent_labels] == ["3", "2", "1", "0"]  # read with the chain
    assert create(ms, Kind.VIEW, "v", "l3", {"x": "1", "unset": ""}).parent_labels == \
        snap.parent_labels
    assert ms.get_snapshot("v").labels == {"x": "1"}
    assert ms.labels_by_ids([]) == []
    with pytest.raises(NotFound):
        ms.labels_by_ids(["999"])


def test_a_parent_loop_in_a_corrupt_database_is_reported(ms: MetaStore) -> None:
    create(ms, Kind.ACTIVE, "x-a")
    commit(ms, "x-a", "x")
    create(ms, Kind.ACTIVE, "y", "x")
    xid = ms.get_info("x")[0]
    with ms.transaction() as db:  # x becomes its own grandparent
        db.execute("PRAGMA foreign_keys=OFF")
        db.execute("UPDATE snapshots SET parent_id=? WHERE id=?", (int(xid), int(xid)))
    with pytest.raises(FailedPrecondition, match="loop"):
        ms.get_snapshot("y")


def test_a_missing_parent_in_a_corrupt_database_is_reported(ms: MetaStore) -> None:
    create(ms, Kind.ACTIVE, "x-a")
    commit(ms, "x-a", "x")
    create(ms, Kind.ACTIVE, "y", "x")
    ms._db.execute("PRAGMA foreign_keys=OFF")  # only outside a transaction
    with ms.transaction() as db:
        db.execute("DELETE FROM snapshots WHERE key='x'")
    with pytest.raises(FailedPrecondition, match="missing from chain"):
        ms.get_snapshot("y")

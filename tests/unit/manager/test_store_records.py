"""Daemon and instance records across pynydus versions (the upgrade path): a record
written before a field existed loads with its default, one written by a newer version
loads without the fields this one does not know."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

from pynydus.manager.store import DaemonRecord, DaemonStore, RafsRecord


def test_records_from_older_and_newer_versions_load(tmp_path: Path) -> None:
    db = tmp_path / "daemons.db"
    store = DaemonStore(db)
    store.close()
    old = {"id": "d1", "mode": "dedicated", "mountpoint": "/m", "api_socket": "/s",
           "config_path": "/c", "bootstrap": "/b", "log_file": "/l", "pid": 42}  # no thread_num
    newer = {**old, "id": "d2", "thread_num": 2, "prefetch_files": "", "future_field": [1]}
    inst = {"snapshot_id": "7", "daemon_id": "d1", "image_ref": "r/a:1", "snapshot_dir": "/s/7",
            "mountpoint": "/m", "bootstrap": "/b", "config_path": "/c", "fs_hint": "later"}
    conn = sqlite3.connect(db)
    with conn:
        for rec in (old, newer):
            conn.execute("INSERT INTO daemons(id, record) VALUES(?, ?)", (rec["id"], json.dumps(rec)))
        conn.execute("INSERT INTO instances(snapshot_id, seq, daemon_id, record) VALUES(?, ?, ?, ?)",
                     ("7", 1, "d1", json.dumps(inst)))
    conn.close()
    store = DaemonStore(db)
    try:
        d1, d2 = store.daemons()
        assert d1 == DaemonRecord(**old) and d1.thread_num == 0 and d1.prefetch_files == ""
        assert d1.command == []  # not known for a daemon started before it was recorded
        assert d2.thread_num == 2 and not hasattr(d2, "future_field")
        (r,) = store.instances()
        assert isinstance(r, RafsRecord) and r.image_ref == "r/a:1"
    finally:
        store.close()


def test_a_successor_record_replaces_the_spare_one_in_one_transaction(tmp_path: Path) -> None:
    """After a takeover the daemon's record names the successor and the spare's is gone,
    both or neither (a snapshotter killed in between finds one consistent state)."""
    store = DaemonStore(tmp_path / "daemons.db")
    try:
        daemon = DaemonRecord(id="d1", mode="dedicated", mountpoint="/m", api_socket="/s1",
                              config_path="/c", bootstrap="/b", log_file="/l1", pid=10)
        spare = DaemonRecord(id="spare-1", mode="spare", mountpoint="", api_socket="/s2",
                             config_path="", bootstrap="", log_file="/l2", pid=20)
        store.put_daemon(daemon)
        store.put_daemon(spare)
        daemon.pid, daemon.api_socket = 20, "/s2"
        store.replace_daemon(daemon, "spare-1")
        assert store.daemons() == [daemon]
        bad = DaemonRecord(**{**daemon.__dict__, "pid": 30})
        bad.command = object()  # type: ignore[assignment]  # not JSON: the put fails
        try:
            store.replace_daemon(bad, "d1")
        except TypeError:
            pass
        assert store.daemons() == [daemon]  # rolled back: nothing half done
    finally:
        store.close()


def test_delete_many_removes_daemons_and_instances_in_one_transaction(tmp_path: Path) -> None:
    store = DaemonStore(tmp_path / "daemons.db")
    try:
        for i in range(5):
            store.put_daemon(DaemonRecord(id=f"d{i}", mode="dedicated", mountpoint="/m",
                                          api_socket="/s", config_path="", bootstrap="",
                                          log_file=""))
            store.put_instance(RafsRecord(snapshot_id=str(i), daemon_id=f"d{i}", image_ref="r",
                                          snapshot_dir="/s", mountpoint="/m", bootstrap="/b",
                                          config_path="/c"))
        changes = store._db.total_changes
        store.delete_many(daemon_ids=["d1", "d3", "gone"], snapshot_ids=["1", "3"])
        assert [d.id for d in store.daemons()] == ["d0", "d2", "d4"]
        assert [r.snapshot_id for r in store.instances()] == ["0", "2", "4"]
        assert store._db.total_changes - changes == 4
        assert not store._db.in_transaction
        store.delete_many()  # nothing to do: no transaction at all
    finally:
        store.close()

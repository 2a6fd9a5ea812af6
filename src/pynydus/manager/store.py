"""Persistent records of daemons and RAFS instances (SQLite at ``<root>/daemons.db``).

What a restarted snapshotter needs to find its daemons again: which process
serves which mountpoint through which API socket, and which image (snapshot)
each daemon serves. Field names follow upstream's records (``ConfigState``,
``Rafs``) so the docs map one to one; the file itself is SQLite, not bbolt.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, TypeVar

R = TypeVar("R")


@dataclass
class DaemonRecord:
    id: str
    mode: str  # dedicated | shared
    mountpoint: str
    api_socket: str
    config_path: str  # dedicated: the daemon's config; shared: ""
    bootstrap: str  # dedicated: the image's bootstrap; shared: ""
    log_file: str
    pid: int = 0
    thread_num: int = 0
    # dedicated: a file of paths its start prefetches (--prefetch-files), "" for none
    prefetch_files: str = ""
    # the daemon program that was started (daemon.nydusd_path resolved); [] in records
    # written before pynydus kept it
    command: list[str] = field(default_factory=list)
    # fs_driver blobfile: the daemon shows its images' blobs as flat files (--blob-files)
    blob_files: bool = False


@dataclass
class RafsRecord:
    snapshot_id: str
    daemon_id: str
    image_ref: str
    snapshot_dir: str
    mountpoint: str
    bootstrap: str
    config_path: str
    seq: int = 0
    annotations: dict[str, str] = field(default_factory=dict)
    # where the daemon's registry credentials came from (a keychain source's description,
    # never a secret; "" when the image was mounted anonymously), and whether renewal asks
    # the sources again for them (not for the snapshot labels' own)
    credential_source: str = ""
    credentials_renewable: bool = False
    # fs_driver blobfile: where the kernel's EROFS mount of the bootstrap over the
    # daemon's blob files is (what containers see); "" for a FUSE tree at ``mountpoint``
    erofs_mountpoint: str = ""


_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS daemons (id TEXT PRIMARY KEY, record TEXT NOT NULL)",
    (
        "CREATE TABLE IF NOT EXISTS instances (snapshot_id TEXT PRIMARY KEY, "
        "seq INTEGER NOT NULL, daemon_id TEXT NOT NULL, record TEXT NOT NULL)"
    ),
)


def _record(cls: type[R], text: str) -> R:
    """A record from its JSON, keeping only the fields ``cls`` knows: a record written
    by a newer pynydus (kept across a downgrade) still loads, its new fields dropped;
    fields added since a record was written take their defaults."""
    known = {f.name for f in fields(cls)}  # type: ignore[arg-type]
    return cls(**{k: v for k, v in json.loads(text).items() if k in known})


class DaemonStore:
    def __init__(self, path: str | Path) -> None:
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False, timeout=30)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        for stmt in _SCHEMA:
            self._db.execute(stmt)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _write(self, sql: str, args: tuple[Any, ...]) -> None:
        with self._lock:
            self._db.execute(sql, args)

    def put_daemon(self, rec: DaemonRecord) -> None:
        self._write("INSERT OR REPLACE INTO daemons(id, record) VALUES(?, ?)", (rec.id, json.dumps(asdict(rec))))

    def delete_daemon(self, daemon_id: str) -> None:
        self._write("DELETE FROM daemons WHERE id=?", (daemon_id,))

    def _transaction(self, statements: list[tuple[str, list[tuple[Any, ...]]]]) -> None:
        """Run ``(sql, rows)`` pairs in one transaction: one sync to disk."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                for sql, rows in statements:
                    self._db.executemany(sql, rows)
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def replace_daemon(self, rec: DaemonRecord, gone_id: str) -> None:
        """Put ``rec`` and delete ``gone_id`` in one transaction (one sync to disk): a
        successor's record becomes the daemon's it took over."""
        self._transaction([
            ("INSERT OR REPLACE INTO daemons(id, record) VALUES(?, ?)",
             [(rec.id, json.dumps(asdict(rec)))]),
            ("DELETE FROM daemons WHERE id=?", [(gone_id,)]),
        ])

    def delete_many(self, *, daemon_ids: Sequence[str] = (),
                    snapshot_ids: Sequence[str] = ()) -> None:
        """Delete these daemon and instance records in one transaction (one sync: a
        Cleanup after 100 images were removed made 200 commits one by one)."""
        if not daemon_ids and not snapshot_ids:
            return
        self._transaction([("DELETE FROM daemons WHERE id=?", [(d,) for d in daemon_ids]),
                           ("DELETE FROM instances WHERE snapshot_id=?",
                            [(s,) for s in snapshot_ids])])

    def daemons(self) -> list[DaemonRecord]:
        with self._lock:
            rows = self._db.execute("SELECT record FROM daemons ORDER BY id").fetchall()
        return [_record(DaemonRecord, r[0]) for r in rows]

    def put_instance(self, rec: RafsRecord) -> RafsRecord:
        """Insert or replace; a new instance gets the next sequence number (mount order)."""
        with self._lock:
            if rec.seq == 0:
                row = self._db.execute("SELECT COALESCE(MAX(seq), 0) + 1 FROM instances").fetchone()
                rec.seq = int(row[0])
            self._db.execute(
                "INSERT OR REPLACE INTO instances(snapshot_id, seq, daemon_id, record) VALUES(?, ?, ?, ?)",
                (rec.snapshot_id, rec.seq, rec.daemon_id, json.dumps(asdict(rec))),
            )
        return rec

    def delete_instance(self, snapshot_id: str) -> None:
        self._write("DELETE FROM instances WHERE snapshot_id=?", (snapshot_id,))

    def instances(self) -> list[RafsRecord]:
        with self._lock:
            rows = self._db.execute("SELECT record FROM instances ORDER BY seq").fetchall()
        return [_record(RafsRecord, r[0]) for r in rows]

"""SQLite metastore for snapshots: keys, kinds, parent chains, labels, times, usage.

The counterpart of containerd's ``snapshots/storage`` bolt store. Every change is
one SQLite transaction (WAL, synchronous=FULL so a committed change survives a
crash, as bolt's fsync does). Filesystem work happens outside: callers create
directories before ``create`` and delete them after ``remove`` commits, so a crash
leaves at worst an orphan directory, which Cleanup removes.

Ids are integers that are never reused (AUTOINCREMENT); a snapshot's directory is
``snapshots/<id>``. Commit keeps the id and renames the key, exactly like
containerd, so the committed layer's data never moves.

Thread safety: one connection guarded by a lock. The gRPC server calls in from a
thread pool; SQLite serialises writers anyway and our transactions are short.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from enum import IntEnum
from pathlib import Path

from pynydus.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound, q

SCHEMA_VERSION = 1


class Kind(IntEnum):
    """Snapshot kinds, numbered as containerd's snapshots.v1.Kind enum."""

    UNKNOWN = 0
    VIEW = 1
    ACTIVE = 2
    COMMITTED = 3


_KINDS = tuple(Kind)  # by value (0-3): an index, not an enum lookup per row


@dataclass(frozen=True)
class Info:
    """What Stat returns: containerd's snapshots.Info."""

    name: str
    parent: str
    kind: Kind
    created_ns: int
    updated_ns: int
    labels: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Usage:
    size: int = 0
    inodes: int = 0


@dataclass(frozen=True)
class Snapshot:
    """A snapshot's id, kind and the ids of its ancestors, nearest parent first; with
    the labels of each ancestor (same order) and its own, read with the chain."""

    id: str
    kind: Kind
    parent_ids: tuple[str, ...]
    parent_labels: tuple[Mapping[str, str], ...] = field(default=(), compare=False)
    labels: Mapping[str, str] = field(default_factory=dict, compare=False)


_SCHEMA = """
CREATE TABLE IF NOT EXISTS snapshots (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    key TEXT NOT NULL UNIQUE,
    parent_id INTEGER REFERENCES snapshots(id),
    kind INTEGER NOT NULL,
    created_ns INTEGER NOT NULL,
    updated_ns INTEGER NOT NULL,
    labels TEXT NOT NULL DEFAULT '{}',
    size INTEGER NOT NULL DEFAULT 0,
    inodes INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS snapshots_parent ON snapshots(parent_id);
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);
"""

# The longest parent chain we follow; containerd has no limit, but a loop in a
# corrupt database must not hang us. Overlay itself stops far below this.
_MAX_CHAIN = 4096

# A snapshot by key and its chain: (id, parent_id, kind, labels), itself first.
_KEY_CHAIN_SQL = """
WITH RECURSIVE chain(id, parent_id, kind, labels, depth) AS (
    SELECT id, parent_id, kind, labels, 0 FROM snapshots WHERE key = ?1
    UNION ALL
    SELECT s.id, s.parent_id, s.kind, s.labels, c.depth + 1 FROM snapshots s
    JOIN chain c ON s.id = c.parent_id WHERE c.depth <= ?2
)
SELECT id, parent_id, kind, labels FROM chain ORDER BY depth
"""

# Every snapshot's info, in id order.
_WALK_SQL = ("SELECT s.key, p.key, s.kind, s.created_ns, s.updated_ns, s.labels "
             "FROM snapshots s LEFT JOIN snapshots p ON s.parent_id = p.id ORDER BY s.id")


def _now_ns() -> int:
    return time.time_ns()


class MetaStore:
    """Persistent snapshot metadata. All methods are atomic; errors leave no change."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._lock = threading.RLock()
        self._db = sqlite3.connect(
            str(self.path), isolation_level=None, check_same_thread=False, timeout=30
        )
        # One process owns the store (the root lock), as bolt's flock has containerd's
        # one: holding SQLite's locks keeps the WAL index in our memory and spares every
        # statement its lock and unlock calls on the -shm file (set before WAL mode).
        self._db.execute("PRAGMA locking_mode=EXCLUSIVE")
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("PRAGMA foreign_keys=ON")
        with self.transaction() as db:
            for stmt in _SCHEMA.strip().split(";"):
                if stmt.strip():
                    db.execute(stmt)
            row = db.execute("SELECT value FROM meta WHERE name='schema'").fetchone()
            if row is None:
                db.execute("INSERT INTO meta(name, value) VALUES('schema', ?)", (str(SCHEMA_VERSION),))
            elif int(row[0]) > SCHEMA_VERSION:
                raise FailedPrecondition(
                    f"metastore {self.path}: schema version {row[0]} is newer than this "
                    f"pynydus understands ({SCHEMA_VERSION}); upgrade pynydus"
                )

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def busy(self) -> bool:
        """A hint: another thread holds the store now (a write transaction commits with an
        fsync, which can take milliseconds on a busy disk). Never blocks."""
        if self._lock.acquire(blocking=False):
            self._lock.release()
            return False
        return True

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """One write transaction; rolled back if the body raises."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            else:
                self._db.execute("COMMIT")

    # --- reads ------------------------------------------------------------------

    def _row(self, db: sqlite3.Connection, key: str) -> tuple[int, int | None, int] | None:
        row = db.execute("SELECT id, parent_id, kind FROM snapshots WHERE key=?", (key,)).fetchone()
        return None if row is None else (row[0], row[1], row[2])

    def _lookup(self, db: sqlite3.Connection, key: str, limit: int
                ) -> tuple[Kind, tuple[str, ...], tuple[Mapping[str, str], ...]] | None:
        """The kind of ``key`` and the ids and labels of it and its ancestors (itself
        first), in one recursive query (one query per layer cost ~10 us each; Mounts,
        Prepare and View read the chain on every call); None if there is no ``key``.
        More than ``limit`` layers (a loop) is FailedPrecondition."""
        rows = db.execute(_KEY_CHAIN_SQL, (key, _MAX_CHAIN)).fetchall()
        if not rows:
            return None
        ids, labels = _checked_chain([r[:2] + r[3:] for r in rows], limit)
        return Kind(rows[0][2]), ids, labels

    def get_snapshot(self, key: str) -> Snapshot:
        """The id, kind, labels and ancestors (ids and labels) of ``key``, in one query;
        NotFound if there is none."""
        with self._lock:
            found = self._lookup(self._db, key, _MAX_CHAIN + 1)
        if found is None:
            raise NotFound(f"snapshot {q(key)} does not exist")
        kind, ids, labels = found
        return Snapshot(ids[0], kind, ids[1:], labels[1:], labels[0])

    def get_info(self, key: str) -> tuple[str, Info, Usage]:
        """(id, info, recorded usage) of ``key``; NotFound if there is none."""
        with self._lock:
            row = self._db.execute(
                "SELECT s.id, s.key, p.key, s.kind, s.created_ns, s.updated_ns, s.labels, s.size, "
                "s.inodes FROM snapshots s LEFT JOIN snapshots p ON s.parent_id = p.id "
                "WHERE s.key=?",
                (key,),
            ).fetchone()
        if row is None:
            raise NotFound(f"snapshot {q(key)} does not exist")
        return str(row[0]), _info(row[1:7]), Usage(row[7], row[8])

    def walk(self) -> Iterator[Info]:
        """Every snapshot's info, in id order. Reads a consistent snapshot of the table."""
        with self._lock:
            rows = self._db.execute(_WALK_SQL).fetchall()
        for row in rows:
            yield _info(row)

    def walk_upto(self, limit: int) -> list[Info] | None:
        """Every snapshot's info, in id order, if there are at most ``limit`` snapshots
        (one read of at most ``limit + 1`` rows); None if there are more."""
        with self._lock:
            rows = self._db.execute(_WALK_SQL + " LIMIT ?", (limit + 1,)).fetchall()
        return None if len(rows) > limit else [_info(row) for row in rows]

    def labels_by_ids(self, sids: Sequence[str]) -> list[dict[str, str]]:
        """Labels of each snapshot id in ``sids``, in that order; NotFound if one is missing."""
        if not sids:
            return []
        with self._lock:
            rows = dict(self._db.execute(
                f"SELECT id, labels FROM snapshots WHERE id IN ({','.join('?' * len(sids))})",
                [int(sid) for sid in sids]).fetchall())
        try:
            return [json.loads(rows[int(sid)]) for sid in sids]
        except KeyError as err:
            raise NotFound(f"snapshot id {err.args[0]} does not exist") from err

    def labels_by_id(self, sid: str) -> dict[str, str]:
        """Labels of the snapshot with id ``sid``; NotFound if there is none."""
        return self.labels_by_ids((sid,))[0]

    def id_map(self) -> dict[str, str]:
        """id -> key of every snapshot (for finding orphan directories)."""
        with self._lock:
            return {str(i): k for i, k in self._db.execute("SELECT id, key FROM snapshots")}

    # --- writes -----------------------------------------------------------------

    def create(
        self,
        db: sqlite3.Connection,
        kind: Kind,
        key: str,
        parent: str,
        labels: Mapping[str, str],
    ) -> Snapshot:
        """Record a new Active or View snapshot inside the caller's transaction.

        Errors as containerd's storage: parent missing → NotFound, parent not
        committed → InvalidArgument, key taken → AlreadyExists.
        """
        if kind not in (Kind.ACTIVE, Kind.VIEW):
            raise InvalidArgument(f"snapshot kind {kind.name} invalid; only active or view can be created")
        if not key:
            raise InvalidArgument("snapshot key must not be empty")
        parent_id: int | None = None
        chain: tuple[tuple[str, ...], tuple[Mapping[str, str], ...]] = ((), ())
        if parent:
            found = self._lookup(db, parent, _MAX_CHAIN)  # the parent is the first ancestor
            if found is None:
                raise NotFound(f"parent snapshot {q(parent)} does not exist")
            if found[0] != Kind.COMMITTED:
                raise InvalidArgument(f"parent {q(parent)} is not a committed snapshot")
            chain = found[1:]
            parent_id = int(chain[0][0])
        now = _now_ns()
        kept = _kept_labels(labels)
        try:
            cur = db.execute(
                "INSERT INTO snapshots(key, parent_id, kind, created_ns, updated_ns, labels) "
                "VALUES(?, ?, ?, ?, ?, ?)",
                (key, parent_id, int(kind), now, now, _dump_labels(kept)),
            )
        except sqlite3.IntegrityError as err:
            # the key's UNIQUE index answers "taken?" without a query of its own
            if "snapshots.key" not in str(err):
                raise
            raise AlreadyExists(f"snapshot {q(key)} already exists") from err
        new_id = cur.lastrowid
        assert new_id is not None
        return Snapshot(str(new_id), kind, *chain, kept)

    def commit_active(
        self, db: sqlite3.Connection, key: str, name: str, usage: Usage, labels: Mapping[str, str]
    ) -> str:
        """Turn active ``key`` into committed ``name`` (same id); labels are replaced, not inherited.

        Errors as containerd: name taken → AlreadyExists, key missing → NotFound,
        key not active → FailedPrecondition. Returns the id.
        """
        if not name:
            raise InvalidArgument("commit: name must not be empty")
        if self._row(db, name) is not None:
            raise AlreadyExists(f"committed snapshot {q(name)} already exists")
        row = self._row(db, key)
        if row is None:
            raise NotFound(f"active snapshot {q(key)} does not exist")
        if row[2] != Kind.ACTIVE:
            raise FailedPrecondition(f"snapshot {q(key)} is not active (kind {Kind(row[2]).name.lower()})")
        now = _now_ns()
        db.execute(
            "UPDATE snapshots SET key=?, kind=?, created_ns=?, updated_ns=?, labels=?, size=?, "
            "inodes=? WHERE id=?",
            (name, int(Kind.COMMITTED), now, now, _dump_labels(labels), usage.size, usage.inodes, row[0]),
        )
        return str(row[0])

    def remove(self, db: sqlite3.Connection, key: str) -> tuple[str, Kind]:
        """Delete ``key`` inside the caller's transaction; returns (id, kind).

        NotFound if missing; FailedPrecondition if any snapshot names it as parent.
        """
        row = self._row(db, key)
        if row is None:
            raise NotFound(f"snapshot {q(key)} does not exist")
        child = db.execute("SELECT key FROM snapshots WHERE parent_id=? LIMIT 1", (row[0],)).fetchone()
        if child is not None:
            raise FailedPrecondition(
                f"snapshot {q(key)} has child snapshot {q(child[0])}; remove the child first"
            )
        db.execute("DELETE FROM snapshots WHERE id=?", (row[0],))
        return str(row[0]), Kind(row[2])

    def update_info(self, name: str, labels: Mapping[str, str], paths: list[str]) -> Info:
        """Update the mutable fields (labels) of ``name``; see containerd's UpdateInfo.

        ``paths`` empty: labels replaced. ``labels``: replaced. ``labels.KEY``: that one
        label set from ``labels`` or, if absent there, deleted. Other paths →
        InvalidArgument. updated_at becomes now.
        """
        with self.transaction() as db:
            row = db.execute("SELECT id, labels FROM snapshots WHERE key=?", (name,)).fetchone()
            if row is None:
                raise NotFound(f"snapshot {q(name)} does not exist")
            current: dict[str, str] = json.loads(row[1])
            if not paths:
                current = dict(labels)
            for path in paths:
                if path.startswith("labels."):
                    lkey = path[len("labels."):]
                    if lkey in labels:
                        current[lkey] = labels[lkey]
                    else:
                        current.pop(lkey, None)
                elif path == "labels":
                    current = dict(labels)
                else:
                    raise InvalidArgument(f"cannot update {q(path)} field on snapshot {q(name)}")
            db.execute(
                "UPDATE snapshots SET labels=?, updated_ns=? WHERE id=?",
                (_dump_labels(current), _now_ns(), row[0]),
            )
        return self.get_info(name)[1]

    def change_labels_by_id(self, sid: str, put: Mapping[str, str],
                            drop: Sequence[str] = ()) -> None:
        """Set ``put`` and delete ``drop`` in the labels of snapshot id ``sid`` (the
        snapshotter's own marks, e.g. an OCI fallback); NotFound if there is none."""
        with self.transaction() as db:
            row = db.execute("SELECT labels FROM snapshots WHERE id=?", (int(sid),)).fetchone()
            if row is None:
                raise NotFound(f"snapshot id {sid} does not exist")
            current: dict[str, str] = json.loads(row[0])
            for key in drop:
                current.pop(key, None)
            current.update(put)
            db.execute("UPDATE snapshots SET labels=?, updated_ns=? WHERE id=?",
                       (_dump_labels(current), _now_ns(), int(sid)))


def _checked_chain(rows: Sequence[tuple[int, int | None, str]], limit: int
                   ) -> tuple[tuple[str, ...], tuple[Mapping[str, str], ...]]:
    """Ids and parsed labels of chain rows (id, parent_id, labels), nearest first; a
    chain of more than ``limit`` rows (a loop) or one that ends on a missing parent is
    FailedPrecondition."""
    if len(rows) > limit:
        raise FailedPrecondition(f"metastore: parent chain longer than {_MAX_CHAIN} (loop?)")
    if rows and rows[-1][1] is not None:
        raise FailedPrecondition(f"metastore: snapshot id {rows[-1][1]} missing from chain")
    return tuple(str(r[0]) for r in rows), tuple(_load_labels(r[2]) for r in rows)


def _load_labels(text: str) -> dict[str, str]:
    # most layers of a chain have none ("{}"): no parser for them on every Mounts
    labels: dict[str, str] = {} if text == "{}" else json.loads(text)
    return labels


def _kept_labels(labels: Mapping[str, str]) -> dict[str, str]:
    # As containerd's label writer: an empty value means "unset", it is not stored.
    return {k: v for k, v in labels.items() if v != ""}


def _dump_labels(labels: Mapping[str, str]) -> str:
    return json.dumps(_kept_labels(labels), sort_keys=True, separators=(",", ":"))


def _info(row: tuple[str, str | None, int, int, int, str]) -> Info:
    """A row (key, parent's key, kind, created, updated, labels) as SQLite returns it."""
    key, parent, kind, created, updated, labels = row
    return Info(name=key, parent=parent or "", kind=_KINDS[kind], created_ns=created,
                updated_ns=updated, labels=_load_labels(labels))

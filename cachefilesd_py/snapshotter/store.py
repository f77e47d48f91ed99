"""The snapshotter's metadata: one sqlite3 database in the root directory, so snapshots survive a restart.

A snapshot is a row: its ``name`` (containerd's key, or the name it was committed under), ``parent`` (a committed
snapshot's name, or ""), ``kind`` (:data:`VIEW`, :data:`ACTIVE`, :data:`COMMITTED`, the API's numbers), labels,
times, and ``nydus``: "" for an ordinary layer, :data:`NYDUS_BLOB` for a Nydus data-blob layer (committed empty,
never downloaded), :data:`NYDUS_BOOTSTRAP` for the layer whose bootstrap is mounted lazily.  A snapshot's files live
under ``snapshots/<id>`` in the root (:class:`Store` hands out the ids).
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["ACTIVE", "COMMITTED", "NYDUS_BLOB", "NYDUS_BOOTSTRAP", "VIEW", "Snapshot", "SnapshotError", "Store"]

VIEW, ACTIVE, COMMITTED = 1, 2, 3
NYDUS_BLOB, NYDUS_BOOTSTRAP = "blob", "bootstrap"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS snapshots (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    name TEXT NOT NULL UNIQUE,
    parent TEXT NOT NULL DEFAULT '',
    kind INTEGER NOT NULL,
    created REAL NOT NULL,
    updated REAL NOT NULL,
    labels TEXT NOT NULL DEFAULT '{}',
    nydus TEXT NOT NULL DEFAULT '',
    size INTEGER NOT NULL DEFAULT 0,
    inodes INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS snapshots_parent ON snapshots(parent);
"""


class SnapshotError(Exception):
    """A request the metadata refuses; ``code`` is the gRPC status name it maps to."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass
class Snapshot:
    id: int
    name: str
    parent: str
    kind: int
    created: float
    updated: float
    labels: dict[str, str] = field(default_factory=dict)
    nydus: str = ""
    size: int = 0
    inodes: int = 0


_COLUMNS = "id, name, parent, kind, created, updated, labels, nydus, size, inodes"


def _row(r: tuple) -> Snapshot:
    return Snapshot(r[0], r[1], r[2], r[3], r[4], r[5], json.loads(r[6]), r[7], r[8], r[9])


class Store:
    """The snapshot table; thread-safe (one connection, one lock: the gRPC handlers run in a thread pool)."""

    def __init__(self, path: Path) -> None:
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)
        self._lock = threading.RLock()

    def close(self) -> None:
        self._db.close()

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """Hold the lock and one sqlite transaction: the whole block happens or none of it."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def get(self, name: str) -> Snapshot | None:
        with self._lock:
            r = self._db.execute(f"SELECT {_COLUMNS} FROM snapshots WHERE name = ?", (name,)).fetchone()
        return None if r is None else _row(r)

    def need(self, name: str) -> Snapshot:
        snap = self.get(name)
        if snap is None:
            raise SnapshotError("NOT_FOUND", f"snapshot {name!r} does not exist")
        return snap

    def all(self) -> list[Snapshot]:
        with self._lock:
            return [_row(r) for r in self._db.execute(f"SELECT {_COLUMNS} FROM snapshots ORDER BY id")]

    def children(self, name: str) -> list[Snapshot]:
        with self._lock:
            rows = self._db.execute(f"SELECT {_COLUMNS} FROM snapshots WHERE parent = ?", (name,)).fetchall()
        return [_row(r) for r in rows]

    def chain(self, snap: Snapshot) -> list[Snapshot]:
        """``snap``'s ancestors, its parent first."""
        out: list[Snapshot] = []
        parent = snap.parent
        while parent:
            p = self.need(parent)
            out.append(p)
            parent = p.parent
        return out

    def create(self, name: str, parent: str, kind: int, labels: dict[str, str], nydus: str = "") -> Snapshot:
        if not name:
            raise SnapshotError("INVALID_ARGUMENT", "snapshot key is empty")
        with self.transaction():
            if self.get(name) is not None:
                raise SnapshotError("ALREADY_EXISTS", f"snapshot {name!r} already exists")
            if parent:
                p = self.need(parent)
                if p.kind != COMMITTED:
                    raise SnapshotError("INVALID_ARGUMENT", f"parent {parent!r} is not a committed snapshot")
            now = time.time()
            cur = self._db.execute(
                "INSERT INTO snapshots (name, parent, kind, created, updated, labels, nydus) VALUES (?,?,?,?,?,?,?)",
                (name, parent, kind, now, now, json.dumps(labels), nydus),
            )
            return Snapshot(int(cur.lastrowid or 0), name, parent, kind, now, now, dict(labels), nydus)

    def commit(self, key: str, name: str, labels: dict[str, str], size: int, inodes: int,
               nydus: str | None = None) -> Snapshot:  # fmt: skip
        """Active snapshot ``key`` becomes committed ``name`` (same id, so same files)."""
        with self.transaction():
            snap = self.need(key)
            if snap.kind != ACTIVE:
                raise SnapshotError("FAILED_PRECONDITION", f"snapshot {key!r} is not active")
            if self.get(name) is not None:
                raise SnapshotError("ALREADY_EXISTS", f"snapshot {name!r} already exists")
            merged = {**snap.labels, **labels}
            self._db.execute(
                "UPDATE snapshots SET name = ?, kind = ?, labels = ?, updated = ?, size = ?, inodes = ?, "
                "nydus = ? WHERE id = ?",
                (name, COMMITTED, json.dumps(merged), time.time(), size, inodes,
                 snap.nydus if nydus is None else nydus, snap.id),
            )  # fmt: skip
        return self.need(name)

    def set_labels(self, name: str, labels: dict[str, str]) -> Snapshot:
        with self.transaction():
            snap = self.need(name)
            self._db.execute("UPDATE snapshots SET labels = ?, updated = ? WHERE id = ?",
                             (json.dumps(labels), time.time(), snap.id))  # fmt: skip
        return self.need(name)

    def remove(self, name: str) -> Snapshot:
        """Delete ``name``'s row (FAILED_PRECONDITION while it has children); returns what it was."""
        with self.transaction():
            snap = self.need(name)
            if self.children(name):
                raise SnapshotError("FAILED_PRECONDITION", f"snapshot {name!r} has children")
            self._db.execute("DELETE FROM snapshots WHERE id = ?", (snap.id,))
        return snap

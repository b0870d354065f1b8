"""SQLite durability for a store node: every replica's promise, log, commit index and snapshot.

One database per node, WAL mode, ``synchronous=FULL``: a commit returns only after fsync. The
node writes all persist actions of one event-loop turn in one transaction (group commit) and
sends nothing from that turn until the commit returned.

Idle cells live only here: a replica is loaded into memory when a message for it arrives.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable, Sequence
from typing import Any

import msgpack

from cellcloud.core.paxos import (
    Action,
    DurableState,
    Entry,
    PersistCommit,
    PersistEntries,
    PersistPromise,
    PersistSnapshot,
)

SCHEMA = """
CREATE TABLE IF NOT EXISTS cell (
    cell TEXT PRIMARY KEY,
    members TEXT,                -- initial membership (JSON), NULL for a joining replica
    promised_round INTEGER NOT NULL DEFAULT 0,
    promised_node TEXT NOT NULL DEFAULT '',
    commit_index INTEGER NOT NULL DEFAULT 0,
    snapshot BLOB
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS log (
    cell TEXT NOT NULL,
    slot INTEGER NOT NULL,
    entry BLOB NOT NULL,
    PRIMARY KEY (cell, slot)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS directory (
    cell TEXT PRIMARY KEY,
    members TEXT NOT NULL,
    version INTEGER NOT NULL
) WITHOUT ROWID;
"""


def _pack(x: Any) -> bytes:
    out: bytes = msgpack.packb(x, use_bin_type=True)
    return out


def _unpack(b: bytes) -> Any:
    return msgpack.unpackb(b, raw=False, strict_map_key=False)


class SqliteStore:
    def __init__(self, path: str, *, fsync: bool = True) -> None:
        """``fsync=False`` is the planted skip-fsync bug; only tests set it."""
        self.db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute(f"PRAGMA synchronous={'FULL' if fsync else 'OFF'}")
        self.db.executescript(SCHEMA)
        self.commits = 0

    def close(self) -> None:
        self.db.close()

    def create_cells(self, cells: Iterable[tuple[str, tuple[str, ...] | None]]) -> int:
        """Create replicas (idempotent); one transaction for the whole batch."""
        rows = [(c, json.dumps(list(m)) if m is not None else None) for c, m in cells]
        with self.db:
            self.db.execute("BEGIN")
            cur = self.db.executemany(
                "INSERT OR IGNORE INTO cell (cell, members) VALUES (?, ?)", rows
            )
        return cur.rowcount

    def has_cell(self, cell: str) -> bool:
        row = self.db.execute("SELECT 1 FROM cell WHERE cell = ?", (cell,)).fetchone()
        return row is not None

    def load(self, cell: str) -> tuple[tuple[str, ...] | None, DurableState] | None:
        row = self.db.execute(
            "SELECT members, promised_round, promised_node, commit_index, snapshot "
            "FROM cell WHERE cell = ?",
            (cell,),
        ).fetchone()
        if row is None:
            return None
        members = tuple(json.loads(row[0])) if row[0] is not None else None
        snapshot = _unpack(row[4]) if row[4] is not None else None
        entries: dict[int, Entry] = {}
        for slot, blob in self.db.execute(
            "SELECT slot, entry FROM log WHERE cell = ? ORDER BY slot", (cell,)
        ):
            b, cmd, cid, seq = _unpack(blob)
            entries[slot] = Entry(slot, (b[0], b[1]), cmd, cid, seq)
        return members, DurableState((row[1], row[2]), row[3], snapshot, entries)

    def persist(self, actions: Sequence[Action]) -> None:
        """Write one batch of persist actions in one fsynced transaction."""
        if not actions:
            return
        with self.db:
            self.db.execute("BEGIN")
            for a in actions:
                if isinstance(a, PersistPromise):
                    self.db.execute(
                        "UPDATE cell SET promised_round = ?, promised_node = ? WHERE cell = ? "
                        "AND (promised_round < ? OR (promised_round = ? AND promised_node < ?))",
                        (a.ballot[0], a.ballot[1], a.cell, a.ballot[0], a.ballot[0], a.ballot[1]),
                    )
                elif isinstance(a, PersistEntries):
                    self.db.executemany(
                        "INSERT OR REPLACE INTO log (cell, slot, entry) VALUES (?, ?, ?)",
                        [
                            (a.cell, e.slot, _pack([list(e.ballot), e.cmd, e.client_id, e.seq]))
                            for e in a.entries
                        ],
                    )
                elif isinstance(a, PersistCommit):
                    self.db.execute(
                        "UPDATE cell SET commit_index = max(commit_index, ?) WHERE cell = ?",
                        (a.commit_index, a.cell),
                    )
                elif isinstance(a, PersistSnapshot):
                    self.db.execute(
                        "UPDATE cell SET snapshot = ? WHERE cell = ?",
                        (_pack(a.snapshot), a.cell),
                    )
                    self.db.execute(
                        "DELETE FROM log WHERE cell = ? AND slot <= ?",
                        (a.cell, a.snapshot["index"]),
                    )
        self.commits += 1

    # ---- discovery directory (eventually consistent) ----------------------------------------

    def directory_put(self, cell: str, members: tuple[str, ...], version: int) -> bool:
        with self.db:
            cur = self.db.execute(
                "INSERT INTO directory (cell, members, version) VALUES (?, ?, ?) "
                "ON CONFLICT(cell) DO UPDATE SET members = excluded.members, "
                "version = excluded.version WHERE excluded.version > directory.version",
                (cell, json.dumps(list(members)), version),
            )
        return cur.rowcount > 0

    def directory_get(self, cell: str) -> tuple[tuple[str, ...], int] | None:
        row = self.db.execute(
            "SELECT members, version FROM directory WHERE cell = ?", (cell,)
        ).fetchone()
        return (tuple(json.loads(row[0])), row[1]) if row else None

    def cell_count(self) -> int:
        row = self.db.execute("SELECT count(*) FROM cell").fetchone()
        return int(row[0])

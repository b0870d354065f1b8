"""The cell's CloudWatch-Logs-shaped store: log groups, streams and events (one per line of
output), per account, in their own SQLite file (``<state>/logs.db``) beside the catalog's.

Bounded: events per group (``log_events_per_group_max``, the oldest go first), groups per
account (``log_groups_per_account_max``), and a group's retention (``PutRetentionPolicy``)
drops older events at each append and each sweep. Logs are acknowledged to no one: one
transaction per batch, no fsync of its own (a crash may lose the last second).
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from ..core.cwlogs import DAY_MS
from ..core.limits import DEFAULT_LIMITS, Limits

_SCHEMA = """
CREATE TABLE IF NOT EXISTS log_groups (
    account TEXT NOT NULL, grp TEXT NOT NULL, created_ms INTEGER NOT NULL,
    retention_days INTEGER, PRIMARY KEY (account, grp)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS log_streams (
    account TEXT NOT NULL, grp TEXT NOT NULL, stream TEXT NOT NULL,
    created_ms INTEGER NOT NULL, first_ms INTEGER NOT NULL, last_ms INTEGER NOT NULL,
    last_ingest_ms INTEGER NOT NULL, PRIMARY KEY (account, grp, stream)) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS log_streams_last ON log_streams (account, grp, last_ms);
CREATE TABLE IF NOT EXISTS log_events (
    id INTEGER PRIMARY KEY AUTOINCREMENT, account TEXT NOT NULL, grp TEXT NOT NULL,
    stream TEXT NOT NULL, ts_ms INTEGER NOT NULL, ingest_ms INTEGER NOT NULL,
    request_id TEXT NOT NULL, message TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS log_events_grp ON log_events (account, grp, id);
CREATE INDEX IF NOT EXISTS log_events_time ON log_events (account, grp, ts_ms, id);
CREATE INDEX IF NOT EXISTS log_events_stream ON log_events (account, grp, stream, id);
"""


@dataclass(frozen=True)
class Event:
    id: int
    stream: str
    ts_ms: int
    ingest_ms: int
    request_id: str
    message: str


#: one event to file: (account, group, stream, timestamp ms, request id, message)
EventRow = tuple[str, str, str, int, str, str]


class LogStore:
    def __init__(self, state_dir: str, limits: Limits = DEFAULT_LIMITS) -> None:
        os.makedirs(state_dir, exist_ok=True)
        self.limits = limits
        self.db = sqlite3.connect(os.path.join(state_dir, "logs.db"), isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.executescript(_SCHEMA)
        self.counters = {"events": 0, "events_dropped": 0, "groups_refused": 0}

    @contextlib.contextmanager
    def _tx(self) -> Iterator[None]:
        self.db.execute("BEGIN")
        try:
            yield
            self.db.execute("COMMIT")
        except BaseException:
            if self.db.in_transaction:
                self.db.execute("ROLLBACK")
            raise

    # -- writes ----------------------------------------------------------------------------
    def append(self, rows: list[EventRow], now_ms: int) -> None:
        """File events; a group is created on its first event (as Lambda's would be), unless
        its account is at its group limit (then its events are dropped, counted)."""
        if not rows:
            return
        touched: dict[tuple[str, str], bool] = {}
        with self._tx():
            for account, grp, stream, ts, rid, message in rows:
                key = (account, grp)
                if key not in touched:
                    touched[key] = self._ensure_group(account, grp, now_ms)
                if not touched[key]:
                    self.counters["events_dropped"] += 1
                    continue
                self.db.execute(
                    "INSERT INTO log_events (account, grp, stream, ts_ms, ingest_ms, request_id, "
                    "message) VALUES (?,?,?,?,?,?,?)", (account, grp, stream, ts, now_ms, rid,
                                                       message))
                self.db.execute(
                    "INSERT INTO log_streams VALUES (?,?,?,?,?,?,?) ON CONFLICT "
                    "(account, grp, stream) DO UPDATE SET first_ms=min(first_ms, excluded.first_ms),"
                    " last_ms=max(last_ms, excluded.last_ms), last_ingest_ms=excluded.last_ingest_ms",
                    (account, grp, stream, now_ms, ts, ts, now_ms))
                self.counters["events"] += 1
            for (account, grp), ok in touched.items():
                if ok:
                    self._trim(account, grp, now_ms)

    def _ensure_group(self, account: str, grp: str, now_ms: int) -> bool:
        if self.db.execute("SELECT 1 FROM log_groups WHERE account=? AND grp=?",
                           (account, grp)).fetchone():
            return True
        n = self.db.execute("SELECT count(*) FROM log_groups WHERE account=?",
                            (account,)).fetchone()[0]
        if n >= self.limits.log_groups_per_account_max:
            self.counters["groups_refused"] += 1
            return False
        self.db.execute("INSERT INTO log_groups VALUES (?,?,?,NULL)", (account, grp, now_ms))
        return True

    def _trim(self, account: str, grp: str, now_ms: int) -> None:
        """The group's bounds: its retention, then its event cap (the oldest go)."""
        row = self.db.execute("SELECT retention_days FROM log_groups WHERE account=? AND grp=?",
                              (account, grp)).fetchone()
        deleted = 0
        if row and row[0]:
            deleted += self.db.execute(
                "DELETE FROM log_events WHERE account=? AND grp=? AND ts_ms < ?",
                (account, grp, now_ms - int(row[0]) * DAY_MS)).rowcount
        deleted += self.db.execute(
            "DELETE FROM log_events WHERE account=? AND grp=? AND id <= (SELECT id FROM "
            "log_events WHERE account=? AND grp=? ORDER BY id DESC LIMIT 1 OFFSET ?)",
            (account, grp, account, grp, self.limits.log_events_per_group_max)).rowcount
        if deleted <= 0:
            return
        # streams left without events go with them
        self.db.execute(
            "DELETE FROM log_streams WHERE account=? AND grp=? AND NOT EXISTS (SELECT 1 FROM "
            "log_events e WHERE e.account=log_streams.account AND e.grp=log_streams.grp AND "
            "e.stream=log_streams.stream)", (account, grp))

    def sweep(self, now_ms: int) -> None:
        """Retention applied to every group that has one (the frontend calls it each minute)."""
        groups = self.db.execute("SELECT account, grp FROM log_groups WHERE retention_days "
                                 "IS NOT NULL").fetchall()
        if groups:
            with self._tx():
                for account, grp in groups:
                    self._trim(str(account), str(grp), now_ms)

    def create_group(self, account: str, grp: str, now_ms: int) -> bool:
        """False if it exists; raises OverflowError at the account's group limit."""
        with self._tx():
            if self.db.execute("SELECT 1 FROM log_groups WHERE account=? AND grp=?",
                               (account, grp)).fetchone():
                return False
            if not self._ensure_group(account, grp, now_ms):
                raise OverflowError(self.limits.log_groups_per_account_max)
        return True

    def delete_group(self, account: str, grp: str) -> bool:
        with self._tx():
            cur = self.db.execute("DELETE FROM log_groups WHERE account=? AND grp=?",
                                  (account, grp))
            self.db.execute("DELETE FROM log_streams WHERE account=? AND grp=?", (account, grp))
            self.db.execute("DELETE FROM log_events WHERE account=? AND grp=?", (account, grp))
        return cur.rowcount == 1

    def set_retention(self, account: str, grp: str, days: int | None, now_ms: int) -> bool:
        with self._tx():
            cur = self.db.execute("UPDATE log_groups SET retention_days=? WHERE account=? AND "
                                  "grp=?", (days, account, grp))
            if cur.rowcount == 1 and days:
                self._trim(account, grp, now_ms)
        return cur.rowcount == 1

    def export_account(self, account: str, bytes_max: int) -> dict[str, Any]:
        """The account's groups and their newest events within ``bytes_max`` of messages (a
        tenant migration carries them; older events beyond the budget stay behind)."""
        groups = [[str(g), int(c), r] for g, c, r in self.db.execute(
            "SELECT grp, created_ms, retention_days FROM log_groups WHERE account=? "
            "ORDER BY grp", (account,)).fetchall()]
        events: list[list[Any]] = []
        size = 0
        for row in self.db.execute(
                "SELECT grp, stream, ts_ms, ingest_ms, request_id, message FROM log_events "
                "WHERE account=? ORDER BY id DESC", (account,)):
            size += len(row[5]) + len(row[1]) + 64
            if size > bytes_max:
                break
            events.append(list(row))
        events.reverse()
        return {"groups": groups, "events": events}

    def import_account(self, account: str, doc: dict[str, Any]) -> int:
        """Groups and events from another cell's export; a group already here keeps what it
        has (an import that runs twice adds nothing). Returns the events added."""
        added = 0
        with self._tx():
            fresh: set[str] = set()
            for grp, created, retention in doc.get("groups", []):
                cur = self.db.execute("INSERT OR IGNORE INTO log_groups VALUES (?,?,?,?)",
                                      (account, str(grp), int(created), retention))
                if cur.rowcount == 1:
                    fresh.add(str(grp))
            for grp, stream, ts, ingest, rid, message in doc.get("events", []):
                if grp not in fresh:
                    continue
                self.db.execute(
                    "INSERT INTO log_events (account, grp, stream, ts_ms, ingest_ms, request_id, "
                    "message) VALUES (?,?,?,?,?,?,?)",
                    (account, grp, stream, int(ts), int(ingest), str(rid), str(message)))
                self.db.execute(
                    "INSERT INTO log_streams VALUES (?,?,?,?,?,?,?) ON CONFLICT "
                    "(account, grp, stream) DO UPDATE SET first_ms=min(first_ms, excluded.first_ms),"
                    " last_ms=max(last_ms, excluded.last_ms), last_ingest_ms=max(last_ingest_ms, "
                    "excluded.last_ingest_ms)", (account, grp, stream, int(ingest), int(ts),
                                                 int(ts), int(ingest)))
                added += 1
        return added

    def forget_account(self, account: str) -> None:
        with self._tx():
            for table in ("log_groups", "log_streams", "log_events"):
                self.db.execute(f"DELETE FROM {table} WHERE account=?", (account,))

    # -- reads -----------------------------------------------------------------------------
    def group(self, account: str, grp: str) -> dict[str, Any] | None:
        row = self.db.execute("SELECT created_ms, retention_days FROM log_groups WHERE "
                              "account=? AND grp=?", (account, grp)).fetchone()
        return {"created_ms": int(row[0]), "retention_days": row[1]} if row else None

    def groups(self, account: str, prefix: str, after: str, limit: int
               ) -> list[tuple[str, int, int | None, int]]:
        """(name, created ms, retention days, stored bytes) by name, after ``after``."""
        rows = self.db.execute(
            "SELECT g.grp, g.created_ms, g.retention_days, (SELECT coalesce(sum(length("
            "e.message)), 0) FROM log_events e WHERE e.account=g.account AND e.grp=g.grp) "
            "FROM log_groups g WHERE g.account=? AND g.grp > ? AND substr(g.grp, 1, ?) = ? "
            "ORDER BY g.grp LIMIT ?", (account, after, len(prefix), prefix, limit)).fetchall()
        return [(str(r[0]), int(r[1]), r[2], int(r[3])) for r in rows]

    def streams(self, account: str, grp: str, *, by_time: bool, descending: bool,
                prefix: str, cursor: tuple[int, str] | None, limit: int
                ) -> list[tuple[str, int, int, int, int]]:
        """(stream, created, first event, last event, last ingestion) ordered by name or by
        last event time; ``cursor`` is the (last_ms, name) after which the page starts."""
        order = "DESC" if descending else "ASC"
        cmp = "<" if descending else ">"
        if by_time:
            last_ms, name = cursor if cursor else (None, None)
            where = "" if cursor is None else f"AND (last_ms, stream) {cmp} (?, ?)"
            args: tuple[Any, ...] = (account, grp) + ((last_ms, name) if cursor else ()) + (limit,)
            sql = (f"SELECT stream, created_ms, first_ms, last_ms, last_ingest_ms FROM "
                   f"log_streams WHERE account=? AND grp=? {where} "
                   f"ORDER BY last_ms {order}, stream {order} LIMIT ?")
        else:
            where = "" if cursor is None else f"AND stream {cmp} ?"
            args = (account, grp, len(prefix), prefix) + ((cursor[1],) if cursor else ()) + (
                limit,)
            sql = (f"SELECT stream, created_ms, first_ms, last_ms, last_ingest_ms FROM "
                   f"log_streams WHERE account=? AND grp=? AND substr(stream, 1, ?) = ? {where} "
                   f"ORDER BY stream {order} LIMIT ?")
        return [(str(r[0]), int(r[1]), int(r[2]), int(r[3]), int(r[4]))
                for r in self.db.execute(sql, args).fetchall()]

    def stream_events(self, account: str, grp: str, stream: str, *, start: int | None,
                      end: int | None, after_id: int | None, before_id: int | None,
                      from_head: bool, limit: int) -> list[Event]:
        """One stream's events in id order: the first ``limit`` after ``after_id`` (or from
        the head), or the last ``limit`` before ``before_id`` (or before the tail)."""
        conds = ["account=?", "grp=?", "stream=?"]
        args: list[Any] = [account, grp, stream]
        if start is not None:
            conds.append("ts_ms >= ?")
            args.append(start)
        if end is not None:
            conds.append("ts_ms < ?")
            args.append(end)
        if after_id is not None:
            conds.append("id > ?")
            args.append(after_id)
        if before_id is not None:
            conds.append("id < ?")
            args.append(before_id)
        ascending = from_head or after_id is not None
        events = self._events(conds, args, f"id {'ASC' if ascending else 'DESC'}", limit)
        return events if ascending else events[::-1]

    def scan(self, account: str, grp: str, *, streams: list[str] | None, start: int | None,
             end: int | None, after: tuple[int, int] | None, limit: int) -> list[Event]:
        """A group's events by (timestamp, id), after the ``after`` position, at most
        ``limit`` (the caller's bound on what one FilterLogEvents call looks at)."""
        conds = ["account=?", "grp=?"]
        args: list[Any] = [account, grp]
        if streams:
            conds.append(f"stream IN ({','.join('?' * len(streams))})")
            args.extend(streams)
        if start is not None:
            conds.append("ts_ms >= ?")
            args.append(start)
        if end is not None:
            conds.append("ts_ms <= ?")
            args.append(end)
        if after is not None:
            conds.append("(ts_ms, id) > (?, ?)")
            args.extend(after)
        return self._events(conds, args, "ts_ms, id", limit)

    def recent_requests(self, account: str, grp: str, limit: int) -> list[tuple[str, int]]:
        """The latest request ids that logged in a group, newest first, with their time."""
        rows = self.db.execute(
            "SELECT request_id, max(ts_ms) FROM (SELECT id, request_id, ts_ms FROM log_events "
            "WHERE account=? AND grp=? AND request_id != '' ORDER BY id DESC LIMIT ?) "
            "GROUP BY request_id ORDER BY max(id) DESC LIMIT ?",
            (account, grp, limit * 50, limit)).fetchall()
        return [(str(r[0]), int(r[1])) for r in rows]

    def request_events(self, account: str, grp: str, request_id: str, limit: int) -> list[Event]:
        return self._events(["account=?", "grp=?", "request_id=?"], [account, grp, request_id],
                            "id", limit)

    def _events(self, conds: list[str], args: list[Any], order: str, limit: int) -> list[Event]:
        """The events matching every condition (SQL with ``?`` placeholders; never a caller's
        text), in ``order``, at most ``limit``."""
        rows = self.db.execute(
            "SELECT id, stream, ts_ms, ingest_ms, request_id, message FROM log_events WHERE "
            + " AND ".join(conds) + f" ORDER BY {order} LIMIT ?", (*args, limit)).fetchall()
        return [Event(int(r[0]), str(r[1]), int(r[2]), int(r[3]), str(r[4]), str(r[5]))
                for r in rows]

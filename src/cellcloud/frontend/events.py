"""The cell's durable async event queue and its functions' async settings (one SQLite file).

The frontend *accepts* events here (``Intake.accept``: the row is committed with
``synchronous=FULL`` — WAL fsync — before the 202 leaves); the cell's dispatcher process
(dispatcher.py) *claims* them under a lease, delivers them, and deletes or reschedules them.
Both processes open the same file; WAL lets them work side by side.

Invariants:
- an event row exists from the moment it was acknowledged until its outcome (the invoke's
  result or its failure) has been handed to its destination, or dropped by policy;
- a claimed row carries ``lease_owner`` and ``lease_expiry_ms``; a row whose lease has expired
  is ready again (the dispatcher that held it died or hung), so nothing stays stuck;
- completion is conditional on the lease (``WHERE id=? AND lease_owner=?``), so a dispatcher
  that lost its lease cannot complete or reschedule someone else's delivery.
Delivery is therefore at least once; the event id (the 202's request id) is stable across
redeliveries and is the handler's ``context.aws_request_id``.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import sqlite3
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..core import errors, retry
from ..core.errors import LambdaError
from ..core.limits import DEFAULT_LIMITS, Limits

events_per_function_max = 10_000
events_per_cell_max = 100_000
claim_batch_max = 64
#: the internal header that carries an event's id as the invoke's request id (the router never
#: forwards it, so only the cell's own dispatcher can set it)
EVENT_ID_HEADER = "x-cellcloud-event-id"
#: set on an invoke's 429 when the function's reserved concurrency is 0 (it cannot run at all):
#: the dispatcher then sends the event to its on-failure destination without retrying
RESERVED_ZERO_HEADER = "x-cellcloud-reserved-concurrency"
#: how long a cached queue depth may be used by intake (a bound, not a wait)
depth_cache_ms = 250

SQS_ARN = re.compile(r"^arn:aws[a-zA-Z-]*:sqs:(?P<region>[a-z0-9-]+):(?P<account>\d{12}):"
                     r"(?P<name>[a-zA-Z0-9_-]{1,80})$")
LAMBDA_ARN = re.compile(r"^arn:aws[a-zA-Z-]*:lambda:(?P<region>[a-z0-9-]+):(?P<account>\d{12}):"
                        r"function:(?P<name>[a-zA-Z0-9-_]{1,64})(?::(?P<qualifier>[a-zA-Z0-9-_$]+))?$")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    id TEXT PRIMARY KEY,
    account TEXT NOT NULL,
    name TEXT NOT NULL,
    qualifier TEXT NOT NULL,
    payload BLOB NOT NULL,
    accepted_ms INTEGER NOT NULL,
    timeout_s INTEGER NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    platform_retries INTEGER NOT NULL DEFAULT 0,
    due_ms INTEGER NOT NULL,
    lease_owner TEXT,
    lease_expiry_ms INTEGER NOT NULL DEFAULT 0,
    last_error TEXT
);
CREATE INDEX IF NOT EXISTS events_by_function ON events(account, name, due_ms);
CREATE INDEX IF NOT EXISTS events_by_due ON events(due_ms);
CREATE TABLE IF NOT EXISTS event_ids (
    id TEXT PRIMARY KEY,
    accepted_ms INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS event_ids_by_age ON event_ids(accepted_ms);
CREATE TABLE IF NOT EXISTS event_configs (
    account TEXT NOT NULL,
    name TEXT NOT NULL,
    qualifier TEXT NOT NULL,
    doc TEXT NOT NULL,
    modified_s REAL NOT NULL,
    PRIMARY KEY (account, name, qualifier)
);
"""


def now_ms() -> int:
    return int(time.time() * 1000)


def connect(path: str) -> sqlite3.Connection:
    db = sqlite3.connect(path, isolation_level=None, timeout=10.0, check_same_thread=False)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")  # every commit fsyncs the WAL: an ack means on disk
    db.execute("PRAGMA busy_timeout=10000")
    db.executescript(_SCHEMA)
    if "dead_letter" not in {r[1] for r in db.execute("PRAGMA table_info(events)")}:
        try:  # a file from before DeadLetterConfig
            db.execute("ALTER TABLE events ADD COLUMN dead_letter TEXT NOT NULL DEFAULT ''")
        except sqlite3.OperationalError:  # the other process added it first
            pass
    return db


@dataclass(frozen=True)
class Event:
    id: str
    account: str
    name: str
    qualifier: str
    payload: bytes
    accepted_ms: int
    timeout_s: int
    attempts: int
    platform_retries: int
    #: the function's DeadLetterConfig TargetArn when the event was accepted ("" none)
    dead_letter: str = ""


class EventStore:
    """The SQLite file, as both processes use it."""

    def __init__(self, state_dir: str) -> None:
        os.makedirs(state_dir, exist_ok=True)
        self.path = os.path.join(state_dir, "events.db")
        self.db = connect(self.path)

    # -- intake --------------------------------------------------------------------------------
    def insert(self, ev: Event) -> None:
        self.db.execute(
            "INSERT INTO events (id, account, name, qualifier, payload, accepted_ms, timeout_s,"
            " due_ms, dead_letter) VALUES (?,?,?,?,?,?,?,?,?)",
            (ev.id, ev.account, ev.name, ev.qualifier, ev.payload, ev.accepted_ms, ev.timeout_s,
             ev.accepted_ms, ev.dead_letter))

    def insert_once(self, ev: Event, remembered_ms: int) -> bool:
        """Insert an event whose id the caller chose (a schedule's tick), unless that id was
        accepted within ``remembered_ms``: one transaction, committed before the answer.
        Returns whether it was inserted (False: a re-send, already accepted)."""
        self.db.execute("BEGIN IMMEDIATE")
        try:
            self.db.execute("DELETE FROM event_ids WHERE accepted_ms < ?",
                            (ev.accepted_ms - remembered_ms,))
            if self.db.execute("SELECT 1 FROM event_ids WHERE id=?", (ev.id,)).fetchone():
                self.db.execute("COMMIT")
                return False
            self.db.execute("INSERT INTO event_ids VALUES (?, ?)", (ev.id, ev.accepted_ms))
            self.insert(ev)
            self.db.execute("COMMIT")
            return True
        except BaseException:
            self.db.execute("ROLLBACK")
            raise

    def depth(self, account: str | None = None, name: str | None = None) -> int:
        if account is None:
            row = self.db.execute("SELECT COUNT(*) FROM events").fetchone()
        elif name is None:  # every function of the tenant (a migration's drain waits on it)
            row = self.db.execute("SELECT COUNT(*) FROM events WHERE account=?",
                                  (account,)).fetchone()
        else:
            row = self.db.execute("SELECT COUNT(*) FROM events WHERE account=? AND name=?",
                                  (account, name)).fetchone()
        return int(row[0])

    # -- dispatch ------------------------------------------------------------------------------
    def release_all_leases(self) -> int:
        """Make every in-flight event ready now. Only for a dispatcher that holds the cell's
        dispatcher lock (so every other holder of a lease is dead)."""
        cur = self.db.execute("UPDATE events SET lease_owner=NULL, lease_expiry_ms=0 "
                              "WHERE lease_owner IS NOT NULL")
        return cur.rowcount

    def claim(self, owner: str, now: int, total: int, per_function_max: int,
              inflight: dict[tuple[str, str], int], start: int = 0) -> list[Event]:
        """Lease up to ``total`` ready events, fairly: functions take turns (round robin from
        ``start``), each up to ``per_function_max`` in flight (``inflight`` holds what it has
        already), so one function's backlog cannot starve another's."""
        if total <= 0:
            return []
        self.db.execute("BEGIN IMMEDIATE")
        try:
            fns = [(a, n) for a, n in self.db.execute(
                "SELECT DISTINCT account, name FROM events WHERE due_ms<=? AND lease_expiry_ms<=?",
                (now, now)) if inflight.get((a, n), 0) < per_function_max]
            fns.sort()
            if fns:
                k = start % len(fns)
                fns = fns[k:] + fns[:k]
            picked: list[Event] = []
            want = {fn: per_function_max - inflight.get(fn, 0) for fn in fns}
            # Round robin, one event per function per round, until slots or total run out.
            while len(picked) < total and any(want.values()):
                for fn in fns:
                    if len(picked) >= total or want[fn] <= 0:
                        continue
                    row = self.db.execute(
                        "SELECT id, account, name, qualifier, payload, accepted_ms, timeout_s,"
                        " attempts, platform_retries, dead_letter FROM events WHERE account=? AND"
                        " name=? AND"
                        " due_ms<=? AND lease_expiry_ms<=? ORDER BY due_ms, accepted_ms LIMIT 1",
                        (fn[0], fn[1], now, now)).fetchone()
                    if row is None:
                        want[fn] = 0
                        continue
                    ev = Event(row[0], row[1], row[2], row[3], bytes(row[4]), row[5], row[6],
                               row[7], row[8], row[9])
                    self.db.execute(
                        "UPDATE events SET lease_owner=?, lease_expiry_ms=? WHERE id=?",
                        (owner, retry.lease_expiry_ms(now, ev.timeout_s), ev.id))
                    picked.append(ev)
                    want[fn] -= 1
            self.db.execute("COMMIT")
            return picked
        except BaseException:
            self.db.execute("ROLLBACK")
            raise

    def complete(self, event_id: str, owner: str) -> bool:
        cur = self.db.execute("DELETE FROM events WHERE id=? AND lease_owner=?", (event_id, owner))
        return cur.rowcount == 1

    def reschedule(self, event_id: str, owner: str, due_ms: int, attempts: int,
                   platform_retries: int, error: str) -> bool:
        cur = self.db.execute(
            "UPDATE events SET due_ms=?, attempts=?, platform_retries=?, lease_owner=NULL,"
            " lease_expiry_ms=0, last_error=? WHERE id=? AND lease_owner=?",
            (due_ms, attempts, platform_retries, error[:1000], event_id, owner))
        return cur.rowcount == 1

    def backlog(self, now: int) -> list[dict[str, Any]]:
        """Per function: queued events, in flight, and the age of the oldest (the fairness
        metric ``cellcloud_async_oldest_event_age_ms``)."""
        rows = self.db.execute(
            "SELECT account, name, COUNT(*), MIN(accepted_ms), SUM(lease_expiry_ms > ?) "
            "FROM events GROUP BY account, name", (now,)).fetchall()
        return [{"account": a, "function": n, "queued": c, "in_flight": int(f or 0),
                 "oldest_age_ms": max(0, now - int(m))} for a, n, c, m, f in rows]

    # -- async settings ------------------------------------------------------------------------
    def put_config(self, account: str, name: str, qualifier: str, doc: dict[str, Any]) -> float:
        t = time.time()
        self.db.execute("INSERT OR REPLACE INTO event_configs VALUES (?,?,?,?,?)",
                        (account, name, qualifier, json.dumps(doc), t))
        return t

    def get_config(self, account: str, name: str,
                   qualifier: str) -> tuple[dict[str, Any], float] | None:
        row = self.db.execute("SELECT doc, modified_s FROM event_configs WHERE account=? AND "
                              "name=? AND qualifier=?", (account, name, qualifier)).fetchone()
        return None if row is None else (json.loads(row[0]), float(row[1]))

    def delete_config(self, account: str, name: str, qualifier: str) -> bool:
        cur = self.db.execute("DELETE FROM event_configs WHERE account=? AND name=? AND "
                              "qualifier=?", (account, name, qualifier))
        return cur.rowcount == 1

    def list_configs(self, account: str, name: str) -> list[tuple[str, dict[str, Any], float]]:
        rows = self.db.execute("SELECT qualifier, doc, modified_s FROM event_configs WHERE "
                               "account=? AND name=? ORDER BY qualifier", (account, name))
        return [(q, json.loads(d), float(m)) for q, d, m in rows]


def policy_of(doc: dict[str, Any] | None) -> retry.AsyncPolicy:
    if not doc:
        return retry.AsyncPolicy()
    dest = doc.get("DestinationConfig") or {}
    return retry.AsyncPolicy(
        retry_attempts_max=int(doc.get("MaximumRetryAttempts", retry.retry_attempts_default)),
        event_age_ms_max=int(doc.get("MaximumEventAgeInSeconds", retry.event_age_s_default))
        * 1000,
        on_success=(dest.get("OnSuccess") or {}).get("Destination") or None,
        on_failure=(dest.get("OnFailure") or {}).get("Destination") or None,
    )


def check_config(doc: dict[str, Any], region: str, account: str,
                 base: dict[str, Any] | None = None) -> dict[str, Any]:
    """Validate a Put/UpdateFunctionEventInvokeConfig body; Update merges into ``base``."""
    out: dict[str, Any] = dict(base or {})
    if "MaximumRetryAttempts" in doc and doc["MaximumRetryAttempts"] is not None:
        v = doc["MaximumRetryAttempts"]
        if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= retry.retry_attempts_max:
            raise LambdaError(400, "ValidationException",
                              f"1 validation error detected: Value '{v}' at "
                              "'maximumRetryAttempts' failed to satisfy constraint: Member must "
                              f"have value between 0 and {retry.retry_attempts_max}")
        out["MaximumRetryAttempts"] = v
    if "MaximumEventAgeInSeconds" in doc and doc["MaximumEventAgeInSeconds"] is not None:
        v = doc["MaximumEventAgeInSeconds"]
        if (isinstance(v, bool) or not isinstance(v, int)
                or not retry.event_age_s_min <= v <= retry.event_age_s_max):
            raise LambdaError(400, "ValidationException",
                              f"1 validation error detected: Value '{v}' at "
                              "'maximumEventAgeInSeconds' failed to satisfy constraint: Member "
                              f"must have value between {retry.event_age_s_min} and "
                              f"{retry.event_age_s_max}")
        out["MaximumEventAgeInSeconds"] = v
    if "DestinationConfig" in doc and doc["DestinationConfig"] is not None:
        dc = doc["DestinationConfig"]
        if not isinstance(dc, dict):
            raise errors.invalid("DestinationConfig must be an object")
        merged = dict(out.get("DestinationConfig") or {})
        for key in ("OnSuccess", "OnFailure"):
            if key not in dc:
                continue
            arn = (dc[key] or {}).get("Destination") if isinstance(dc[key], dict) else None
            if arn:
                check_destination(arn, region, account)
                merged[key] = {"Destination": arn}
            else:
                merged.pop(key, None)
        out["DestinationConfig"] = merged
    return out


def check_destination(arn: object, region: str, account: str) -> str:
    if not isinstance(arn, str):
        raise errors.invalid("Destination must be an ARN")
    m = SQS_ARN.match(arn) or LAMBDA_ARN.match(arn)
    if m is None:
        raise errors.invalid(f"The destination ARN {arn} is invalid: cellcloud supports "
                             "arn:aws:sqs:REGION:ACCOUNT:QUEUE and Lambda function ARNs.")
    if m["region"] != region or m["account"] != account:
        raise errors.invalid(f"The destination {arn} must be in this region ({region}) and "
                             "account.")
    return arn


class Intake:
    """The frontend's half: accept events durably (or shed them), serve the async settings."""

    def __init__(self, store: EventStore, *, ack_before_write: bool = False,
                 limits: Limits = DEFAULT_LIMITS) -> None:
        self.store = store
        self.limits = limits
        # A planted bug for the chaos experiment: answer 202 first, write later. The chaos
        # run must report the events this loses.
        self.ack_before_write = ack_before_write
        self._unwritten: list[Event] = []
        self._depth = (0, -depth_cache_ms)
        self.counters = {"accepted": 0, "shed": 0, "deduplicated": 0}
        #: whether an SQS queue exists (the cell's queues; set by frontend/server.py), for
        #: DeadLetterConfig
        self.queue_exists: Callable[[str, str], bool] | None = None

    def accept(self, account: str, name: str, qualifier: str, payload: bytes,
               timeout_s: int, dead_letter: str = "", event_id: str | None = None) -> str:
        """Accept an event durably; returns its id. ``event_id`` (internal callers only: a
        schedule's tick) is accepted once: a re-send of an id already accepted is answered with
        it and not queued again (counted as ``deduplicated``)."""
        if len(payload) > self.limits.event_payload_bytes_max:
            raise LambdaError(413, "RequestEntityTooLargeException",
                              f"{len(payload)} byte payload is too large for the Event "
                              f"invocation type (limit {self.limits.event_payload_bytes_max} "
                              "bytes)")
        now = now_ms()
        depth, at = self._depth
        if now - at >= depth_cache_ms:
            depth = self.store.depth()
        if depth >= events_per_cell_max:
            self.counters["shed"] += 1
            raise errors.too_many("Rate Exceeded. The cell's async event queue is full.",
                                  "AsyncQueueFull")
        if self.store.depth(account, name) >= events_per_function_max:
            self.counters["shed"] += 1
            raise errors.too_many(f"Rate Exceeded. The async event queue of {name} is full.",
                                  "FunctionAsyncQueueFull")
        ev = Event(event_id or str(uuid.uuid4()), account, name, qualifier, payload, now,
                   timeout_s, 0, 0, dead_letter)
        if event_id is not None:
            if not self.store.insert_once(ev, self.limits.async_event_ids_remembered_ms):
                self.counters["deduplicated"] += 1
                return ev.id
        elif self.ack_before_write:
            self._unwritten.append(ev)
            if len(self._unwritten) == 1:
                asyncio.get_running_loop().call_later(2.0, self.flush_unwritten)
        else:
            self.store.insert(ev)  # committed and fsynced before we answer
        self._depth = (depth + 1, now if now - at >= depth_cache_ms else at)
        self.counters["accepted"] += 1
        return ev.id

    def flush_unwritten(self) -> None:
        rows, self._unwritten = self._unwritten, []
        for ev in rows:
            self.store.insert(ev)

    def statistics(self) -> dict[str, Any]:
        return {**self.counters, "backlog": self.store.backlog(now_ms())}

"""Queues and their messages in one SQLite file (WAL, fsync on commit), time passed in.

A message is visible when ``visible_ms <= now``; receiving it hides it for the visibility
timeout and gives it a fresh receipt handle; deleting needs the latest receipt handle. A
message is kept until deleted or older than the queue's retention period.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import os
import secrets
import sqlite3
import uuid
from dataclasses import dataclass, field
from typing import Any

from ..core import fifo
from ..core.limits import DEFAULT_LIMITS

queues_per_account_max = 1000
messages_per_queue_max = 100_000
message_bytes_max = 256 * 1024
receive_batch_max = 10
visibility_timeout_s_default = 30
visibility_timeout_s_max = 43_200
retention_s_default = 345_600  # 4 days, as SQS
retention_s_max = 1_209_600
#: visible messages of a FIFO queue looked at per receive to find groups not in flight
fifo_scan_max = 1000

_SCHEMA = """
CREATE TABLE IF NOT EXISTS queues (
    account TEXT NOT NULL,
    name TEXT NOT NULL,
    created_ms INTEGER NOT NULL,
    attributes TEXT NOT NULL,
    PRIMARY KEY (account, name)
);
CREATE TABLE IF NOT EXISTS messages (
    id TEXT PRIMARY KEY,
    account TEXT NOT NULL,
    queue TEXT NOT NULL,
    body TEXT NOT NULL,
    sent_ms INTEGER NOT NULL,
    visible_ms INTEGER NOT NULL,
    receive_count INTEGER NOT NULL DEFAULT 0,
    receipt TEXT
);
CREATE INDEX IF NOT EXISTS messages_by_queue ON messages(account, queue, visible_ms, sent_ms);
CREATE INDEX IF NOT EXISTS messages_by_receipt ON messages(receipt);
CREATE TABLE IF NOT EXISTS meta (k TEXT PRIMARY KEY, v TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS fifo_dedup (
    account TEXT NOT NULL,
    queue TEXT NOT NULL,
    scope_key TEXT NOT NULL,
    dedup_id TEXT NOT NULL,
    msg_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    sent_ms INTEGER NOT NULL,
    PRIMARY KEY (account, queue, scope_key, dedup_id)
);
"""
#: columns added after the first schema (ALTER TABLE on an older file)
_ADDED = {"messages": [("msg_attrs", "TEXT NOT NULL DEFAULT '{}'"),
                       ("first_receive_ms", "INTEGER NOT NULL DEFAULT 0"),
                       ("dead_from", "TEXT"),
                       # FIFO queues: the group, the deduplication id, the sequence number
                       ("grp", "TEXT"), ("dedup", "TEXT"), ("seq", "INTEGER")],
          "queues": [("tags", "TEXT NOT NULL DEFAULT '{}'")]}


def receipt_invalid(detail: str = "") -> QueueError:
    return QueueError("ReceiptHandleIsInvalid", "ReceiptHandleIsInvalid",
                      f"The input receipt handle is invalid.{' ' + detail if detail else ''}")


class QueueError(Exception):
    """An SQS-shaped error: the modelled type, its query-compatible code, a message."""

    def __init__(self, type_: str, code: str, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.type = type_
        self.code = code
        self.message = message
        self.status = status


def no_such_queue() -> QueueError:
    return QueueError("QueueDoesNotExist", "AWS.SimpleQueueService.NonExistentQueue",
                      "The specified queue does not exist.")


def invalid(message: str) -> QueueError:
    return QueueError("InvalidParameterValue", "InvalidParameterValue", message)


@dataclass(frozen=True)
class Message:
    id: str
    body: str
    md5: str
    receipt: str
    receive_count: int
    sent_ms: int
    #: message attributes and system attributes, as sent ({name: {DataType, StringValue |
    #: BinaryValue}}; system ones under the key "$system")
    attrs: dict[str, Any] = field(default_factory=dict)
    first_receive_ms: int = 0
    group: str | None = None
    dedup: str | None = None
    seq: int | None = None


@dataclass(frozen=True)
class Outgoing:
    """One message to send: its body, delay and attributes (already validated)."""
    body: str
    delay_s: int
    attrs: dict[str, Any] = field(default_factory=dict)
    #: FIFO queues: the group, the deduplication id, and the scope it is compared in
    group: str | None = None
    dedup: str | None = None
    dedup_scope_key: str = ""


def md5_hex(body: str) -> str:
    return hashlib.md5(body.encode()).hexdigest()


def md5_of_attributes(attrs: dict[str, Any]) -> str:
    """SQS's MD5OfMessageAttributes: over the attributes sorted by name, each as
    len(name) name len(type) type transport(1 string|2 binary) len(value) value, lengths as
    4-byte big-endian integers, strings UTF-8, binary values decoded from base64."""
    h = hashlib.md5()
    for name in sorted(attrs):
        a = attrs[name]
        dtype = str(a["DataType"])
        for part in (name.encode(), dtype.encode()):
            h.update(len(part).to_bytes(4, "big") + part)
        if "BinaryValue" in a and a["BinaryValue"] is not None:
            value = base64.b64decode(a["BinaryValue"])
            h.update(b"\x02")
        else:
            value = str(a["StringValue"]).encode()
            h.update(b"\x01")
        h.update(len(value).to_bytes(4, "big") + value)
    return h.hexdigest()


def redrive_target(attrs: dict[str, str], account: str) -> tuple[str | None, int]:
    """The dead-letter queue's name (same account; checked when the policy was set) and
    maxReceiveCount of a queue's RedrivePolicy, or (None, 0)."""
    policy = attrs.get("RedrivePolicy")
    if not policy:
        return None, 0
    doc = json.loads(policy)
    return str(doc["deadLetterTargetArn"]).rsplit(":", 1)[1], int(doc["maxReceiveCount"])


class QueueStore:
    def __init__(self, state_dir: str) -> None:
        os.makedirs(state_dir, exist_ok=True)
        self.path = os.path.join(state_dir, "queues.db")
        self.db = sqlite3.connect(self.path, isolation_level=None, timeout=10.0,
                                  check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.executescript(_SCHEMA)
        for table, cols in _ADDED.items():
            have = {r[1] for r in self.db.execute(f"PRAGMA table_info({table})")}
            for col, decl in cols:
                if col not in have:
                    self.db.execute(f"ALTER TABLE {table} ADD COLUMN {col} {decl}")
        row = self.db.execute("SELECT v FROM meta WHERE k='receipt_key'").fetchone()
        if row is None:
            self.db.execute("INSERT OR IGNORE INTO meta VALUES ('receipt_key', ?)",
                            (secrets.token_hex(32),))
            row = self.db.execute("SELECT v FROM meta WHERE k='receipt_key'").fetchone()
        self._receipt_key = bytes.fromhex(row[0])

    # -- receipt handles: the queue and message they belong to, signed (a forged one is refused)

    def _receipt(self, account: str, name: str, mid: str) -> str:
        raw = f"{account}/{name}/{mid}/{uuid.uuid4().hex}".encode()
        mac = hmac.new(self._receipt_key, raw, hashlib.sha256).digest()[:16]
        return base64.urlsafe_b64encode(raw + mac).decode()

    def check_receipt(self, account: str, name: str, receipt: str) -> str:
        """The message id a receipt handle names, if this store issued it for this queue."""
        try:
            blob = base64.urlsafe_b64decode(receipt.encode())
        except (binascii.Error, ValueError):
            raise receipt_invalid() from None
        raw, mac = blob[:-16], blob[-16:]
        good = hmac.new(self._receipt_key, raw, hashlib.sha256).digest()[:16]
        if len(blob) <= 16 or not hmac.compare_digest(mac, good):
            raise receipt_invalid()
        parts = raw.decode(errors="replace").split("/")
        if len(parts) != 4 or parts[0] != account or parts[1] != name:
            raise receipt_invalid("It belongs to another queue.")
        return parts[2]

    def create(self, account: str, name: str, attributes: dict[str, str], now_ms: int,
               tags: dict[str, str] | None = None) -> None:
        row = self.db.execute("SELECT attributes FROM queues WHERE account=? AND name=?",
                              (account, name)).fetchone()
        if row is not None:
            if attributes and any(json.loads(row[0]).get(k) != v for k, v in attributes.items()):
                raise QueueError("QueueNameExists", "QueueAlreadyExists",
                                 f"A queue already exists with the same name and a different "
                                 f"value for an attribute: {name}")
            return
        n = self.db.execute("SELECT COUNT(*) FROM queues WHERE account=?", (account,)).fetchone()
        if n[0] >= queues_per_account_max:
            raise QueueError("OverLimit", "OverLimit",
                             f"An account may have at most {queues_per_account_max} queues.",
                             403)
        self.db.execute("INSERT INTO queues (account, name, created_ms, attributes, tags) "
                        "VALUES (?,?,?,?,?)",
                        (account, name, now_ms, json.dumps(attributes), json.dumps(tags or {})))

    def set_attributes(self, account: str, name: str, changes: dict[str, str]) -> None:
        """Merge ``changes`` (an empty value removes the attribute) in one write."""
        _, attrs = self.attributes(account, name)
        for k, v in changes.items():
            if v == "":
                attrs.pop(k, None)
            else:
                attrs[k] = v
        self.db.execute("UPDATE queues SET attributes=? WHERE account=? AND name=?",
                        (json.dumps(attrs), account, name))

    def tags(self, account: str, name: str) -> dict[str, str]:
        row = self.db.execute("SELECT tags FROM queues WHERE account=? AND name=?",
                              (account, name)).fetchone()
        if row is None:
            raise no_such_queue()
        tags: dict[str, str] = json.loads(row[0])
        return tags

    def set_tags(self, account: str, name: str, tags: dict[str, str]) -> None:
        self.db.execute("UPDATE queues SET tags=? WHERE account=? AND name=?",
                        (json.dumps(tags), account, name))

    def exists(self, account: str, name: str) -> bool:
        return self.db.execute("SELECT 1 FROM queues WHERE account=? AND name=?",
                               (account, name)).fetchone() is not None

    def attributes(self, account: str, name: str) -> tuple[int, dict[str, str]]:
        row = self.db.execute("SELECT created_ms, attributes FROM queues WHERE account=? AND "
                              "name=?", (account, name)).fetchone()
        if row is None:
            raise no_such_queue()
        return int(row[0]), json.loads(row[1])

    def list_names(self, account: str, prefix: str) -> list[str]:
        rows = self.db.execute("SELECT name FROM queues WHERE account=? ORDER BY name LIMIT ?",
                               (account, queues_per_account_max))
        return [n for (n,) in rows if n.startswith(prefix)]

    def delete_queue(self, account: str, name: str) -> None:
        self.attributes(account, name)
        self.db.execute("DELETE FROM messages WHERE account=? AND queue=?", (account, name))
        self.db.execute("DELETE FROM queues WHERE account=? AND name=?", (account, name))

    def send(self, account: str, name: str, body: str, now_ms: int, delay_s: int = 0,
             attrs: dict[str, Any] | None = None) -> Message:
        return self.send_many(account, name, [Outgoing(body, delay_s, attrs or {})], now_ms)[0]

    def send_many(self, account: str, name: str, batch: list[Outgoing],
                  now_ms: int) -> list[Message]:
        """Store every message of ``batch`` or none (one transaction)."""
        _, attrs = self.attributes(account, name)
        for m in batch:
            if len(m.body.encode()) > message_bytes_max:
                raise invalid(f"One or more parameters are invalid. Reason: Message must be "
                              f"shorter than {message_bytes_max} bytes.")
        self.expire(account, name, now_ms, attrs)
        visible, hidden = self.counts(account, name, now_ms)
        if visible + hidden + len(batch) > messages_per_queue_max:
            raise QueueError("OverLimit", "OverLimit",
                             f"The queue holds its maximum of {messages_per_queue_max} messages.",
                             403)
        out = []
        self.db.execute("BEGIN IMMEDIATE")
        try:
            for m in batch:
                mid = str(uuid.uuid4())
                seq = None
                if m.group is not None:
                    assert m.dedup is not None
                    seen = self.db.execute(
                        "SELECT msg_id, seq, sent_ms FROM fifo_dedup WHERE account=? AND "
                        "queue=? AND scope_key=? AND dedup_id=?",
                        (account, name, m.dedup_scope_key, m.dedup)).fetchone()
                    if seen is not None and fifo.is_duplicate(seen[2], now_ms):
                        # accepted, not stored again: the first message's id and number
                        out.append(Message(seen[0], m.body, md5_hex(m.body), "", 0, now_ms,
                                           m.attrs, group=m.group, dedup=m.dedup,
                                           seq=seen[1]))
                        continue
                    seq = self._next_seq(account, name)
                    self.db.execute("INSERT OR REPLACE INTO fifo_dedup VALUES (?,?,?,?,?,?,?)",
                                    (account, name, m.dedup_scope_key, m.dedup, mid, seq,
                                     now_ms))
                self.db.execute(
                    "INSERT INTO messages (id, account, queue, body, sent_ms, visible_ms, "
                    "msg_attrs, grp, dedup, seq) VALUES (?,?,?,?,?,?,?,?,?,?)",
                    (mid, account, name, m.body, now_ms, now_ms + m.delay_s * 1000,
                     json.dumps(m.attrs), m.group, m.dedup, seq))
                out.append(Message(mid, m.body, md5_hex(m.body), "", 0, now_ms, m.attrs,
                                   group=m.group, dedup=m.dedup, seq=seq))
            self.db.execute("DELETE FROM fifo_dedup WHERE account=? AND queue=? AND sent_ms<?",
                            (account, name, now_ms - DEFAULT_LIMITS.sqs_fifo_dedup_window_ms))
            self.db.execute("COMMIT")
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        return out

    def _next_seq(self, account: str, name: str) -> int:
        key = f"seq/{account}/{name}"
        row = self.db.execute("SELECT v FROM meta WHERE k=?", (key,)).fetchone()
        seq = (int(row[0]) if row else 0) + 1
        self.db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, str(seq)))
        return seq

    def expire(self, account: str, name: str, now_ms: int, attrs: dict[str, str]) -> None:
        retention_s = int(attrs.get("MessageRetentionPeriod", retention_s_default))
        self.db.execute("DELETE FROM messages WHERE account=? AND queue=? AND sent_ms<?",
                        (account, name, now_ms - retention_s * 1000))

    def receive(self, account: str, name: str, n: int, visibility_s: int | None,
                now_ms: int) -> list[Message]:
        """Up to ``n`` visible messages, hidden for the visibility timeout. A message already
        received ``maxReceiveCount`` times moves to the RedrivePolicy's dead-letter queue
        instead (keeping its id, body, attributes and sent time)."""
        _, attrs = self.attributes(account, name)
        self.expire(account, name, now_ms, attrs)
        if visibility_s is None:
            visibility_s = int(attrs.get("VisibilityTimeout", visibility_timeout_s_default))
        dlq, max_receives = redrive_target(attrs, account)
        self.db.execute("BEGIN IMMEDIATE")
        try:
            out: list[Message] = []
            while len(out) < n:
                rows = self._receivable(account, name, n - len(out), now_ms)
                if not rows:
                    break
                for mid, body, count, sent, mattrs, first, grp, dedup, seq in rows:
                    if dlq is not None and count >= max_receives:
                        self.db.execute(
                            "UPDATE messages SET queue=?, receive_count=0, receipt=NULL, "
                            "visible_ms=?, first_receive_ms=0, dead_from=? WHERE id=?",
                            (dlq, now_ms, name, mid))
                        continue
                    receipt = self._receipt(account, name, mid)
                    first = first or now_ms
                    self.db.execute(
                        "UPDATE messages SET visible_ms=?, receive_count=?, receipt=?, "
                        "first_receive_ms=? WHERE id=?",
                        (now_ms + visibility_s * 1000, count + 1, receipt, first, mid))
                    out.append(Message(mid, body, md5_hex(body), receipt, count + 1, sent,
                                       json.loads(mattrs), first, grp, dedup, seq))
            self.db.execute("COMMIT")
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        return out

    def _receivable(self, account: str, name: str, n: int, now_ms: int) -> list[Any]:
        cols = ("SELECT id, body, receive_count, sent_ms, msg_attrs, first_receive_ms, grp, "
                "dedup, seq FROM messages WHERE account=? AND queue=? AND visible_ms<=? ")
        if not fifo.is_fifo(name):
            return self.db.execute(cols + "ORDER BY sent_ms LIMIT ?",
                                   (account, name, now_ms, n)).fetchall()
        busy = {g for (g,) in self.db.execute(
            "SELECT DISTINCT grp FROM messages WHERE account=? AND queue=? AND visible_ms>? "
            "AND receive_count>0", (account, name, now_ms))}
        heads = self.db.execute(
            "SELECT id, grp, seq FROM messages WHERE account=? AND queue=? AND visible_ms<=? "
            "ORDER BY seq LIMIT ?", (account, name, now_ms, fifo_scan_max)).fetchall()
        chosen = fifo.pick([fifo.Candidate(i, g, q) for i, g, q in heads], busy, n)
        rows = []
        for c in chosen:
            rows.append(self.db.execute(cols.replace("visible_ms<=? ", "id=?"),
                                        (account, name, c.id)).fetchone())
        return rows

    def change_visibility(self, account: str, name: str, receipt: str, timeout_s: int,
                          now_ms: int) -> None:
        """Hide the message a (current) receipt handle names for ``timeout_s`` from now."""
        mid = self.check_receipt(account, name, receipt)
        row = self.db.execute("SELECT receipt, visible_ms FROM messages WHERE id=? AND "
                              "account=? AND queue=?", (mid, account, name)).fetchone()
        if row is None:
            raise invalid(f"Value {receipt} for parameter ReceiptHandle is invalid. Reason: "
                          "Message does not exist or is not available for visibility timeout "
                          "change.")
        if row[0] != receipt:
            raise invalid(f"Value {receipt} for parameter ReceiptHandle is invalid. Reason: "
                          "The receipt handle has expired.")
        if row[1] <= now_ms:
            raise QueueError("MessageNotInflight", "AWS.SimpleQueueService.MessageNotInflight",
                             "The message referred to isn't in flight.")
        self.db.execute("UPDATE messages SET visible_ms=? WHERE id=?",
                        (now_ms + timeout_s * 1000, mid))

    def delete(self, account: str, name: str, receipt: str) -> None:
        self.attributes(account, name)
        self.check_receipt(account, name, receipt)
        # A stale receipt handle deletes nothing and is not an error (as SQS).
        self.db.execute("DELETE FROM messages WHERE account=? AND queue=? AND receipt=?",
                        (account, name, receipt))

    def delete_many(self, account: str, name: str, receipts: list[str]) -> None:
        """Delete by receipt handles, already checked (:meth:`check_receipt`), in one
        transaction (one fsync for a batch)."""
        self.attributes(account, name)
        self.db.execute("BEGIN IMMEDIATE")
        try:
            for receipt in receipts:
                self.db.execute("DELETE FROM messages WHERE account=? AND queue=? AND receipt=?",
                                (account, name, receipt))
            self.db.execute("COMMIT")
        except BaseException:
            self.db.execute("ROLLBACK")
            raise

    def purge(self, account: str, name: str) -> int:
        self.attributes(account, name)
        return self.db.execute("DELETE FROM messages WHERE account=? AND queue=?",
                               (account, name)).rowcount

    def counts(self, account: str, name: str, now_ms: int) -> tuple[int, int]:
        """(visible, not visible: in flight or delayed)."""
        visible, in_flight, delayed = self.counts3(account, name, now_ms)
        return visible, in_flight + delayed

    def counts3(self, account: str, name: str, now_ms: int) -> tuple[int, int, int]:
        """(visible, in flight, delayed) — SQS's ApproximateNumberOfMessages,
        ...NotVisible and ...Delayed."""
        row = self.db.execute(
            "SELECT SUM(visible_ms<=?), SUM(visible_ms>? AND receive_count>0), "
            "SUM(visible_ms>? AND receive_count=0) FROM messages WHERE account=? AND "
            "queue=?", (now_ms, now_ms, now_ms, account, name)).fetchone()
        return int(row[0] or 0), int(row[1] or 0), int(row[2] or 0)

    def dead_letter_sources(self, account: str, arn: str) -> list[str]:
        rows = self.db.execute("SELECT name, attributes FROM queues WHERE account=? "
                               "ORDER BY name", (account,))
        out = []
        for qname, attrs in rows:
            policy = json.loads(attrs).get("RedrivePolicy")
            if policy and json.loads(policy).get("deadLetterTargetArn") == arn:
                out.append(qname)
        return out

    def move_back(self, account: str, dlq: str, destination: str | None, now_ms: int) -> int:
        """Move every message of ``dlq`` to ``destination``, or (None) back to the queue each
        came from; one transaction. Returns how many moved."""
        self.db.execute("BEGIN IMMEDIATE")
        try:
            if destination is not None:
                n = self.db.execute(
                    "UPDATE messages SET queue=?, receive_count=0, receipt=NULL, visible_ms=?, "
                    "first_receive_ms=0, dead_from=NULL WHERE account=? AND queue=?",
                    (destination, now_ms, account, dlq)).rowcount
            else:
                n = self.db.execute(
                    "UPDATE messages SET queue=dead_from, receive_count=0, receipt=NULL, "
                    "visible_ms=?, first_receive_ms=0, dead_from=NULL WHERE account=? AND "
                    "queue=? AND dead_from IS NOT NULL AND EXISTS (SELECT 1 FROM queues q "
                    "WHERE q.account=messages.account AND q.name=messages.dead_from)",
                    (now_ms, account, dlq)).rowcount
            self.db.execute("COMMIT")
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        return int(n)

    def peek(self, account: str, name: str, limit: int) -> list[dict[str, Any]]:
        self.attributes(account, name)
        rows = self.db.execute("SELECT id, body, sent_ms, receive_count FROM messages WHERE "
                               "account=? AND queue=? ORDER BY sent_ms LIMIT ?",
                               (account, name, limit))
        return [{"MessageId": m, "Body": b, "SentTimestamp": s, "ReceiveCount": c}
                for m, b, s, c in rows]

"""Queues and their messages in one SQLite file (WAL, fsync on commit), time passed in.

A message is visible when ``visible_ms <= now``; receiving it hides it for the visibility
timeout and gives it a fresh receipt handle; deleting needs the latest receipt handle. A
message is kept until deleted or older than the queue's retention period.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import uuid
from dataclasses import dataclass
from typing import Any

queues_per_account_max = 1000
messages_per_queue_max = 100_000
message_bytes_max = 256 * 1024
receive_batch_max = 10
visibility_timeout_s_default = 30
visibility_timeout_s_max = 43_200
retention_s_default = 345_600  # 4 days, as SQS
retention_s_max = 1_209_600

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
"""


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


def md5_hex(body: str) -> str:
    return hashlib.md5(body.encode()).hexdigest()


class QueueStore:
    def __init__(self, state_dir: str) -> None:
        os.makedirs(state_dir, exist_ok=True)
        self.path = os.path.join(state_dir, "queues.db")
        self.db = sqlite3.connect(self.path, isolation_level=None, timeout=10.0,
                                  check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.executescript(_SCHEMA)

    def create(self, account: str, name: str, attributes: dict[str, str], now_ms: int) -> None:
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
        self.db.execute("INSERT INTO queues VALUES (?,?,?,?)",
                        (account, name, now_ms, json.dumps(attributes)))

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

    def send(self, account: str, name: str, body: str, now_ms: int, delay_s: int = 0) -> Message:
        _, attrs = self.attributes(account, name)
        if len(body.encode()) > message_bytes_max:
            raise invalid(f"One or more parameters are invalid. Reason: Message must be shorter "
                          f"than {message_bytes_max} bytes.")
        self.expire(account, name, now_ms, attrs)
        if self.counts(account, name, now_ms)[0] + self.counts(account, name, now_ms)[1] >= \
                messages_per_queue_max:
            raise QueueError("OverLimit", "OverLimit",
                             f"The queue holds its maximum of {messages_per_queue_max} messages.",
                             403)
        mid = str(uuid.uuid4())
        self.db.execute("INSERT INTO messages (id, account, queue, body, sent_ms, visible_ms) "
                        "VALUES (?,?,?,?,?,?)",
                        (mid, account, name, body, now_ms, now_ms + delay_s * 1000))
        return Message(mid, body, md5_hex(body), "", 0, now_ms)

    def expire(self, account: str, name: str, now_ms: int, attrs: dict[str, str]) -> None:
        retention_s = int(attrs.get("MessageRetentionPeriod", retention_s_default))
        self.db.execute("DELETE FROM messages WHERE account=? AND queue=? AND sent_ms<?",
                        (account, name, now_ms - retention_s * 1000))

    def receive(self, account: str, name: str, n: int, visibility_s: int | None,
                now_ms: int) -> list[Message]:
        _, attrs = self.attributes(account, name)
        if visibility_s is None:
            visibility_s = int(attrs.get("VisibilityTimeout", visibility_timeout_s_default))
        self.db.execute("BEGIN IMMEDIATE")
        try:
            rows = self.db.execute(
                "SELECT id, body, receive_count, sent_ms FROM messages WHERE account=? AND "
                "queue=? AND visible_ms<=? ORDER BY sent_ms LIMIT ?",
                (account, name, now_ms, n)).fetchall()
            out = []
            for mid, body, count, sent in rows:
                receipt = f"{mid}:{uuid.uuid4().hex}"
                self.db.execute("UPDATE messages SET visible_ms=?, receive_count=?, receipt=? "
                                "WHERE id=?", (now_ms + visibility_s * 1000, count + 1, receipt,
                                               mid))
                out.append(Message(mid, body, md5_hex(body), receipt, count + 1, sent))
            self.db.execute("COMMIT")
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        return out

    def delete(self, account: str, name: str, receipt: str) -> None:
        self.attributes(account, name)
        # A stale receipt handle deletes nothing and is not an error (as SQS).
        self.db.execute("DELETE FROM messages WHERE account=? AND queue=? AND receipt=?",
                        (account, name, receipt))

    def purge(self, account: str, name: str) -> int:
        self.attributes(account, name)
        return self.db.execute("DELETE FROM messages WHERE account=? AND queue=?",
                               (account, name)).rowcount

    def counts(self, account: str, name: str, now_ms: int) -> tuple[int, int]:
        row = self.db.execute(
            "SELECT SUM(visible_ms<=?), SUM(visible_ms>?) FROM messages WHERE account=? AND "
            "queue=?", (now_ms, now_ms, account, name)).fetchone()
        return int(row[0] or 0), int(row[1] or 0)

    def peek(self, account: str, name: str, limit: int) -> list[dict[str, Any]]:
        self.attributes(account, name)
        rows = self.db.execute("SELECT id, body, sent_ms, receive_count FROM messages WHERE "
                               "account=? AND queue=? ORDER BY sent_ms LIMIT ?",
                               (account, name, limit))
        return [{"MessageId": m, "Body": b, "SentTimestamp": s, "ReceiveCount": c}
                for m, b, s, c in rows]

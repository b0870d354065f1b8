"""Durable function metadata and code bundles for one cell.

Callers use :class:`FunctionStore` only, so the Physalia colony can replace SQLite later without
touching them. Metadata lives in SQLite (WAL, synchronous=FULL: a create is on disk before it is
acknowledged); bundles are content-addressed files named by their SHA-256.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol


@dataclass
class FunctionRecord:
    account: str
    name: str
    runtime: str
    handler: str
    code_sha256: str  # hex
    code_size: int
    memory_mb: int = 128
    timeout_s: int = 3
    environment: dict[str, str] = field(default_factory=dict)
    description: str = ""
    role: str = ""
    ephemeral_mb: int = 512
    tags: dict[str, str] = field(default_factory=dict)
    revision: int = 1
    revision_id: str = ""
    last_modified: str = ""
    concurrency_max: int | None = None

    @property
    def key(self) -> str:
        """Identifies this exact code+configuration: environments are never shared across keys."""
        return f"{self.account}/{self.name}/{self.revision}"


class FunctionStore(Protocol):
    def get(self, account: str, name: str) -> FunctionRecord | None: ...
    def put_new(self, rec: FunctionRecord) -> bool: ...
    def update(self, rec: FunctionRecord, expected_revision: int) -> bool: ...
    def delete(self, account: str, name: str) -> bool: ...
    def list_page(self, account: str, after: str, limit: int) -> list[FunctionRecord]: ...
    def count(self, account: str) -> int: ...
    def put_bundle(self, sha256_hex: str, data: bytes) -> None: ...
    def get_bundle(self, sha256_hex: str) -> bytes: ...
    def append_logs(self, rows: list[tuple[str, str, int, str, bytes]]) -> None: ...
    def read_logs(self, account: str, name: str, limit: int) -> list[tuple[int, str, bytes]]: ...


_SCHEMA = """
CREATE TABLE IF NOT EXISTS functions (
    account TEXT NOT NULL, name TEXT NOT NULL, doc TEXT NOT NULL, revision INTEGER NOT NULL,
    PRIMARY KEY (account, name)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS logs (
    id INTEGER PRIMARY KEY AUTOINCREMENT, account TEXT NOT NULL, name TEXT NOT NULL,
    ts_ms INTEGER NOT NULL, request_id TEXT NOT NULL, text BLOB NOT NULL);
CREATE INDEX IF NOT EXISTS logs_fn ON logs (account, name, id);
"""


class SqliteFunctionStore:
    def __init__(self, state_dir: str, log_rows_per_function_max: int = 1000) -> None:
        os.makedirs(state_dir, exist_ok=True)
        self.bundles_dir = os.path.join(state_dir, "bundles")
        os.makedirs(self.bundles_dir, exist_ok=True)
        self.db = sqlite3.connect(os.path.join(state_dir, "cell.db"), isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.executescript(_SCHEMA)
        self.log_rows_per_function_max = log_rows_per_function_max

    @staticmethod
    def _decode(doc: str) -> FunctionRecord:
        return FunctionRecord(**json.loads(doc))

    def get(self, account: str, name: str) -> FunctionRecord | None:
        row = self.db.execute(
            "SELECT doc FROM functions WHERE account=? AND name=?", (account, name)).fetchone()
        return self._decode(row[0]) if row else None

    def put_new(self, rec: FunctionRecord) -> bool:
        try:
            self.db.execute("INSERT INTO functions VALUES (?,?,?,?)",
                            (rec.account, rec.name, json.dumps(asdict(rec)), rec.revision))
        except sqlite3.IntegrityError:
            return False
        return True

    def update(self, rec: FunctionRecord, expected_revision: int) -> bool:
        cur = self.db.execute(
            "UPDATE functions SET doc=?, revision=? WHERE account=? AND name=? AND revision=?",
            (json.dumps(asdict(rec)), rec.revision, rec.account, rec.name, expected_revision))
        return cur.rowcount == 1

    def delete(self, account: str, name: str) -> bool:
        cur = self.db.execute("DELETE FROM functions WHERE account=? AND name=?", (account, name))
        self.db.execute("DELETE FROM logs WHERE account=? AND name=?", (account, name))
        return cur.rowcount == 1

    def list_page(self, account: str, after: str, limit: int) -> list[FunctionRecord]:
        rows = self.db.execute(
            "SELECT doc FROM functions WHERE account=? AND name>? ORDER BY name LIMIT ?",
            (account, after, limit)).fetchall()
        return [self._decode(r[0]) for r in rows]

    def count(self, account: str) -> int:
        row = self.db.execute("SELECT count(*) FROM functions WHERE account=?", (account,)).fetchone()
        return int(row[0])

    def put_bundle(self, sha256_hex: str, data: bytes) -> None:
        path = os.path.join(self.bundles_dir, sha256_hex + ".zip")
        if os.path.exists(path):
            return
        tmp = f"{path}.tmp-{os.getpid()}-{time.monotonic_ns()}"
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.rename(tmp, path)
        dfd = os.open(self.bundles_dir, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)

    def get_bundle(self, sha256_hex: str) -> bytes:
        with open(os.path.join(self.bundles_dir, sha256_hex + ".zip"), "rb") as f:
            return f.read()

    def append_logs(self, rows: list[tuple[str, str, int, str, bytes]]) -> None:
        # Logs are not acknowledged to anyone: a lost tail after a crash is acceptable, so one
        # transaction for the whole batch and no fsync of its own.
        self.db.execute("BEGIN")
        self.db.executemany(
            "INSERT INTO logs (account, name, ts_ms, request_id, text) VALUES (?,?,?,?,?)", rows)
        for account, name in {(r[0], r[1]) for r in rows}:
            self.db.execute(
                "DELETE FROM logs WHERE account=? AND name=? AND id <= "
                "(SELECT id FROM logs WHERE account=? AND name=? ORDER BY id DESC LIMIT 1 OFFSET ?)",
                (account, name, account, name, self.log_rows_per_function_max))
        self.db.execute("COMMIT")

    def read_logs(self, account: str, name: str, limit: int) -> list[tuple[int, str, bytes]]:
        rows = self.db.execute(
            "SELECT ts_ms, request_id, text FROM logs WHERE account=? AND name=? "
            "ORDER BY id DESC LIMIT ?", (account, name, limit)).fetchall()
        return [(int(r[0]), str(r[1]), bytes(r[2])) for r in reversed(rows)]


def config_doc(rec: FunctionRecord, region: str) -> dict[str, Any]:
    """Lambda's FunctionConfiguration shape."""
    import base64

    return {
        "FunctionName": rec.name,
        "FunctionArn": function_arn(region, rec.account, rec.name),
        "Runtime": rec.runtime,
        "Role": rec.role or f"arn:aws:iam::{rec.account}:role/cellcloud-default",
        "Handler": rec.handler,
        "CodeSize": rec.code_size,
        "Description": rec.description,
        "Timeout": rec.timeout_s,
        "MemorySize": rec.memory_mb,
        "LastModified": rec.last_modified,
        "CodeSha256": base64.b64encode(bytes.fromhex(rec.code_sha256)).decode(),
        "Version": "$LATEST",
        "Environment": {"Variables": dict(rec.environment)},
        "TracingConfig": {"Mode": "PassThrough"},
        "RevisionId": rec.revision_id,
        "State": "Active",
        "LastUpdateStatus": "Successful",
        "PackageType": "Zip",
        "Architectures": ["x86_64"],
        "EphemeralStorage": {"Size": rec.ephemeral_mb},
        "LoggingConfig": {"LogFormat": "Text", "LogGroup": f"/aws/lambda/{rec.name}"},
    }


def function_arn(region: str, account: str, name: str) -> str:
    return f"arn:aws:lambda:{region}:{account}:function:{name}"

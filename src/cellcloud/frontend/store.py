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
    version: str = "$LATEST"  # or a published version's number
    layers: list[dict[str, Any]] = field(default_factory=list)  # {arn, sha256, code_size, unzipped}
    unzipped_size: int = 0

    @property
    def key(self) -> str:
        """The placement key: identifies this exact code+configuration of this version, so
        environments are never shared across versions or revisions."""
        return f"{self.account}/{self.name}/{self.version}/{self.revision}"


@dataclass
class AliasRecord:
    account: str
    name: str  # the function's
    alias: str
    function_version: str
    description: str = ""
    weights: dict[str, float] = field(default_factory=dict)
    revision_id: str = ""


@dataclass
class LayerVersionRecord:
    account: str
    name: str
    version: int
    sha256: str
    code_size: int
    unzipped_size: int
    description: str = ""
    compatible_runtimes: list[str] = field(default_factory=list)
    compatible_architectures: list[str] = field(default_factory=list)
    license_info: str = ""
    created_date: str = ""


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
    def publish_version(self, rec: FunctionRecord) -> FunctionRecord: ...
    def import_version(self, rec: FunctionRecord, counter: int) -> bool: ...
    def version_counter(self, account: str, name: str) -> int: ...
    def get_version(self, account: str, name: str, version: int) -> FunctionRecord | None: ...
    def list_versions(self, account: str, name: str, after: int, limit: int
                      ) -> list[FunctionRecord]: ...
    def delete_version(self, account: str, name: str, version: int) -> bool: ...
    def put_alias(self, rec: AliasRecord, *, new: bool) -> bool: ...
    def get_alias(self, account: str, name: str, alias: str) -> AliasRecord | None: ...
    def list_aliases(self, account: str, name: str, after: str, limit: int
                     ) -> list[AliasRecord]: ...
    def delete_alias(self, account: str, name: str, alias: str) -> bool: ...
    def get_concurrency(self, account: str, name: str) -> int | None: ...
    def put_concurrency(self, account: str, name: str, reserved: int | None) -> None: ...
    def reserved_total(self, account: str, except_name: str) -> int: ...
    def put_provisioned(self, account: str, name: str, qualifier: str, n: int | None) -> None: ...
    def list_provisioned(self) -> list[tuple[str, str, str, int]]: ...
    def publish_layer_version(self, rec: LayerVersionRecord) -> LayerVersionRecord: ...
    def get_layer_version(self, account: str, name: str, version: int
                          ) -> LayerVersionRecord | None: ...
    def list_layer_versions(self, account: str, name: str, before: int, limit: int
                            ) -> list[LayerVersionRecord]: ...
    def list_layer_names(self, account: str, after: str, limit: int) -> list[str]: ...
    def delete_layer_version(self, account: str, name: str, version: int) -> bool: ...


_SCHEMA = """
CREATE TABLE IF NOT EXISTS functions (
    account TEXT NOT NULL, name TEXT NOT NULL, doc TEXT NOT NULL, revision INTEGER NOT NULL,
    PRIMARY KEY (account, name)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS logs (
    id INTEGER PRIMARY KEY AUTOINCREMENT, account TEXT NOT NULL, name TEXT NOT NULL,
    ts_ms INTEGER NOT NULL, request_id TEXT NOT NULL, text BLOB NOT NULL);
CREATE INDEX IF NOT EXISTS logs_fn ON logs (account, name, id);
CREATE TABLE IF NOT EXISTS versions (
    account TEXT NOT NULL, name TEXT NOT NULL, version INTEGER NOT NULL, doc TEXT NOT NULL,
    PRIMARY KEY (account, name, version)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS version_counters (
    account TEXT NOT NULL, name TEXT NOT NULL, last INTEGER NOT NULL,
    PRIMARY KEY (account, name)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS aliases (
    account TEXT NOT NULL, name TEXT NOT NULL, alias TEXT NOT NULL, doc TEXT NOT NULL,
    PRIMARY KEY (account, name, alias)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS concurrency (
    account TEXT NOT NULL, name TEXT NOT NULL, reserved INTEGER NOT NULL,
    PRIMARY KEY (account, name)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS provisioned (
    account TEXT NOT NULL, name TEXT NOT NULL, qualifier TEXT NOT NULL, n INTEGER NOT NULL,
    PRIMARY KEY (account, name, qualifier)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS layers (
    account TEXT NOT NULL, name TEXT NOT NULL, version INTEGER NOT NULL, doc TEXT NOT NULL,
    PRIMARY KEY (account, name, version)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS layer_counters (
    account TEXT NOT NULL, name TEXT NOT NULL, last INTEGER NOT NULL,
    PRIMARY KEY (account, name)) WITHOUT ROWID;
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
        """The function with its versions, aliases, reserved concurrency and logs."""
        self.db.execute("BEGIN")
        cur = self.db.execute("DELETE FROM functions WHERE account=? AND name=?", (account, name))
        for table in ("logs", "versions", "version_counters", "aliases", "concurrency"):
            self.db.execute(f"DELETE FROM {table} WHERE account=? AND name=?", (account, name))
        self.db.execute("COMMIT")
        return cur.rowcount == 1

    # -- versions: immutable snapshots, numbered from 1, numbers never reused -----------------
    def publish_version(self, rec: FunctionRecord) -> FunctionRecord:
        self.db.execute("BEGIN")
        row = self.db.execute("SELECT last FROM version_counters WHERE account=? AND name=?",
                              (rec.account, rec.name)).fetchone()
        number = (int(row[0]) if row else 0) + 1
        published = FunctionRecord(**{**asdict(rec), "version": str(number)})
        self.db.execute("INSERT OR REPLACE INTO version_counters VALUES (?,?,?)",
                        (rec.account, rec.name, number))
        self.db.execute("INSERT INTO versions VALUES (?,?,?,?)",
                        (rec.account, rec.name, number, json.dumps(asdict(published))))
        self.db.execute("COMMIT")
        return published

    def import_version(self, rec: FunctionRecord, counter: int) -> bool:
        """A version moved from another cell keeps its number (and the function's counter
        never goes back, so numbers are never reused). False if it was already there."""
        self.db.execute("BEGIN")
        cur = self.db.execute("INSERT OR IGNORE INTO versions VALUES (?,?,?,?)",
                              (rec.account, rec.name, int(rec.version), json.dumps(asdict(rec))))
        row = self.db.execute("SELECT last FROM version_counters WHERE account=? AND name=?",
                              (rec.account, rec.name)).fetchone()
        self.db.execute("INSERT OR REPLACE INTO version_counters VALUES (?,?,?)",
                        (rec.account, rec.name, max(counter, int(row[0]) if row else 0)))
        self.db.execute("COMMIT")
        return cur.rowcount == 1

    def version_counter(self, account: str, name: str) -> int:
        row = self.db.execute("SELECT last FROM version_counters WHERE account=? AND name=?",
                              (account, name)).fetchone()
        return int(row[0]) if row else 0

    def get_version(self, account: str, name: str, version: int) -> FunctionRecord | None:
        row = self.db.execute("SELECT doc FROM versions WHERE account=? AND name=? AND version=?",
                              (account, name, version)).fetchone()
        return self._decode(row[0]) if row else None

    def list_versions(self, account: str, name: str, after: int, limit: int) -> list[FunctionRecord]:
        rows = self.db.execute(
            "SELECT doc FROM versions WHERE account=? AND name=? AND version>? ORDER BY version "
            "LIMIT ?", (account, name, after, limit)).fetchall()
        return [self._decode(r[0]) for r in rows]

    def delete_version(self, account: str, name: str, version: int) -> bool:
        cur = self.db.execute("DELETE FROM versions WHERE account=? AND name=? AND version=?",
                              (account, name, version))
        return cur.rowcount == 1

    # -- aliases -------------------------------------------------------------------------------
    def put_alias(self, rec: AliasRecord, *, new: bool) -> bool:
        doc = json.dumps(asdict(rec))
        if new:
            try:
                self.db.execute("INSERT INTO aliases VALUES (?,?,?,?)",
                                (rec.account, rec.name, rec.alias, doc))
            except sqlite3.IntegrityError:
                return False
            return True
        cur = self.db.execute("UPDATE aliases SET doc=? WHERE account=? AND name=? AND alias=?",
                              (doc, rec.account, rec.name, rec.alias))
        return cur.rowcount == 1

    def get_alias(self, account: str, name: str, alias: str) -> AliasRecord | None:
        row = self.db.execute("SELECT doc FROM aliases WHERE account=? AND name=? AND alias=?",
                              (account, name, alias)).fetchone()
        return AliasRecord(**json.loads(row[0])) if row else None

    def list_aliases(self, account: str, name: str, after: str, limit: int) -> list[AliasRecord]:
        rows = self.db.execute(
            "SELECT doc FROM aliases WHERE account=? AND name=? AND alias>? ORDER BY alias LIMIT ?",
            (account, name, after, limit)).fetchall()
        return [AliasRecord(**json.loads(r[0])) for r in rows]

    def delete_alias(self, account: str, name: str, alias: str) -> bool:
        cur = self.db.execute("DELETE FROM aliases WHERE account=? AND name=? AND alias=?",
                              (account, name, alias))
        return cur.rowcount == 1

    # -- reserved concurrency ------------------------------------------------------------------
    def get_concurrency(self, account: str, name: str) -> int | None:
        row = self.db.execute("SELECT reserved FROM concurrency WHERE account=? AND name=?",
                              (account, name)).fetchone()
        return int(row[0]) if row else None

    def put_concurrency(self, account: str, name: str, reserved: int | None) -> None:
        if reserved is None:
            self.db.execute("DELETE FROM concurrency WHERE account=? AND name=?", (account, name))
        else:
            self.db.execute("INSERT OR REPLACE INTO concurrency VALUES (?,?,?)",
                            (account, name, reserved))

    def put_provisioned(self, account: str, name: str, qualifier: str, n: int | None) -> None:
        if n is None:
            self.db.execute("DELETE FROM provisioned WHERE account=? AND name=? AND qualifier=?",
                            (account, name, qualifier))
        else:
            self.db.execute("INSERT OR REPLACE INTO provisioned VALUES (?,?,?,?)",
                            (account, name, qualifier, n))

    def list_provisioned(self) -> list[tuple[str, str, str, int]]:
        rows = self.db.execute("SELECT account, name, qualifier, n FROM provisioned").fetchall()
        return [(str(a), str(b), str(c), int(d)) for a, b, c, d in rows]

    def reserved_total(self, account: str, except_name: str) -> int:
        row = self.db.execute(
            "SELECT coalesce(sum(reserved), 0) FROM concurrency WHERE account=? AND name<>?",
            (account, except_name)).fetchone()
        return int(row[0])

    # -- layers --------------------------------------------------------------------------------
    def publish_layer_version(self, rec: LayerVersionRecord) -> LayerVersionRecord:
        self.db.execute("BEGIN")
        row = self.db.execute("SELECT last FROM layer_counters WHERE account=? AND name=?",
                              (rec.account, rec.name)).fetchone()
        number = (int(row[0]) if row else 0) + 1
        published = LayerVersionRecord(**{**asdict(rec), "version": number})
        self.db.execute("INSERT OR REPLACE INTO layer_counters VALUES (?,?,?)",
                        (rec.account, rec.name, number))
        self.db.execute("INSERT INTO layers VALUES (?,?,?,?)",
                        (rec.account, rec.name, number, json.dumps(asdict(published))))
        self.db.execute("COMMIT")
        return published

    def get_layer_version(self, account: str, name: str, version: int) -> LayerVersionRecord | None:
        row = self.db.execute("SELECT doc FROM layers WHERE account=? AND name=? AND version=?",
                              (account, name, version)).fetchone()
        return LayerVersionRecord(**json.loads(row[0])) if row else None

    def list_layer_versions(self, account: str, name: str, before: int, limit: int
                            ) -> list[LayerVersionRecord]:
        rows = self.db.execute(
            "SELECT doc FROM layers WHERE account=? AND name=? AND version<? "
            "ORDER BY version DESC LIMIT ?", (account, name, before, limit)).fetchall()
        return [LayerVersionRecord(**json.loads(r[0])) for r in rows]

    def list_layer_names(self, account: str, after: str, limit: int) -> list[str]:
        rows = self.db.execute(
            "SELECT DISTINCT name FROM layers WHERE account=? AND name>? ORDER BY name LIMIT ?",
            (account, after, limit)).fetchall()
        return [str(r[0]) for r in rows]

    def delete_layer_version(self, account: str, name: str, version: int) -> bool:
        cur = self.db.execute("DELETE FROM layers WHERE account=? AND name=? AND version=?",
                              (account, name, version))
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


def config_doc(rec: FunctionRecord, region: str, *, qualify_latest: bool = False
               ) -> dict[str, Any]:
    """Lambda's FunctionConfiguration shape. A published version's ARN carries its number;
    $LATEST's carries ``:$LATEST`` only where Lambda shows it (ListVersionsByFunction)."""
    import base64

    qualifier = rec.version if rec.version != "$LATEST" or qualify_latest else None
    doc: dict[str, Any] = {
        "FunctionName": rec.name,
        "FunctionArn": function_arn(region, rec.account, rec.name, qualifier),
        "Runtime": rec.runtime,
        "Role": rec.role or f"arn:aws:iam::{rec.account}:role/cellcloud-default",
        "Handler": rec.handler,
        "CodeSize": rec.code_size,
        "Description": rec.description,
        "Timeout": rec.timeout_s,
        "MemorySize": rec.memory_mb,
        "LastModified": rec.last_modified,
        "CodeSha256": base64.b64encode(bytes.fromhex(rec.code_sha256)).decode(),
        "Version": rec.version,
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
    if rec.layers:
        doc["Layers"] = [{"Arn": layer["arn"], "CodeSize": layer["code_size"]}
                         for layer in rec.layers]
    return doc


def function_arn(region: str, account: str, name: str, qualifier: str | None = None) -> str:
    arn = f"arn:aws:lambda:{region}:{account}:function:{name}"
    return f"{arn}:{qualifier}" if qualifier else arn


def layer_arn(region: str, account: str, name: str, version: int | None = None) -> str:
    arn = f"arn:aws:lambda:{region}:{account}:layer:{name}"
    return f"{arn}:{version}" if version is not None else arn

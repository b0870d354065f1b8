"""Durable function metadata and code bundles for one cell.

Callers use :class:`FunctionStore` only, so the Physalia colony can replace SQLite later without
touching them. Metadata lives in SQLite (WAL, synchronous=FULL: a create is on disk before it is
acknowledged); bundles are content-addressed files named by their SHA-256.

Bundles are reference-counted: ``bundle_refs`` holds one row per (holder, digest), where a
holder is a function's ``$LATEST`` (code and layers), a published version (code and layers) or
a layer version, written in the same transaction as the holder's own row. Aliases point at
versions, so they hold their bundles through them. A digest without rows is unreferenced and
its file may be freed (:meth:`SqliteFunctionStore.unreferenced`, :meth:`delete_bundle`).

A full state disk: writes raise :class:`StateDiskFull` (HTTP 507). Deletes must still work
there, and SQLite needs room in its WAL to delete, so the store keeps a pre-allocated reserve
file (``reserve``, ``Limits.state_disk_reserve_bytes``) that it gives up when a delete finds the
disk full, and takes back once there is room again.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import sqlite3
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol, TypeVar

from ..core import vpc
from ..core.cwlogs import LoggingConfig
from ..core.errors import LambdaError
from ..core.limits import DEFAULT_LIMITS

log = logging.getLogger("cellcloud.frontend")

T = TypeVar("T")

_SQLITE_FULL = 13


def is_disk_full(exc: BaseException) -> bool:
    """ENOSPC/EDQUOT from a file write, or SQLITE_FULL from SQLite."""
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    if isinstance(exc, sqlite3.Error):
        code = getattr(exc, "sqlite_errorcode", None)
        return (code is not None and code & 0xFF == _SQLITE_FULL) or (
            "database or disk is full" in str(exc))
    return False


class StateDiskFull(LambdaError):
    """507: the region's state disk has no room for this write (the API still deletes)."""

    def __init__(self, path: str, what: str) -> None:
        # The host path stays in the operator's log, out of the tenant's answer.
        super().__init__(
            507, "ServiceException",
            f"No space left on the region's state disk: {what} could not be written. "
            "Delete functions, versions or layers (deletes still work) or ask the operator "
            "for space, then retry.")
        self.path = path
        log.error("state disk full at %s: %s could not be written", path, what)


@dataclass(frozen=True)
class DiskSpace:
    path: str
    free_bytes: int
    total_bytes: int
    reserve_bytes: int  # held back for deletes on a full disk (0: given up, not yet restored)

    def doc(self) -> dict[str, Any]:
        return asdict(self)


def disk_space(path: str, reserve_bytes: int = 0) -> DiskSpace:
    st = os.statvfs(path)
    return DiskSpace(path, st.f_bavail * st.f_frsize, st.f_blocks * st.f_frsize, reserve_bytes)


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
    # the function's network setting (core/vpc.py): "" region default | egress | none
    network: str = ""
    # its allow-list ("CIDR:port" entries; only with network "egress")
    net_allow: list[str] = field(default_factory=list)
    # DeadLetterConfig.TargetArn (frontend/deadletter.py): "" none
    dead_letter_target: str = ""
    # "Zip" | "Image"; an image function's resolved image (frontend/image_functions.py:
    # uri, repo, digest, layers, entrypoint, cmd, workdir, env, user, size, overrides)
    package_type: str = "Zip"
    image: dict[str, Any] = field(default_factory=dict)
    # LoggingConfig (core/cwlogs.py's LoggingConfig.to_record); empty: Text, the default group
    logging: dict[str, Any] = field(default_factory=dict)
    # SnapStart.ApplyOn: "PublishedVersions" or "" (None); only with microvm isolation
    snapstart: str = ""

    @property
    def key(self) -> str:
        """The placement key: identifies this exact code+configuration of this version, so
        environments are never shared across versions or revisions."""
        return f"{self.account}/{self.name}/{self.version}/{self.revision}"

    def bundle_digests(self) -> set[str]:
        """The bundles this record holds: its code and its layers."""
        return {self.code_sha256, *(str(layer["sha256"]) for layer in self.layers)}


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
    def unreferenced(self, digests: Iterable[str]) -> list[str]: ...
    def delete_bundle(self, sha256_hex: str) -> None: ...
    def disk_space(self) -> DiskSpace: ...
    def restore_reserve(self) -> bool: ...
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
    def get_policy(self, account: str, kind: str, name: str, qualifier: str) -> str | None: ...
    def put_policy(self, account: str, kind: str, name: str, qualifier: str,
                   doc: str | None) -> None: ...
    def get_url(self, account: str, name: str, qualifier: str
                ) -> tuple[str, dict[str, Any]] | None: ...
    def get_url_by_id(self, url_id: str) -> tuple[str, str, str, dict[str, Any]] | None: ...
    def put_url(self, account: str, name: str, qualifier: str, url_id: str,
                doc: dict[str, Any], *, new: bool) -> bool: ...
    def list_urls(self, account: str, name: str, after: str | None,
                  limit: int) -> list[tuple[str, str, dict[str, Any]]]: ...
    def delete_url(self, account: str, name: str, qualifier: str) -> bool: ...


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
CREATE TABLE IF NOT EXISTS policies (
    account TEXT NOT NULL, kind TEXT NOT NULL, name TEXT NOT NULL, qualifier TEXT NOT NULL,
    doc TEXT NOT NULL, PRIMARY KEY (account, kind, name, qualifier)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS function_urls (
    account TEXT NOT NULL, name TEXT NOT NULL, qualifier TEXT NOT NULL, url_id TEXT NOT NULL,
    doc TEXT NOT NULL, PRIMARY KEY (account, name, qualifier)) WITHOUT ROWID;
CREATE UNIQUE INDEX IF NOT EXISTS function_urls_id ON function_urls (url_id);
"""

#: kind: 'f' a function's $LATEST (version ''), 'v' a published version, 'l' a layer version.
_REFS_SCHEMA = """
CREATE TABLE bundle_refs (
    kind TEXT NOT NULL, account TEXT NOT NULL, name TEXT NOT NULL, version TEXT NOT NULL,
    sha TEXT NOT NULL, PRIMARY KEY (kind, account, name, version, sha)) WITHOUT ROWID;
CREATE INDEX bundle_refs_sha ON bundle_refs (sha);
"""


class SqliteFunctionStore:
    def __init__(self, state_dir: str, log_rows_per_function_max: int = 1000,
                 reserve_bytes: int = DEFAULT_LIMITS.state_disk_reserve_bytes) -> None:
        os.makedirs(state_dir, exist_ok=True)
        self.state_dir = state_dir
        self.bundles_dir = os.path.join(state_dir, "bundles")
        os.makedirs(self.bundles_dir, exist_ok=True)
        self.reserve_path = os.path.join(state_dir, "reserve")
        self.reserve_bytes = reserve_bytes
        self.db = sqlite3.connect(os.path.join(state_dir, "cell.db"), isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.executescript(_SCHEMA)
        if self.db.execute("SELECT 1 FROM sqlite_master WHERE name='bundle_refs'").fetchone() is None:
            self._build_refs()
        self.log_rows_per_function_max = log_rows_per_function_max
        self.sweep_bundles()
        self.restore_reserve()

    # -- writes --------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _tx(self, what: str) -> Iterator[None]:
        """One transaction: committed, or rolled back on any error (a failed write never leaves
        the connection inside a transaction). A full disk is :class:`StateDiskFull`."""
        try:
            self.db.execute("BEGIN")
            try:
                yield
                self.db.execute("COMMIT")
            except BaseException:
                if self.db.in_transaction:
                    self.db.execute("ROLLBACK")
                raise
        except (OSError, sqlite3.Error) as e:
            if is_disk_full(e):
                raise StateDiskFull(self.state_dir, what) from e
            raise

    def _freeing(self, what: str, write: Callable[[], T]) -> T:
        """A write that only removes: on a full disk, give up the reserve and try once more."""
        try:
            return write()
        except StateDiskFull:
            if not self.release_reserve():
                raise
            log.warning("state disk full: released the %d-byte reserve for %s",
                        self.reserve_bytes, what)
            return write()

    def _set_refs(self, kind: str, account: str, name: str, version: str,
                  digests: Iterable[str]) -> None:
        self.db.execute("DELETE FROM bundle_refs WHERE kind=? AND account=? AND name=? AND "
                        "version=?", (kind, account, name, version))
        self.db.executemany("INSERT OR IGNORE INTO bundle_refs VALUES (?,?,?,?,?)",
                            [(kind, account, name, version, d) for d in sorted(set(digests))])

    def _build_refs(self) -> None:
        """A state dir from before reference counting: every holder's digests, once."""
        with self._tx("the bundle reference table"):
            # Statement by statement: executescript would commit first, and a table created
            # without its rows would free bundles that are in use.
            for statement in _REFS_SCHEMA.split(";"):
                if statement.strip():
                    self.db.execute(statement)
            for (doc,) in self.db.execute("SELECT doc FROM functions").fetchall():
                rec = self._decode(doc)
                self._set_refs("f", rec.account, rec.name, "", rec.bundle_digests())
            for (doc,) in self.db.execute("SELECT doc FROM versions").fetchall():
                rec = self._decode(doc)
                self._set_refs("v", rec.account, rec.name, rec.version, rec.bundle_digests())
            for (doc,) in self.db.execute("SELECT doc FROM layers").fetchall():
                layer = LayerVersionRecord(**json.loads(doc))
                self._set_refs("l", layer.account, layer.name, str(layer.version), [layer.sha256])

    @staticmethod
    def _decode(doc: str) -> FunctionRecord:
        return FunctionRecord(**json.loads(doc))

    def get(self, account: str, name: str) -> FunctionRecord | None:
        row = self.db.execute(
            "SELECT doc FROM functions WHERE account=? AND name=?", (account, name)).fetchone()
        return self._decode(row[0]) if row else None

    def put_new(self, rec: FunctionRecord) -> bool:
        try:
            with self._tx(f"function {rec.name}"):
                self.db.execute("INSERT INTO functions VALUES (?,?,?,?)",
                                (rec.account, rec.name, json.dumps(asdict(rec)), rec.revision))
                self._set_refs("f", rec.account, rec.name, "", rec.bundle_digests())
        except sqlite3.IntegrityError:
            return False
        return True

    def update(self, rec: FunctionRecord, expected_revision: int) -> bool:
        with self._tx(f"function {rec.name}"):
            cur = self.db.execute(
                "UPDATE functions SET doc=?, revision=? WHERE account=? AND name=? AND revision=?",
                (json.dumps(asdict(rec)), rec.revision, rec.account, rec.name, expected_revision))
            if cur.rowcount == 1:
                self._set_refs("f", rec.account, rec.name, "", rec.bundle_digests())
        return cur.rowcount == 1

    def delete(self, account: str, name: str) -> bool:
        """The function with its versions, aliases, reserved concurrency and logs."""
        def write() -> bool:
            with self._tx(f"the deletion of function {name}"):
                cur = self.db.execute("DELETE FROM functions WHERE account=? AND name=?",
                                      (account, name))
                for table in ("logs", "versions", "version_counters", "aliases", "concurrency",
                              "provisioned"):
                    self.db.execute(f"DELETE FROM {table} WHERE account=? AND name=?",
                                    (account, name))
                self.db.execute("DELETE FROM bundle_refs WHERE kind IN ('f', 'v') AND "
                                "account=? AND name=?", (account, name))
                self.db.execute("DELETE FROM policies WHERE account=? AND kind='f' AND name=?",
                                (account, name))
                self.db.execute("DELETE FROM function_urls WHERE account=? AND name=?",
                                (account, name))
            return cur.rowcount == 1
        return self._freeing(f"the deletion of function {name}", write)

    # -- versions: immutable snapshots, numbered from 1, numbers never reused -----------------
    def publish_version(self, rec: FunctionRecord) -> FunctionRecord:
        with self._tx(f"a version of function {rec.name}"):
            row = self.db.execute("SELECT last FROM version_counters WHERE account=? AND name=?",
                                  (rec.account, rec.name)).fetchone()
            number = (int(row[0]) if row else 0) + 1
            published = FunctionRecord(**{**asdict(rec), "version": str(number)})
            self.db.execute("INSERT OR REPLACE INTO version_counters VALUES (?,?,?)",
                            (rec.account, rec.name, number))
            self.db.execute("INSERT INTO versions VALUES (?,?,?,?)",
                            (rec.account, rec.name, number, json.dumps(asdict(published))))
            self._set_refs("v", rec.account, rec.name, str(number), rec.bundle_digests())
        return published

    def import_version(self, rec: FunctionRecord, counter: int) -> bool:
        """A version moved from another cell keeps its number (and the function's counter
        never goes back, so numbers are never reused). False if it was already there."""
        with self._tx(f"a version of function {rec.name}"):
            cur = self.db.execute(
                "INSERT OR IGNORE INTO versions VALUES (?,?,?,?)",
                (rec.account, rec.name, int(rec.version), json.dumps(asdict(rec))))
            if cur.rowcount == 1:
                self._set_refs("v", rec.account, rec.name, str(int(rec.version)),
                               rec.bundle_digests())
            row = self.db.execute("SELECT last FROM version_counters WHERE account=? AND name=?",
                                  (rec.account, rec.name)).fetchone()
            self.db.execute("INSERT OR REPLACE INTO version_counters VALUES (?,?,?)",
                            (rec.account, rec.name, max(counter, int(row[0]) if row else 0)))
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
        def write() -> bool:
            with self._tx(f"the deletion of version {version} of function {name}"):
                cur = self.db.execute(
                    "DELETE FROM versions WHERE account=? AND name=? AND version=?",
                    (account, name, version))
                self._set_refs("v", account, name, str(version), [])
            return cur.rowcount == 1
        return self._freeing(f"the deletion of version {version} of function {name}", write)

    # -- aliases -------------------------------------------------------------------------------
    def put_alias(self, rec: AliasRecord, *, new: bool) -> bool:
        doc = json.dumps(asdict(rec))
        if new:
            try:
                with self._tx(f"alias {rec.alias}"):
                    self.db.execute("INSERT INTO aliases VALUES (?,?,?,?)",
                                    (rec.account, rec.name, rec.alias, doc))
            except sqlite3.IntegrityError:
                return False
            return True
        with self._tx(f"alias {rec.alias}"):
            cur = self.db.execute(
                "UPDATE aliases SET doc=? WHERE account=? AND name=? AND alias=?",
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
        def write() -> bool:
            with self._tx(f"the deletion of alias {alias} of function {name}"):
                cur = self.db.execute("DELETE FROM aliases WHERE account=? AND name=? AND alias=?",
                                      (account, name, alias))
                self.db.execute("DELETE FROM function_urls WHERE account=? AND name=? AND "
                                "qualifier=?", (account, name, alias))
            return cur.rowcount == 1
        return self._freeing(f"the deletion of alias {alias}", write)

    # -- reserved concurrency ------------------------------------------------------------------
    def get_concurrency(self, account: str, name: str) -> int | None:
        row = self.db.execute("SELECT reserved FROM concurrency WHERE account=? AND name=?",
                              (account, name)).fetchone()
        return int(row[0]) if row else None

    def put_concurrency(self, account: str, name: str, reserved: int | None) -> None:
        what = f"the concurrency setting of function {name}"
        if reserved is None:
            def delete() -> None:
                with self._tx(what):
                    self.db.execute("DELETE FROM concurrency WHERE account=? AND name=?",
                                    (account, name))
            self._freeing(what, delete)
            return
        with self._tx(what):
            self.db.execute("INSERT OR REPLACE INTO concurrency VALUES (?,?,?)",
                            (account, name, reserved))

    def put_provisioned(self, account: str, name: str, qualifier: str, n: int | None) -> None:
        what = f"the provisioned concurrency of function {name}"
        if n is None:
            def delete() -> None:
                with self._tx(what):
                    self.db.execute(
                        "DELETE FROM provisioned WHERE account=? AND name=? AND qualifier=?",
                        (account, name, qualifier))
            self._freeing(what, delete)
            return
        with self._tx(what):
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
        with self._tx(f"a version of layer {rec.name}"):
            row = self.db.execute("SELECT last FROM layer_counters WHERE account=? AND name=?",
                                  (rec.account, rec.name)).fetchone()
            number = (int(row[0]) if row else 0) + 1
            published = LayerVersionRecord(**{**asdict(rec), "version": number})
            self.db.execute("INSERT OR REPLACE INTO layer_counters VALUES (?,?,?)",
                            (rec.account, rec.name, number))
            self.db.execute("INSERT INTO layers VALUES (?,?,?,?)",
                            (rec.account, rec.name, number, json.dumps(asdict(published))))
            self._set_refs("l", rec.account, rec.name, str(number), [rec.sha256])
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
        def write() -> bool:
            with self._tx(f"the deletion of version {version} of layer {name}"):
                cur = self.db.execute(
                    "DELETE FROM layers WHERE account=? AND name=? AND version=?",
                    (account, name, version))
                self.db.execute("DELETE FROM policies WHERE account=? AND kind='l' AND name=? "
                                "AND qualifier=?", (account, name, str(version)))
                self._set_refs("l", account, name, str(version), [])
            return cur.rowcount == 1
        return self._freeing(f"the deletion of version {version} of layer {name}", write)

    # -- resource policies (kind 'f': a function, qualifier '' or a version/alias; 'l': a layer
    # version, qualifier its number); doc is the policy's statements as JSON
    def get_policy(self, account: str, kind: str, name: str, qualifier: str) -> str | None:
        row = self.db.execute("SELECT doc FROM policies WHERE account=? AND kind=? AND name=? "
                              "AND qualifier=?", (account, kind, name, qualifier)).fetchone()
        return None if row is None else str(row[0])

    def put_policy(self, account: str, kind: str, name: str, qualifier: str,
                   doc: str | None) -> None:
        what = f"the resource policy of {name}"
        if doc is None:
            def delete() -> None:
                with self._tx(what):
                    self.db.execute("DELETE FROM policies WHERE account=? AND kind=? AND name=? "
                                    "AND qualifier=?", (account, kind, name, qualifier))
            self._freeing(what, delete)
            return
        with self._tx(what):
            self.db.execute("INSERT OR REPLACE INTO policies VALUES (?,?,?,?,?)",
                            (account, kind, name, qualifier, doc))

    # -- function URLs (qualifier '' or an alias); doc: AuthType, Cors, InvokeMode, times -------
    def get_url(self, account: str, name: str, qualifier: str) -> tuple[str, dict[str, Any]] | None:
        row = self.db.execute("SELECT url_id, doc FROM function_urls WHERE account=? AND name=? "
                              "AND qualifier=?", (account, name, qualifier)).fetchone()
        return None if row is None else (str(row[0]), json.loads(row[1]))

    def get_url_by_id(self, url_id: str) -> tuple[str, str, str, dict[str, Any]] | None:
        """(account, name, qualifier, doc) of a URL id."""
        row = self.db.execute("SELECT account, name, qualifier, doc FROM function_urls WHERE "
                              "url_id=?", (url_id,)).fetchone()
        return None if row is None else (str(row[0]), str(row[1]), str(row[2]),
                                         json.loads(row[3]))

    def put_url(self, account: str, name: str, qualifier: str, url_id: str,
                doc: dict[str, Any], *, new: bool) -> bool:
        """Insert (``new``: False if one exists) or replace a function's URL config."""
        with self._tx(f"the function URL of {name}"):
            if new:
                cur = self.db.execute("INSERT OR IGNORE INTO function_urls VALUES (?,?,?,?,?)",
                                      (account, name, qualifier, url_id, json.dumps(doc)))
            else:
                cur = self.db.execute("UPDATE function_urls SET doc=? WHERE account=? AND "
                                      "name=? AND qualifier=?",
                                      (json.dumps(doc), account, name, qualifier))
        return cur.rowcount == 1

    def list_urls(self, account: str, name: str, after: str | None,
                  limit: int) -> list[tuple[str, str, dict[str, Any]]]:
        """(qualifier, url_id, doc) of a function's URLs, by qualifier, after ``after`` (None:
        from the first)."""
        rows = self.db.execute(
            "SELECT qualifier, url_id, doc FROM function_urls WHERE account=? AND name=? AND "
            "(? IS NULL OR qualifier>?) ORDER BY qualifier LIMIT ?",
            (account, name, after, after, limit)).fetchall()
        return [(str(q), str(u), json.loads(d)) for q, u, d in rows]

    def delete_url(self, account: str, name: str, qualifier: str) -> bool:
        def write() -> bool:
            with self._tx(f"the deletion of the function URL of {name}"):
                cur = self.db.execute("DELETE FROM function_urls WHERE account=? AND name=? AND "
                                      "qualifier=?", (account, name, qualifier))
            return cur.rowcount == 1
        return self._freeing(f"the deletion of the function URL of {name}", write)

    def list_page(self, account: str, after: str, limit: int) -> list[FunctionRecord]:
        rows = self.db.execute(
            "SELECT doc FROM functions WHERE account=? AND name>? ORDER BY name LIMIT ?",
            (account, after, limit)).fetchall()
        return [self._decode(r[0]) for r in rows]

    def count(self, account: str) -> int:
        row = self.db.execute("SELECT count(*) FROM functions WHERE account=?", (account,)).fetchone()
        return int(row[0])

    # -- bundles: content-addressed, reference-counted files ------------------------------------
    def _bundle_path(self, sha256_hex: str) -> str:
        if not (len(sha256_hex) == 64 and all(c in "0123456789abcdef" for c in sha256_hex)):
            raise ValueError(f"not a SHA-256 digest: {sha256_hex!r}")
        return os.path.join(self.bundles_dir, sha256_hex + ".zip")

    def put_bundle(self, sha256_hex: str, data: bytes) -> None:
        """Durable before any record names it. Unreferenced until a record does: the caller
        writes the record next, or gives the bundle back (:meth:`unreferenced`)."""
        path = self._bundle_path(sha256_hex)
        if os.path.exists(path):
            return
        tmp = f"{path}.tmp-{os.getpid()}-{time.monotonic_ns()}"
        try:
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
        except OSError as e:
            if is_disk_full(e):
                raise StateDiskFull(self.state_dir, f"the code bundle {sha256_hex[:12]}") from e
            raise
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)  # gone after the rename; here only if something failed

    def unreferenced(self, digests: Iterable[str]) -> list[str]:
        """Which of these digests no function, version or layer version holds."""
        return sorted(d for d in set(digests) if self.db.execute(
            "SELECT 1 FROM bundle_refs WHERE sha=? LIMIT 1", (d,)).fetchone() is None)

    def delete_bundle(self, sha256_hex: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._bundle_path(sha256_hex))

    def sweep_bundles(self) -> list[str]:
        """At start (nothing in flight): temp files a crash or a full disk left, and bundles no
        record holds (written by a create whose record write failed). What it removed."""
        removed = []
        for entry in sorted(os.listdir(self.bundles_dir)):
            sha, dot, rest = entry.partition(".")
            unwanted = ".tmp-" in entry or (rest == "zip" and len(sha) == 64
                                            and not self.db.execute(
                "SELECT 1 FROM bundle_refs WHERE sha=? LIMIT 1", (sha,)).fetchone())
            if unwanted:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(self.bundles_dir, entry))
                removed.append(entry)
        if removed:
            log.warning("freed %d unreferenced bundle files at start", len(removed))
        return removed

    # -- the state disk ------------------------------------------------------------------------
    def disk_space(self) -> DiskSpace:
        held = os.path.getsize(self.reserve_path) if os.path.exists(self.reserve_path) else 0
        return disk_space(self.state_dir, held)

    def release_reserve(self) -> bool:
        """Give the reserve back to the filesystem (a delete on a full disk needs the room).
        False if there was none to give."""
        try:
            os.unlink(self.reserve_path)
        except FileNotFoundError:
            return False
        return True

    def restore_reserve(self) -> bool:
        """Take the reserve (again) if the disk has room for it and a little more; never fills
        the disk doing so. True if the reserve is in place."""
        if self.reserve_bytes <= 0:
            return True
        if os.path.exists(self.reserve_path) and os.path.getsize(
                self.reserve_path) >= self.reserve_bytes:
            return True
        if disk_space(self.state_dir).free_bytes < 2 * self.reserve_bytes:
            return False
        tmp = f"{self.reserve_path}.tmp-{os.getpid()}"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                os.posix_fallocate(fd, 0, self.reserve_bytes)  # real blocks, not a sparse file
                os.fsync(fd)
            finally:
                os.close(fd)
            os.rename(tmp, self.reserve_path)
            return True
        except OSError as e:
            if not is_disk_full(e):
                raise
            return False
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)

    def get_bundle(self, sha256_hex: str) -> bytes:
        with open(os.path.join(self.bundles_dir, sha256_hex + ".zip"), "rb") as f:
            return f.read()

    def append_logs(self, rows: list[tuple[str, str, int, str, bytes]]) -> None:
        # Logs are not acknowledged to anyone: a lost tail after a crash is acceptable, so one
        # transaction for the whole batch and no fsync of its own.
        with self._tx("function logs"):
            self.db.executemany(
                "INSERT INTO logs (account, name, ts_ms, request_id, text) VALUES (?,?,?,?,?)",
                rows)
            for account, name in {(r[0], r[1]) for r in rows}:
                self.db.execute(
                    "DELETE FROM logs WHERE account=? AND name=? AND id <= (SELECT id FROM logs "
                    "WHERE account=? AND name=? ORDER BY id DESC LIMIT 1 OFFSET ?)",
                    (account, name, account, name, self.log_rows_per_function_max))

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
        "VpcConfig": vpc.echo(vpc.Setting(rec.network, tuple(rec.net_allow))),
        "LoggingConfig": LoggingConfig.from_record(rec.logging).doc(rec.name),
        # As Lambda: On for a published version of a function with ApplyOn PublishedVersions
        "SnapStart": {"ApplyOn": rec.snapstart or "None",
                      "OptimizationStatus": ("On" if rec.snapstart and rec.version != "$LATEST"
                                             else "Off")},
    }
    if rec.dead_letter_target:
        doc["DeadLetterConfig"] = {"TargetArn": rec.dead_letter_target}
    if rec.layers:
        doc["Layers"] = [{"Arn": layer["arn"], "CodeSize": layer["code_size"]}
                         for layer in rec.layers]
    if rec.package_type == "Image":  # as Lambda: no Runtime/Handler; the manifest digest
        from .image_functions import config_response

        del doc["Runtime"], doc["Handler"]
        doc["PackageType"] = "Image"
        doc["CodeSha256"] = rec.code_sha256
        doc["ImageConfigResponse"] = config_response(rec)
    return doc


def function_arn(region: str, account: str, name: str, qualifier: str | None = None) -> str:
    arn = f"arn:aws:lambda:{region}:{account}:function:{name}"
    return f"{arn}:{qualifier}" if qualifier else arn


def layer_arn(region: str, account: str, name: str, version: int | None = None) -> str:
    arn = f"arn:aws:lambda:{region}:{account}:layer:{name}"
    return f"{arn}:{version}" if version is not None else arn

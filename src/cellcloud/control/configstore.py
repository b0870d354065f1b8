"""The region's configuration store: one small interface, several implementations chosen in the
region's config (:func:`open_config_store`).

Contract (every implementation, tested by the same suite in ``tests/control``):

- keys are UTF-8 strings (≤ ``config_key_bytes_max``), values bytes (≤
  ``config_value_bytes_max``); over a limit → :class:`ConfigStoreError`, nothing written;
- every write gives the key a *revision*: an integer that is strictly greater than any revision
  the key had before (both built-in stores use one store-wide counter, as etcd does, so a
  deleted and re-created key never reuses a revision);
- ``cas(key, expected_revision, value)`` writes only if the key's revision is still
  ``expected_revision`` (``0`` = the key must be absent) and returns the new revision, or
  ``None`` when the comparison failed; it is atomic;
- ``list(prefix)`` returns the entries under ``prefix`` in key order, at most
  ``config_list_max`` (more → :class:`ConfigStoreError`, never a silent truncation);
- an unreachable or failing backend raises :class:`ConfigStoreUnavailable` (the outcome of a
  write is then unknown). Nothing here retries: the caller (the control plane's loop) is the one
  layer that does.

The methods are coroutines so that every backend fits the asyncio control plane; the SQLite and
etcd stores run their blocking calls in a worker thread.
"""

from __future__ import annotations

import asyncio
import base64
import json
import sqlite3
import threading
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

config_key_bytes_max = 512
config_value_bytes_max = 1024 * 1024  # etcd's default request limit is 1.5 MiB
config_list_max = 10_000
etcd_call_timeout_ms = 5_000
etcd_answer_bytes_max = 64 * 1024 * 1024


class ConfigStoreError(Exception):
    """A request the store refuses (a limit, a malformed answer)."""


class ConfigStoreUnavailable(ConfigStoreError):
    """The backend could not be reached or failed; a write's outcome is unknown."""


@dataclass(frozen=True)
class Entry:
    key: str
    value: bytes
    revision: int


class ConfigStore(Protocol):
    async def get(self, key: str) -> Entry | None: ...

    async def put(self, key: str, value: bytes) -> int: ...

    async def cas(self, key: str, expected_revision: int, value: bytes) -> int | None: ...

    async def delete(self, key: str) -> bool: ...

    async def list(self, prefix: str) -> list[Entry]: ...

    async def close(self) -> None: ...


def _key(key: str) -> bytes:
    if not isinstance(key, str) or not key:
        raise ConfigStoreError("a key is a non-empty string")
    b = key.encode()
    if len(b) > config_key_bytes_max:
        raise ConfigStoreError(f"key longer than config_key_bytes_max={config_key_bytes_max}")
    return b


def _value(value: bytes) -> bytes:
    if not isinstance(value, bytes | bytearray | memoryview):
        raise ConfigStoreError("a value is bytes")
    if len(value) > config_value_bytes_max:
        raise ConfigStoreError(
            f"value of {len(value)} bytes is over config_value_bytes_max={config_value_bytes_max}")
    return bytes(value)


def prefix_end(prefix: bytes) -> bytes | None:
    """The smallest byte string greater than every string that starts with ``prefix`` (None:
    no upper bound)."""
    p = prefix.rstrip(b"\xff")
    if not p:
        return None
    return p[:-1] + bytes([p[-1] + 1])


# -- SQLite: the embedded default on one machine ------------------------------------------------
class _BlockingStore:
    """The async ``ConfigStore`` face of a store whose calls block (SQLite, HTTP): each call
    runs on a worker thread so the control plane's event loop never waits on I/O."""

    def get_sync(self, key: str) -> Entry | None:
        raise NotImplementedError

    def put_sync(self, key: str, value: bytes) -> int:
        raise NotImplementedError

    def cas_sync(self, key: str, expected_revision: int, value: bytes) -> int | None:
        raise NotImplementedError

    def delete_sync(self, key: str) -> bool:
        raise NotImplementedError

    def list_sync(self, prefix: str) -> list[Entry]:
        raise NotImplementedError

    async def get(self, key: str) -> Entry | None:
        return await asyncio.to_thread(self.get_sync, key)

    async def put(self, key: str, value: bytes) -> int:
        return await asyncio.to_thread(self.put_sync, key, value)

    async def cas(self, key: str, expected_revision: int, value: bytes) -> int | None:
        return await asyncio.to_thread(self.cas_sync, key, expected_revision, value)

    async def delete(self, key: str) -> bool:
        return await asyncio.to_thread(self.delete_sync, key)

    async def list(self, prefix: str) -> list[Entry]:
        return await asyncio.to_thread(self.list_sync, prefix)


class SqliteConfigStore(_BlockingStore):
    """One SQLite file in WAL mode with ``synchronous=FULL``: a write has reached the disk when
    the call returns."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("CREATE TABLE IF NOT EXISTS kv (key BLOB PRIMARY KEY, value BLOB NOT NULL,"
                         " revision INTEGER NOT NULL)")
        self._db.execute("CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY,"
                         " value INTEGER NOT NULL)")
        self._db.execute("INSERT OR IGNORE INTO meta VALUES ('revision', 0)")

    def _write(self, fn: Any) -> Any:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                out = fn()
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")
            return out

    def _next_revision(self) -> int:
        self._db.execute("UPDATE meta SET value = value + 1 WHERE name = 'revision'")
        row = self._db.execute("SELECT value FROM meta WHERE name = 'revision'").fetchone()
        return int(row[0])

    def _row(self, k: bytes) -> tuple[bytes, int] | None:
        row = self._db.execute("SELECT value, revision FROM kv WHERE key = ?", (k,)).fetchone()
        return None if row is None else (bytes(row[0]), int(row[1]))

    def get_sync(self, key: str) -> Entry | None:
        k = _key(key)
        with self._lock:
            row = self._row(k)
        return None if row is None else Entry(key, row[0], row[1])

    def put_sync(self, key: str, value: bytes) -> int:
        k, v = _key(key), _value(value)

        def fn() -> int:
            rev = self._next_revision()
            self._db.execute("INSERT OR REPLACE INTO kv VALUES (?, ?, ?)", (k, v, rev))
            return rev

        return int(self._write(fn))

    def cas_sync(self, key: str, expected_revision: int, value: bytes) -> int | None:
        k, v = _key(key), _value(value)

        def fn() -> int | None:
            row = self._row(k)
            if (row[1] if row else 0) != expected_revision:
                return None
            rev = self._next_revision()
            self._db.execute("INSERT OR REPLACE INTO kv VALUES (?, ?, ?)", (k, v, rev))
            return rev

        out: int | None = self._write(fn)
        return out

    def delete_sync(self, key: str) -> bool:
        k = _key(key)

        def fn() -> bool:
            if self._row(k) is None:
                return False
            self._next_revision()
            self._db.execute("DELETE FROM kv WHERE key = ?", (k,))
            return True

        return bool(self._write(fn))

    def list_sync(self, prefix: str) -> list[Entry]:
        p = prefix.encode()
        end = prefix_end(p)
        sql = "SELECT key, value, revision FROM kv WHERE key >= ?"
        args: tuple[bytes, ...] = (p,)
        if end is not None:
            sql += " AND key < ?"
            args += (end,)
        sql += " ORDER BY key LIMIT ?"
        with self._lock:
            rows = self._db.execute(sql, (*args, config_list_max + 1)).fetchall()
        if len(rows) > config_list_max:
            raise ConfigStoreError(f"more than config_list_max={config_list_max} keys under "
                                   f"{prefix!r}")
        return [Entry(bytes(r[0]).decode(), bytes(r[1]), int(r[2])) for r in rows]

    async def close(self) -> None:
        with self._lock:
            self._db.close()


# -- etcd, through its v3 HTTP/JSON gateway ------------------------------------------------------
def _b64(b: bytes) -> str:
    return base64.b64encode(b).decode()


class EtcdConfigStore(_BlockingStore):
    """etcd v3 over its JSON gateway (``/v3/kv/range``, ``/v3/kv/put``, ``/v3/kv/txn``,
    ``/v3/kv/deleterange``); keys and values travel base64-encoded, int64s as strings. A key's
    revision is etcd's ``mod_revision``; ``cas`` is a txn comparing it (``create_revision == 0``
    for "absent"). Plain HTTP on loopback here; TLS arrives with the region's mTLS (issue #8)."""

    def __init__(self, url: str, *, timeout_ms: int = etcd_call_timeout_ms) -> None:
        self.url = url.rstrip("/")
        self.timeout_ms = timeout_ms

    def _call(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        req = urllib.request.Request(
            self.url + path, data=json.dumps(body).encode(), method="POST",
            headers={"content-type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=self.timeout_ms / 1000) as resp:
                data = resp.read(etcd_answer_bytes_max + 1)
        except urllib.error.HTTPError as e:
            detail = e.read(4096).decode(errors="replace")
            raise ConfigStoreUnavailable(f"etcd {path}: HTTP {e.code}: {detail}") from e
        except (OSError, urllib.error.URLError) as e:
            raise ConfigStoreUnavailable(f"etcd {path}: {e}") from e
        if len(data) > etcd_answer_bytes_max:
            raise ConfigStoreError(f"etcd {path}: answer over etcd_answer_bytes_max")
        try:
            out = json.loads(data)
        except ValueError as e:
            raise ConfigStoreError(f"etcd {path}: not JSON") from e
        if not isinstance(out, dict):
            raise ConfigStoreError(f"etcd {path}: unexpected answer")
        return out

    @staticmethod
    def _entry(kv: dict[str, Any]) -> Entry:
        return Entry(base64.b64decode(kv["key"]).decode(),
                     base64.b64decode(kv.get("value", "")), int(kv["mod_revision"]))

    def get_sync(self, key: str) -> Entry | None:
        out = self._call("/v3/kv/range", {"key": _b64(_key(key))})
        kvs = out.get("kvs") or []
        return self._entry(kvs[0]) if kvs else None

    def put_sync(self, key: str, value: bytes) -> int:
        out = self._call("/v3/kv/put", {"key": _b64(_key(key)), "value": _b64(_value(value))})
        return int(out["header"]["revision"])

    def cas_sync(self, key: str, expected_revision: int, value: bytes) -> int | None:
        k = _b64(_key(key))
        v = _b64(_value(value))
        if expected_revision == 0:
            compare = {"key": k, "target": "CREATE", "result": "EQUAL", "create_revision": "0"}
        else:
            compare = {"key": k, "target": "MOD", "result": "EQUAL",
                       "mod_revision": str(expected_revision)}
        out = self._call("/v3/kv/txn", {"compare": [compare],
                                        "success": [{"request_put": {"key": k, "value": v}}],
                                        "failure": []})
        if not out.get("succeeded", False):  # the gateway omits false fields
            return None
        return int(out["header"]["revision"])

    def delete_sync(self, key: str) -> bool:
        out = self._call("/v3/kv/deleterange", {"key": _b64(_key(key))})
        return int(out.get("deleted", 0)) > 0

    def list_sync(self, prefix: str) -> list[Entry]:
        p = prefix.encode()
        end = prefix_end(p)
        body = {"key": _b64(p or b"\0"), "range_end": _b64(end if end is not None else b"\0"),
                "limit": str(config_list_max + 1), "sort_order": "ASCEND", "sort_target": "KEY"}
        out = self._call("/v3/kv/range", body)
        kvs = out.get("kvs") or []
        if len(kvs) > config_list_max or out.get("more", False):
            raise ConfigStoreError(f"more than config_list_max={config_list_max} keys under "
                                   f"{prefix!r}")
        return [self._entry(kv) for kv in kvs]

    async def close(self) -> None:
        return None


# -- choosing one from the region's config -------------------------------------------------------
def open_config_store(spec: Mapping[str, Any]) -> ConfigStore:
    """``{"kind": "sqlite", "path": ...}`` | ``{"kind": "etcd", "url": ...}`` |
    ``{"kind": "physalia", "colony": <colony file>, "replicas": 7}``."""
    kind = spec.get("kind", "sqlite")
    if kind == "sqlite":
        return SqliteConfigStore(str(spec["path"]))
    if kind == "etcd":
        return EtcdConfigStore(str(spec["url"]),
                               timeout_ms=int(spec.get("timeout_ms", etcd_call_timeout_ms)))
    if kind == "physalia":
        from .physalia_store import PhysaliaConfigStore

        return PhysaliaConfigStore.from_file(str(spec["colony"]),
                                             replicas=spec.get("replicas"))
    raise ConfigStoreError(f"unknown configuration store kind {kind!r}")


class TimedConfigStore:
    """A ConfigStore that times every request into a Prometheus histogram
    (``cellcloud_store_request_duration_seconds`` by backend, op and outcome: ok, refused —
    a ConfigStoreError — or unavailable)."""

    def __init__(self, inner: ConfigStore, backend: str, registry: Any) -> None:
        from prometheus_client import Histogram

        self.inner = inner
        self.backend = backend
        self.duration = Histogram(
            "cellcloud_store_request_duration_seconds",
            "Configuration store requests of the control plane, by backend, op and outcome",
            ["backend", "op", "outcome"], registry=registry,
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                     2.5, 5.0, 10.0))

    async def _timed(self, op: str, call: Any) -> Any:
        import time

        started = time.monotonic()
        outcome = "ok"
        try:
            return await call
        except ConfigStoreUnavailable:
            outcome = "unavailable"
            raise
        except ConfigStoreError:
            outcome = "refused"
            raise
        finally:
            self.duration.labels(self.backend, op, outcome).observe(time.monotonic() - started)

    async def get(self, key: str) -> Entry | None:
        entry: Entry | None = await self._timed("get", self.inner.get(key))
        return entry

    async def put(self, key: str, value: bytes) -> int:
        rev: int = await self._timed("put", self.inner.put(key, value))
        return rev

    async def cas(self, key: str, expected_revision: int, value: bytes) -> int | None:
        rev: int | None = await self._timed("cas", self.inner.cas(key, expected_revision, value))
        return rev

    async def delete(self, key: str) -> bool:
        done: bool = await self._timed("delete", self.inner.delete(key))
        return done

    async def list(self, prefix: str) -> list[Entry]:
        entries: list[Entry] = await self._timed("list", self.inner.list(prefix))
        return entries

    async def close(self) -> None:
        await self.inner.close()

"""The control plane's configuration store on the Physalia colony (``store/``).

Physalia's way: every configuration key lives in a store cell of its own (``cfg-<hash>``), so a
failure that takes out some cells leaves the other keys available. Inside a key's cell:
``h`` holds ``<revision>:<chunks>``, ``c0``…``c14`` the value in chunks of ≤ 4,000 bytes (the
store caps a value at 4 KiB and a transaction at 16 keys). A compare-and-set is one store
transaction that checks ``h`` and writes ``h`` and the chunks together — atomic and
linearizable within the cell, which is all the ``ConfigStore`` contract asks.

Revisions are global and increasing, as etcd's are: a counter cell hands them out (a store
CAS loop). ``list(prefix)`` reads an index kept in its own cell (the key names, chunked the same
way), updated after a key is created or deleted.
"""

from __future__ import annotations

import asyncio
import hashlib
from typing import Any

from ..store.client import StoreBusy, StoreClient, StoreRejected, StoreUnavailable
from ..store.colony import Colony
from .configstore import (
    ConfigStoreError,
    ConfigStoreUnavailable,
    Entry,
    config_key_bytes_max,
    config_list_max,
    config_value_bytes_max,
)

chunk_bytes = 4000
chunks_max = 15  # + the head = the store's 16-key transaction limit
physalia_value_bytes_max = chunk_bytes * chunks_max
cas_attempts_max = 32
COUNTER_CELL = "cfg-revision-counter"
INDEX_CELL = "cfg-index"


def _cell(key: str) -> str:
    return "cfg-" + hashlib.sha256(key.encode()).hexdigest()[:32]


def _head(raw: Any) -> tuple[int, int]:
    """(revision, chunks) of a head value; (0, 0) for an absent key."""
    if raw is None:
        return 0, 0
    rev, _, n = bytes(raw).decode().partition(":")
    return int(rev), int(n)


class PhysaliaConfigStore:
    def __init__(self, colony: Colony, *, replicas: int | None = None) -> None:
        self.colony = colony
        self._client: StoreClient | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        n = len(colony.nodes)
        self.replicas = replicas or min(7, n if n % 2 else n - 1)
        self._cells: set[str] = set()

    @classmethod
    def from_file(cls, path: str, **kw: Any) -> PhysaliaConfigStore:
        return cls(Colony.load(path), **kw)

    @property
    def client(self) -> StoreClient:
        """The store client of the running event loop (its connections and locks belong to
        one loop; a caller that moves to another loop gets a fresh client)."""
        loop = asyncio.get_running_loop()
        if self._client is None or self._loop is not loop:
            self._client, self._loop = StoreClient(self.colony), loop
        return self._client

    async def _ensure(self, cell: str) -> None:
        if cell not in self._cells:
            await self._call(self.client.create_cell(cell, replicas=self.replicas))
            self._cells.add(cell)

    @staticmethod
    async def _call(coro: Any) -> Any:
        try:
            return await coro
        except StoreRejected as e:
            raise ConfigStoreError(str(e)) from e
        except (StoreUnavailable, StoreBusy) as e:
            raise ConfigStoreUnavailable(str(e)) from e

    # -- one chunked value in one cell -----------------------------------------------------------
    async def _read(self, cell: str) -> tuple[bytes | None, Any]:
        await self._ensure(cell)
        _, values = await self._call(self.client.txn(
            cell, ["h", *(f"c{i}" for i in range(chunks_max))]))
        if values[0] is None:
            return None, None
        n = _head(values[0])[1]
        return b"".join(bytes(v) for v in values[1:1 + n] if v is not None), values[0]

    async def _write(self, cell: str, old_head: Any, rev: int, value: bytes | None) -> bool:
        old_n = _head(old_head)[1]
        chunks = ([value[i:i + chunk_bytes] for i in range(0, len(value), chunk_bytes)]
                  if value is not None else [])
        writes: list[tuple[str, Any]] = [("h", f"{rev}:{len(chunks)}".encode()
                                          if value is not None else None)]
        writes += [(f"c{i}", c) for i, c in enumerate(chunks)]
        writes += [(f"c{i}", None) for i in range(len(chunks), old_n)]
        check = ("h", "eq", old_head) if old_head is not None else ("h", "absent", None)
        ok, _ = await self._call(self.client.txn(cell, [], [check], writes))
        return bool(ok)

    async def _next_revision(self) -> int:
        await self._ensure(COUNTER_CELL)
        for _ in range(cas_attempts_max):
            cur = await self._call(self.client.get(COUNTER_CELL, "rev"))
            nxt = (int(cur) if cur is not None else 0) + 1
            if await self._call(self.client.cas(COUNTER_CELL, "rev", cur, nxt)):
                return nxt
        raise ConfigStoreUnavailable("the revision counter is too contended")

    async def _index(self, add: str | None = None, remove: str | None = None) -> list[str]:
        for _ in range(cas_attempts_max):
            raw, head = await self._read(INDEX_CELL)
            keys = sorted(set(raw.decode().split("\n")) - {""}) if raw else []
            if add is None and remove is None:
                return keys
            new = sorted((set(keys) | ({add} if add else set())) - ({remove} if remove else set()))
            if new == keys:
                return keys
            rev = _head(head)[0] + 1
            data = "\n".join(new).encode()
            if len(data) > physalia_value_bytes_max:
                raise ConfigStoreError("too many keys for the index (config_list_max)")
            if await self._write(INDEX_CELL, head, rev, data):
                return new
        raise ConfigStoreUnavailable("the key index is too contended")

    # -- the ConfigStore contract -----------------------------------------------------------------
    @staticmethod
    def _check(key: str, value: bytes | None = None) -> None:
        if "\n" in key:
            raise ConfigStoreError("the physalia backend's index cannot hold a key with a newline")
        if not key or len(key.encode()) > config_key_bytes_max:
            raise ConfigStoreError(f"a key must be 1 to config_key_bytes_max="
                                   f"{config_key_bytes_max} bytes")
        if value is not None and len(value) > min(config_value_bytes_max,
                                                  physalia_value_bytes_max):
            raise ConfigStoreError(
                f"value of {len(value)} bytes is over config_value_bytes_max for the physalia "
                f"backend ({physalia_value_bytes_max})")

    async def get(self, key: str) -> Entry | None:
        self._check(key)
        value, head = await self._read(_cell(key))
        if value is None and head is None:
            return None
        return Entry(key, value or b"", _head(head)[0])

    async def cas(self, key: str, expected_revision: int, value: bytes) -> int | None:
        self._check(key, value)
        cell = _cell(key)
        _, head = await self._read(cell)
        current = _head(head)[0]
        if current != expected_revision:
            return None
        rev = await self._next_revision()
        if not await self._write(cell, head, rev, value):
            return None
        if head is None:
            await self._index(add=key)
        return rev

    async def put(self, key: str, value: bytes) -> int:
        self._check(key, value)
        for _ in range(cas_attempts_max):
            e = await self.get(key)
            rev = await self.cas(key, e.revision if e else 0, value)
            if rev is not None:
                return rev
        raise ConfigStoreUnavailable(f"{key!r} is too contended")

    async def delete(self, key: str) -> bool:
        self._check(key)
        cell = _cell(key)
        for _ in range(cas_attempts_max):
            _, head = await self._read(cell)
            if head is None:
                return False
            if await self._write(cell, head, 0, None):
                await self._index(remove=key)
                return True
        raise ConfigStoreUnavailable(f"{key!r} is too contended")

    async def list(self, prefix: str) -> list[Entry]:
        keys = [k for k in await self._index() if k.startswith(prefix)]
        if len(keys) > config_list_max:
            raise ConfigStoreError(f"more than config_list_max={config_list_max} keys under "
                                   f"{prefix!r}")
        entries = await asyncio.gather(*(self.get(k) for k in keys))
        return [e for e in entries if e is not None]

    async def close(self) -> None:
        if self._client is not None and self._loop is asyncio.get_running_loop():
            await self._client.close()
        self._client = None

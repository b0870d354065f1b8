"""The volume client: the asyncio shell around ``ClientCore`` (docs/volumes.md).

    store = StoreClient.from_file("colony.json")
    servers = load_servers("servers.json")          # {id: ServerAddress}
    cfg = await create_volume(store, "vol-1", 1 << 30, servers)
    vc = VolumeClient("vol-1", store, servers, client_id="host-a")
    await vc.attach()                                # takes the volume over (epoch + 1)
    await vc.write(0, b"...")                        # returns once durable on every replica
    data = await vc.read(0, 4096)                    # from the primary
    await vc.flush()
    await vc.close()

The volume's configuration lives in ONE store cell per volume (``vol.<volume_id>``, key
``config``), created near the volume's servers' zone. Writes larger than
``volume_write_bytes_max`` are split. Up to ``volume_client_ops_inflight_max`` non-overlapping
operations are in flight at once (overlapping ones run in order); re-mirror chunks, one at a
time, alternate with them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import time
from dataclasses import dataclass, field
from typing import Any

from cellcloud import transport
from cellcloud.core.limits import DEFAULT_LIMITS
from cellcloud.store.client import StoreClient, StoreError
from cellcloud.volumes.blockdev import data_extents, replace_durably
from cellcloud.volumes.core import (
    CONFIG_KEY,
    CfgCas,
    CfgGet,
    ClientAction,
    ClientCore,
    ClientParams,
    Complete,
    Deposed,
    SendServer,
    ServerInfo,
    VolumeAttached,
    VolumeConfig,
    VolumeError,
    VolumeUnavailable,
    choose_replicas,
    volume_zone,
)


@dataclass(frozen=True)
class ServerAddress:
    server_id: str
    host: str
    port: int
    labels: dict[str, str] = field(default_factory=dict)


def load_servers(path: str) -> dict[str, ServerAddress]:
    """A servers file: ``{"s1": {"host": ..., "port": ..., "labels": {...}}, ...}``."""
    with open(path) as f:
        raw = json.load(f)
    return {sid: ServerAddress(sid, s["host"], int(s["port"]), dict(s.get("labels", {})))
            for sid, s in raw.items()}


def cell_of(volume_id: str) -> str:
    return f"vol.{volume_id}"


def _infos(servers: dict[str, ServerAddress]) -> list[ServerInfo]:
    return [ServerInfo(s.server_id, dict(s.labels)) for s in servers.values()]


async def create_volume(
    store: StoreClient,
    volume_id: str,
    size_bytes: int,
    servers: dict[str, ServerAddress],
    *,
    replicas: int = DEFAULT_LIMITS.volume_replicas,
    cell_replicas: int | None = None,
    rng: random.Random | None = None,
) -> VolumeConfig:
    """Place the volume's replicas, create its configuration cell near them, write epoch 1."""
    lim = DEFAULT_LIMITS
    gib = 1024**3
    if not lim.volume_size_gib_min * gib <= size_bytes <= lim.volume_size_gib_max * gib:
        raise VolumeError(f"size {size_bytes} bytes is outside [{lim.volume_size_gib_min}, "
                          f"{lim.volume_size_gib_max}] GiB")
    rng = rng or random.Random()
    infos = _infos(servers)
    first = rng.choice(sorted(servers))
    chosen = choose_replicas(infos, [first], set(), replicas, rng)
    zone = volume_zone(infos, chosen)
    nodes = len(store.colony.nodes)
    n = cell_replicas or max(r for r in (1, 3, 5, 7) if r <= nodes)
    await store.create_cell(cell_of(volume_id), near_zone=zone, replicas=n)
    cfg = VolumeConfig(volume_id, size_bytes, 1, tuple(chosen), chosen[0])
    if not await store.cas(cell_of(volume_id), CONFIG_KEY, None, cfg.encode()):
        raise VolumeError(f"volume {volume_id} exists")
    return cfg


class VolumeClient:
    """One attached writer of one volume (see the module doc). ``read``/``write``/``flush``/
    ``size_bytes`` are the interface the block-device attachment calls."""

    def __init__(
        self,
        volume_id: str,
        store: StoreClient,
        servers: dict[str, ServerAddress],
        *,
        client_id: str,
        params: ClientParams | None = None,
        tick_ms: int = 20,
        rng: random.Random | None = None,
    ) -> None:
        self.volume_id = volume_id
        self.store = store
        self.servers = servers
        self.params = params or ClientParams(
            replicas=DEFAULT_LIMITS.volume_replicas, request_timeout_ms=1_000,
            cfg_timeout_ms=6_000, retry_backoff_ms=200, mirror_chunk_bytes=1024 * 1024,
            rewire_attempts_max=DEFAULT_LIMITS.volume_rewire_attempts_max,
            inflight_max=DEFAULT_LIMITS.volume_client_ops_inflight_max,
            write_batch_max=DEFAULT_LIMITS.volume_write_batch_writes_max,
            batch_bytes_max=DEFAULT_LIMITS.volume_write_bytes_max)
        self.core = ClientCore(client_id, volume_id, _infos(servers), rng or random.Random(),
                               self.params)
        self.jitter = random.Random()
        self.tick_s = tick_ms / 1000
        self.conns: dict[str, transport.Client] = {}
        self.futures: dict[int, asyncio.Future[Complete]] = {}
        self.op_ids = 0
        self.cfg_seq = 0
        self.tasks: set[asyncio.Task[Any]] = set()
        self.ticker: asyncio.Task[None] | None = None
        self.ready = asyncio.Event()
        self.t0 = time.monotonic()
        self.events: list[tuple[float, str]] = []  # (monotonic s, what): rewires, deposal

    # ---- the BlockStore interface ------------------------------------------------------------

    @property
    def size_bytes(self) -> int:
        if self.core.config is None:
            raise VolumeError("not attached")
        return self.core.config.size_bytes

    async def attach(self, timeout_s: float = 60.0, *, force: bool = True) -> VolumeConfig:
        """Attach: take the volume over (``force``: even from another attached client, which
        is fenced), else raise ``VolumeAttached`` if another client has it."""
        self.core.force = force
        self.ticker = asyncio.create_task(self._tick())
        self._run(self.core.start(self._now()))
        await asyncio.wait_for(self._until_ready(), timeout_s)
        assert self.core.config is not None
        return self.core.config

    async def write(self, offset: int, data: bytes) -> None:
        """Returns once ``data`` is durable on every replica of the current configuration."""
        step = DEFAULT_LIMITS.volume_write_bytes_max
        for i in range(0, max(len(data), 1), step):
            await self._op("write", offset + i, data[i: i + step], 0)

    async def read(self, offset: int, length: int) -> bytes:
        step = DEFAULT_LIMITS.volume_write_bytes_max
        parts = []
        for i in range(0, length, step):
            parts.append(await self._op("read", offset + i, b"", min(step, length - i)))
        return b"".join(parts)

    async def flush(self) -> None:
        """Writes are durable when ``write`` returns; flush waits for any still in flight."""
        pending = [f for f in self.futures.values() if not f.done()]
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)

    async def close(self) -> None:
        if self.ticker is not None:
            self.ticker.cancel()
            with contextlib.suppress(BaseException):
                await self.ticker
        for t in list(self.tasks):
            t.cancel()
        for c in self.conns.values():
            with contextlib.suppress(Exception):
                await c.close()
        self.conns = {}

    # ---- the shell -----------------------------------------------------------------------------

    def _now(self) -> int:
        return int((time.monotonic() - self.t0) * 1000)

    async def detach(self, timeout_s: float = 60.0) -> None:
        """Finish what is in flight, then give the volume up (attached_client = "")."""
        await self.flush()

        async def wait() -> None:
            while self.core.phase not in ("detached", "deposed"):
                if self.core.phase == "ready" and self.core.cfg_pending is None:
                    self._run(self.core.detach(self._now()))
                self.ready.clear()
                await self.ready.wait()

        await asyncio.wait_for(wait(), timeout_s)
        await self.close()

    async def _until_ready(self) -> None:
        while self.core.phase != "ready":
            if self.core.phase == "refused":
                raise VolumeAttached(f"{self.volume_id}: attached by another client")
            if self.core.phase == "deposed":
                if self.core.config is None:
                    raise VolumeError(f"{self.volume_id}: no such volume")
                raise Deposed(f"{self.volume_id}: attached by another client")
            self.ready.clear()
            await self.ready.wait()

    async def _op(self, kind: str, offset: int, data: bytes, length: int) -> bytes:
        self.op_ids += 1
        op_id = self.op_ids
        fut: asyncio.Future[Complete] = asyncio.get_running_loop().create_future()
        self.futures[op_id] = fut
        try:
            if kind == "write":
                self._run(self.core.submit_write(op_id, offset, data, self._now()))
            else:
                self._run(self.core.submit_read(op_id, offset, length, self._now()))
            done = await fut
        finally:
            self.futures.pop(op_id, None)
        if not done.ok:
            if done.error == "deposed":
                raise Deposed(f"{self.volume_id}: attached by another client")
            if ("past the end" in done.error or "out of range" in done.error
                    or done.error == "no such volume"):
                raise VolumeError(done.error)
            raise VolumeUnavailable(f"{self.volume_id}: {done.error}")
        return done.data

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(self.tick_s)
            self._run(self.core.on_tick(self._now()))

    def _spawn(self, coro: Any) -> None:
        t = asyncio.create_task(coro)
        self.tasks.add(t)
        t.add_done_callback(self.tasks.discard)

    def _run(self, actions: list[ClientAction]) -> None:
        epoch = self.core.config.epoch if self.core.config else 0
        for a in actions:
            if isinstance(a, CfgGet | CfgCas):
                self.cfg_seq += 1
                self._spawn(self._cfg(a, self.cfg_seq))
            elif isinstance(a, SendServer):
                self._spawn(self._send(a))
            elif isinstance(a, Complete):
                fut = self.futures.get(a.op_id)
                if fut is not None and not fut.done():
                    fut.set_result(a)
        cfg = self.core.config
        if cfg is not None and cfg.epoch != epoch:
            self.events.append((time.monotonic(), f"epoch {cfg.epoch} {list(cfg.replicas)}"))
        self.ready.set()

    async def _cfg(self, action: CfgGet | CfgCas, seq: int) -> None:
        cell = cell_of(self.volume_id)
        ok: bool | None = None
        if isinstance(action, CfgCas):
            with contextlib.suppress(StoreError):  # outcome unknown: the read below tells
                ok = await self.store.cas(cell, CONFIG_KEY, action.expected.encode(),
                                          action.new.encode())
            if ok:  # the cell holds exactly the new record: no need to read it back
                if seq == self.cfg_seq:
                    self._run(self.core.on_cfg(action.new, True, self._now()))
                return
        backoff_s = 0.05
        while True:
            try:
                raw = await self.store.get(cell, CONFIG_KEY)
                break
            except StoreError:
                # Busy or unreachable: read again soon (jittered, capped), unless the core has
                # asked something newer meanwhile.
                await asyncio.sleep(self.jitter.uniform(0, backoff_s))
                backoff_s = min(backoff_s * 2, 2.0)
                if seq != self.cfg_seq:
                    return
        if seq != self.cfg_seq:
            return  # an answer to an older request
        if not isinstance(raw, bytes):
            self._run(self.core.gone(self._now()))
            return
        self._run(self.core.on_cfg(VolumeConfig.decode(raw), ok, self._now()))

    async def _send(self, a: SendServer) -> None:
        addr = self.servers.get(a.server)
        reply: dict[str, Any] | None = None
        if addr is not None:
            conn = self.conns.get(a.server)
            if conn is None:
                conn = self.conns[a.server] = transport.Client(
                    addr.host, addr.port, connect_timeout_s=self.params.request_timeout_ms / 1000,
                    expect_role="storage")  # under mTLS: only a storage server is talked to
            try:
                reply = await conn.call("volume", a.request,
                                        timeout_s=self.params.request_timeout_ms / 1000)
            except (transport.TransportError, transport.RemoteError, OSError):
                reply = None
        self._run(self.core.on_server(a.rid, reply, self._now()))


def _preads(fd: int, parts: list[tuple[int, int]]) -> list[bytes]:
    return [os.pread(fd, n, o) for o, n in parts]


class RegionVolumes:
    """A region's replicated volumes as its control plane makes and deletes them (the EC2
    API's ``CreateVolume``/``DeleteVolume``, control/ec2.py): the store colony that holds each
    volume's config cell and the storage servers file the supervisor writes. The servers file
    is read at each call (a restarted server keeps its port, so it stays true)."""

    def __init__(self, colony_path: str, servers_path: str,
                 request_timeout_s: float = 5.0) -> None:
        self.colony_path = colony_path
        self.servers_path = servers_path
        self.request_timeout_s = request_timeout_s
        self._store: StoreClient | None = None

    def store(self) -> StoreClient:
        if self._store is None:  # made on the loop that uses it
            self._store = StoreClient.from_file(self.colony_path)
        return self._store

    async def create(self, volume_id: str, size_bytes: int) -> VolumeConfig:
        """Place the replicas and write epoch 1; a volume made before with this id and size
        (a retried create) is returned as it is."""
        store = self.store()
        try:
            return await create_volume(store, volume_id, size_bytes,
                                       load_servers(self.servers_path))
        except VolumeError:
            raw = await store.get(cell_of(volume_id), CONFIG_KEY)
            if isinstance(raw, bytes):
                cfg = VolumeConfig.decode(raw)
                if cfg.size_bytes == size_bytes:
                    return cfg
            raise

    async def delete(self, volume_id: str) -> list[str]:
        """Delete the volume's record (compare-and-set, so a rewire racing it is seen), then
        tell every storage server to drop its bytes, at the epoch after the last record (which
        stays as a tombstone on each server that held it: the last writer is refused; a
        replica the volume was rewired away from goes too). The servers that answered; a
        server down now keeps its file (not collected yet)."""
        store = self.store()
        cell = cell_of(volume_id)
        while True:
            raw = await store.get(cell, CONFIG_KEY)
            if not isinstance(raw, bytes):
                return []  # never made, or deleted already
            if await store.cas(cell, CONFIG_KEY, raw, None):
                break
        cfg = VolumeConfig.decode(raw)
        gone = VolumeConfig(volume_id, cfg.size_bytes, cfg.epoch + 1, cfg.replicas,
                            cfg.primary)
        servers = load_servers(self.servers_path)
        req = {"op": "drop", "volume": volume_id, "epoch": gone.epoch,
               "config": gone.to_dict()}

        async def drop(sid: str) -> str | None:
            addr = servers.get(sid)
            if addr is None:
                return None
            conn = transport.Client(addr.host, addr.port, expect_role="storage",
                                    connect_timeout_s=self.request_timeout_s)
            try:
                reply = await conn.call("volume", req, timeout_s=self.request_timeout_s)
                return sid if reply.get("status") == "ok" else None
            except (transport.TransportError, transport.RemoteError, OSError):
                return None
            finally:
                with contextlib.suppress(Exception):
                    await conn.close()

        done = await asyncio.gather(*(drop(s) for s in sorted(servers)))
        return [s for s in done if s is not None]

    async def _call(self, sid: str, req: dict[str, Any]) -> dict[str, Any] | None:
        """One request to storage server ``sid`` (None: unreachable, or no such server)."""
        addr = load_servers(self.servers_path).get(sid)
        if addr is None:
            return None
        conn = transport.Client(addr.host, addr.port, expect_role="storage",
                                connect_timeout_s=self.request_timeout_s)
        try:
            reply: dict[str, Any] = await conn.call("volume", req,
                                                    timeout_s=self.request_timeout_s)
            return reply
        except (transport.TransportError, transport.RemoteError, OSError):
            return None
        finally:
            with contextlib.suppress(Exception):
                await conn.close()

    async def freeze(self, volume_id: str, snapshot_id: str, attempts: int = 20) -> str:
        """A snapshot's point in time (docs/volumes.md, "Snapshots"): read the volume's
        configuration, then ask a complete replica of it (the primary first) to freeze a copy
        of its bytes — every write acknowledged before this call is in it, and the copy is
        made between two of the volume's requests (crash-consistent). Works while a writer is
        attached. Returns the server that holds the frozen copy."""
        store = self.store()
        why = "no complete replica answered"
        for _ in range(attempts):
            raw = await store.get(cell_of(volume_id), CONFIG_KEY)
            if not isinstance(raw, bytes):
                raise VolumeError(f"{volume_id}: no such volume")
            cfg = VolumeConfig.decode(raw)
            req = {"op": "snapshot", "volume": volume_id, "epoch": cfg.epoch,
                   "config": cfg.to_dict(), "snapshot": snapshot_id}
            for sid in [cfg.primary] + [r for r in cfg.complete() if r != cfg.primary]:
                reply = await self._call(sid, req)
                status = reply.get("status") if reply else None
                if status == "ok":
                    return sid
                why = f"{sid}: {reply.get('message') or status}" if reply else f"{sid}: down"
                if status == "stale":
                    break  # the configuration moved on: read it again
            await asyncio.sleep(0.2)
        raise VolumeUnavailable(f"{volume_id}: no snapshot taken ({why})")

    async def copy_frozen(self, volume_id: str, snapshot_id: str, sid: str, dst: str,
                          size_bytes: int, attempts: int = 50) -> None:
        """Copy the frozen copy on ``sid`` into the sparse file ``dst`` (through
        ``dst.part``, fsynced, renamed; holes skipped), then drop it from the server."""
        chunk = DEFAULT_LIMITS.volume_write_bytes_max
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        tmp = dst + ".part"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            os.ftruncate(fd, size_bytes)
            off, fails = 0, 0
            while off < size_bytes:
                n = min(chunk, size_bytes - off)
                reply = await self._call(sid, {"op": "snapshot_read", "volume": volume_id,
                                               "snapshot": snapshot_id, "offset": off,
                                               "length": n})
                if not reply or reply.get("status") != "ok":
                    fails += 1  # a restarted server keeps its frozen copy: try again
                    if fails >= attempts:
                        raise VolumeUnavailable(f"{volume_id}: the frozen copy on {sid} "
                                                f"cannot be read: {reply}")
                    await asyncio.sleep(0.2)
                    continue
                if not reply.get("hole"):
                    await asyncio.to_thread(os.pwrite, fd, bytes(reply["data"]), off)
                nxt = reply.get("next")
                off = max(off + n, nxt if isinstance(nxt, int) else 0)
            await asyncio.to_thread(os.fsync, fd)
        except BaseException:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        os.close(fd)
        replace_durably(tmp, dst)
        await self._call(sid, {"op": "snapshot_drop", "volume": volume_id,
                               "snapshot": snapshot_id})

    async def restore(self, volume_id: str, fd: int | None, client_id: str,
                      window: int = 8) -> None:
        """Write the data extents of the file open at ``fd`` (a snapshot's bytes; None: all
        zeroes) into the replicated volume ``volume_id``, attached as ``client_id`` (up to
        ``window`` writes at once: group-committed), then detach. ``fd`` is closed."""

        vc = VolumeClient(volume_id, self.store(), load_servers(self.servers_path),
                          client_id=client_id)
        try:
            await vc.attach()
            if fd is not None:
                step = DEFAULT_LIMITS.volume_write_bytes_max
                end = min(vc.size_bytes, os.fstat(fd).st_size)
                ranges = [(o, min(step, stop - o)) for start, stop in data_extents(fd, end)
                          for o in range(start, stop, step)]
                for i in range(0, len(ranges), window):
                    parts = ranges[i: i + window]
                    datas = await asyncio.to_thread(_preads, fd, parts)
                    await asyncio.gather(*(vc.write(o, d) for (o, _), d in zip(parts, datas,
                                                                               strict=True)))
            await vc.detach()
        finally:
            await vc.close()
            if fd is not None:
                os.close(fd)

    async def close(self) -> None:
        if self._store is not None:
            await self._store.close()
            self._store = None

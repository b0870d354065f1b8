"""The storage server: a process that holds volume replicas as sparse files and only ANSWERS
(like an agent): ``cellcloud storage serve``.

Its decisions are ``ServerCore``'s (fencing by epoch); this shell carries out their effects in
order, durably, before it answers: a learned configuration is written to
``<vol>.volume.json`` (write, fsync, rename, fsync the directory), a write goes into
``<vol>.img`` with ``pwrite`` and ``fdatasync``. Requests of one volume are carried out in arrival order (a FIFO lock), the
disk work in a thread so the event loop keeps answering other volumes.

One transport op, ``volume`` (the request dict of ``volumes/core.py``), and ``stats``. The
links are the transport's (msgpack frames); with ``--pki-dir`` they are mutual TLS as role
``storage``, which accepts only ``volume`` and ``control`` peers.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
from typing import Any

from cellcloud import transport
from cellcloud.volumes.blockdev import copy_extents
from cellcloud.volumes.core import (
    INVALID,
    DropData,
    DropFrozen,
    FreezeData,
    PersistConfig,
    ReadData,
    ReadFrozen,
    ResetData,
    ServerCore,
    VolumeConfig,
    VolumeError,
    WriteData,
)

VOLUME_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def _is_hole(fd: int, offset: int, length: int) -> bool:
    """No data is allocated in [offset, offset + length) (it reads as zeroes)."""
    try:
        return os.lseek(fd, offset, os.SEEK_DATA) >= offset + length
    except OSError:  # ENXIO: no data after offset
        return True


class StorageServer:
    def __init__(self, server_id: str, state_dir: str) -> None:
        self.server_id = server_id
        self.dir = state_dir
        os.makedirs(state_dir, exist_ok=True)
        self.core = ServerCore(server_id)
        self.core.load(self._load_configs())
        self.locks: dict[str, asyncio.Lock] = {}
        self.fds: dict[str, int] = {}
        self.counters = {"requests": 0, "writes": 0, "reads": 0, "refused": 0, "dropped": 0,
                         "write_batches": 0, "snapshots": 0}

    def _load_configs(self) -> list[VolumeConfig]:
        out = []
        for name in sorted(os.listdir(self.dir)):
            if name.endswith(".volume.json"):
                with open(os.path.join(self.dir, name), "rb") as f:
                    out.append(VolumeConfig.decode(f.read()))
        return out

    def _fd(self, volume_id: str, size_bytes: int) -> int:
        fd = self.fds.get(volume_id)
        if fd is None:
            fd = os.open(os.path.join(self.dir, f"{volume_id}.img"), os.O_RDWR | os.O_CREAT,
                         0o600)
            if os.fstat(fd).st_size < size_bytes:
                os.ftruncate(fd, size_bytes)  # sparse: no blocks until written
            self.fds[volume_id] = fd
        return fd

    def _persist_config(self, cfg: VolumeConfig) -> None:
        path = os.path.join(self.dir, f"{cfg.volume_id}.volume.json")
        tmp = path + ".tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, cfg.encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        dfd = os.open(self.dir, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
        self._fd(cfg.volume_id, cfg.size_bytes)

    def _carry_out(self, effects: list[Any], size_bytes: int) -> dict[str, Any] | None:
        read: dict[str, Any] | None = None
        wrote: set[int] = set()
        for e in effects:
            if isinstance(e, ResetData):
                fd = self._fd(e.volume_id, e.size_bytes)
                os.ftruncate(fd, 0)  # every block a hole again
                os.ftruncate(fd, e.size_bytes)
                os.fsync(fd)
            elif isinstance(e, PersistConfig):
                self._persist_config(e.config)
            elif isinstance(e, DropData):
                if e.volume_id in self.fds:
                    os.close(self.fds.pop(e.volume_id))
                try:
                    os.unlink(os.path.join(self.dir, f"{e.volume_id}.img"))
                except FileNotFoundError:
                    pass
            elif isinstance(e, WriteData):
                fd = self._fd(e.volume_id, size_bytes)
                if _is_hole(fd, e.offset, len(e.data)) and e.data == bytes(len(e.data)):
                    continue  # zeroes onto a hole (a re-mirrored sparse region): nothing to do
                os.pwrite(fd, e.data, e.offset)
                wrote.add(fd)
            elif isinstance(e, FreezeData):
                # under the volume's lock: no write lands while the copy is made
                src = os.dup(self._fd(e.volume_id, size_bytes))
                copy_extents(src, self._frozen_path(e.volume_id, e.snapshot_id), size_bytes)
            elif isinstance(e, ReadFrozen):
                read = self._read_frozen(e)
            elif isinstance(e, DropFrozen):
                try:
                    os.unlink(self._frozen_path(e.volume_id, e.snapshot_id))
                except FileNotFoundError:
                    pass
            elif isinstance(e, ReadData):
                fd = self._fd(e.volume_id, size_bytes)
                read = {}
                if e.mirror:
                    end = e.offset + e.length
                    try:
                        read["next"] = os.lseek(fd, end, os.SEEK_DATA) if end < size_bytes \
                            else size_bytes
                    except OSError:  # ENXIO: only holes after the range
                        read["next"] = size_bytes
                    if _is_hole(fd, e.offset, e.length):
                        read.update(hole=True, data=b"")
                        continue
                read["data"] = os.pread(fd, e.length, e.offset)
        for fd in wrote:
            os.fdatasync(fd)  # durable before the answer leaves
        return read

    def _frozen_path(self, volume_id: str, snapshot_id: str) -> str:
        return os.path.join(self.dir, f"{volume_id}.{snapshot_id}.frozen")

    def _read_frozen(self, e: ReadFrozen) -> dict[str, Any]:
        fd = os.open(self._frozen_path(e.volume_id, e.snapshot_id), os.O_RDONLY | os.O_CLOEXEC)
        try:
            size = os.fstat(fd).st_size
            end = min(e.offset + e.length, size)
            out: dict[str, Any] = {"size": size}
            try:
                out["next"] = os.lseek(fd, end, os.SEEK_DATA) if end < size else size
            except OSError:  # ENXIO: only holes after the range
                out["next"] = size
            if e.offset >= end or _is_hole(fd, e.offset, end - e.offset):
                out.update(hole=True, data=b"")
            else:
                out["data"] = os.pread(fd, end - e.offset, e.offset)
            return out
        finally:
            os.close(fd)

    async def handle(self, req: Any) -> dict[str, Any]:
        self.counters["requests"] += 1
        if not isinstance(req, dict) or not VOLUME_ID.match(str(req.get("volume", ""))):
            self.counters["refused"] += 1
            return {"status": INVALID, "message": "malformed request"}
        lock = self.locks.setdefault(req["volume"], asyncio.Lock())
        async with lock:
            reply, effects = self.core.on_request(req)
            if not effects:
                if reply.get("status") != "ok":
                    self.counters["refused"] += 1
                return reply
            try:
                size = int(req["config"]["size_bytes"]) if "config" in req else 0
                read = await asyncio.to_thread(self._carry_out, effects, size)
            except (OSError, VolumeError, ValueError) as exc:
                return {"status": "io_error", "message": str(exc)}
            if read is not None:
                self.counters["reads"] += 1
                reply = dict(reply, **read)
            elif any(isinstance(e, WriteData) for e in effects):
                self.counters["writes"] += 1
                if req.get("op") == "write_batch":  # a group-commit round: one fdatasync
                    self.counters["write_batches"] += 1
            elif any(isinstance(e, FreezeData) for e in effects):
                self.counters["snapshots"] += 1
            elif any(isinstance(e, DropData) for e in effects):
                self.counters["dropped"] += 1
            return reply

    async def stats(self, _body: Any) -> dict[str, Any]:
        return {"server": self.server_id, **self.counters,
                "volumes": {v: s.config.epoch for v, s in self.core.volumes.items()}}

    def ops(self) -> dict[str, Any]:
        return {"volume": self.handle, "stats": self.stats}

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds = {}


async def serve(server_id: str, state_dir: str, host: str, port: int,
                ready: Any = None) -> None:
    """Serve until cancelled; ``ready(host, port)`` once listening."""
    srv = StorageServer(server_id, state_dir)
    t = transport.Server(srv.ops())
    addr = await t.listen_tcp(host, port)
    with open(os.path.join(state_dir, "server.json"), "w") as f:
        json.dump({"server": server_id, "host": addr[0], "port": addr[1]}, f)
    if ready is not None:
        ready(*addr)
    try:
        await asyncio.Event().wait()
    finally:
        await t.close()
        srv.close()

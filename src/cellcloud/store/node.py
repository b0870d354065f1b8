"""A store node: an asyncio shell around many ``Replica`` cores.

The loop: frames arrive on TCP connections (peers and clients alike), are authenticated
(HMAC) and decoded, and queue in a bounded inbox. The main task takes everything queued,
feeds it to the replicas, writes every persist action of the batch to SQLite in one fsynced
transaction (group commit), and only then sends the batch's messages and replies. A timer
feeds ticks. Replicas are loaded from SQLite on first use and evicted least-recently-used
beyond ``replicas_loaded_max``; an idle cell costs no memory.

Run one: ``python -m cellcloud.store node --colony colony.json --node n1``. It prints
``READY <node> <host>:<port>`` on stdout once it accepts connections.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import random
import sys
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any

from cellcloud.core.paxos import (
    NOT_HERE,
    PERSIST_ACTIONS,
    Action,
    Replica,
    ReplicaParams,
    Reply,
    Request,
    Response,
    Send,
)
from cellcloud.store.colony import Colony
from cellcloud.store.durable import SqliteStore
from cellcloud.store.wire import FrameRejected, decode, encode, read_frame, seal, unseal

ADMIN_TYPES = frozenset(
    {"create_cell", "create_cells", "locate", "stats", "cell_status", "directory", "ping"}
)


@dataclass
class NodeOptions:
    tick_ms: int = 10
    inbox_max: int = 20_000
    batch_max: int = 2_000
    peer_queue_max: int = 20_000
    replicas_loaded_max: int = 50_000
    connections_max: int = 1_024
    create_batch_max: int = 20_000
    params: ReplicaParams = field(default_factory=ReplicaParams)
    bug_skip_fsync: bool = False  # planted bug: only tests set it


class PeerLink:
    """Outbound frames to one peer, over a connection we (re)open ourselves."""

    def __init__(self, node: Node, peer: str, host: str, port: int) -> None:
        self.node = node
        self.peer = peer
        self.host = host
        self.port = port
        self.queue: deque[bytes] = deque()
        self.wakeup = asyncio.Event()
        self.task = asyncio.create_task(self.run())

    def send(self, frame: bytes) -> None:
        if len(self.queue) >= self.node.options.peer_queue_max:
            self.node.counters["peer_frames_dropped"] += 1
            return
        self.queue.append(frame)
        self.wakeup.set()

    async def run(self) -> None:
        backoff_ms = 10
        while True:
            try:
                _, writer = await asyncio.wait_for(
                    asyncio.open_connection(self.host, self.port), timeout=1.0
                )
            except (OSError, TimeoutError):
                self.queue.clear()  # peers retransmit; stale frames are worthless
                await asyncio.sleep(random.uniform(0, backoff_ms) / 1000)  # reconnect backoff
                backoff_ms = min(1000, backoff_ms * 2)
                continue
            backoff_ms = 10
            try:
                while True:
                    await self.wakeup.wait()
                    self.wakeup.clear()
                    while self.queue:
                        writer.write(self.queue.popleft())
                    await writer.drain()
            except (OSError, ConnectionError):
                with contextlib.suppress(Exception):
                    writer.close()


class Node:
    def __init__(
        self, colony: Colony, node_id: str, data_dir: str, options: NodeOptions | None = None
    ) -> None:
        self.colony = colony
        self.node_id = node_id
        self.key = colony.key
        self.options = options or NodeOptions()
        self.host, self.port = colony.address(node_id)
        os.makedirs(data_dir, exist_ok=True)
        self.store = SqliteStore(
            os.path.join(data_dir, f"{node_id}.sqlite3"), fsync=not self.options.bug_skip_fsync
        )
        self.replicas: OrderedDict[str, Replica] = OrderedDict()
        self.config_seen: dict[str, int] = {}
        self.inbox: asyncio.Queue[tuple[str, Any, str]] = asyncio.Queue(self.options.inbox_max)
        self.clients: dict[str, asyncio.StreamWriter] = {}
        self.links: dict[str, PeerLink] = {}
        self.tokens = itertools.count(1)
        self.rng = random.Random(int.from_bytes(os.urandom(8), "big"))
        self.counters: dict[str, int] = {
            "frames_in": 0,
            "frames_unauthenticated": 0,
            "frames_undecodable": 0,
            "requests": 0,
            "inbox_full": 0,
            "peer_frames_dropped": 0,
            "fsync_batches": 0,
            "replicas_loaded": 0,
            "replicas_evicted": 0,
        }
        self.server: asyncio.Server | None = None

    @staticmethod
    def now_ms() -> int:
        return int(time.monotonic() * 1000)

    # ---- replicas ---------------------------------------------------------------------------

    def replica(self, cell: str) -> Replica | None:
        r = self.replicas.get(cell)
        if r is not None:
            self.replicas.move_to_end(cell)
            return r
        loaded = self.store.load(cell)
        if loaded is None:
            return None
        members, durable = loaded
        r = Replica(
            cell,
            self.node_id,
            members,
            self.options.params,
            random.Random(self.rng.getrandbits(64)),
            self.now_ms(),
            durable,
        )
        r.batching = True
        self.replicas[cell] = r
        self.config_seen[cell] = len(r.sm.configs)
        self.counters["replicas_loaded"] += 1
        while len(self.replicas) > self.options.replicas_loaded_max:
            old, _ = self.replicas.popitem(last=False)  # state is durable; only roles are lost
            self.config_seen.pop(old, None)
            self.counters["replicas_evicted"] += 1
        return r

    # ---- network ----------------------------------------------------------------------------

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._on_connection, self.host, self.port)
        for peer in self.colony.node_ids():
            if peer != self.node_id:
                host, port = self.colony.address(peer)
                self.links[peer] = PeerLink(self, peer, host, port)

    async def _on_connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        if len(self.clients) >= self.options.connections_max:
            writer.close()
            return
        token = f"conn:{next(self.tokens)}"
        self.clients[token] = writer
        try:
            while True:
                frame = await read_frame(reader)
                self.counters["frames_in"] += 1
                try:
                    body = unseal(self.key, frame)
                except FrameRejected:
                    self.counters["frames_unauthenticated"] += 1
                    continue
                self._enqueue(body, token)
        except (asyncio.IncompleteReadError, ConnectionError, FrameRejected, OSError):
            pass
        finally:
            self.clients.pop(token, None)
            with contextlib.suppress(Exception):
                writer.close()

    def _enqueue(self, body: dict[str, Any], token: str) -> None:
        t = body.get("t")
        if t in ADMIN_TYPES:
            item: tuple[str, Any, str] = ("admin", body, token)
        else:
            try:
                msg = decode(body)
            except (FrameRejected, TypeError, ValueError):
                self.counters["frames_undecodable"] += 1
                return
            if isinstance(msg, Request):
                msg = Request(msg.cell, token, msg.request_id, msg.client_id, msg.seq, msg.command)
            elif isinstance(msg, Response):
                self.counters["frames_undecodable"] += 1
                return
            item = ("msg", msg, token)
        try:
            self.inbox.put_nowait(item)
        except asyncio.QueueFull:
            self.counters["inbox_full"] += 1
            if item[0] == "msg" and isinstance(item[1], Request):
                req = item[1]
                resp = Response(req.cell, self.node_id, req.request_id, "busy")
                self._send_to_client(token, encode(resp))

    def _send_to_client(self, token: str, body: dict[str, Any]) -> None:
        writer = self.clients.get(token)
        if writer is not None and not writer.is_closing():
            writer.write(seal(self.key, body))

    def _send_to_peer(self, peer: str, body: dict[str, Any]) -> None:
        link = self.links.get(peer)
        if link is not None:
            link.send(seal(self.key, body))

    # ---- main loop --------------------------------------------------------------------------

    async def run(self) -> None:
        tick = asyncio.create_task(self._ticker())
        try:
            while True:
                first = await self.inbox.get()
                batch = [first]
                while len(batch) < self.options.batch_max and not self.inbox.empty():
                    batch.append(self.inbox.get_nowait())
                await self._process(batch)
        finally:
            tick.cancel()

    async def _ticker(self) -> None:
        while True:
            await asyncio.sleep(self.options.tick_ms / 1000)  # the shell's clock, not a test wait
            with contextlib.suppress(asyncio.QueueFull):
                self.inbox.put_nowait(("tick", None, ""))

    async def _process(self, batch: list[tuple[str, Any, str]]) -> None:
        actions: list[Action] = []
        admin_out: list[tuple[str, dict[str, Any]]] = []
        gossip: list[dict[str, Any]] = []
        now = self.now_ms()
        ticked = False
        touched: set[str] = set()
        for kind, payload, token in batch:
            if kind == "tick":
                if ticked:
                    continue
                ticked = True
                for loaded in list(self.replicas.values()):
                    actions.extend(loaded.on_tick(now))
            elif kind == "admin":
                reply = self._admin(payload, gossip)
                if reply is not None:
                    admin_out.append((token, reply))
            else:
                msg = payload
                if isinstance(msg, Request):
                    self.counters["requests"] += 1
                r = self.replica(msg.cell)
                if r is None:
                    if isinstance(msg, Request):
                        known = self.store.directory_get(msg.cell)
                        members = list(known[0]) if known else None
                        resp = Response(msg.cell, self.node_id, msg.request_id, NOT_HERE, members)
                        actions.append(Reply(token, resp))
                    continue
                if isinstance(msg, Request):
                    touched.add(msg.cell)
                actions.extend(r.on_message(msg, now))
                if len(r.sm.configs) != self.config_seen.get(r.cell):
                    self.config_seen[r.cell] = len(r.sm.configs)
                    eff, now_members = r.sm.configs[-1]
                    if self.store.directory_put(r.cell, now_members, eff):
                        gossip.append(
                            {
                                "t": "directory",
                                "cell": r.cell,
                                "members": list(now_members),
                                "version": eff,
                            }
                        )
        for cell in touched:
            busy_replica = self.replicas.get(cell)
            if busy_replica is not None:
                actions.extend(busy_replica.flush(now))
        persist = [a for a in actions if isinstance(a, PERSIST_ACTIONS)]
        if persist:
            # Group commit: one fsynced transaction for the whole batch, before any send.
            # Inline, not in a thread: an fsync here costs ~0.3 ms, a thread hand-off more CPU.
            self.store.persist(persist)
            self.counters["fsync_batches"] += 1
        for a in actions:
            if isinstance(a, Send):
                self._send_to_peer(a.to, encode(a.msg))
            elif isinstance(a, Reply):
                self._send_to_client(a.to, encode(a.msg))
        for token, reply in admin_out:
            self._send_to_client(token, reply)
        for g in gossip:
            for peer in self.links:
                self._send_to_peer(peer, g)

    # ---- admin ------------------------------------------------------------------------------

    def _admin(self, body: dict[str, Any], gossip: list[dict[str, Any]]) -> dict[str, Any] | None:
        t = body["t"]
        rid = body.get("request_id", 0)
        reply: dict[str, Any] = {"t": "admin_reply", "request_id": rid, "src": self.node_id}
        if t == "ping":
            return reply | {"ok": True}
        if t == "directory":
            members = tuple(body["members"])
            self.store.directory_put(body["cell"], members, int(body["version"]))
            return None
        if t == "create_cell":
            cell = body["cell"]
            initial = tuple(body["members"]) if body.get("members") else None
            if initial is not None and (len(initial) % 2 != 1 or self.node_id not in initial):
                return reply | {"ok": False, "error": "members must be odd and include node"}
            self.store.create_cells([(cell, initial)])
            if initial is not None and self.store.directory_put(cell, initial, 1):
                gossip.append(
                    {"t": "directory", "cell": cell, "members": list(initial), "version": 1}
                )
            return reply | {"ok": True}
        if t == "create_cells":
            # Batched creation (one transaction): idle cells live only in SQLite.
            batch = [(str(c), tuple(m)) for c, m in body["cells"]]
            if len(batch) > self.options.create_batch_max:
                return reply | {"ok": False, "error": "over create_batch_max"}
            if any(len(m) % 2 != 1 or self.node_id not in m for _, m in batch):
                return reply | {"ok": False, "error": "members must be odd and include node"}
            created = self.store.create_cells(batch)
            return reply | {"ok": True, "created": created}
        if t == "locate":
            known = self.store.directory_get(body["cell"])
            here = self.replica(body["cell"]) if known is None else self.replicas.get(body["cell"])
            found: list[str] | None = None
            if here is not None:
                found = list(here.config_for(here.commit_index + 1))
            elif known:
                found = list(known[0])
            return reply | {"ok": found is not None, "members": found}
        if t == "cell_status":
            loaded = self.replica(body["cell"])
            if loaded is None:
                return reply | {"ok": False, "error": "not here"}
            stats = loaded.statistics()
            stats["ballot"] = list(stats["ballot"])
            stats["promised"] = list(stats["promised"])
            stats["members"] = list(stats["members"])
            return reply | {"ok": True, "status": stats}
        if t == "stats":
            return reply | {
                "ok": True,
                "counters": dict(self.counters),
                "replicas_loaded_now": len(self.replicas),
                "cells": self.store.cell_count(),
                "inbox": self.inbox.qsize(),
            }
        return reply | {"ok": False, "error": f"unknown admin op {t}"}


async def serve(colony: Colony, node_id: str, data_dir: str, options: NodeOptions) -> None:
    node = Node(colony, node_id, data_dir, options)
    await node.start()
    print(f"READY {node_id} {node.host}:{node.port}", flush=True)
    await node.run()


def main(colony_path: str, node_id: str, data_dir: str, bug_skip_fsync: bool = False) -> None:
    from .. import eventlog

    eventlog.setup("store", node=node_id)
    colony = Colony.load(colony_path)
    options = NodeOptions(bug_skip_fsync=bug_skip_fsync)
    try:
        asyncio.run(serve(colony, node_id, data_dir, options))
    except KeyboardInterrupt:
        sys.exit(0)

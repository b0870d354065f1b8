"""Deterministic simulator: a whole store colony in one process, from one seed.

Everything that is not the protocol sits behind a small simulated interface:

* ``SimNetwork``: per-message delay, loss, duplication (reordering follows from random delays),
  and partitions: symmetric splits of the colony, asymmetric (one-way) cuts between nodes, and
  client partitions (a client cut off from some nodes, e.g. the leader).
* Clocks: every node reads its own clock (offset and rate skew) from the world's virtual time.
* ``SimDisk``: writes are buffered until ``sync``; a crash loses every unsynced write. A torn
  crash strikes inside a batch: after its persists are written, a random prefix of them
  reaches the disk and the node dies before the sync and before sending anything.
* Shells: the direct shell (every event is its own batch) or the production shell's path
  (``batching``): messages queue in an inbox, a drain takes them as one batch with replicas in
  batching mode, flushes every touched cell, one sync, then sends; replicas are loaded from
  disk on first use and evicted least-recently-used beyond ``replicas_loaded_max`` (as
  ``store/node.py`` does).
* Clients: closed-loop data clients with retries, and reconfiguration clients that replace a
  member of their cell (``reconfig`` with ``expect``) while the faults run.

The shell rule from ``cellcloud.core.paxos`` is enforced here exactly as in the real node:
persist actions are written and synced before any message of the same batch is sent.

A run is a fault phase (partitions, crashes, restarts) followed by a quiet phase with every
node up and the network healed. A run fails if a replica's assertion fires, if two replicas
apply different commands at one slot, if one client command ``(client_id, seq)`` is executed
at two slots (at most once, whatever the retries and session evictions), if the clients'
history is not linearizable, or if some client makes no progress in the quiet phase. Every failure names its seed; the same seed
replays the same run exactly.

    python -m cellcloud.store.sim --seeds 10000          # soak
    python -m cellcloud.store.sim --seed 1234 --verbose  # replay one run
"""

from __future__ import annotations

import argparse
import functools
import heapq
import random
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from cellcloud.core.paxos import (
    BUSY,
    EXPIRED,
    NOT_LEADER,
    OK,
    PERSIST_ACTIONS,
    REJECTED,
    Action,
    DurableState,
    Message,
    PersistCommit,
    PersistEntries,
    PersistPromise,
    PersistSnapshot,
    Replica,
    ReplicaParams,
    Reply,
    Request,
    Response,
    Send,
)
from cellcloud.store.checker import Operation, check_history

KEYS = ("a", "b", "c")


@dataclass(frozen=True)
class SimConfig:
    nodes: int = 5
    cells: int = 2
    replicas_per_cell: int = 3
    clients_per_cell: int = 3
    fault_phase_ms: int = 3000
    quiet_phase_ms: int = 2500
    tick_ms: int = 10
    delay_ms_min: int = 1
    delay_ms_max: int = 15
    loss_max: float = 0.08
    dup_max: float = 0.05
    fault_gap_ms_min: int = 50
    fault_gap_ms_max: int = 400
    attempt_timeout_ms: int = 150
    attempts_max: int = 12
    think_ms_max: int = 30
    params: ReplicaParams = field(
        default_factory=lambda: ReplicaParams(alpha_slots=8, log_entries_max=16)
    )
    torn_crash_p: float = 0.3  # share of crash faults that strike inside a batch
    asymmetric_p: float = 0.1  # share of faults that cut one direction between two nodes
    client_partition_p: float = 0.1  # share of faults that cut a client off from some nodes
    classic_faults: bool = True  # symmetric partitions and crashes (off: only the new kinds)
    batching: bool = False  # the production shell's inbox/batch/flush/evict path
    drain_ms: int = 2  # how long the batching shell lets its inbox fill before a drain
    replicas_loaded_max: int = 1  # batching shell: replicas in memory per node (fault phase)
    reconfig_clients: bool = False  # one client per cell replaces members under faults
    bug_skip_fsync: bool = False
    bug_send_before_sync: bool = False  # the shell sends a batch's messages, then syncs
    bug_skip_flush: bool = False  # the batching shell forgets to flush touched cells
    # Compare every replica's applied commands slot by slot (off: only the checker judges).
    check_agreement: bool = True


class SimDisk:
    """One node's disk: buffered writes, ``sync`` makes them durable, a crash loses the rest."""

    def __init__(self) -> None:
        self.durable: dict[str, DurableState] = {}
        self.unsynced: list[Action] = []
        self.syncs = 0

    def write(self, action: Action) -> None:
        self.unsynced.append(action)

    def sync(self) -> None:
        self.syncs += 1
        for a in self.unsynced:
            assert isinstance(a, PERSIST_ACTIONS)
            d = self.durable.setdefault(a.cell, DurableState())
            if isinstance(a, PersistPromise):
                d.promised = max(d.promised, a.ballot)
            elif isinstance(a, PersistEntries):
                for e in a.entries:
                    d.entries[e.slot] = e
            elif isinstance(a, PersistCommit):
                d.commit_index = max(d.commit_index, a.commit_index)
            elif isinstance(a, PersistSnapshot):
                if d.snapshot is None or a.snapshot["index"] > d.snapshot["index"]:
                    d.snapshot = a.snapshot
                idx = a.snapshot["index"]
                d.entries = {s: e for s, e in d.entries.items() if s > idx}
        self.unsynced = []

    def crash(self, keep: int = 0) -> None:
        """Lose the unsynced writes, except the first ``keep`` (a torn batch: the disk wrote
        some of them before the power went)."""
        self.unsynced = self.unsynced[:keep]
        if keep:
            self.sync()
            self.syncs -= 1
        self.unsynced = []

    def load(self, cell: str) -> DurableState | None:
        d = self.durable.get(cell)
        if d is None:
            return None
        return DurableState(d.promised, d.commit_index, d.snapshot, dict(d.entries))


class SimNetwork:
    def __init__(self, world: World, loss: float, dup: float) -> None:
        self.world = world
        self.loss = loss
        self.dup = dup
        self.blocked: set[tuple[str, str]] = set()  # (src, dst): one direction
        self.sent = 0
        self.dropped = 0

    def partition(self, side_a: set[str], side_b: set[str]) -> None:
        self.blocked = {(a, b) for a in side_a for b in side_b}
        self.blocked |= {(b, a) for a, b in self.blocked}

    def cut_one_way(self, src: str, dst: str) -> None:
        """An asymmetric partition: ``src`` can no longer reach ``dst``; ``dst`` still reaches
        ``src``."""
        self.blocked.add((src, dst))

    def cut_client(self, client: str, nodes: set[str]) -> None:
        """A client partition: the client and these nodes cannot reach each other."""
        for n in nodes:
            self.blocked |= {(client, n), (n, client)}

    def heal(self) -> None:
        self.blocked = set()

    def send(self, src: str, dst: str, msg: Any) -> None:
        w = self.world
        self.sent += 1
        if (src, dst) in self.blocked or w.rng.random() < self.loss:
            self.dropped += 1
            return
        copies = 2 if w.rng.random() < self.dup else 1
        for _ in range(copies):
            delay = w.rng.randint(w.cfg.delay_ms_min, w.cfg.delay_ms_max)
            w.schedule(delay, functools.partial(w.deliver, dst, msg))


class SimNode:
    def __init__(
        self, world: World, node_id: str, cells: dict[str, tuple[str, ...] | None]
    ) -> None:
        self.world = world
        self.node_id = node_id
        self.cells = cells  # cell -> initial members, for cells this node hosts
        self.disk = SimDisk()
        self.clock_offset_ms = world.rng.randint(0, 10_000)
        self.clock_rate = 1.0 + world.rng.uniform(-0.01, 0.01)
        self.up = True
        self.replicas: dict[str, Replica] = {}  # batching: in LRU order, oldest first
        self.inbox: list[Message | Request] = []
        self.drain_scheduled = False
        self.torn_armed = False  # crash inside the next batch that persists something
        self.incarnation = 0
        self.loaded_max = world.cfg.replicas_loaded_max
        self.start()

    def now_ms(self) -> int:
        return self.clock_offset_ms + int(self.world.now_ms * self.clock_rate)

    def _load(self, cell: str) -> Replica:
        rng = random.Random(self.world.rng.getrandbits(64))
        r = Replica(
            cell,
            self.node_id,
            self.cells[cell],
            self.world.cfg.params,
            rng,
            self.now_ms(),
            self.disk.load(cell),
        )
        r.batching = self.world.cfg.batching
        self.world.track(r)
        return r

    def start(self) -> None:
        self.up = True
        self.incarnation += 1
        self.torn_armed = False
        self.inbox = []
        if self.world.cfg.batching:
            return  # replicas load on first use, like store/node.py
        for cell in self.cells:
            self.replicas[cell] = self._load(cell)

    def replica(self, cell: str) -> Replica | None:
        """The production shell's replica cache: load from disk on use, evict LRU."""
        r = self.replicas.get(cell)
        if r is not None or not self.world.cfg.batching:
            if r is not None and self.world.cfg.batching:
                self.replicas[cell] = self.replicas.pop(cell)  # most recently used
            return r
        if cell not in self.cells:
            return None
        r = self.replicas[cell] = self._load(cell)
        while len(self.replicas) > self.loaded_max:
            del self.replicas[next(iter(self.replicas))]  # durable state stays on disk
        return r

    def crash(self, keep: int = 0) -> None:
        self.up = False
        self.disk.crash(keep)
        self.replicas = {}
        self.inbox = []

    def execute(self, actions: list[Action]) -> bool:
        """Carry out one batch: persists, sync, then sends. False if the node died in it."""
        cfg = self.world.cfg
        persist = [a for a in actions if isinstance(a, PERSIST_ACTIONS)]
        for p in persist:
            self.disk.write(p)
        sends = [a for a in actions if isinstance(a, Send | Reply)]
        if cfg.bug_send_before_sync:
            for a in sends:
                self.world.net.send(self.node_id, a.to, a.msg)
            sends = []
        if persist and self.torn_armed:
            # Power lost between the writes and the fsync: a prefix of them may have reached
            # the disk, the rest is lost, and nothing after the sync happens.
            self.crash(keep=self.world.rng.randint(0, len(self.disk.unsynced)))
            return False
        if persist and not cfg.bug_skip_fsync:
            self.disk.sync()
        for a in sends:
            self.world.net.send(self.node_id, a.to, a.msg)
        return True

    def on_message(self, msg: Message | Request) -> None:
        if self.world.cfg.batching:
            self.inbox.append(msg)
            if not self.drain_scheduled:
                self.drain_scheduled = True
                inc = self.incarnation
                self.world.schedule(self.world.cfg.drain_ms, lambda: self.drain(inc))
            return
        r = self.replicas.get(msg.cell)
        if r is None:
            return
        actions = r.on_message(msg, self.now_ms())
        self.world.observe(r)
        self.execute(actions)

    def drain(self, incarnation: int) -> None:
        """The production shell's loop body: one batch, flush touched cells, one sync."""
        self.drain_scheduled = False
        if not self.up or incarnation != self.incarnation:
            return
        batch, self.inbox = self.inbox, []
        now = self.now_ms()
        actions: list[Action] = []
        touched: dict[str, Replica] = {}
        for msg in batch:
            r = self.replica(msg.cell)
            if r is None:
                continue
            if isinstance(msg, Request):
                touched[msg.cell] = r
            actions.extend(r.on_message(msg, now))
            self.world.observe(r)
        if not self.world.cfg.bug_skip_flush:
            for r in touched.values():
                actions.extend(r.flush(now))
                self.world.observe(r)
        self.execute(actions)

    def on_tick(self) -> None:
        now = self.now_ms()
        if self.world.cfg.batching:
            actions: list[Action] = []
            for r in list(self.replicas.values()):
                actions.extend(r.on_tick(now))
                self.world.observe(r)
            self.execute(actions)
            return
        for r in list(self.replicas.values()):
            actions = r.on_tick(now)
            self.world.observe(r)
            if not self.execute(actions):
                return


class SimClient:
    """A closed-loop client: one command at a time, retries with the same (client_id, seq)."""

    def __init__(
        self, world: World, name: str, cell: str, members: tuple[str, ...], reconfig: bool = False
    ) -> None:
        self.world = world
        self.name = name
        # 0 until the cell opened a session for us (a "session" command returns its id).
        self.client_id = 0
        self.opening = False  # the last request sent was a "session" command
        self.data_sends = 0  # attempts of the current command sent under a session
        self.reconfig = reconfig  # a reconfiguration client: replaces members, no data ops
        self.expired = 0
        self.cell = cell
        self.members = members
        self.rng = random.Random(world.rng.getrandbits(64))
        self.seq = 0
        self.request_id = 0
        self.target = self.rng.choice(members)
        self.cmd: dict[str, Any] | None = None
        self.call_ms = 0
        self.attempts = 0
        self.completed_after: list[int] = []

    def random_command(self) -> dict[str, Any]:
        rng = self.rng
        key = rng.choice(KEYS)
        value: Any = rng.choice(
            [rng.randint(0, 5), rng.choice([True, False]), bytes([rng.randint(97, 99)])]
        )
        kind = rng.random()
        if kind < 0.35:
            return {"op": "get", "key": key}
        if kind < 0.6:
            return {"op": "put", "key": key, "value": value}
        if kind < 0.67:
            return {"op": "delete", "key": key}
        if kind < 0.85:
            expected = rng.choice([None, rng.randint(0, 5), True])
            return {"op": "cas", "key": key, "expected": expected, "value": value}
        k1, k2 = rng.sample(KEYS, 2)
        writes = [[k2, value]] if rng.random() < 0.7 else []
        return {"op": "txn", "reads": [k1, k2], "checks": [[k1, "ne", value]], "writes": writes}

    def reconfig_command(self) -> dict[str, Any]:
        """Replace a random member with a random non-member, expecting the membership the
        most advanced replica knows (a driver's peek, not part of the protocol)."""
        w = self.world
        known = max(
            (
                r
                for n in w.nodes.values()
                for r in n.replicas.values()
                if r.cell == self.cell and r.joined
            ),
            key=lambda r: r.sm.applied_index,
            default=None,
        )
        members = known.sm.configs[-1][1] if known is not None else w.cell_members[self.cell]
        outside = [n for n in self.members if n not in members]
        return {
            "op": "reconfig",
            "expect": list(members),
            "remove": self.rng.choice(members),
            "add": self.rng.choice(outside),
        }

    def next_op(self) -> None:
        self.seq += 1
        self.cmd = self.reconfig_command() if self.reconfig else self.random_command()
        self.call_ms = self.world.now_ms
        self.attempts = 0
        self.data_sends = 0
        self.send()

    def send(self) -> None:
        assert self.cmd is not None
        self.attempts += 1
        self.request_id += 1
        rid = self.request_id
        self.opening = self.client_id == 0
        if self.opening:
            req = Request(self.cell, self.name, rid, 0, 0, {"op": "session"})
        else:
            self.data_sends += 1
            req = Request(self.cell, self.name, rid, self.client_id, self.seq, self.cmd)
        self.world.net.send(self.name, self.target, req)
        self.world.schedule(self.world.cfg.attempt_timeout_ms, lambda: self.on_timeout(rid))

    def finish(self, result: Any, known: bool) -> None:
        assert self.cmd is not None
        w = self.world
        if self.reconfig:
            if known:
                w.reconfigs += result is True
                self.completed_after.append(self.call_ms)
            self.cmd = None
            w.schedule(self.rng.randint(50, 300), self.next_op)
            return
        w.history.append(
            Operation(
                self.name,
                self.cell,
                self.cmd,
                self.call_ms,
                w.now_ms if known else None,
                result,
                len(w.history),
            )
        )
        if known:
            self.completed_after.append(self.call_ms)
        self.cmd = None
        w.schedule(self.rng.randint(0, w.cfg.think_ms_max), self.next_op)

    def retry_or_give_up(self, delay_ms: int) -> None:
        if self.attempts >= self.world.cfg.attempts_max:
            self.finish(None, known=False)
            return
        rid = self.request_id
        self.world.schedule(delay_ms, lambda: self.send() if rid == self.request_id else None)

    def on_timeout(self, rid: int) -> None:
        if rid != self.request_id or self.cmd is None:
            return
        self.request_id += 1  # a late answer to the old attempt is ignored
        self.target = self.rng.choice(self.members)
        self.retry_or_give_up(0)

    def on_response(self, resp: Response) -> None:
        if resp.request_id != self.request_id or self.cmd is None:
            return
        self.request_id += 1
        if resp.status == OK and self.opening:
            self.client_id, self.seq = resp.result, 1  # the pending command opens the session
            self.send()
        elif resp.status == OK:
            self.finish(resp.result, known=True)
        elif resp.status == REJECTED:
            raise AssertionError(f"client sent a valid command and got rejected: {resp}")
        elif resp.status == EXPIRED:
            # The cell evicted our session: nothing applied now. A fresh client id opens a new
            # session; if only this attempt was ever sent the command was never applied, so it
            # is sent again under the new id, else its outcome is unknown.
            self.expired += 1
            self.client_id = 0
            if self.data_sends == 1:
                self.data_sends = 0
                self.send()
            else:
                self.finish(None, known=False)
        elif resp.status == NOT_LEADER:
            hint = resp.leader_hint
            others = [m for m in self.members if m != self.target]
            self.target = hint if hint in self.members else self.rng.choice(others)
            self.retry_or_give_up(self.rng.randint(0, 10))
        else:
            assert resp.status == BUSY, resp
            cap = min(200, 5 * 2**self.attempts)
            self.retry_or_give_up(self.rng.randint(0, cap))  # full jitter


@dataclass
class SimOutcome:
    seed: int
    ok: bool
    reason: str = ""
    ops: int = 0
    ops_known: int = 0
    events: int = 0


class World:
    def __init__(self, seed: int, cfg: SimConfig) -> None:
        self.seed = seed
        self.cfg = cfg
        self.rng = random.Random(seed)
        self.now_ms = 0
        self.queue: list[tuple[int, int, Callable[[], None]]] = []
        self.seq = 0
        self.events = 0
        self.history: list[Operation] = []
        self.chosen: dict[tuple[str, int], tuple[Any, ...]] = {}
        self.executed: dict[tuple[str, int, int], int] = {}  # (cell, client, seq) -> slot
        self.reconfigs = 0
        self.torn_crashes = 0
        self.net = SimNetwork(
            self, self.rng.uniform(0, cfg.loss_max), self.rng.uniform(0, cfg.dup_max)
        )
        node_ids = [f"n{i}" for i in range(cfg.nodes)]
        placement: dict[str, dict[str, tuple[str, ...] | None]] = {n: {} for n in node_ids}
        self.cell_members: dict[str, tuple[str, ...]] = {}
        for c in range(cfg.cells):
            cell = f"cell{c}"
            members = tuple(sorted(self.rng.sample(node_ids, cfg.replicas_per_cell)))
            self.cell_members[cell] = members
            for n in node_ids:
                if n in members:
                    placement[n][cell] = members
                elif cfg.reconfig_clients:
                    placement[n][cell] = None  # a replica that may be added later
        self.nodes = {n: SimNode(self, n, placement[n]) for n in node_ids}
        self.clients: dict[str, SimClient] = {}
        for cell, members in self.cell_members.items():
            hosts = tuple(node_ids) if cfg.reconfig_clients else members
            for i in range(cfg.clients_per_cell + cfg.reconfig_clients):
                name = f"c{len(self.clients) + 1}"
                self.clients[name] = SimClient(
                    self, name, cell, hosts, reconfig=i == cfg.clients_per_cell
                )

    # ---- scheduling ---------------------------------------------------------------------

    def schedule(self, delay_ms: int, fn: Callable[[], None]) -> None:
        self.seq += 1
        heapq.heappush(self.queue, (self.now_ms + delay_ms, self.seq, fn))

    def deliver(self, dst: str, msg: Any) -> None:
        if isinstance(msg, Response):
            client = self.clients.get(dst)
            if client is not None:
                client.on_response(msg)
            return
        node = self.nodes.get(dst)
        if node is not None and node.up:
            node.on_message(msg)

    # ---- invariants -----------------------------------------------------------------------

    def track(self, r: Replica) -> None:
        r.applied_trace = []

    def observe(self, r: Replica) -> None:
        trace = r.applied_trace
        assert trace is not None
        for slot, _cmd, client_id, seq, executed in trace:
            # At most once: a client command runs at one slot, whatever the retries.
            if client_id and executed:
                first = self.executed.setdefault((r.cell, client_id, seq), slot)
                if first != slot:
                    raise AssertionError(
                        f"at-most-once violated: {r.cell} client {client_id} seq {seq} "
                        f"executed at slots {first} and {slot}"
                    )
        if not self.cfg.check_agreement:
            trace.clear()
            return
        for slot, cmd, client_id, seq, _executed in trace:
            key = (r.cell, slot)
            got = (cmd, client_id, seq)
            have = self.chosen.setdefault(key, got)
            if have != got:
                raise AssertionError(
                    f"agreement violated: {r.cell} slot {slot}: {have} vs {got} on {r.node_id}"
                )
        trace.clear()

    # ---- faults ---------------------------------------------------------------------------

    def fault(self) -> None:
        if self.now_ms >= self.cfg.fault_phase_ms:
            return
        rng = self.rng
        ids = sorted(self.nodes)
        kind = rng.random()
        leaders = [
            n for n in ids if any(r.role == "leader" for r in self.nodes[n].replicas.values())
        ]
        cfg = self.cfg
        if rng.random() < cfg.asymmetric_p:
            # An asymmetric partition: one direction between two nodes (often a leader's).
            a = rng.choice(leaders or ids)
            b = rng.choice([n for n in ids if n != a])
            src, dst = (a, b) if rng.random() < 0.5 else (b, a)
            self.net.cut_one_way(src, dst)
        elif rng.random() < cfg.client_partition_p:
            # A client cut off from some nodes: a leader, or a random minority or majority.
            client = rng.choice(sorted(self.clients))
            side = {rng.choice(leaders)} if leaders and rng.random() < 0.5 else set(
                rng.sample(ids, rng.randint(1, len(ids) - 1))
            )
            self.net.cut_client(client, side)
        elif not cfg.classic_faults:
            if kind < 0.3:
                self.net.heal()
        elif kind < 0.2 and leaders:
            # Jepsen's partition-leader nemesis: cut a current leader off from every node.
            side = {rng.choice(leaders)}
            self.net.partition(side, set(ids) - side)
        elif kind < 0.35:
            side = set(rng.sample(ids, rng.randint(1, len(ids) // 2)))
            self.net.partition(side, set(ids) - side)
        elif kind < 0.45:
            self.net.heal()
        elif kind < 0.75:
            up = [n for n in ids if self.nodes[n].up]
            if up:
                node = self.nodes[rng.choice(up)]
                if rng.random() < cfg.torn_crash_p:
                    node.torn_armed = True  # dies inside its next batch, before the sync
                    self.torn_crashes += 1
                else:
                    node.crash()
        else:
            down = [n for n in ids if not self.nodes[n].up]
            if down:
                self.nodes[rng.choice(down)].start()
        gap = rng.randint(self.cfg.fault_gap_ms_min, self.cfg.fault_gap_ms_max)
        self.schedule(gap, self.fault)

    def heal_all(self) -> None:
        self.net.heal()
        for node in self.nodes.values():
            node.torn_armed = False
            # Eviction thrash (a working set over replicas_loaded_max) starves elections: the
            # quiet phase judges progress with room for every replica, as a sized node has.
            node.loaded_max = len(node.cells)
            if not node.up:
                node.start()

    def tick(self, node: SimNode) -> None:
        if node.up:
            node.on_tick()
        self.schedule(self.cfg.tick_ms, lambda: self.tick(node))

    # ---- run ------------------------------------------------------------------------------

    def run(self) -> SimOutcome:
        cfg = self.cfg
        for node in self.nodes.values():
            self.schedule(self.rng.randint(0, cfg.tick_ms), functools.partial(self.tick, node))
        for client in self.clients.values():
            self.schedule(self.rng.randint(0, 50), client.next_op)
        self.schedule(self.rng.randint(0, 200), self.fault)
        self.schedule(cfg.fault_phase_ms, self.heal_all)
        end = cfg.fault_phase_ms + cfg.quiet_phase_ms
        while self.queue and self.queue[0][0] <= end:
            self.now_ms, _, fn = heapq.heappop(self.queue)
            self.events += 1
            fn()
        known = sum(1 for op in self.history if op.return_ms is not None)
        out = SimOutcome(self.seed, True, "", len(self.history), known, self.events)
        # Pending commands at the end: outcome unknown.
        for client in self.clients.values():
            if client.cmd is not None:
                self.history.append(
                    Operation(
                        client.name,
                        client.cell,
                        client.cmd,
                        client.call_ms,
                        None,
                        None,
                        len(self.history),
                    )
                )
        result = check_history(self.history)
        if not result.ok:
            out.ok = False
            ops = "\n  ".join(repr(op) for op in result.failed_partition[:60])
            out.reason = f"history not linearizable; group:\n  {ops}"
            return out
        quiet_start = cfg.fault_phase_ms
        for client in self.clients.values():
            if not any(t >= quiet_start for t in client.completed_after):
                out.ok = False
                out.reason = (
                    f"no progress: {client.name} ({client.cell}) finished nothing "
                    "in the quiet phase with every node up"
                )
                return out
        return out


def run_seed(seed: int, cfg: SimConfig | None = None) -> SimOutcome:
    cfg = cfg or config_for_seed(seed)
    world = World(seed, cfg)
    try:
        return world.run()
    except AssertionError as exc:
        return SimOutcome(seed, False, f"assertion: {exc}", len(world.history), 0, world.events)


def config_for_seed(seed: int, **overrides: Any) -> SimConfig:
    """The default mix. Every run has loss, duplication, reordering, clock skew, symmetric,
    asymmetric and client partitions, crashes between events and torn crashes inside batches.
    By seed: 3-replica cells, every fourth a 5-replica cell, every eighth a 7-replica cell
    (Physalia's and the benchmark's size); every third runs the production shell's batching
    and eviction path; every fifth keeps only 2 client sessions per cell (evictions, so the
    at-most-once rule for expired sessions is exercised); every seventh adds a
    reconfiguration client per cell."""
    base = SimConfig()
    if seed % 8 == 5:
        base = replace(base, replicas_per_cell=7, nodes=9)
    elif seed % 4 == 3:
        base = replace(base, replicas_per_cell=5, nodes=7)
    if seed % 3 == 2:
        base = replace(base, batching=True, cells=3, replicas_loaded_max=2)
    if seed % 7 == 4:
        base = replace(base, reconfig_clients=True)
    elif seed % 5 == 1:
        base = replace(base, params=replace(base.params, sessions_max=2))
    return replace(base, **overrides) if overrides else base


# Planted bugs, each proving that a check can fail. Shell bugs live in SimConfig, protocol
# and state-machine bugs in ReplicaParams. Some need a fault or mode to show (see with_bug).
SIM_BUGS = {"skip_fsync", "send_before_sync", "skip_flush"}
REPLICA_BUGS = {
    "accept_lower_ballot",
    "stale_reads",
    "apply_evicted_sessions",
    "count_any_acks",
}


def with_bug(cfg: SimConfig, bug: str) -> SimConfig:
    """``cfg`` with one planted bug switched on (and the mode it lives in)."""
    if bug in SIM_BUGS:
        flags: dict[str, Any] = {f"bug_{bug}": True}
        cfg = replace(cfg, **flags)
        if bug == "skip_flush":
            cfg = replace(cfg, batching=True)  # only the batching shell flushes
        if bug == "send_before_sync" and cfg.torn_crash_p > 0:
            cfg = replace(cfg, torn_crash_p=1.0)  # only a crash inside a batch can show it
        return cfg
    assert bug in REPLICA_BUGS, bug
    params = replace(cfg.params, **{f"bug_{bug}": True})
    if bug == "apply_evicted_sessions":
        params = replace(params, sessions_max=min(params.sessions_max, 2))
    cfg = replace(cfg, params=params)
    if bug == "count_any_acks":
        cfg = replace(cfg, reconfig_clients=True)  # only non-members' acks can mislead it
    return cfg


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m cellcloud.store.sim")
    ap.add_argument("--seeds", type=int, default=500, help="run seeds [start, start+seeds)")
    ap.add_argument("--start", type=int, default=0)
    ap.add_argument("--seed", type=int, default=None, help="replay exactly one seed")
    ap.add_argument("--bug", choices=sorted(SIM_BUGS) + sorted(REPLICA_BUGS))
    ap.add_argument("--checker-only", action="store_true", help="skip the agreement check")
    ap.add_argument("--verbose", action="store_true")
    args = ap.parse_args(argv)
    seeds = [args.seed] if args.seed is not None else range(args.start, args.start + args.seeds)
    failures = 0
    t0 = time.monotonic()
    ops = 0
    for seed in seeds:
        cfg = config_for_seed(seed, check_agreement=not args.checker_only)
        if args.bug is not None:
            cfg = with_bug(cfg, args.bug)
        out = run_seed(seed, cfg)
        ops += out.ops
        if args.verbose or not out.ok:
            status = "ok" if out.ok else "FAIL"
            print(
                f"seed {seed}: {status} ops={out.ops} known={out.ops_known} "
                f"events={out.events} {out.reason}"
            )
        failures += not out.ok
    dt = time.monotonic() - t0
    print(f"{len(seeds)} seeds, {failures} failed, {ops} ops checked, {dt:.1f}s")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

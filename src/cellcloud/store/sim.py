"""Deterministic simulator: a whole store colony in one process, from one seed.

Everything that is not the protocol sits behind a small simulated interface:

* ``SimNetwork``: per-message delay, loss, duplication (reordering follows from random delays),
  and partitions between nodes. Clients reach every live node (partitions split the colony).
* Clocks: every node reads its own clock (offset and rate skew) from the world's virtual time.
* ``SimDisk``: writes are buffered until ``sync``; a crash loses every unsynced write.

The shell rule from ``cellcloud.core.paxos`` is enforced here exactly as in the real node:
persist actions are written and synced before any message of the same batch is sent.

A run is a fault phase (partitions, crashes, restarts) followed by a quiet phase with every
node up and the network healed. A run fails if a replica's assertion fires, if two replicas
apply different commands at one slot, if the clients' history is not linearizable, or if some
client makes no progress in the quiet phase. Every failure names its seed; the same seed
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
    bug_skip_fsync: bool = False
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

    def crash(self) -> None:
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
        self.blocked: set[frozenset[str]] = set()
        self.sent = 0
        self.dropped = 0

    def partition(self, side_a: set[str], side_b: set[str]) -> None:
        self.blocked = {frozenset((a, b)) for a in side_a for b in side_b}

    def heal(self) -> None:
        self.blocked = set()

    def send(self, src: str, dst: str, msg: Any) -> None:
        w = self.world
        self.sent += 1
        if frozenset((src, dst)) in self.blocked or w.rng.random() < self.loss:
            self.dropped += 1
            return
        copies = 2 if w.rng.random() < self.dup else 1
        for _ in range(copies):
            delay = w.rng.randint(w.cfg.delay_ms_min, w.cfg.delay_ms_max)
            w.schedule(delay, functools.partial(w.deliver, dst, msg))


class SimNode:
    def __init__(self, world: World, node_id: str, cells: dict[str, tuple[str, ...]]) -> None:
        self.world = world
        self.node_id = node_id
        self.cells = cells  # cell -> initial members, for cells this node hosts
        self.disk = SimDisk()
        self.clock_offset_ms = world.rng.randint(0, 10_000)
        self.clock_rate = 1.0 + world.rng.uniform(-0.01, 0.01)
        self.up = True
        self.replicas: dict[str, Replica] = {}
        self.start()

    def now_ms(self) -> int:
        return self.clock_offset_ms + int(self.world.now_ms * self.clock_rate)

    def start(self) -> None:
        self.up = True
        now = self.now_ms()
        for cell, members in self.cells.items():
            rng = random.Random(self.world.rng.getrandbits(64))
            r = Replica(
                cell, self.node_id, members, self.world.cfg.params, rng, now, self.disk.load(cell)
            )
            self.world.track(r)
            self.replicas[cell] = r

    def crash(self) -> None:
        self.up = False
        self.disk.crash()
        self.replicas = {}

    def execute(self, actions: list[Action]) -> None:
        persist = [a for a in actions if isinstance(a, PERSIST_ACTIONS)]
        for p in persist:
            self.disk.write(p)
        if persist and not self.world.cfg.bug_skip_fsync:
            self.disk.sync()
        for a in actions:
            if isinstance(a, Send | Reply):
                self.world.net.send(self.node_id, a.to, a.msg)

    def on_message(self, msg: Message | Request) -> None:
        r = self.replicas.get(msg.cell)
        if r is None:
            return
        self.execute(r.on_message(msg, self.now_ms()))
        self.world.observe(r)

    def on_tick(self) -> None:
        now = self.now_ms()
        for r in self.replicas.values():
            self.execute(r.on_tick(now))
            self.world.observe(r)


class SimClient:
    """A closed-loop client: one command at a time, retries with the same (client_id, seq)."""

    def __init__(
        self, world: World, name: str, client_id: int, cell: str, members: tuple[str, ...]
    ) -> None:
        self.world = world
        self.name = name
        self.client_id = client_id
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

    def next_op(self) -> None:
        self.seq += 1
        self.cmd = self.random_command()
        self.call_ms = self.world.now_ms
        self.attempts = 0
        self.send()

    def send(self) -> None:
        assert self.cmd is not None
        self.attempts += 1
        self.request_id += 1
        rid = self.request_id
        req = Request(self.cell, self.name, rid, self.client_id, self.seq, self.cmd)
        self.world.net.send(self.name, self.target, req)
        self.world.schedule(self.world.cfg.attempt_timeout_ms, lambda: self.on_timeout(rid))

    def finish(self, result: Any, known: bool) -> None:
        assert self.cmd is not None
        w = self.world
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
        if resp.status == OK:
            self.finish(resp.result, known=True)
        elif resp.status == REJECTED:
            raise AssertionError(f"client sent a valid command and got rejected: {resp}")
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
        self.net = SimNetwork(
            self, self.rng.uniform(0, cfg.loss_max), self.rng.uniform(0, cfg.dup_max)
        )
        node_ids = [f"n{i}" for i in range(cfg.nodes)]
        placement: dict[str, dict[str, tuple[str, ...]]] = {n: {} for n in node_ids}
        self.cell_members: dict[str, tuple[str, ...]] = {}
        for c in range(cfg.cells):
            cell = f"cell{c}"
            members = tuple(sorted(self.rng.sample(node_ids, cfg.replicas_per_cell)))
            self.cell_members[cell] = members
            for m in members:
                placement[m][cell] = members
        self.nodes = {n: SimNode(self, n, placement[n]) for n in node_ids}
        self.clients: dict[str, SimClient] = {}
        cid = 0
        for cell, members in self.cell_members.items():
            for _ in range(cfg.clients_per_cell):
                cid += 1
                name = f"c{cid}"
                self.clients[name] = SimClient(self, name, cid, cell, members)

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
        if not self.cfg.check_agreement:
            trace.clear()
            return
        for slot, cmd, client_id, seq in trace:
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
        if kind < 0.2 and leaders:
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
                self.nodes[rng.choice(up)].crash()
        else:
            down = [n for n in ids if not self.nodes[n].up]
            if down:
                self.nodes[rng.choice(down)].start()
        gap = rng.randint(self.cfg.fault_gap_ms_min, self.cfg.fault_gap_ms_max)
        self.schedule(gap, self.fault)

    def heal_all(self) -> None:
        self.net.heal()
        for node in self.nodes.values():
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
    """The default mix: most runs use 3-replica cells, every fourth a 5-replica cell."""
    base = SimConfig()
    if seed % 4 == 3:
        base = replace(base, replicas_per_cell=5, nodes=7)
    return replace(base, **overrides) if overrides else base


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m cellcloud.store.sim")
    ap.add_argument("--seeds", type=int, default=500, help="run seeds [start, start+seeds)")
    ap.add_argument("--start", type=int, default=0)
    ap.add_argument("--seed", type=int, default=None, help="replay exactly one seed")
    ap.add_argument("--bug", choices=["skip_fsync", "accept_lower_ballot", "stale_reads"])
    ap.add_argument("--checker-only", action="store_true", help="skip the agreement check")
    ap.add_argument("--verbose", action="store_true")
    args = ap.parse_args(argv)
    seeds = [args.seed] if args.seed is not None else range(args.start, args.start + args.seeds)
    failures = 0
    t0 = time.monotonic()
    ops = 0
    for seed in seeds:
        overrides: dict[str, Any] = {"check_agreement": not args.checker_only}
        if args.bug == "skip_fsync":
            overrides["bug_skip_fsync"] = True
        elif args.bug is not None:
            p = replace(SimConfig().params, **{f"bug_{args.bug}": True})
            overrides["params"] = p
        out = run_seed(seed, config_for_seed(seed, **overrides))
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

"""Deterministic simulator of the volume failover protocol, from one seed (store/sim.py style).

One volume, its storage servers (``ServerCore`` behind a simulated disk), its configuration
cell (a linearizable compare-and-set register, reached over the same lossy network), and
volume clients (``ClientCore`` with a closed-loop workload of numbered block writes and reads).

Faults in the fault phase: per-message delay and loss (reordering follows from random delays);
server crashes (a crash inside a write may tear it: a prefix of its bytes reaches the disk,
nothing is answered) and restarts with their durable state; server pauses (messages wait, then
run); partitions between the client and servers; the configuration cell cut off from everyone
(IO goes on, configuration changes wait); a writer paused while a second client takes the
volume over (it resumes with its old epoch). Then a quiet phase: everything healed and
restarted, and a verifier client attaches (a last failover) and reads every block back.

A run fails if the checker (``volumes/checker.py``) finds a lost acknowledged write, two writers
acknowledged in one epoch, or a deposed writer's write acknowledged; or if the verifier cannot
read the volume back in the quiet phase (no progress).

    python -m cellcloud.volumes.sim --seeds 2000
    python -m cellcloud.volumes.sim --seed 17 --verbose
    python -m cellcloud.volumes.sim --bug ack_majority --seeds 200
"""

from __future__ import annotations

import argparse
import functools
import heapq
import random
import sys
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from cellcloud.volumes.checker import History, Read, Write, check
from cellcloud.volumes.core import (
    CfgCas,
    CfgGet,
    ClientAction,
    ClientCore,
    ClientParams,
    Complete,
    PersistConfig,
    ReadData,
    ResetData,
    SendServer,
    ServerCore,
    ServerInfo,
    VolumeConfig,
    WriteData,
)

VOLUME = "vol-1"
CFG = "cfg"


@dataclass(frozen=True)
class SimConfig:
    servers: int = 6
    blocks: int = 16
    block_bytes: int = 8
    fault_phase_ms: int = 3000
    quiet_phase_ms: int = 4000
    tick_ms: int = 10
    delay_ms_min: int = 1
    delay_ms_max: int = 15
    loss: float = 0.01
    fault_gap_ms_min: int = 100
    fault_gap_ms_max: int = 500
    think_ms_max: int = 20
    torn_p: float = 0.3
    takeover_p: float = 0.5  # a second client takes the volume over from a paused writer
    isolate_primary_p: float = 0.5  # ... and a partition leaves it with its primary only
    params: ClientParams = ClientParams(request_timeout_ms=200, cfg_timeout_ms=300,
                                        retry_backoff_ms=50, mirror_chunk_bytes=32)
    bug_no_fencing: bool = False  # servers accept any epoch
    bug_ack_majority: bool = False  # clients acknowledge on a majority of replicas
    bug_unfenced_reads: bool = False  # clients read the primary without an epoch check


SIM_BUGS = ("no_fencing", "ack_majority", "unfenced_reads", "group_ack_queued")


def with_bug(cfg: SimConfig, bug: str) -> SimConfig:
    if bug == "no_fencing":
        return replace(cfg, bug_no_fencing=True)
    if bug == "ack_majority":
        return replace(cfg, bug_ack_majority=True,
                       params=replace(cfg.params, bug_ack_majority=True))
    if bug == "group_ack_queued":
        return replace(cfg, params=replace(cfg.params, bug_group_ack_queued=True))
    if bug == "unfenced_reads":
        return replace(cfg, bug_unfenced_reads=True,
                       params=replace(cfg.params, bug_unfenced_reads=True))
    raise ValueError(bug)


@dataclass
class SimOutcome:
    seed: int
    ok: bool
    reason: str
    writes_acked: int
    reads: int
    rewires: int
    events: int


class SimServer:
    def __init__(self, world: World, sid: str) -> None:
        self.world = world
        self.sid = sid
        self.up = True
        self.paused = False
        self.held: list[tuple[str, int, dict[str, Any]]] = []
        self.torn_armed = False
        self.configs: dict[str, VolumeConfig] = {}  # durable
        self.data: dict[str, bytearray] = {}  # durable (written and fsynced before replies)
        self.allocated: dict[str, set[int]] = {}  # bytes ever written (the rest: holes)
        self.core = self._core()

    def _core(self) -> ServerCore:
        core = ServerCore(self.sid, bug_no_fencing=self.world.cfg.bug_no_fencing)
        core.load(list(self.configs.values()))
        return core

    def crash(self) -> None:
        self.up = False
        self.paused = False
        self.held = []

    def restart(self) -> None:
        if not self.up:
            self.up = True
            self.torn_armed = False
            self.core = self._core()

    def resume(self) -> None:
        self.paused = False
        held, self.held = self.held, []
        for src, rid, req in held:
            self.on_request(src, rid, req)

    def on_request(self, src: str, rid: int, req: dict[str, Any]) -> None:
        if not self.up:
            return
        if self.paused:
            self.held.append((src, rid, req))
            return
        reply, effects = self.core.on_request(req)
        for e in effects:
            if isinstance(e, PersistConfig):
                self.configs[e.config.volume_id] = e.config
                self.data.setdefault(e.config.volume_id, bytearray(e.config.size_bytes))
            elif isinstance(e, ResetData):
                self.data[e.volume_id] = bytearray(e.size_bytes)
                self.allocated[e.volume_id] = set()
            elif isinstance(e, WriteData):
                buf = self.data[e.volume_id]
                alloc = self.allocated.setdefault(e.volume_id, set())
                if self.torn_armed:
                    # Power lost inside the write: a prefix reached the disk, no answer.
                    keep = self.world.rng.randint(0, len(e.data))
                    buf[e.offset: e.offset + keep] = e.data[:keep]
                    alloc.update(range(e.offset, e.offset + keep))
                    self.crash()
                    self.world.schedule(self.world.rng.randint(50, 400), self.restart)
                    return
                buf[e.offset: e.offset + len(e.data)] = e.data
                alloc.update(range(e.offset, e.offset + len(e.data)))
            elif isinstance(e, ReadData):
                buf = self.data.get(e.volume_id) or bytearray(e.offset + e.length)
                reply = dict(reply, data=bytes(buf[e.offset: e.offset + e.length]))
                if e.mirror:
                    alloc = self.allocated.get(e.volume_id, set())
                    end = e.offset + e.length
                    after = [b for b in alloc if b >= end]
                    reply["next"] = min(after) if after else len(buf)
                    if not any(e.offset <= b < end for b in alloc):
                        reply["hole"] = True
                        reply["data"] = b""
        self.world.net.send(self.sid, src, ("reply", rid, reply))


class SimCell:
    """The volume's configuration cell: a linearizable CAS register."""

    def __init__(self, world: World, initial: VolumeConfig) -> None:
        self.world = world
        self.value = initial
        self.cas_ok = 0

    def on_request(self, src: str, rid: int, req: CfgGet | CfgCas) -> None:
        ok: bool | None = None
        if isinstance(req, CfgCas):
            ok = self.value == req.expected
            if ok:
                self.value = req.new
                self.cas_ok += 1
        self.world.net.send(CFG, src, ("cfg", rid, (self.value, ok)))


class SimClient:
    def __init__(self, world: World, name: str, workload: bool) -> None:
        self.world = world
        self.name = name
        self.rng = random.Random(world.rng.getrandbits(64))
        self.core = ClientCore(name, VOLUME, world.server_infos,
                               random.Random(world.rng.getrandbits(64)), world.cfg.params)
        self.workload = workload
        self.paused = False
        self.held: list[Callable[[], None]] = []
        self.op_seq = 0
        self.ops: dict[int, tuple[str, list[int], bytes, float]] = {}
        self.cfg_rid = 0
        self.done = False
        self.to_read: list[int] = []  # the verifier's blocks left to read
        self.retired = False  # the process is gone: it sends nothing more
        self.read_only = False  # the workload only reads from now on

    def run(self, fn: Callable[[], list[ClientAction]]) -> None:
        if self.paused:
            self.held.append(lambda: self.run(fn))
            return
        self.execute(fn())

    def resume(self) -> None:
        self.paused = False
        held, self.held = self.held, []
        for fn in held:
            fn()

    def execute(self, actions: list[ClientAction]) -> None:
        w = self.world
        if self.retired:
            return
        for a in actions:
            if isinstance(a, CfgGet | CfgCas):
                self.cfg_rid += 1
                w.net.send(self.name, CFG, ("cfg_req", self.cfg_rid, a))
            elif isinstance(a, SendServer):
                w.net.send(self.name, a.server, ("req", a.rid, a.request))
            elif isinstance(a, Complete):
                self.completed(a)
        if self.core.fenced_epoch:
            w.history.fenced_ms.setdefault(self.core.fenced_epoch, w.now_ms)

    def on_message(self, msg: tuple[str, int, Any]) -> None:
        kind, rid, body = msg
        if kind == "cfg":
            if rid != self.cfg_rid:
                return  # an answer to an older request (the core asked again since)
            value, ok = body
            self.run(lambda: self.core.on_cfg(value, ok, self.world.now_ms))
        else:
            self.run(lambda: self.core.on_server(rid, body, self.world.now_ms))

    def tick(self) -> None:
        if not self.paused:
            self.execute(self.core.on_tick(self.world.now_ms))
        self.world.schedule(self.world.cfg.tick_ms, self.tick)

    def next_op(self) -> None:
        w = self.world
        if self.core.phase == "deposed" or self.done:
            return
        if self.paused:
            self.held.append(self.next_op)
            return
        bb = w.cfg.block_bytes
        self.op_seq += 1
        op_id = self.op_seq
        if self.to_read:
            block = self.to_read.pop(0)
            self.ops[op_id] = ("read", [block], b"", w.now_ms)
            self.execute(self.core.submit_read(op_id, block * bb, bb, w.now_ms))
            return
        if not self.workload:
            self.done = not self.ops  # the verifier: every block read back
            return
        if self.rng.random() < 0.65 and not self.read_only:
            n = self.rng.choice([1, 1, 2])
            first = self.rng.randrange(0, w.cfg.blocks - n + 1)
            blocks = list(range(first, first + n))
            data = b"".join(w.unique_value() for _ in blocks)
            self.ops[op_id] = ("write", blocks, data, w.now_ms)
            self.execute(self.core.submit_write(op_id, first * bb, data, w.now_ms))
        else:
            block = self.rng.randrange(w.cfg.blocks)
            self.ops[op_id] = ("read", [block], b"", w.now_ms)
            self.execute(self.core.submit_read(op_id, block * bb, bb, w.now_ms))

    def completed(self, c: Complete) -> None:
        w = self.world
        kind, blocks, data, call = self.ops.pop(c.op_id)
        bb = w.cfg.block_bytes
        for i, b in enumerate(blocks):
            if kind == "write":
                w.history.writes.append(Write(self.name, b, data[i * bb:(i + 1) * bb], call,
                                              w.now_ms if c.ok else None, c.epoch, c.sent_ms))
            elif c.ok:
                w.history.reads.append(Read(self.name, b, c.data[i * bb:(i + 1) * bb], call,
                                            w.now_ms, c.epoch))
        if not c.ok and kind == "read" and c.error != "deposed" and not self.workload:
            self.to_read.insert(0, blocks[0])  # the verifier reads every block
        w.schedule(self.rng.randint(0, w.cfg.think_ms_max), self.next_op)

    def pending_writes(self) -> list[tuple[str, list[int], bytes, float]]:
        return [o for o in self.ops.values() if o[0] == "write"]


class SimNetwork:
    def __init__(self, world: World) -> None:
        self.world = world
        self.blocked: set[tuple[str, str]] = set()

    def send(self, src: str, dst: str, msg: Any) -> None:
        w = self.world
        if (src, dst) in self.blocked or w.rng.random() < w.cfg.loss:
            return
        delay = w.rng.randint(w.cfg.delay_ms_min, w.cfg.delay_ms_max)
        w.schedule(delay, functools.partial(w.deliver, src, dst, msg))


class World:
    def __init__(self, seed: int, cfg: SimConfig) -> None:
        self.seed = seed
        self.cfg = cfg
        self.rng = random.Random(seed)
        self.now_ms = 0
        self.queue: list[tuple[int, int, Callable[[], None]]] = []
        self.seq = 0
        self.events = 0
        self.history = History(cfg.block_bytes)
        self.net = SimNetwork(self)
        self.values = 0
        self.server_infos = [
            ServerInfo(f"s{i}", {"zone": "z0" if i < cfg.servers - 2 else "z1",
                                 "rack": f"r{i % 3}"})
            for i in range(cfg.servers)
        ]
        self.servers = {s.server_id: SimServer(self, s.server_id) for s in self.server_infos}
        replicas = tuple(s.server_id for s in self.server_infos[: cfg.params.replicas])
        initial = VolumeConfig(VOLUME, cfg.blocks * cfg.block_bytes, 1, replicas, replicas[0])
        self.cell = SimCell(self, initial)
        self.clients: dict[str, SimClient] = {}
        self.log: list[str] = []

    def unique_value(self) -> bytes:
        self.values += 1
        return self.values.to_bytes(self.cfg.block_bytes, "big")

    def schedule(self, delay: int, fn: Callable[[], None]) -> None:
        self.seq += 1
        heapq.heappush(self.queue, (self.now_ms + delay, self.seq, fn))

    def deliver(self, src: str, dst: str, msg: Any) -> None:
        if (src, dst) in self.net.blocked:
            return
        if dst == CFG:
            _, rid, req = msg
            self.cell.on_request(src, rid, req)
        elif dst in self.servers:
            _, rid, req = msg
            self.servers[dst].on_request(src, rid, req)
        elif dst in self.clients:
            self.clients[dst].on_message(msg)

    def add_client(self, name: str, workload: bool) -> SimClient:
        c = self.clients[name] = SimClient(self, name, workload)
        c.execute(c.core.start(self.now_ms))
        self.schedule(self.cfg.tick_ms, c.tick)
        for _ in range(self.cfg.params.inflight_max):  # that many operations at once
            self.schedule(0, c.next_op)
        return c

    # ---- faults -----------------------------------------------------------------------------

    def fault(self) -> None:
        cfg = self.cfg
        if self.now_ms >= cfg.fault_phase_ms:
            return
        rng = self.rng
        kind = rng.random()
        sids = sorted(self.servers)
        if kind < 0.35:
            s = self.servers[rng.choice(sids)]
            if rng.random() < cfg.torn_p:
                s.torn_armed = True  # dies inside its next write
            else:
                s.crash()
                self.schedule(rng.randint(100, 1500), s.restart)
            self.log.append(f"{self.now_ms:.0f} crash {s.sid}")
        elif kind < 0.5:
            s = self.servers[rng.choice(sids)]
            s.paused = True
            self.schedule(rng.randint(50, 600), s.resume)
            self.log.append(f"{self.now_ms:.0f} pause {s.sid}")
        elif kind < 0.65:
            cname = rng.choice(sorted(self.clients))
            cut = rng.sample(sids, rng.randint(1, 2))
            for sid in cut:
                self.net.blocked |= {(cname, sid), (sid, cname)}
            self.schedule(rng.randint(100, 800), self.heal)
            self.log.append(f"{self.now_ms:.0f} partition {cname} from {cut}")
        elif kind < 0.8:
            ends = list(self.clients) + sids
            for e in ends:
                self.net.blocked |= {(e, CFG), (CFG, e)}
            self.schedule(rng.randint(100, 1000), self.heal)
            self.log.append(f"{self.now_ms:.0f} store partitioned")
        elif kind < 0.8 + 0.2 * cfg.takeover_p and len(self.clients) < 3:
            writer = self.clients[sorted(self.clients)[-1]]
            writer.paused = True
            name = f"c{len(self.clients) + 1}"
            self.add_client(name, workload=True)
            old = writer.core.config
            isolate = old is not None and rng.random() < cfg.isolate_primary_p
            back = rng.randint(200, 900) + (700 if isolate else 0)
            self.schedule(back, writer.resume)
            self.log.append(f"{self.now_ms:.0f} pause {writer.name}, {name} takes over")
            if old is not None and isolate:
                # A partition leaves the paused writer with its old primary only: the new
                # writer cannot reach that primary and rewires it away; the old writer resumes
                # reaching nothing else (the configuration cell included) for a while, and
                # reads — bytes that primary served it would miss the new writer's
                # acknowledged writes.
                pairs = {(name, old.primary), (old.primary, name)}
                self.net.blocked |= pairs
                pairs |= {(writer.name, CFG), (CFG, writer.name)}
                pairs |= {p for sid in sids if sid != old.primary
                          for p in ((writer.name, sid), (sid, writer.name))}
                self.schedule(back, functools.partial(self.isolate, writer, pairs))
                self.schedule(back + rng.randint(200, 800), functools.partial(self.unblock, pairs))
                self.log.append(f"{self.now_ms:.0f} {writer.name} and {old.primary} cut off")
        self.schedule(rng.randint(cfg.fault_gap_ms_min, cfg.fault_gap_ms_max), self.fault)

    def isolate(self, client: SimClient, pairs: set[tuple[str, str]]) -> None:
        self.net.blocked |= pairs
        client.read_only = True  # a deposed process that comes back and reads

    def unblock(self, pairs: set[tuple[str, str]]) -> None:
        self.net.blocked -= pairs

    def heal(self) -> None:
        self.net.blocked = set()

    def heal_all(self) -> None:
        self.heal()
        for s in self.servers.values():
            s.torn_armed = False
            s.restart()
            s.resume()
        for c in self.clients.values():
            c.resume()
        self.log.append(f"{self.now_ms:.0f} heal all")

    def verify(self) -> None:
        for c in self.clients.values():
            c.retired = True  # the workload's processes end; a last client attaches
        v = self.add_client("verifier", workload=False)
        v.to_read = list(range(self.cfg.blocks))
        self.log.append(f"{self.now_ms:.0f} verifier attaches")

    # ---- run ----------------------------------------------------------------------------------

    def run(self) -> SimOutcome:
        cfg = self.cfg
        self.add_client("c1", workload=True)
        self.schedule(self.rng.randint(0, 200), self.fault)
        self.schedule(cfg.fault_phase_ms, self.heal_all)
        self.schedule(cfg.fault_phase_ms + 300, self.verify)
        end = cfg.fault_phase_ms + cfg.quiet_phase_ms
        while self.queue and self.queue[0][0] <= end:
            self.now_ms, _, fn = heapq.heappop(self.queue)
            self.events += 1
            fn()
            v = self.clients.get("verifier")
            if v is not None and v.done:
                break
        h = self.history
        for c in self.clients.values():
            for _, blocks, data, call in c.pending_writes():  # outcome unknown
                bb = cfg.block_bytes
                h.writes += [Write(c.name, b, data[i * bb:(i + 1) * bb], call, None)
                             for i, b in enumerate(blocks)]
        acked = sum(1 for w in h.writes if w.return_ms is not None)
        rewires = sum(c.core.rewires for c in self.clients.values())
        out = SimOutcome(self.seed, True, "", acked, len(h.reads), rewires, self.events)
        problems = check(h)
        v = self.clients["verifier"]
        verified = {r.block for r in h.reads if r.client == "verifier"}
        if len(verified) < cfg.blocks:
            problems.append(f"no progress: the verifier read {len(verified)}/{cfg.blocks} "
                            f"blocks (phase {v.core.phase}, config {v.core.config})")
        if problems:
            out.ok = False
            out.reason = "; ".join(problems[:3]) + "\n" + "\n".join(self.log[-30:])
        return out


def config_for_seed(seed: int, **overrides: Any) -> SimConfig:
    """The default mix: every run has loss, reordering, crashes (30 % torn), pauses, client
    and store partitions; half the runs a writer is paused while another takes the volume.
    Each client keeps 1 to 4 operations in flight (by seed); in half the seeds its writes are
    group-committed (one write round in flight, the writes queued meanwhile in the next)."""
    base = SimConfig()
    base = replace(base, params=replace(base.params, inflight_max=1 + seed % 4,
                                        write_batch_max=4 if seed // 4 % 2 else 1))
    return replace(base, **overrides)


def run_seed(seed: int, cfg: SimConfig | None = None) -> SimOutcome:
    world = World(seed, cfg or config_for_seed(seed))
    try:
        return world.run()
    except AssertionError as exc:
        return SimOutcome(seed, False, f"assertion: {exc}", 0, 0, 0, world.events)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m cellcloud.volumes.sim")
    ap.add_argument("--seeds", type=int, default=500)
    ap.add_argument("--start", type=int, default=0)
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--bug", choices=SIM_BUGS)
    ap.add_argument("--verbose", action="store_true")
    args = ap.parse_args(argv)
    seeds = [args.seed] if args.seed is not None else range(args.start, args.start + args.seeds)
    failures = 0
    totals = [0, 0, 0]
    for seed in seeds:
        cfg = config_for_seed(seed)
        if args.bug:
            cfg = with_bug(cfg, args.bug)
        out = run_seed(seed, cfg)
        totals[0] += out.writes_acked
        totals[1] += out.reads
        totals[2] += out.rewires
        if not out.ok:
            failures += 1
            print(f"seed {seed} FAILED: {out.reason}")
        elif args.verbose:
            print(f"seed {seed}: ok, {out.writes_acked} writes acked, {out.reads} reads, "
                  f"{out.rewires} rewires, {out.events} events")
    print(f"{len(seeds)} seeds, {failures} failed; {totals[0]} writes acked, {totals[1]} "
          f"reads, {totals[2]} rewires")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

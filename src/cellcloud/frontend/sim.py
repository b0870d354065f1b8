"""Deterministic simulator of one cell's invoke path, from one seed (beside ``store/sim.py``).

The invoke core (``core/invoke.py``) runs unchanged; everything around it is simulated: fake
agents that refuse (full), fail creates, slow down, freeze, lose a reply (the handler ran, the
link broke, the agent restarts), die mid-invocation and come back empty; environments that
crash, time out, are found gone or reset; clients that send invocations of functions with
reserved concurrency, two versions under the per-version cap, and a provisioned pool, and
that give up at their timeout; routers that take leases (a claim on one warm environment on
which they run invocations themselves, router → agent; the agent enforces revocation and
confirms it) and die. The shell rules are the real shell's: every CreateEnv gets one
EnvCreated/EnvCreateFailed, every RunInvoke one InvokeFinished, agents are polled (AgentLost,
AgentBack), the core is ticked.

Checked properties (a run fails at the first violation, naming its seed):

1. at most once: a sync invoke's handler starts at most once (no re-run after it may have run);
2. concurrency: running handlers of a function never exceed its reserved concurrency, nor
   those of one version the per-version cap;
3. answered in time: every request is answered exactly once, within its timeout + the core's
   answer slack + one tick;
4. provisioned pools are kept: after the quiet phase each pool is at its target on live agents;
5. one invocation per environment at a time (leases' invocations included);
6. no slot leaks: after the quiet phase no request or lease is still counted.

A run is a fault phase (traffic and faults) then a quiet phase (every agent up, no faults).

    python -m cellcloud.frontend.sim --seeds 2000          # soak
    python -m cellcloud.frontend.sim --seed 17 --verbose   # replay one run
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

from cellcloud.core.invoke import (
    AgentBack,
    AgentLost,
    Answer,
    CreateEnv,
    DestroyEnv,
    EnvCreated,
    EnvCreateFailed,
    FunctionRef,
    GrantLease,
    InvokeCore,
    InvokeFinished,
    InvokeOutcome,
    InvokeParams,
    InvokeRequested,
    LeaseHolderLost,
    LeaseRequested,
    LeaseReturned,
    LeaseRevoked,
    MarkAgentDown,
    ProvisionedSet,
    RevokeLease,
    RunInvoke,
    Throttle,
    Tick,
)
from cellcloud.core.placement import Placement
from cellcloud.core.poison import PoisonDetector, PoisonParams
from cellcloud.core.sharding import PlainSharder, Worker


@dataclass(frozen=True)
class SimConfig:
    agents: int = 4
    envs_max: int = 3
    memory_mb_max: int = 1024
    shard_size: int = 2
    fault_phase_ms: int = 1500
    quiet_phase_ms: int = 1200
    tick_ms: int = 10
    poll_ms: int = 40
    requests: int = 90
    net_ms_max: int = 4
    create_ms_max: int = 30
    call_slack_ms: int = 1500  # the shell's agent-call timeout beyond the function's
    crash_gap_ms: tuple[int, int] = (150, 600)  # between agent deaths (fault phase)
    down_ms: tuple[int, int] = (50, 300)
    freeze_ms: tuple[int, int] = (100, 500)
    p_freeze: float = 0.3  # per death slot: a freeze instead of a death
    p_create_error: float = 0.04
    p_env_crash: float = 0.05
    p_env_gone: float = 0.03
    p_env_reset: float = 0.03
    p_reply_lost: float = 0.03
    routers: int = 2  # lease holders
    leases: int = 30
    params: InvokeParams = field(default_factory=lambda: InvokeParams(
        function_concurrency_default_max=3, invokes_inflight_max=40, answer_slack_ms=150,
        lease_ms=150))


# The functions: (owner, version key, timeout ms, memory MB, reserved, provisioned)
FUNCTIONS: tuple[tuple[str, str, int, int, int | None, int], ...] = (
    ("a/free", "a/free/1", 80, 128, None, 0),
    ("a/free", "a/free/2", 80, 128, None, 0),
    ("a/capped", "a/capped/1", 60, 256, 2, 0),
    ("a/capped", "a/capped/2", 60, 256, 2, 0),
    ("a/warm", "a/warm/1", 100, 128, None, 2),
)


class Violation(Exception):
    pass


@dataclass
class _Env:
    function_key: str
    owner: str
    busy: str | None = None  # request id running
    lease: str | None = None  # the lease it is bound to (the agent enforces it)
    revoking: str | None = None  # a revoked lease whose last invocation still runs


@dataclass
class FakeAgent:
    agent_id: str
    envs_max: int
    memory_mb_max: int
    up: bool = True
    frozen_until: int = 0
    epoch: int = 0
    envs: dict[str, _Env] = field(default_factory=dict)
    memory: dict[str, int] = field(default_factory=dict)
    # op id -> callback run with the failure outcome if the agent dies first
    pending: dict[int, Callable[[], None]] = field(default_factory=dict)


@dataclass
class SimResult:
    seed: int
    ok: bool
    reason: str
    requests: int
    answered_ok: int
    events: list[str]


class World:
    def __init__(self, seed: int, cfg: SimConfig | None = None, verbose: bool = False) -> None:
        self.seed = seed
        self.cfg = cfg = cfg or SimConfig()
        self.rng = random.Random(seed)
        self.verbose = verbose
        self.now = 0
        self._q: list[tuple[int, int, Callable[[], None]]] = []
        self._seq = 0
        self._op = 0
        self.events: list[Any] = []
        ids = [f"ag{i}" for i in range(cfg.agents)]
        self.agents = {a: FakeAgent(a, cfg.envs_max, cfg.memory_mb_max) for a in ids}
        placement = Placement(env_id_prefix="sim", idle_timeout_ms=400)
        for a in ids:
            placement.add_agent(a, cfg.envs_max, cfg.memory_mb_max)
        self.core = InvokeCore(
            placement, params=cfg.params,
            poison=PoisonDetector(PoisonParams.for_shard(cfg.shard_size, cooldown_ms=200)),
            sharder=PlainSharder([Worker(a) for a in ids], cfg.shard_size))
        self.believed_up = dict.fromkeys(ids, True)
        self.fns = {key: FunctionRef(key, owner, timeout, mem, reserved)
                    for owner, key, timeout, mem, reserved, _ in FUNCTIONS}
        self.provisioned = {key: n for _, key, *_, n in FUNCTIONS if n}
        # request id -> (sent at, function, answer deadline); answers; handler starts
        self.sent: dict[str, tuple[int, FunctionRef]] = {}
        self.answers: dict[str, tuple[int, bool]] = {}
        self.started: set[str] = set()
        self.running_owner: dict[str, int] = {}
        self.running_key: dict[str, int] = {}
        self.answered_ok = 0
        self._bounds: list[tuple[int, str]] = []
        self.holders = [f"rt{i}.0" for i in range(cfg.routers)]
        self.gen = 0

    # -- the event queue -----------------------------------------------------------------------
    def at(self, t: int, fn: Callable[[], None]) -> None:
        self._seq += 1
        heapq.heappush(self._q, (max(t, self.now), self._seq, fn))

    def log(self, text: str) -> None:
        self.events.append(f"{self.now:6d} {text}")
        if self.verbose:
            print(self.events[-1])

    def trace(self, arrow: str, item: Any) -> None:
        """Stimuli and instructions, kept as objects (formatted only when printed)."""
        self.events.append((self.now, arrow, item))
        if self.verbose:
            print(f"{self.now:6d} {arrow} {item}")

    def net(self) -> int:
        return self.rng.randint(0, self.cfg.net_ms_max)

    # -- the shell: stimuli in, instructions executed -------------------------------------------
    def feed(self, stimulus: Any) -> None:
        self.trace("->", stimulus)
        for ins in self.core.handle(stimulus, self.now):
            self.trace("<-", ins)
            self.execute(ins)

    def execute(self, ins: Any) -> None:
        match ins:
            case CreateEnv():
                self.call(ins.agent_id, functools.partial(self.agent_create, ins=ins),
                          functools.partial(EnvCreateFailed, ins.env_id, "unreachable"),
                          self.cfg.create_ms_max + self.cfg.call_slack_ms)
            case RunInvoke():
                fn = self.fns[self.sent[ins.request_id][1].key]
                self.call(ins.agent_id, functools.partial(self.agent_invoke, ins=ins),
                          functools.partial(InvokeFinished, ins.request_id, "transport_lost"),
                          fn.timeout_ms + self.cfg.call_slack_ms,
                          not_delivered=functools.partial(InvokeFinished, ins.request_id,
                                                          "not_delivered"))
            case DestroyEnv():
                def destroy(agent: FakeAgent, i: DestroyEnv = ins) -> None:
                    env = agent.envs.pop(i.env_id, None)
                    agent.memory.pop(i.env_id, None)
                    if env is not None and env.busy is not None:
                        self.handler_ended(env)
                self.at(self.now + self.net(), functools.partial(self._deliver, ins.agent_id,
                                                                 destroy))
            case Answer() | Throttle():
                self.answer(ins.request_id, isinstance(ins, Answer) and ins.ok)
            case MarkAgentDown():
                self.believed_up[ins.agent_id] = False
            case GrantLease():
                self.granted(ins)
            case RevokeLease():
                self.revoke(ins)

    def _deliver(self, agent_id: str, fn: Callable[[FakeAgent], None]) -> None:
        agent = self.agents[agent_id]
        if agent.up:
            fn(agent)

    def call(self, agent_id: str, op: Callable[[FakeAgent, int], None],
             lost: Callable[[], Any], timeout_ms: int,
             not_delivered: Callable[[], Any] | None = None) -> None:
        """One agent call: ``op`` runs on the agent when it arrives and schedules its reply;
        the agent's death first (or the call's timeout) feeds ``lost`` instead."""
        agent = self.agents[agent_id]
        self._op += 1
        op_id = self._op
        if not agent.up:  # connection refused: the call never reached the agent
            self.at(self.now + self.net(),
                    lambda: self.feed((not_delivered or lost)()))
            return
        agent.pending[op_id] = lambda: self.feed(lost())

        def arrive() -> None:
            if op_id in agent.pending:
                op(agent, op_id)

        def expire() -> None:  # the shell's call timeout
            done = agent.pending.pop(op_id, None)
            if done is not None:
                done()
        self.at(self.now + self.net(), arrive)
        self.at(self.now + timeout_ms, expire)

    def reply(self, agent: FakeAgent, op_id: int, stimulus: Any, delay: int) -> None:
        epoch = agent.epoch

        def land() -> None:
            if agent.epoch != epoch or op_id not in agent.pending:
                return
            if self.now < agent.frozen_until:  # a frozen agent answers when it thaws
                self.at(agent.frozen_until, land)
                return
            del agent.pending[op_id]
            self.feed(stimulus)
        self.at(self.now + delay, land)

    # -- the fake agent's ops --------------------------------------------------------------------
    def agent_create(self, agent: FakeAgent, op_id: int, ins: CreateEnv) -> None:
        fn = self.fns[ins.function_key]
        if len(agent.envs) >= agent.envs_max or (
                sum(agent.memory.values()) + fn.memory_mb > agent.memory_mb_max):
            self.reply(agent, op_id, EnvCreateFailed(ins.env_id, "agent_full"), self.net())
            return
        if self.rng.random() < self.cfg.p_create_error:
            self.reply(agent, op_id, EnvCreateFailed(ins.env_id, "error"), self.net())
            return
        agent.envs[ins.env_id] = _Env(fn.key, fn.owner)
        agent.memory[ins.env_id] = fn.memory_mb
        self.reply(agent, op_id, EnvCreated(ins.env_id),
                   self.rng.randint(1, self.cfg.create_ms_max))

    def agent_invoke(self, agent: FakeAgent, op_id: int, ins: RunInvoke) -> None:
        env = agent.envs.get(ins.env_id)
        fn = self.sent[ins.request_id][1]
        if env is None or self.rng.random() < self.cfg.p_env_gone:
            if env is not None:
                agent.envs.pop(ins.env_id)
                agent.memory.pop(ins.env_id, None)
            self.reply(agent, op_id, InvokeFinished(ins.request_id, "env_gone"), self.net())
            return
        if env.busy is not None:
            raise Violation(f"environment {ins.env_id} given {ins.request_id} while it runs "
                            f"{env.busy}")
        if self.rng.random() < self.cfg.p_env_reset:
            agent.envs.pop(ins.env_id)
            agent.memory.pop(ins.env_id, None)
            self.reply(agent, op_id, InvokeFinished(ins.request_id, "env_reset"), self.net())
            return
        outcome, duration = self.start_handler(env, ins.env_id, ins.request_id, fn)
        epoch = agent.epoch
        env_id = ins.env_id

        def end() -> None:
            if agent.epoch != epoch or agent.envs.get(env_id) is not env:
                return  # the agent died or the environment was destroyed: already ended
            if self.now < agent.frozen_until:
                self.at(agent.frozen_until, end)
                return
            self.handler_ended(env)
            if outcome == "env_died":
                agent.envs.pop(env_id)
                agent.memory.pop(env_id, None)
            if self.rng.random() < self.cfg.p_reply_lost:
                # The handler ran; the reply is lost with the connection; the agent restarts.
                self.log(f"reply of {ins.request_id} lost; {agent.agent_id} restarts")
                self.kill(agent, self.rng.randint(*self.cfg.down_ms))
                return
            self.reply(agent, op_id, InvokeFinished(ins.request_id, outcome), self.net())
        self.at(self.now + duration, end)

    def start_handler(self, env: _Env, env_id: str, rid: str,
                      fn: FunctionRef) -> tuple[InvokeOutcome, int]:
        """The checks at a handler's start; its outcome and duration."""
        if env.busy is not None:
            raise Violation(f"environment {env_id} given {rid} while it runs {env.busy}")
        if rid in self.started:
            raise Violation(f"{rid} ran twice (second time on {env_id})")
        self.started.add(rid)
        env.busy = rid
        self.running_owner[fn.owner] = self.running_owner.get(fn.owner, 0) + 1
        self.running_key[fn.key] = self.running_key.get(fn.key, 0) + 1
        if fn.reserved is not None and self.running_owner[fn.owner] > fn.reserved:
            raise Violation(f"{fn.owner} runs {self.running_owner[fn.owner]} invocations, "
                            f"reserved concurrency {fn.reserved}")
        cap = self.cfg.params.function_concurrency_default_max
        if self.running_key[fn.key] > cap:
            raise Violation(f"{fn.key} runs {self.running_key[fn.key]} invocations, "
                            f"per-version cap {cap}")
        duration = self.rng.randint(1, fn.timeout_ms * 5 // 4)
        outcome: InvokeOutcome = "ok" if self.rng.random() < 0.8 else "function_error"
        if duration >= fn.timeout_ms or self.rng.random() < self.cfg.p_env_crash:
            outcome, duration = "env_died", min(duration, fn.timeout_ms)
        return outcome, duration

    def handler_ended(self, env: _Env, alive: bool = True) -> None:
        env.busy = None
        self.running_owner[env.owner] -= 1
        self.running_key[env.function_key] -= 1
        if env.revoking is not None:  # the revoked lease's last invocation is over
            lease, env.revoking, env.lease = env.revoking, None, None
            self.at(self.now + self.net(), lambda: self.feed(LeaseRevoked(lease, alive)))

    # -- routers holding leases (router -> agent, without the frontend) -------------------------
    def send_lease(self, n: int, router: int) -> None:
        key = self.rng.choice(sorted(self.fns))
        fn = self.fns[key]
        rid = f"l{n}"
        self.track(rid, fn)
        self.feed(LeaseRequested(rid, self.holders[router], fn))

    def granted(self, g: GrantLease) -> None:
        self.answer(g.lease_id, True)
        agent = self.agents[g.agent_id]
        router = self.holders.index(g.holder) if g.holder in self.holders else -1

        def bind() -> None:  # the frontend tells the agent, then the router
            env = agent.envs.get(g.env_id)
            if not agent.up or env is None:
                return  # the agent or environment is gone: AgentLost / the router's call ends it
            env.lease = g.lease_id
            if router >= 0:
                self.at(self.now + self.net(), lambda: self.router_invoke(router, g, 0))
        self.at(self.now + self.net(), bind)

    def router_invoke(self, router: int, g: GrantLease, m: int) -> None:
        if self.holders[router] != g.holder:
            return  # the router died: its leases are revoked by LeaseHolderLost
        agent = self.agents[g.agent_id]
        env = agent.envs.get(g.env_id)
        if not agent.up or env is None or env.lease != g.lease_id or env.revoking is not None:
            return  # refused by the agent (the lease is over): the revocation ends it
        if m >= self.rng.randint(1, 4) or self.now >= g.expires_ms:
            self.at(self.now + self.net(), lambda: self.feed(LeaseReturned(g.lease_id, "ok")))
            return
        fn = self.sent[g.lease_id][1]
        outcome, duration = self.start_handler(env, g.env_id, f"{g.lease_id}.{m}", fn)
        epoch = agent.epoch

        def end() -> None:
            if agent.epoch != epoch or agent.envs.get(g.env_id) is not env:
                return
            if self.now < agent.frozen_until:
                self.at(agent.frozen_until, end)
                return
            revoked = env.revoking is not None
            self.handler_ended(env, alive=outcome != "env_died")
            if outcome == "env_died":
                agent.envs.pop(g.env_id)
                agent.memory.pop(g.env_id, None)
                if not revoked:
                    self.at(self.now + self.net(),
                            lambda: self.feed(LeaseReturned(g.lease_id, "env_died")))
                return
            self.at(self.now + self.net(), lambda: self.router_invoke(router, g, m + 1))
        self.at(self.now + duration, end)

    def revoke(self, r: RevokeLease) -> None:
        agent = self.agents[r.agent_id]

        def land() -> None:
            if not agent.up:
                return  # AgentLost ends the lease
            env = agent.envs.get(r.env_id)
            if env is not None and env.lease == r.lease_id and env.busy is not None:
                env.revoking = r.lease_id  # confirmed when the running invocation ends
                return
            if env is not None and env.lease == r.lease_id:
                env.lease = None
            alive = env is not None  # the agent says whether the environment outlived the lease
            self.at(self.now + self.net(), lambda: self.feed(LeaseRevoked(r.lease_id, alive)))
        self.at(self.now + self.net(), land)

    def router_fault(self) -> None:
        if self.now >= self.cfg.fault_phase_ms or not self.holders:
            return
        i = self.rng.randrange(len(self.holders))
        old = self.holders[i]
        self.gen += 1
        self.holders[i] = f"rt{i}.{self.gen}"
        self.log(f"router {old} dies")
        self.at(self.now + self.rng.randint(5, 50), lambda: self.feed(LeaseHolderLost(old)))
        self.at(self.now + self.rng.randint(*self.cfg.crash_gap_ms) * 2, self.router_fault)

    # -- faults ----------------------------------------------------------------------------------
    def kill(self, agent: FakeAgent, down_ms: int) -> None:
        if not agent.up:
            return
        self.log(f"{agent.agent_id} dies ({len(agent.envs)} envs)")
        agent.up = False
        agent.epoch += 1
        for env in agent.envs.values():
            if env.busy is not None:
                self.handler_ended(env, alive=False)
        agent.envs.clear()
        agent.memory.clear()
        pending, agent.pending = agent.pending, {}
        for lost in pending.values():
            self.at(self.now + self.net(), lost)

        def back() -> None:
            agent.up = True
            agent.frozen_until = 0
            self.log(f"{agent.agent_id} is back")
        self.at(self.now + down_ms, back)

    def fault(self) -> None:
        if self.now >= self.cfg.fault_phase_ms:
            return
        agent = self.agents[self.rng.choice(sorted(self.agents))]
        if self.rng.random() < self.cfg.p_freeze:
            agent.frozen_until = self.now + self.rng.randint(*self.cfg.freeze_ms)
            self.log(f"{agent.agent_id} freezes until {agent.frozen_until}")
        else:
            self.kill(agent, self.rng.randint(*self.cfg.down_ms))
        self.at(self.now + self.rng.randint(*self.cfg.crash_gap_ms), self.fault)

    # -- the periodic shell duties ----------------------------------------------------------------
    def tick(self) -> None:
        self.feed(Tick())
        self.check_deadlines()
        if self.now < self.cfg.fault_phase_ms + self.cfg.quiet_phase_ms:
            self.at(self.now + self.cfg.tick_ms, self.tick)

    def poll(self) -> None:
        for a in sorted(self.agents):
            agent = self.agents[a]
            if agent.up and not self.believed_up[a]:
                self.believed_up[a] = True
                self.feed(AgentBack(a, agent.envs_max, agent.memory_mb_max))
            elif not agent.up and self.believed_up[a]:
                self.feed(AgentLost(a, "poll failed"))
        if self.now < self.cfg.fault_phase_ms + self.cfg.quiet_phase_ms:
            self.at(self.now + self.cfg.poll_ms, self.poll)

    # -- clients ---------------------------------------------------------------------------------
    def send(self, n: int) -> None:
        key = self.rng.choice(sorted(self.fns))
        fn = self.fns[key]
        rid = f"r{n}"
        self.track(rid, fn)
        self.feed(InvokeRequested(rid, fn))

    def track(self, rid: str, fn: FunctionRef) -> None:
        self.sent[rid] = (self.now, fn)
        bound = self.now + fn.timeout_ms + self.cfg.params.answer_slack_ms + self.cfg.tick_ms
        heapq.heappush(self._bounds, (bound, rid))

    def answer(self, rid: str, ok: bool) -> None:
        if rid in self.answers:
            raise Violation(f"{rid} answered twice")
        sent_at, fn = self.sent[rid]
        bound = sent_at + fn.timeout_ms + self.cfg.params.answer_slack_ms + self.cfg.tick_ms
        if self.now > bound:
            raise Violation(f"{rid} answered at {self.now}, after its bound {bound}")
        self.answers[rid] = (self.now, ok)
        self.answered_ok += ok

    def check_deadlines(self) -> None:
        """The clients' own timeouts: a request not answered by its bound is a violation."""
        while self._bounds and self._bounds[0][1] in self.answers:
            heapq.heappop(self._bounds)
        if self._bounds and self.now > self._bounds[0][0]:
            bound, rid = self._bounds[0]
            raise Violation(f"{rid} ({self.sent[rid][1].key}) not answered by {bound} (its "
                            "client gave up)")

    def check_provisioned(self) -> None:
        for key, target in self.provisioned.items():
            live = [e for e in self.core.placement.envs.values()
                    if e.function_key == key and e.provisioned and e.state != "creating"
                    and e.env_id in self.agents[e.agent_id].envs and self.agents[e.agent_id].up]
            if len(live) < target:
                raise Violation(f"provisioned pool {key} holds {len(live)} of {target} after the "
                                f"quiet phase")

    # -- a run -----------------------------------------------------------------------------------
    def run(self) -> SimResult:
        cfg = self.cfg
        for key, n in self.provisioned.items():
            self.feed(ProvisionedSet(self.fns[key], n))
        for n in range(cfg.requests):
            self.at(self.rng.randint(0, cfg.fault_phase_ms), functools.partial(self.send, n))
        for n in range(cfg.leases):
            self.at(self.rng.randint(0, cfg.fault_phase_ms),
                    functools.partial(self.send_lease, n, n % max(1, cfg.routers)))
        if cfg.routers:
            self.at(self.rng.randint(*cfg.crash_gap_ms) * 2, self.router_fault)
        self.at(self.rng.randint(*cfg.crash_gap_ms), self.fault)
        self.at(cfg.tick_ms, self.tick)
        self.at(cfg.poll_ms, self.poll)
        try:
            while self._q:
                self.now, _, fn = heapq.heappop(self._q)
                fn()
            self.check_deadlines()
            missing = [r for r in self.sent if r not in self.answers]
            if missing:
                raise Violation(f"never answered: {missing[:5]}")
            self.check_provisioned()
            if self.core.requests or self.core.inflight_total:
                raise Violation(f"slots still held after the quiet phase: "
                                f"{sorted(self.core.requests)[:5]}")
        except Violation as e:
            return SimResult(self.seed, False, f"seed {self.seed}: {e}", len(self.sent),
                             self.answered_ok, self.events)
        except AssertionError as e:
            return SimResult(self.seed, False, f"seed {self.seed}: assertion {e!r}",
                             len(self.sent), self.answered_ok, self.events)
        return SimResult(self.seed, True, "", len(self.sent), self.answered_ok, self.events)



def config_for_seed(seed: int) -> SimConfig:
    """Every seed draws its own fault mix around the defaults."""
    rng = random.Random(seed * 7919 + 1)
    return replace(SimConfig(), agents=rng.randint(3, 5), envs_max=rng.randint(2, 4),
                   p_freeze=rng.choice((0.2, 0.4)), requests=rng.randint(60, 120))


def run_seed(seed: int, cfg: SimConfig | None = None, verbose: bool = False) -> SimResult:
    return World(seed, cfg or config_for_seed(seed), verbose).run()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=500)
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--verbose", action="store_true")
    args = ap.parse_args(argv)
    seeds = [args.seed] if args.seed is not None else list(range(args.seeds))
    t0 = time.perf_counter()
    bad = 0
    for seed in seeds:
        out = run_seed(seed, verbose=args.verbose)
        if not out.ok:
            bad += 1
            print(out.reason)
    dt = time.perf_counter() - t0
    print(f"{len(seeds)} seeds, {bad} failed, {len(seeds) / dt:.0f} seeds/s")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())

"""The invoke path's core, sans-IO: ``InvokeCore.handle(stimulus, now_ms) -> [Instruction]``.

The shape is the store's (``core/paxos.py``): the shell (``frontend/invoker.py``) feeds what
happened (a request arrived, an agent answered, a tick) and executes what comes back (create an
environment, run an invocation on one, destroy one, answer the caller); the seeded simulator
(``frontend/sim.py``) drives the same core with fake agents and checks its properties.

The core owns:

- in-flight counts: per function over all its versions (reserved concurrency) and for the
  whole cell (``invokes_inflight_max``); a request counts until it is answered *and* no agent
  operation of it is outstanding, so an invocation answered by its deadline while its handler
  may still run keeps its slot until the agent reports back;
- placement (``core/placement.py``): warm reuse, creation on the agent of the function's shard
  with room, each agent's environment and memory capacity, the per-version concurrency cap,
  provisioned pools (kept at their target, replaced after a loss), idle reaping;
- retries, only before the handler could have run (an environment that could not be created,
  an environment found gone or reset before the invocation reached it, a call never
  delivered), each create retry on a different agent of the shard (``core/sharding.py``'s
  ``retry_order``); an invocation whose outcome is unknown (the link broke mid-call) is
  answered with an error, never run again;
- the poison check (``core/poison.py``) before every attempt; a host's death counts against
  a function only when that function's invocations were the only ones running on it (issue
  #20: a host dying for its own reasons, or while running other functions' invocations, is
  not one function's fault);
- deadlines: a request is answered at the latest ``timeout + answer_slack_ms`` after it
  arrived, on the first ``Tick`` past it.

Every instruction is a frozen dataclass; so is every stimulus. The shell guarantees: each
``CreateEnv`` for a request or a pool gets exactly one ``EnvCreated`` or ``EnvCreateFailed``,
each ``RunInvoke`` exactly one ``InvokeFinished``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Protocol

from .limits import DEFAULT_LIMITS, Limits
from .placement import Create, Destroy, Placement, Use
from .placement import Throttle as PlacementThrottle
from .poison import PoisonDetector, PoisonParams
from .sharding import retry_order


class _Sharder(Protocol):
    def shard(self, key: str) -> tuple[str, ...]: ...


shards_cached_max = 100_000

# -- stimuli ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class FunctionRef:
    """What the core needs to know of the function version a request runs."""

    key: str  # the version's placement key (account/name/version)
    owner: str  # account/name: reserved concurrency, poison, shard
    timeout_ms: int
    memory_mb: int = 0
    reserved: int | None = None  # the function's reserved concurrency (over all versions)


@dataclass(frozen=True)
class InvokeRequested:
    request_id: str
    fn: FunctionRef


@dataclass(frozen=True)
class EnvCreated:
    env_id: str


# "unsupported": the agent cannot run this function (its isolation setting asks for a backend
# the agent lacks, or the backend refuses its runtime): the detail is a message for the caller.
CreateFailure = Literal["agent_full", "host_memory", "unreachable", "bundle_missing",
                        "unsupported", "error"]


@dataclass(frozen=True)
class EnvCreateFailed:
    env_id: str
    reason: CreateFailure
    detail: str = ""


InvokeOutcome = Literal[
    "ok",  # the handler returned; the environment lives
    "function_error",  # the handler raised; the environment lives
    "env_died",  # a reply came but the environment did not survive (crash, OOM, timeout)
    "env_gone",  # the environment was dead before the invocation reached it: nothing ran
    "env_reset",  # the agent reset the environment before the invocation ran: nothing ran
    "env_error",  # the agent refused the invocation for another reason: nothing to retry
    "not_delivered",  # the call never reached the agent (connection refused): nothing ran
    "transport_lost",  # the link broke mid-call: the handler may have run
]


@dataclass(frozen=True)
class InvokeFinished:
    request_id: str
    outcome: InvokeOutcome
    detail: str = ""


@dataclass(frozen=True)
class AgentLost:
    agent_id: str
    detail: str = ""


@dataclass(frozen=True)
class AgentBack:
    agent_id: str
    envs_max: int
    memory_mb_max: int | None = None


@dataclass(frozen=True)
class ProvisionedSet:
    fn: FunctionRef
    count: int  # 0: no pool


@dataclass(frozen=True)
class FunctionRetired:
    """The version's code or configuration changed: its environments go (busy ones when
    their invocation ends) and so does its provisioned pool."""

    key: str


@dataclass(frozen=True)
class Tick:
    pass


@dataclass(frozen=True)
class LeaseRequested:
    """A router asks for a lease: a bounded, revocable claim on one warm environment of the
    function, counted like an invocation, on which it runs invocations itself (one at a time,
    router → agent) until it returns the lease or the lease is revoked."""

    lease_id: str
    holder: str
    fn: FunctionRef
    warm_only: bool = False  # no warm environment: answered NoWarmEnvironment (none created)


LeaseOutcome = Literal["ok", "env_died"]


@dataclass(frozen=True)
class LeaseReturned:
    lease_id: str
    outcome: LeaseOutcome = "ok"


@dataclass(frozen=True)
class LeaseRevoked:
    """The agent confirms a revoked lease is over: no invocation under it runs, none will
    start. Only then is the lease's slot free."""

    lease_id: str
    env_alive: bool = True  # False: the environment died under the lease's last invocation


@dataclass(frozen=True)
class LeaseHolderLost:
    holder: str


@dataclass(frozen=True)
class ReservedChanged:
    """The function's reserved concurrency changed: its leases, counted under the old limit,
    are revoked (new ones are judged under the new one)."""

    owner: str


Stimulus = (InvokeRequested | EnvCreated | EnvCreateFailed | InvokeFinished | AgentLost
            | AgentBack | ProvisionedSet | FunctionRetired | Tick | LeaseRequested
            | LeaseReturned | LeaseRevoked | LeaseHolderLost | ReservedChanged)

# -- instructions -----------------------------------------------------------------------------


@dataclass(frozen=True)
class CreateEnv:
    env_id: str
    agent_id: str
    function_key: str
    request_id: str | None  # None: for a provisioned pool


@dataclass(frozen=True)
class RunInvoke:
    request_id: str
    env_id: str
    agent_id: str
    cold: bool


@dataclass(frozen=True)
class DestroyEnv:
    env_id: str
    agent_id: str


@dataclass(frozen=True)
class Answer:
    """The request's end: ``ok`` carries the agent's reply (the shell kept it), otherwise
    a Lambda-shaped error (status, type, message)."""

    request_id: str
    ok: bool
    status: int = 200
    error_type: str = ""
    message: str = ""


@dataclass(frozen=True)
class Throttle:
    """The request's end with a 429 (TooManyRequestsException, Lambda's ``Reason``)."""

    request_id: str
    reason: str
    message: str
    reserved_zero: bool = False  # reserved concurrency 0: async events fail at once


@dataclass(frozen=True)
class MarkAgentDown:
    """The core stopped placing on the agent (its environments are lost to the cell)."""

    agent_id: str
    envs_lost: int
    detail: str


@dataclass(frozen=True)
class GrantLease:
    """The answer to a LeaseRequested: the holder may run invocations on the environment, one
    at a time, until ``expires_ms``; the agent is told too (it enforces the lease)."""

    lease_id: str
    holder: str
    env_id: str
    agent_id: str
    expires_ms: int


@dataclass(frozen=True)
class RevokeLease:
    """Tell the agent (and the holder) that the lease ends: the agent refuses invocations under
    it from now on and answers LeaseRevoked once none runs."""

    lease_id: str
    holder: str
    env_id: str
    agent_id: str


Instruction = (CreateEnv | RunInvoke | DestroyEnv | Answer | Throttle | MarkAgentDown
               | GrantLease | RevokeLease)

# -- the core ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class InvokeParams:
    function_concurrency_default_max: int = DEFAULT_LIMITS.function_concurrency_default
    invokes_inflight_max: int = 1000
    env_gone_retries_max: int = DEFAULT_LIMITS.env_gone_retries_max
    answer_slack_ms: int = DEFAULT_LIMITS.invoke_answer_slack_ms
    lease_ms: int = DEFAULT_LIMITS.invoke_lease_ms
    # Planted bugs: each must be caught by a property of frontend/sim.py.
    bug_retry_after_transport_lost: bool = False  # at most once
    bug_ignore_reserved: bool = False  # reserved concurrency
    bug_ignore_version_cap: bool = False  # the per-version cap
    bug_no_deadline: bool = False  # answered within timeout + slack
    bug_no_reprovision: bool = False  # provisioned pools kept
    bug_reuse_on_deadline: bool = False  # one invocation per environment
    bug_free_on_revoke: bool = False  # leases: the slot freed before the agent confirms
    bug_leak_slot: bool = False  # no slot held after the quiet phase

    @classmethod
    def from_limits(cls, limits: Limits, invokes_inflight_max: int) -> InvokeParams:
        return cls(function_concurrency_default_max=limits.function_concurrency_default,
                   invokes_inflight_max=invokes_inflight_max,
                   env_gone_retries_max=limits.env_gone_retries_max,
                   answer_slack_ms=limits.invoke_answer_slack_ms)


@dataclass
class _Request:
    request_id: str
    fn: FunctionRef
    deadline_ms: int
    attempt: int = 0  # create attempts that failed before the handler could run
    failed: list[str] = field(default_factory=list)  # agents that failed this request
    full: bool = False  # the last create failure was a capacity refusal
    gone: int = 0  # environments found gone or reset (placed again)
    env_id: str | None = None
    agent_id: str | None = None
    # idle: no agent op outstanding; leased/revoking: a lease's environment is held
    phase: Literal["creating", "running", "idle", "leased", "revoking"] = "idle"
    answered: bool = False
    holder: str | None = None  # a lease's holder (None: a sync invoke)
    expires_ms: int = 0
    unsupported: str = ""  # the last "unsupported" create failure's message, for the answer


class InvokeCore:
    def __init__(self, placement: Placement, *, params: InvokeParams | None = None,
                 poison: PoisonDetector | None = None, sharder: _Sharder | None = None) -> None:
        self.placement = placement
        self.params = params or InvokeParams()
        self.poison = poison or PoisonDetector(PoisonParams())
        self.sharder = sharder
        self.shards: dict[str, tuple[str, ...]] = {}
        self.requests: dict[str, _Request] = {}
        self.inflight: dict[str, int] = {}  # owner -> requests counted
        self.inflight_total = 0
        self._creating: dict[str, str | None] = {}  # env_id -> request id (None: a pool's)
        self._running: dict[str, str] = {}  # env_id -> request id (RunInvoke outstanding)
        self.counters = {"throttles": 0, "cold_starts": 0, "envs_gone": 0, "env_failures": 0,
                         "deadlines": 0, "poison_charged": 0, "poison_spared": 0,
                         "leases_granted": 0, "leases_revoked": 0}

    # -- queries -------------------------------------------------------------------------------
    def shard_of(self, owner: str) -> tuple[str, ...]:
        shard = self.shards.get(owner)
        if shard is None:
            shard = self.sharder.shard(owner) if self.sharder is not None else ()
            if len(self.shards) < shards_cached_max:
                self.shards[owner] = shard
        return shard

    def statistics(self) -> dict[str, object]:
        return {"requests": len(self.requests), "inflight_total": self.inflight_total,
                "creating": len(self._creating), "running": len(self._running),
                **self.counters}

    # -- the one entry point -------------------------------------------------------------------
    _last_now = 0

    def handle(self, stimulus: Stimulus, now_ms: int) -> list[Instruction]:
        out: list[Instruction] = []
        self._last_now = now_ms
        match stimulus:
            case InvokeRequested():
                self._requested(stimulus.request_id, stimulus.fn, None, now_ms, out)
            case LeaseRequested():
                if stimulus.warm_only and not self.placement.has_idle(stimulus.fn.key):
                    if stimulus.lease_id not in self.requests:
                        out.append(Answer(stimulus.lease_id, False, 409, "NoWarmEnvironment",
                                          "No warm environment of the function is free."))
                    return out
                self._requested(stimulus.lease_id, stimulus.fn, stimulus.holder, now_ms, out)
            case LeaseReturned():
                self._lease_returned(stimulus, now_ms, out)
            case LeaseRevoked():
                if stimulus.env_alive:
                    self._lease_over(stimulus.lease_id, now_ms, out)
                else:
                    self._lease_returned(LeaseReturned(stimulus.lease_id, "env_died"), now_ms,
                                         out)
            case LeaseHolderLost():
                for req in [r for r in self.requests.values()
                            if r.holder == stimulus.holder and r.phase == "leased"]:
                    self._revoke(req, out)
            case ReservedChanged():
                for req in [r for r in self.requests.values()
                            if r.fn.owner == stimulus.owner and r.phase == "leased"]:
                    self._revoke(req, out)
            case EnvCreated():
                self._created(stimulus.env_id, now_ms, out)
            case EnvCreateFailed():
                self._create_failed(stimulus, now_ms, out)
            case InvokeFinished():
                self._finished(stimulus, now_ms, out)
            case AgentLost():
                self._agent_lost(stimulus.agent_id, stimulus.detail, now_ms, out)
            case AgentBack():
                self.placement.add_agent(stimulus.agent_id, stimulus.envs_max,
                                         stimulus.memory_mb_max)
                self._provision(now_ms, out)
            case ProvisionedSet():
                self.placement.memory_mb[stimulus.fn.key] = stimulus.fn.memory_mb
                self.placement.set_provisioned(stimulus.fn.key, stimulus.count)
                self._provision(now_ms, out)
            case FunctionRetired():
                for req in [r for r in self.requests.values()
                            if r.fn.key == stimulus.key and r.phase == "leased"]:
                    self._revoke(req, out)  # no invocation of the old code under a lease
                self.placement.set_provisioned(stimulus.key, 0)
                out += [DestroyEnv(d.env_id, d.agent_id)
                        for d in self.placement.retire_function(stimulus.key)]
            case Tick():
                self._tick(now_ms, out)
        return out

    # -- requests ------------------------------------------------------------------------------
    def _requested(self, request_id: str, fn: FunctionRef, holder: str | None, now_ms: int,
                   out: list[Instruction]) -> None:
        s = InvokeRequested(request_id, fn)
        if s.request_id in self.requests:
            return  # a duplicate delivery of the same request: it is already under way
        if (fn.reserved is not None and not self.params.bug_ignore_reserved
                and self.inflight.get(fn.owner, 0) >= fn.reserved):
            self.counters["throttles"] += 1
            out.append(Throttle(
                s.request_id, "ReservedFunctionConcurrentInvocationLimitExceeded",
                f"Rate Exceeded. Reserved concurrency of {fn.reserved} reached for "
                f"{fn.owner.rsplit('/', 1)[-1]}.", reserved_zero=fn.reserved == 0))
            return
        if self.inflight_total >= self.params.invokes_inflight_max:
            self.counters["throttles"] += 1
            out.append(Throttle(s.request_id, "CellConcurrencyLimitExceeded",
                                "Rate Exceeded. The cell is over capacity."))
            return
        req = _Request(s.request_id, fn, now_ms + fn.timeout_ms + self.params.answer_slack_ms,
                       holder=holder)
        self.requests[s.request_id] = req
        self.inflight[fn.owner] = self.inflight.get(fn.owner, 0) + 1
        self.inflight_total += 1
        self.placement.memory_mb[fn.key] = fn.memory_mb
        self._place(req, now_ms, out)

    def _place(self, req: _Request, now_ms: int, out: list[Instruction]) -> None:
        """One attempt: throttled, a warm environment, or a new one (then RunInvoke later)."""
        fn = req.fn
        verdict = self.poison.allowed(fn.owner, now_ms)
        if verdict is not True:
            assert not isinstance(verdict, bool)
            self._throttle(req, "FunctionKillsWorkers",
                           f"Rate Exceeded. Invocations of {fn.owner.rsplit('/', 1)[-1]} keep "
                           f"killing workers; retry after {verdict.retry_after_ms} ms.", out)
            return
        shard = self.shard_of(fn.owner)
        attempts = max(2, len(shard))
        if req.attempt >= attempts:
            if req.full:  # every agent tried is at its environment or memory cap
                self._throttle(req, "ConcurrentInvocationLimitExceeded",
                               "Rate Exceeded. The cell's hosts are at capacity.", out)
            else:
                self._answer_error(req, "No agent could start an execution environment"
                                   + (f": {req.unsupported}" if req.unsupported else ""), out)
                if not self.params.bug_leak_slot:
                    self._release(req)
            return
        eligible = [a for a in retry_order(shard, req.attempt, fn.owner, failed=req.failed)
                    if a not in req.failed]
        if shard and not eligible and req.unsupported:  # every agent said it cannot: why
            self._answer_error(req, "No agent could start an execution environment: "
                               + req.unsupported, out)
            if not self.params.bug_leak_slot:
                self._release(req)
            return
        cap = fn.reserved or self.params.function_concurrency_default_max
        if self.params.bug_ignore_version_cap:
            cap = 1 << 30
        decision = self.placement.acquire(
            fn.key, cap, now_ms,
            eligible_agents=eligible if shard else None)
        if isinstance(decision, PlacementThrottle):
            self._throttle(req, decision.reason, decision.message, out)
        elif isinstance(decision, Create):
            self.counters["cold_starts"] += 1
            req.env_id, req.agent_id, req.phase = decision.env_id, decision.agent_id, "creating"
            self._creating[decision.env_id] = req.request_id
            out.append(CreateEnv(decision.env_id, decision.agent_id, fn.key, req.request_id))
        else:
            assert isinstance(decision, Use)
            self._run(req, decision.env_id, decision.agent_id, False, out, now_ms)

    def _run(self, req: _Request, env_id: str, agent_id: str, cold: bool,
             out: list[Instruction], now_ms: int = 0) -> None:
        if req.holder is not None:  # a lease: the holder runs the invocations
            req.env_id, req.agent_id, req.phase = env_id, agent_id, "leased"
            req.answered = True
            req.expires_ms = now_ms + self.params.lease_ms
            self.counters["leases_granted"] += 1
            out.append(GrantLease(req.request_id, req.holder, env_id, agent_id,
                                  req.expires_ms))
            return
        req.env_id, req.agent_id, req.phase = env_id, agent_id, "running"
        self._running[env_id] = req.request_id
        out.append(RunInvoke(req.request_id, env_id, agent_id, cold))

    def _created(self, env_id: str, now_ms: int, out: list[Instruction]) -> None:
        if env_id not in self._creating:
            return
        rid = self._creating.pop(env_id)
        env = self.placement.envs.get(env_id)
        if rid is None:  # a provisioned pool's environment
            if env is not None:
                self.placement.prewarmed(env_id, now_ms)
            return
        req = self.requests[rid]
        req.phase = "idle"
        if env is None:  # its agent was declared lost meanwhile: try another one
            if req.agent_id is not None:
                req.failed.append(req.agent_id)
            req.attempt += 1
            self._again_or_release(req, now_ms, out)
            return
        self.placement.created(env_id, now_ms)
        if req.answered:  # past its deadline: the environment is kept warm, unused
            out += self._release_env(env_id, now_ms)
            self._release(req)
            return
        self._run(req, env_id, env.agent_id, True, out, now_ms)

    def _create_failed(self, s: EnvCreateFailed, now_ms: int, out: list[Instruction]) -> None:
        if s.env_id not in self._creating:
            return
        rid = self._creating.pop(s.env_id)
        env = self.placement.envs.get(s.env_id)
        agent_id = env.agent_id if env is not None else None
        if s.reason == "unreachable" and agent_id is not None:
            self._agent_lost(agent_id, s.detail or "unreachable on create", now_ms, out)
        else:
            self.placement.discard(s.env_id)  # nothing was created there: nothing to destroy
        if rid is None:
            return
        req = self.requests[rid]
        req.phase = "idle"
        if req.agent_id is not None:
            req.failed.append(req.agent_id)
        req.attempt += 1
        req.full = s.reason in ("agent_full", "host_memory")
        if s.reason == "unsupported" and s.detail:
            req.unsupported = s.detail
        self._again_or_release(req, now_ms, out)

    def _again_or_release(self, req: _Request, now_ms: int, out: list[Instruction]) -> None:
        if req.answered:
            self._release(req)
        else:
            self._place(req, now_ms, out)

    def _finished(self, s: InvokeFinished, now_ms: int, out: list[Instruction]) -> None:
        req = self.requests.get(s.request_id)
        if req is None or req.phase != "running" or req.env_id is None:
            return
        env_id, agent_id = req.env_id, req.agent_id
        assert agent_id is not None
        self._running.pop(env_id, None)
        req.phase = "idle"
        match s.outcome:
            case "ok" | "function_error":
                self.poison.on_success(req.fn.owner, agent_id, now_ms)
                out += self._release_env(env_id, now_ms)
                self._answer_ok(req, out)
            case "env_died":
                # Crashed or timed out, but its host survived: the jail contained it. An
                # ordinary Lambda error (counted, never a poison); the agent removed it.
                self.counters["env_failures"] += 1
                self.placement.discard(env_id)
                self._answer_ok(req, out)
            case "env_gone" | "env_reset" | "not_delivered":
                # No handler code ran: another environment, a bounded number of times.
                if s.outcome == "env_gone":
                    self.counters["envs_gone"] += 1
                    self.placement.discard(env_id)  # the agent has no such environment
                elif s.outcome == "env_reset":
                    self._discard(env_id, out)
                else:
                    self._agent_lost(agent_id, s.detail or "not reachable", now_ms, out)
                    req.failed.append(agent_id)
                req.gone += 1
                if req.gone > self.params.env_gone_retries_max:
                    self._answer_error(req, f"The execution environment failed: {s.detail}", out)
                else:
                    self._again_or_release(req, now_ms, out)
            case "env_error":
                self._discard(env_id, out)
                self._answer_error(req, f"The execution environment failed: {s.detail}", out)
            case "transport_lost":
                # The handler may have run: never run it again (at most once on our side).
                self._agent_lost(agent_id, s.detail or "link lost mid-invocation", now_ms, out,
                                 cause=req)
                if self.params.bug_retry_after_transport_lost and not req.answered:
                    req.failed.append(agent_id)
                    self._place(req, now_ms, out)
                    return
                self._answer_error(
                    req, "The execution environment's host failed during the invocation "
                    f"({s.detail})", out)
        if req.phase == "idle" and req.answered:
            self._release(req)

    # -- agents --------------------------------------------------------------------------------
    def _agent_lost(self, agent_id: str, detail: str, now_ms: int, out: list[Instruction],
                    cause: _Request | None = None) -> None:
        agent = self.placement.agents.get(agent_id)
        if agent is None or not agent.up:
            return
        # Issue #20: the death is one function's fault only if that function's invocations
        # were the only ones running there.
        owners = {self.requests[rid].fn.owner for env_id, rid in self._running.items()
                  if self.requests[rid].agent_id == agent_id}
        if cause is not None:
            owners.add(cause.fn.owner)
        if len(owners) == 1:
            self.counters["poison_charged"] += 1
            self.poison.on_env_crash(next(iter(owners)), agent_id, now_ms)
        elif owners:
            self.counters["poison_spared"] += 1
        lost = self.placement.agent_down(agent_id)
        out.append(MarkAgentDown(agent_id, len(lost), detail))
        for req in [r for r in self.requests.values()
                    if r.agent_id == agent_id and r.phase in ("leased", "revoking")]:
            assert req.holder is not None and req.env_id is not None
            if req.phase == "leased":
                out.append(RevokeLease(req.request_id, req.holder, req.env_id, agent_id))
            req.phase = "idle"
            self._release(req)

    # -- time ----------------------------------------------------------------------------------
    def _tick(self, now_ms: int, out: list[Instruction]) -> None:
        if not self.params.bug_no_deadline:
            for req in [r for r in self.requests.values()
                        if not r.answered and now_ms >= r.deadline_ms]:
                self.counters["deadlines"] += 1
                if self.params.bug_reuse_on_deadline and req.phase == "running":
                    assert req.env_id is not None
                    self._running.pop(req.env_id, None)
                    self.placement.release(req.env_id, now_ms)
                    req.phase = "idle"
                self._answer_error(
                    req, f"The invocation was not answered within its timeout "
                    f"({req.fn.timeout_ms} ms) and {self.params.answer_slack_ms} ms", out)
                if req.phase == "idle":
                    self._release(req)
        for req in [r for r in self.requests.values()
                    if r.phase == "leased" and now_ms >= r.expires_ms]:
            self._revoke(req, out)
        out += [DestroyEnv(d.env_id, d.agent_id) for d in self.placement.on_tick(now_ms)]
        if not self.params.bug_no_reprovision:
            self._provision(now_ms, out)

    def _provision(self, now_ms: int, out: list[Instruction]) -> None:
        if not self.placement.provisioned:
            return
        for c in self.placement.provision(now_ms):
            self._creating[c.env_id] = None
            out.append(CreateEnv(c.env_id, c.agent_id, self.placement.envs[c.env_id].function_key,
                                 None))

    # -- leases --------------------------------------------------------------------------------
    def _revoke(self, req: _Request, out: list[Instruction]) -> None:
        assert req.holder is not None and req.env_id is not None and req.agent_id is not None
        req.phase = "revoking"
        self.counters["leases_revoked"] += 1
        out.append(RevokeLease(req.request_id, req.holder, req.env_id, req.agent_id))
        if self.params.bug_free_on_revoke:
            self._lease_over(req.request_id, self._last_now, out)

    def _lease_returned(self, s: LeaseReturned, now_ms: int, out: list[Instruction]) -> None:
        req = self.requests.get(s.lease_id)
        if req is None or req.phase not in ("leased", "revoking") or req.env_id is None:
            return
        if s.outcome == "env_died":  # the agent removed it
            self.counters["env_failures"] += 1
            self.placement.discard(req.env_id)
            req.phase = "idle"
            self._release(req)
            return
        self._lease_over(s.lease_id, now_ms, out)

    def _lease_over(self, lease_id: str, now_ms: int, out: list[Instruction]) -> None:
        req = self.requests.get(lease_id)
        if req is None or req.phase not in ("leased", "revoking") or req.env_id is None:
            return
        if req.agent_id is not None:
            self.poison.on_success(req.fn.owner, req.agent_id, now_ms)
        out += self._release_env(req.env_id, now_ms)
        req.phase = "idle"
        self._release(req)

    # -- endings -------------------------------------------------------------------------------
    def _release_env(self, env_id: str, now_ms: int) -> list[Instruction]:
        return [DestroyEnv(d.env_id, d.agent_id)
                for d in self.placement.release(env_id, now_ms)]

    def _discard(self, env_id: str, out: list[Instruction]) -> None:
        d: Destroy | None = self.placement.discard(env_id)
        if d is not None:
            out.append(DestroyEnv(d.env_id, d.agent_id))

    def _throttle(self, req: _Request, reason: str, message: str,
                  out: list[Instruction]) -> None:
        self.counters["throttles"] += 1
        if not req.answered:
            req.answered = True
            out.append(Throttle(req.request_id, reason, message))
        self._release(req)

    def _answer_ok(self, req: _Request, out: list[Instruction]) -> None:
        if not req.answered:
            req.answered = True
            out.append(Answer(req.request_id, True))

    def _answer_error(self, req: _Request, message: str, out: list[Instruction]) -> None:
        if not req.answered:
            req.answered = True
            out.append(Answer(req.request_id, False, 500, "ServiceException", message))

    def _release(self, req: _Request) -> None:
        if self.requests.pop(req.request_id, None) is None:
            return
        owner = req.fn.owner
        self.inflight[owner] -= 1
        if not self.inflight[owner]:
            del self.inflight[owner]
        self.inflight_total -= 1


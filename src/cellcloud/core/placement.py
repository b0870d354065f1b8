"""Placement inside one cell, as a state machine: which warm environment serves an invoke, or
which agent gets a new one. No I/O; the frontend executes the decisions it returns.

Rules (Lambda's): one invocation at a time per environment; warm environments are reused
most-recently-used first (the hottest caches stay hot and the coldest ones age out); a new
environment goes to the eligible agent that holds the fewest environments of this function,
then the fewest overall, so a burst spreads over hosts; environments idle longer than
``idle_timeout_ms`` are reaped; over the per-function concurrency limit or with every agent
full, the invoke is throttled, never queued without bound.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal

EnvState = Literal["creating", "idle", "busy"]


@dataclass
class Env:
    env_id: str
    function_key: str
    agent_id: str
    state: EnvState
    last_used_ms: int
    retired: bool = False
    invocations: int = 0
    provisioned: bool = False  # part of a provisioned-concurrency pool: never idle-reaped
    memory_mb: int = 0  # configured memory, counted against its agent's memory_mb_max


@dataclass
class Agent:
    agent_id: str
    envs_max: int
    up: bool = True
    envs: set[str] = field(default_factory=set)
    # Configured memory the agent accepts in all (its budget × oversubscription); None: not
    # known, only envs_max limits it. The placement counts it so the frontend need not learn
    # it from the agent's AgentFull refusals.
    memory_mb_max: int | None = None
    memory_mb: int = 0
    # ECS tasks placed here (frontend/tasks.py): task id -> (memory MiB, cpu units). Their
    # memory counts in memory_mb too, so functions and tasks share the agent's budget.
    tasks: dict[str, tuple[int, int]] = field(default_factory=dict)


@dataclass(frozen=True)
class Use:
    env_id: str
    agent_id: str


@dataclass(frozen=True)
class Create:
    env_id: str
    agent_id: str


@dataclass(frozen=True)
class Throttle:
    reason: str  # Lambda's TooManyRequestsException Reason
    message: str


@dataclass(frozen=True)
class Destroy:
    env_id: str
    agent_id: str


Decision = Use | Create | Throttle


@dataclass(frozen=True)
class TaskPlaced:
    agent_id: str


@dataclass(frozen=True)
class NoRoom:
    reason: str  # ECS's failure reason: RESOURCE:MEMORY, RESOURCE:CPU, AGENT (none up)


class Placement:
    def __init__(self, *, env_id_prefix: str, idle_timeout_ms: int) -> None:
        self._prefix = env_id_prefix
        self._next_id = 0
        self.idle_timeout_ms = idle_timeout_ms
        self.agents: dict[str, Agent] = {}
        self.envs: dict[str, Env] = {}
        # function_key -> idle env ids, most recently used last (a stack).
        self._idle: dict[str, list[str]] = {}
        # function_key -> envs that count against its concurrency (creating or busy).
        self._active: dict[str, int] = {}
        self._per_agent_fn: dict[tuple[str, str], int] = {}
        # function_key -> provisioned concurrency target (environments kept warm ahead of use).
        self.provisioned: dict[str, int] = {}
        # function_key -> configured memory of one environment (for the agents' memory caps).
        self.memory_mb: dict[str, int] = {}
        # ECS task id -> the agent it is placed on (place_task / release_task).
        self.task_agent: dict[str, str] = {}

    @property
    def env_id_prefix(self) -> str:
        """What every environment id this placement makes starts with."""
        return self._prefix

    # -- agents -----------------------------------------------------------------------------
    def add_agent(self, agent_id: str, envs_max: int, memory_mb_max: int | None = None) -> None:
        agent = self.agents.get(agent_id)
        if agent is None:
            self.agents[agent_id] = Agent(agent_id, envs_max, memory_mb_max=memory_mb_max)
        else:
            agent.envs_max = envs_max
            agent.up = True
            if memory_mb_max is not None:
                agent.memory_mb_max = memory_mb_max

    def agent_down(self, agent_id: str) -> list[str]:
        """The agent is unreachable: forget its environments (they are lost to this cell)."""
        agent = self.agents[agent_id]
        agent.up = False
        lost = sorted(agent.envs)
        for env_id in lost:
            self._forget(env_id)
        return lost

    def agent_up(self, agent_id: str) -> None:
        self.agents[agent_id].up = True

    # -- the invoke path -----------------------------------------------------------------------
    def acquire(
        self,
        function_key: str,
        concurrency_max: int,
        now_ms: int,
        eligible_agents: Iterable[str] | None = None,
    ) -> Decision:
        # The limit holds for warm environments too: a provisioned pool may hold more idle
        # environments than the limit leaves room for (found by frontend/sim.py).
        if self._active.get(function_key, 0) >= concurrency_max:
            return Throttle(
                "ReservedFunctionConcurrentInvocationLimitExceeded",
                f"Rate Exceeded. Function concurrency limit of {concurrency_max} reached.",
            )
        idle = self._idle.get(function_key)
        if idle:
            env = self.envs[idle.pop()]
            assert env.state == "idle"
            env.state = "busy"
            env.last_used_ms = now_ms
            env.invocations += 1
            self._active[function_key] = self._active.get(function_key, 0) + 1
            return Use(env.env_id, env.agent_id)
        agent = self._choose_agent(function_key, eligible_agents)
        if agent is None:
            return Throttle(
                "ConcurrentInvocationLimitExceeded",
                "Rate Exceeded. No execution capacity is free in this cell.",
            )
        env_id = f"{self._prefix}-{self._next_id}"
        self._next_id += 1
        env = Env(env_id, function_key, agent.agent_id, "creating", now_ms, invocations=1,
                  memory_mb=self.memory_mb.get(function_key, 0))
        self.envs[env_id] = env
        agent.envs.add(env_id)
        agent.memory_mb += env.memory_mb
        self._active[function_key] = self._active.get(function_key, 0) + 1
        key = (agent.agent_id, function_key)
        self._per_agent_fn[key] = self._per_agent_fn.get(key, 0) + 1
        return Create(env_id, agent.agent_id)

    def _choose_agent(self, function_key: str, eligible: Iterable[str] | None) -> Agent | None:
        candidates = (
            self.agents.values() if eligible is None
            else (self.agents[a] for a in eligible if a in self.agents)
        )
        best: Agent | None = None
        best_score: tuple[int, int, str] | None = None
        memory_mb = self.memory_mb.get(function_key, 0)
        for agent in candidates:
            if not agent.up or len(agent.envs) >= agent.envs_max:
                continue
            if agent.memory_mb_max is not None and agent.memory_mb + memory_mb > agent.memory_mb_max:
                continue
            score = (
                self._per_agent_fn.get((agent.agent_id, function_key), 0),
                len(agent.envs),
                agent.agent_id,
            )
            if best_score is None or score < best_score:
                best, best_score = agent, score
        return best

    # -- ECS tasks ------------------------------------------------------------------------------
    def place_task(self, task_id: str, memory_mb: int, cpu_units: int, cpu_units_max: int,
                   eligible_agents: Iterable[str]) -> TaskPlaced | NoRoom:
        """One task (one environment of ``memory_mb``/``cpu_units``) on the eligible agent
        that holds the fewest tasks, then the least memory; none with room: why not."""
        assert task_id not in self.task_agent, task_id
        best: Agent | None = None
        up = lacks_memory = 0
        for agent_id in sorted(set(eligible_agents)):
            agent = self.agents.get(agent_id)
            if agent is None or not agent.up:
                continue
            up += 1
            if agent.memory_mb_max is not None \
                    and agent.memory_mb + memory_mb > agent.memory_mb_max:
                lacks_memory += 1
                continue
            if sum(c for _, c in agent.tasks.values()) + cpu_units > cpu_units_max:
                continue
            if best is None or (len(agent.tasks), agent.memory_mb) \
                    < (len(best.tasks), best.memory_mb):
                best = agent
        if best is None:
            return NoRoom("AGENT" if not up else
                          "RESOURCE:MEMORY" if lacks_memory else "RESOURCE:CPU")
        best.tasks[task_id] = (memory_mb, cpu_units)
        best.memory_mb += memory_mb
        self.task_agent[task_id] = best.agent_id
        return TaskPlaced(best.agent_id)

    def hold_task(self, task_id: str, agent_id: str, memory_mb: int, cpu_units: int) -> None:
        """A task known to run on ``agent_id`` (a restarted frontend's): count it there."""
        agent = self.agents.get(agent_id)
        if agent is None or task_id in self.task_agent:
            return
        agent.tasks[task_id] = (memory_mb, cpu_units)
        agent.memory_mb += memory_mb
        self.task_agent[task_id] = agent_id

    def release_task(self, task_id: str) -> None:
        agent_id = self.task_agent.pop(task_id, None)
        agent = self.agents.get(agent_id) if agent_id is not None else None
        if agent is not None and task_id in agent.tasks:
            memory_mb, _ = agent.tasks.pop(task_id)
            agent.memory_mb -= memory_mb

    # -- provisioned concurrency ----------------------------------------------------------------
    def set_provisioned(self, function_key: str, count: int) -> list[Destroy]:
        """Keep ``count`` environments of the function ready ahead of traffic. Lowering the
        target releases the surplus to ordinary idle reaping; returns nothing to destroy now."""
        assert count >= 0
        if count:
            self.provisioned[function_key] = count
        else:
            self.provisioned.pop(function_key, None)
        pool = [e for e in self.envs.values() if e.function_key == function_key and e.provisioned]
        for env in pool[count:]:
            env.provisioned = False
        return []

    def provision(self, now_ms: int, eligible_agents: Iterable[str] | None = None) -> list[Create]:
        """Environments to create now so every provisioned pool reaches its target. They are
        created idle: the caller reports them with :meth:`prewarmed` (or :meth:`discard`)."""
        out: list[Create] = []
        for function_key, target in sorted(self.provisioned.items()):
            have = sum(1 for e in self.envs.values()
                       if e.function_key == function_key and e.provisioned)
            for _ in range(target - have):
                agent = self._choose_agent(function_key, eligible_agents)
                if agent is None:
                    return out
                env_id = f"{self._prefix}-{self._next_id}"
                self._next_id += 1
                self.envs[env_id] = Env(env_id, function_key, agent.agent_id, "creating",
                                        now_ms, provisioned=True,
                                        memory_mb=self.memory_mb.get(function_key, 0))
                agent.envs.add(env_id)
                agent.memory_mb += self.envs[env_id].memory_mb
                key = (agent.agent_id, function_key)
                self._per_agent_fn[key] = self._per_agent_fn.get(key, 0) + 1
                out.append(Create(env_id, agent.agent_id))
        return out

    def has_idle(self, function_key: str) -> bool:
        """Whether a warm environment of the function waits (a lease takes only those)."""
        return bool(self._idle.get(function_key))

    def prewarmed(self, env_id: str, now_ms: int) -> None:
        """A provisioned environment is up: it joins the function's idle pool."""
        env = self.envs.get(env_id)
        if env is None:
            return
        assert env.state == "creating" and env.provisioned, env
        env.state = "idle"
        env.last_used_ms = now_ms
        self._idle.setdefault(env.function_key, []).append(env_id)

    def created(self, env_id: str, now_ms: int) -> None:
        env = self.envs[env_id]
        assert env.state == "creating", env
        env.state = "busy"
        env.last_used_ms = now_ms

    def release(self, env_id: str, now_ms: int) -> list[Destroy]:
        """The invocation on ``env_id`` ended and the environment is healthy."""
        env = self.envs.get(env_id)
        if env is None:  # forgotten meanwhile (agent down)
            return []
        assert env.state == "busy", env
        self._active[env.function_key] -= 1
        if env.retired:
            self._forget(env_id, active_counted=False)
            return [Destroy(env_id, env.agent_id)]
        env.state = "idle"
        env.last_used_ms = now_ms
        self._idle.setdefault(env.function_key, []).append(env_id)
        return []

    def discard(self, env_id: str) -> Destroy | None:
        """The environment is broken (crashed, timed out, failed to start): drop it."""
        env = self.envs.get(env_id)
        if env is None:
            return None
        self._forget(env_id)
        return Destroy(env_id, env.agent_id)

    # -- housekeeping ---------------------------------------------------------------------------
    def retire_function(self, function_key: str) -> list[Destroy]:
        """Code or configuration changed: idle envs go now, busy ones when their invoke ends."""
        out: list[Destroy] = []
        for env in [e for e in self.envs.values() if e.function_key == function_key]:
            if env.state == "idle":
                self._forget(env.env_id)
                out.append(Destroy(env.env_id, env.agent_id))
            else:
                env.retired = True
        return out

    def on_tick(self, now_ms: int) -> list[Destroy]:
        out: list[Destroy] = []
        for stack in list(self._idle.values()):
            # Oldest first in the stack; stop at the first one that is still fresh.
            i = 0
            while i < len(stack):
                env = self.envs[stack[i]]
                if now_ms - env.last_used_ms < self.idle_timeout_ms:
                    break
                if env.provisioned:  # kept warm on purpose
                    i += 1
                    continue
                self._forget(env.env_id)
                out.append(Destroy(env.env_id, env.agent_id))
        return out

    def _forget(self, env_id: str, active_counted: bool = True) -> None:
        env = self.envs.pop(env_id)
        agent = self.agents.get(env.agent_id)
        if agent is not None:
            agent.envs.discard(env_id)
            agent.memory_mb -= env.memory_mb
        key = (env.agent_id, env.function_key)
        self._per_agent_fn[key] -= 1
        if not self._per_agent_fn[key]:
            del self._per_agent_fn[key]
        if env.state == "idle":
            stack = self._idle[env.function_key]
            stack.remove(env_id)
            if not stack:
                del self._idle[env.function_key]
        elif active_counted and not (env.state == "creating" and env.provisioned):
            self._active[env.function_key] -= 1

    def statistics(self) -> dict[str, object]:
        per_agent = {
            a.agent_id: {"up": a.up, "envs": len(a.envs), "envs_max": a.envs_max,
                         "memory_mb": a.memory_mb, "memory_mb_max": a.memory_mb_max,
                         "tasks": len(a.tasks)}
            for a in self.agents.values()
        }
        states: dict[str, int] = {"creating": 0, "idle": 0, "busy": 0}
        for env in self.envs.values():
            states[env.state] += 1
        provisioned = sum(1 for e in self.envs.values() if e.provisioned)
        return {"agents": per_agent, "envs": states, "provisioned": provisioned}

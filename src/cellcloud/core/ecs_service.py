"""An ECS service's deployment controller, sans-IO (issue #17): ``Service.handle(stimulus,
now_ms) -> [Instruction]``, the shape of ``core/invoke.py``.

The shell (not built yet) runs each ``StartTask`` as a task (core/ecs_tasks.py) placed on the
cell's agents and each ``StopTask`` as that task's stop, and reports every task's progress
back. The controller keeps ``desiredCount`` tasks of the PRIMARY deployment RUNNING and healthy:

- **Rolling update** (``UpdateService`` with a new task definition → a new PRIMARY deployment,
  the old one ACTIVE): tasks of all deployments, RUNNING or PENDING or stopping, never exceed
  ``floor(desiredCount × maximumPercent / 100)``; healthy tasks are stopped only while at least
  ``ceil(desiredCount × minimumHealthyPercent / 100)`` stay healthy (ECS's rounding). A task
  counts as healthy once RUNNING and, if its task definition has essential health checks,
  HEALTHY. Old PENDING or unhealthy tasks go first. The deployment is COMPLETED once the primary
  has ``desiredCount`` healthy tasks and no other deployment has any (a "steady state").
- **Replacement**: a task that stops on its own (it failed to start, an essential container
  exited) is replaced; one whose health turns UNHEALTHY is stopped ("Task failed container
  health checks") and replaced. Launches after failures back off (``ecs_tasks.crash_backoff_ms``
  on the consecutive failures: 10 s doubling to 5 min), never a hot loop; a healthy task resets
  it.
- **Deployment circuit breaker** (``deploymentCircuitBreaker``): failures of the primary's
  tasks (failed to start, exited, unhealthy) are counted; at
  ``min(200, max(3, ceil(desiredCount / 2)))`` the deployment is FAILED; with ``rollback`` a
  new PRIMARY deployment of the last COMPLETED task definition replaces it, without, the
  controller stops launching for it.
- **Capacity**: a task the cell could not place (``PlacementFailed``) is not a failure of the
  deployment: the service says why (``pending_reason``, an event) and tries again after a
  backoff; the failures of one batch of starts (those asked for at once) count as one.
- **Scale**: a new ``desiredCount`` (UpdateService, or the target-tracking scaler:
  core/autoscale.py) starts or stops tasks; extra tasks stop PENDING and unhealthy ones first.

Task ids are made from a counter (``<service>-<n>``): no randomness.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from .ecs_taskdef import EcsError
from .ecs_tasks import crash_backoff_ms
from .limits import DEFAULT_LIMITS


@dataclass(frozen=True)
class CircuitBreaker:
    enable: bool = False
    rollback: bool = False


@dataclass(frozen=True)
class DeploymentConfig:
    minimum_healthy_percent: int = 100
    maximum_percent: int = 200
    circuit_breaker: CircuitBreaker = CircuitBreaker()


def check_config(c: DeploymentConfig) -> None:
    """UpdateService/CreateService's ``deploymentConfiguration``, as InvalidParameterException."""
    if not 0 <= c.minimum_healthy_percent <= 100:
        raise EcsError("InvalidParameterException",
                       "minimumHealthyPercent must be between 0 and 100")
    if c.maximum_percent < 100:
        raise EcsError("InvalidParameterException", "maximumPercent must be at least 100")
    if c.minimum_healthy_percent == 100 and c.maximum_percent == 100:
        raise EcsError("InvalidParameterException",
                       "minimumHealthyPercent 100 with maximumPercent 100: a rolling "
                       "deployment could neither start a new task nor stop an old one")


def breaker_threshold(desired_count: int) -> int:
    return min(200, max(3, math.ceil(desired_count / 2)))


# -- stimuli ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Deploy:
    """CreateService / UpdateService with a task definition: a new PRIMARY deployment."""
    task_def: str  # the task definition's ARN
    health_checked: bool  # it has essential containers with health checks


@dataclass(frozen=True)
class SetDesiredCount:
    count: int


@dataclass(frozen=True)
class TaskReport:
    task_id: str
    last_status: Literal["PROVISIONING", "PENDING", "RUNNING", "STOPPING"]
    health: Literal["HEALTHY", "UNHEALTHY", "UNKNOWN"]


@dataclass(frozen=True)
class TaskStopped:
    task_id: str
    stop_code: str  # TaskFailedToStart | EssentialContainerExited | ServiceSchedulerInitiated…
    reason: str


@dataclass(frozen=True)
class PlacementFailed:
    task_id: str
    reason: str  # e.g. "no agent of the shard has room for 1024 CPU / 2048 MiB"


@dataclass(frozen=True)
class Tick:
    pass


Stimulus = Deploy | SetDesiredCount | TaskReport | TaskStopped | PlacementFailed | Tick


# -- instructions -------------------------------------------------------------------------------

@dataclass(frozen=True)
class StartTask:
    task_id: str
    task_def: str
    deployment_id: str


@dataclass(frozen=True)
class StopTask:
    task_id: str
    reason: str


Instruction = StartTask | StopTask


# -- state ------------------------------------------------------------------------------------

@dataclass
class Deployment:
    id: str
    task_def: str
    health_checked: bool
    created_ms: int
    status: Literal["PRIMARY", "ACTIVE"] = "PRIMARY"
    rollout: Literal["IN_PROGRESS", "COMPLETED", "FAILED"] = "IN_PROGRESS"
    rollout_reason: str = "ECS deployment in progress."
    failed_tasks: int = 0


@dataclass
class TaskState:
    id: str
    deployment_id: str
    status: Literal["PROVISIONING", "PENDING", "RUNNING", "STOPPING"] = "PROVISIONING"
    health: Literal["HEALTHY", "UNHEALTHY", "UNKNOWN"] = "UNKNOWN"
    stop_sent: bool = False


@dataclass
class Service:
    name: str
    desired_count: int
    config: DeploymentConfig = DeploymentConfig()
    deployments: list[Deployment] = field(default_factory=list)  # [0] is PRIMARY
    tasks: dict[str, TaskState] = field(default_factory=dict)
    events: list[tuple[int, str]] = field(default_factory=list)
    pending_reason: str = ""
    now_ms: int = 0
    _seq: int = 0
    _deploy_seq: int = 0
    _failures_in_row: int = 0
    _launch_at_ms: int = 0
    _last_completed: Deployment | None = None

    def __post_init__(self) -> None:
        check_config(self.config)
        assert self.desired_count >= 0

    # -- persistence (the shell keeps this in the cell's store: frontend/services.py) -----------
    def snapshot(self) -> dict[str, Any]:
        """Everything the controller knows, as plain JSON-able data."""
        out = asdict(self)
        out["events"] = [[t, msg] for t, msg in self.events]
        return out

    @classmethod
    def restored(cls, doc: dict[str, Any]) -> Service:
        """The controller a ``snapshot()`` was taken of."""
        d = dict(doc)
        cfg = dict(d.pop("config"))
        breaker = CircuitBreaker(**cfg.pop("circuit_breaker"))
        last = d.pop("_last_completed")
        return cls(**d | {
            "config": DeploymentConfig(circuit_breaker=breaker, **cfg),
            "deployments": [Deployment(**x) for x in d["deployments"]],
            "tasks": {k: TaskState(**v) for k, v in d["tasks"].items()},
            "events": [(int(t), str(msg)) for t, msg in d["events"]],
            "_last_completed": Deployment(**last) if last is not None else None})

    # -- views ---------------------------------------------------------------------------------
    @property
    def primary(self) -> Deployment | None:
        return self.deployments[0] if self.deployments else None

    @property
    def last_completed(self) -> Deployment | None:
        """The last deployment that reached a steady state (a rollback goes back to it)."""
        return self._last_completed

    def running_count(self) -> int:
        return sum(1 for t in self.tasks.values() if t.status == "RUNNING")

    def pending_count(self) -> int:
        return sum(1 for t in self.tasks.values() if t.status in ("PROVISIONING", "PENDING"))

    def healthy(self, task_id: str) -> bool:
        """The task counts as healthy: RUNNING, not being stopped, and HEALTHY if its
        deployment's task definition has health checks (else not UNHEALTHY)."""
        t = self.tasks.get(task_id)
        return t is not None and self._healthy(t)

    def _healthy(self, t: TaskState) -> bool:
        d = self._deployment(t.deployment_id)
        return t.status == "RUNNING" and not t.stop_sent and (
            t.health == "HEALTHY" if d is not None and d.health_checked
            else t.health != "UNHEALTHY")

    def _deployment(self, deployment_id: str) -> Deployment | None:
        return next((d for d in self.deployments if d.id == deployment_id), None)

    # -- the one entry point -----------------------------------------------------------------------
    def handle(self, stimulus: Stimulus, now_ms: int) -> list[Instruction]:
        assert now_ms >= self.now_ms, "time runs forward"
        self.now_ms = now_ms
        out: list[Instruction] = []
        match stimulus:
            case Deploy(task_def, checked):
                self._new_deployment(task_def, checked, "ECS deployment in progress.")
            case SetDesiredCount(count):
                assert count >= 0
                self.desired_count = count
                p = self.primary
                if p is not None and p.rollout == "COMPLETED":
                    p.rollout, p.rollout_reason = "IN_PROGRESS", "ECS deployment in progress."
            case TaskReport(task_id, status, health):
                t = self.tasks.get(task_id)
                if t is not None:
                    t.status, t.health = status, health
                    if self._healthy(t):
                        self._failures_in_row = 0
                        self.pending_reason = ""
            case TaskStopped(task_id, code, reason):
                t = self.tasks.pop(task_id, None)
                if t is not None and code in ("TaskFailedToStart", "EssentialContainerExited"):
                    self._failed(t, f"{code}: {reason}")
            case PlacementFailed(task_id, reason):
                if self.tasks.pop(task_id, None) is not None:
                    self.pending_reason = reason
                    if now_ms >= self._launch_at_ms:  # the batch's first: one backoff step
                        self._failures_in_row += 1
                        self._launch_at_ms = now_ms + crash_backoff_ms(self._failures_in_row)
                        self._event(f"(service {self.name}) was unable to place a task. "
                                    f"Reason: {reason}.")
            case Tick():
                pass
        self._reconcile(out)
        return out

    # -- internals -----------------------------------------------------------------------------
    def _event(self, message: str) -> None:
        self.events.append((self.now_ms, message))
        del self.events[:-DEFAULT_LIMITS.ecs_service_events_max]

    def _new_deployment(self, task_def: str, checked: bool, reason: str) -> Deployment:
        self._deploy_seq += 1
        for d in self.deployments:
            d.status = "ACTIVE"
        d = Deployment(f"ecs-svc/{self.name}/{self._deploy_seq}", task_def, checked,
                       self.now_ms, rollout_reason=reason)
        self.deployments.insert(0, d)
        self._failures_in_row, self._launch_at_ms = 0, self.now_ms
        return d

    def _failed(self, t: TaskState, why: str) -> None:
        self._failures_in_row += 1
        self._launch_at_ms = self.now_ms + crash_backoff_ms(self._failures_in_row)
        d = self._deployment(t.deployment_id)
        if d is None:
            return
        d.failed_tasks += 1
        self._event(f"(service {self.name}) task {t.id} failed: {why}")
        breaker = self.config.circuit_breaker
        if (d is self.primary and breaker.enable and d.rollout == "IN_PROGRESS"
                and d.failed_tasks >= breaker_threshold(self.desired_count)):
            d.rollout = "FAILED"
            d.rollout_reason = "ECS deployment circuit breaker: tasks failed to start."
            self._event(f"(service {self.name}) deployment {d.id} failed: "
                        f"{d.failed_tasks} tasks failed.")
            last = self._last_completed
            if breaker.rollback and last is not None and last.task_def != d.task_def:
                self._new_deployment(
                    last.task_def, last.health_checked,
                    f"ECS deployment circuit breaker: rolling back to deploymentId {last.id}")
                self._event(f"(service {self.name}) rolling back to {last.task_def}.")

    def _start(self, d: Deployment, out: list[Instruction]) -> None:
        self._seq += 1
        task_id = f"{self.name}-{self._seq}"
        self.tasks[task_id] = TaskState(task_id, d.id)
        out.append(StartTask(task_id, d.task_def, d.id))

    def _stop(self, t: TaskState, reason: str, out: list[Instruction]) -> None:
        t.stop_sent = True
        out.append(StopTask(t.id, reason))

    def _reconcile(self, out: list[Instruction]) -> None:
        primary = self.primary
        if primary is None:
            return
        # Unhealthy tasks go (and count as failures of their deployment).
        for t in list(self.tasks.values()):
            if t.health == "UNHEALTHY" and not t.stop_sent and t.status == "RUNNING":
                self._stop(t, "Task failed container health checks", out)
                self._failed(t, "container health checks failed")
        primary = self.primary
        assert primary is not None
        desired = self.desired_count
        upper = math.floor(desired * self.config.maximum_percent / 100)
        lower = math.ceil(desired * self.config.minimum_healthy_percent / 100)
        live = [t for t in self.tasks.values() if not t.stop_sent]
        mine = [t for t in live if t.deployment_id == primary.id]
        others = [t for t in live if t.deployment_id != primary.id]
        # Too many of the primary (a scale-in): the least useful go first.
        extra = len(mine) - desired
        if extra > 0:
            for t in sorted(mine, key=lambda t: (self._healthy(t), t.status == "RUNNING",
                                                 -int(t.id.rsplit("-", 1)[1])))[:extra]:
                self._stop(t, "Service scaled in", out)
            mine = [t for t in mine if not t.stop_sent]
        # Start new tasks of the primary, within maximumPercent (stopping tasks hold room).
        want = desired - len(mine)
        if primary.rollout != "FAILED" and self.now_ms >= self._launch_at_ms and want > 0:
            n = min(want, max(0, upper - len(self.tasks)))
            for _ in range(n):
                self._start(primary, out)
            if n:
                self._event(f"(service {self.name}) has started {n} tasks.")
        # Stop old tasks: not-healthy ones at once, healthy ones while enough stay healthy
        # (a FAILED primary without rollback keeps the old ones serving).
        healthy = sum(1 for t in self.tasks.values() if self._healthy(t))
        for t in sorted(others, key=lambda t: (self._healthy(t), t.id)):
            if not self._healthy(t):
                self._stop(t, "Deployment replaced this task", out)
            elif primary.rollout != "FAILED" and healthy - 1 >= lower:
                healthy -= 1
                self._stop(t, "Deployment replaced this task", out)
        # Steady state.
        mine_healthy = sum(1 for t in self.tasks.values()
                           if t.deployment_id == primary.id and self._healthy(t))
        if (primary.rollout == "IN_PROGRESS" and mine_healthy == desired
                and len(mine) == desired
                and all(t.deployment_id == primary.id for t in self.tasks.values())):
            primary.rollout, primary.rollout_reason = "COMPLETED", "ECS deployment completed."
            self._last_completed = primary
            self.deployments = [primary]
            self._event(f"(service {self.name}) has reached a steady state.")

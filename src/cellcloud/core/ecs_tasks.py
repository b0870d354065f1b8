"""One ECS task's lifecycle, sans-IO (issue #17): ``Task.handle(stimulus, now_ms) ->
[Instruction]``, the shape of ``core/invoke.py``.

The shell (not built yet) provisions the task's environment (its network namespace, cgroup
sized from the task's cpu/memory), starts and stops container processes, runs health-check
commands, and feeds what happened; the core decides what to do next and keeps the state that
``DescribeTasks`` reports.

- ``lastStatus``: PROVISIONING → PENDING → RUNNING → STOPPING → STOPPED (``desiredStatus``
  RUNNING until a stop is asked for or the task ends). The task is RUNNING once every container
  has started (or, for one that others wait on to COMPLETE/SUCCEED, has finished).
- Containers start in dependency order: ``dependsOn`` START (the other has started), COMPLETE
  (it exited), SUCCESS (it exited 0), HEALTHY (its health check passed). A dependency that can
  no longer be met (SUCCESS of a container that failed, a container that never starts) or is
  not met within the dependent's ``startTimeout`` fails the dependent.
- Essential containers: when one exits (or cannot start), the whole task stops — stopCode
  ``EssentialContainerExited`` (or ``TaskFailedToStart``) with a ``stoppedReason`` naming it;
  the others are stopped, dependents first, each with its ``stopTimeout`` (30 s default) before
  a kill. A non-essential container's exit is recorded (exitCode, reason) and nothing else.
- Health: each container with a ``healthCheck`` is probed every ``interval`` (the shell runs the
  command with the check's ``timeout``; a timeout is a failure). Failures during
  ``startPeriod`` do not count; ``retries`` consecutive failures make it UNHEALTHY; a success
  HEALTHY. The task's ``healthStatus``: UNHEALTHY if any essential container is, HEALTHY if
  every essential container with a check is, else UNKNOWN. (ECS does not stop an unhealthy
  task itself: a service replaces it — core/ecs_service.py.)
- Restarts (a Pod's ``restartPolicy`` Always/OnFailure, ECS's container ``restartPolicy``): an
  exited container is started again after a crash-loop backoff (:func:`crash_backoff_ms`:
  10 s doubling to 5 min, reset once it ran 10 min), never in a hot loop; with ``never`` (ECS's
  default) an essential container's exit stops the task. A container that another waits on to
  COMPLETE or SUCCEED (a Pod's init container, core/pod.py) is restarted only on failure even
  under ``always``, as Kubernetes restarts init containers: it runs once to success.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from .ecs_taskdef import Container, TaskDefinition, start_order

TaskStatus = Literal["PROVISIONING", "PENDING", "RUNNING", "STOPPING", "STOPPED"]
ContainerStatus = Literal["PENDING", "RUNNING", "STOPPED"]
Health = Literal["HEALTHY", "UNHEALTHY", "UNKNOWN"]
RestartPolicy = Literal["never", "always", "on-failure"]

stop_timeout_ms_default = 30_000  # ECS: a container's stopTimeout when none is given
crash_backoff_ms_initial = 10_000  # kubelet's CrashLoopBackOff: 10 s, doubled per crash
crash_backoff_ms_max = 300_000  # ... up to 5 minutes
crash_backoff_reset_ms = 600_000  # a container that ran 10 minutes starts over at 10 s


def crash_backoff_ms(crashes: int) -> int:
    """Wait before start number ``crashes + 1`` of a container that crashed ``crashes``
    times in a row (0: no wait)."""
    if crashes <= 0:
        return 0
    return min(crash_backoff_ms_max, crash_backoff_ms_initial << min(crashes - 1, 20))


# -- stimuli ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Provisioned:
    """The task's environment exists (network namespace, cgroup, image roots)."""


@dataclass(frozen=True)
class ProvisionFailed:
    reason: str  # e.g. "ResourceInitializationError: …", "no capacity"


@dataclass(frozen=True)
class ContainerStarted:
    name: str


@dataclass(frozen=True)
class ContainerStartFailed:
    name: str
    reason: str  # "CannotStartContainerError: …"


@dataclass(frozen=True)
class ContainerExited:
    name: str
    exit_code: int | None  # None: killed by a signal / unknown
    reason: str = ""


@dataclass(frozen=True)
class HealthResult:
    name: str
    ok: bool


@dataclass(frozen=True)
class StopRequested:
    reason: str
    by: Literal["user", "scheduler"] = "user"


@dataclass(frozen=True)
class Tick:
    """Time passed: due health checks, restarts and start timeouts."""


Stimulus = (Provisioned | ProvisionFailed | ContainerStarted | ContainerStartFailed
            | ContainerExited | HealthResult | StopRequested | Tick)

# -- instructions -------------------------------------------------------------------------------


@dataclass(frozen=True)
class StartContainer:
    name: str


@dataclass(frozen=True)
class StopContainer:
    name: str
    grace_ms: int  # SIGTERM, then SIGKILL after this


@dataclass(frozen=True)
class RunHealthCheck:
    name: str
    command: tuple[str, ...]
    timeout_ms: int


@dataclass(frozen=True)
class Release:
    """Every container is stopped: free the task's environment (network, cgroup, roots)."""


Instruction = StartContainer | StopContainer | RunHealthCheck | Release


# -- state ------------------------------------------------------------------------------------

@dataclass
class ContainerState:
    spec: Container
    status: ContainerStatus = "PENDING"
    starting: bool = False  # StartContainer sent, no answer yet
    exit_code: int | None = None
    reason: str = ""
    health: Health = "UNKNOWN"
    started_ms: int | None = None
    failures: int = 0  # consecutive failed health checks (outside the start period)
    next_probe_ms: int | None = None
    probing: bool = False
    crashes: int = 0
    restart_at_ms: int | None = None
    waiting_since_ms: int | None = None  # when its start began to wait on dependencies
    finished: bool = False  # exited and will not run again

    @property
    def exited_ok(self) -> bool:
        return self.finished and self.exit_code == 0


@dataclass
class Task:
    task_def: TaskDefinition
    now_ms: int
    restart_policy: RestartPolicy = "never"
    last_status: TaskStatus = "PROVISIONING"
    desired_status: Literal["RUNNING", "STOPPED"] = "RUNNING"
    stop_code: str = ""
    stopped_reason: str = ""
    created_ms: int = 0
    started_ms: int | None = None
    stopping_ms: int | None = None
    stopped_ms: int | None = None
    containers: dict[str, ContainerState] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.created_ms = self.now_ms
        self.containers = {n: ContainerState(self.task_def.container(n))
                           for n in start_order(self.task_def)}

    # -- a snapshot kept durably, and a task rebuilt from one ------------------------------------
    def snapshot(self) -> dict[str, object]:
        """The state a restarted shell needs to go on driving the task (JSON-able)."""
        return {
            "last_status": self.last_status, "desired_status": self.desired_status,
            "stop_code": self.stop_code, "stopped_reason": self.stopped_reason,
            "created_ms": self.created_ms, "started_ms": self.started_ms,
            "stopping_ms": self.stopping_ms, "stopped_ms": self.stopped_ms,
            "containers": {n: {"status": c.status, "exit_code": c.exit_code,
                               "reason": c.reason, "health": c.health,
                               "started_ms": c.started_ms, "finished": c.finished,
                               "crashes": c.crashes}
                           for n, c in self.containers.items()},
        }

    @classmethod
    def restored(cls, task_def: TaskDefinition, snap: dict[str, object], now_ms: int,
                 restart_policy: RestartPolicy = "never") -> Task:
        """The task a snapshot describes, as of ``now_ms``: nothing is in flight (a start
        that was asked and not answered is not known to have happened: the container is
        PENDING again), due health checks run at the next stimulus."""
        t = cls(task_def, now_ms, restart_policy=restart_policy)
        t.last_status = snap["last_status"]  # type: ignore[assignment]
        t.desired_status = snap["desired_status"]  # type: ignore[assignment]
        for k in ("stop_code", "stopped_reason"):
            setattr(t, k, str(snap[k]))
        for k in ("created_ms", "started_ms", "stopping_ms", "stopped_ms"):
            setattr(t, k, snap[k])
        saved = snap["containers"]
        assert isinstance(saved, dict)
        for name, c in t.containers.items():
            d = saved.get(name) or {}
            c.status, c.exit_code = d.get("status", "PENDING"), d.get("exit_code")
            c.reason, c.health = str(d.get("reason", "")), d.get("health", "UNKNOWN")
            c.started_ms, c.finished = d.get("started_ms"), bool(d.get("finished"))
            c.crashes = int(d.get("crashes", 0))
            c.waiting_since_ms = now_ms
            if c.status == "RUNNING" and c.spec.health_check is not None:
                c.next_probe_ms = now_ms
        return t

    def resume(self, now_ms: int) -> list[Instruction]:
        """After :meth:`restored`: what may have been lost in flight is asked again (stops
        of a STOPPING task's running containers, starts of containers now due)."""
        assert now_ms >= self.now_ms, "time runs forward"
        self.now_ms = now_ms
        out: list[Instruction] = []
        if self.last_status == "STOPPING":
            for c in reversed(list(self.containers.values())):
                if c.status == "RUNNING":
                    out.append(StopContainer(c.spec.name, self._grace_ms(c)))
        elif self.last_status in ("PENDING", "RUNNING"):
            self._start_ready(out)
        self._timers(out)
        self._settle(out)
        return out

    # -- the view DescribeTasks reports ------------------------------------------------------
    @property
    def health_status(self) -> Health:
        checked = [c for c in self.containers.values()
                   if c.spec.essential and c.spec.health_check is not None]
        if any(c.health == "UNHEALTHY" for c in checked):
            return "UNHEALTHY"
        if checked and all(c.health == "HEALTHY" for c in checked):
            return "HEALTHY"
        return "UNKNOWN"

    # -- the one entry point ---------------------------------------------------------------------
    def handle(self, stimulus: Stimulus, now_ms: int) -> list[Instruction]:
        assert now_ms >= self.now_ms, "time runs forward"
        self.now_ms = now_ms
        out: list[Instruction] = []
        if self.last_status == "STOPPED":
            return out  # late reports of a finished task change nothing
        if self.last_status == "PROVISIONING" and isinstance(
                stimulus, ContainerStarted | ContainerStartFailed | ContainerExited
                | HealthResult):
            return out  # no container was started yet: a confused report changes nothing
        match stimulus:
            case Provisioned():
                if self.last_status == "PROVISIONING" and self.desired_status == "RUNNING":
                    self.last_status = "PENDING"
                    for c in self.containers.values():
                        c.waiting_since_ms = now_ms
                    self._start_ready(out)
                elif self.last_status == "PROVISIONING":  # stopped while provisioning
                    for c in self.containers.values():
                        c.status, c.finished = "STOPPED", True
                    self._finish(out)
            case ProvisionFailed(reason):
                if self.last_status == "PROVISIONING":
                    if self.desired_status == "RUNNING":
                        self.stop_code, self.stopped_reason = "TaskFailedToStart", reason
                    self.desired_status = "STOPPED"
                    for c in self.containers.values():
                        c.status, c.finished = "STOPPED", True
                    self._finish(out)
            case ContainerStarted(name):
                c = self.containers[name]
                c.starting, c.status, c.started_ms = False, "RUNNING", now_ms
                c.reason = ""
                if c.spec.health_check is not None:
                    c.health, c.failures = "UNKNOWN", 0
                    c.next_probe_ms = now_ms  # the first check runs at once
                if self.desired_status == "STOPPED":
                    out.append(StopContainer(name, self._grace_ms(c)))
                else:
                    self._start_ready(out)
            case ContainerStartFailed(name, reason):
                c = self.containers[name]
                c.starting, c.status, c.finished, c.reason = False, "STOPPED", True, reason
                if c.spec.essential and self.desired_status == "RUNNING":
                    self._fail("TaskFailedToStart", f"{reason} (container {name})", out)
                else:
                    self._start_ready(out)
            case ContainerExited(name, code, reason):
                self._exited(self.containers[name], code, reason, out)
            case HealthResult(name, ok):
                self._health(self.containers[name], ok)
            case StopRequested(reason, by):
                self._stop("UserInitiated" if by == "user" else "ServiceSchedulerInitiated",
                           reason, out)
            case Tick():
                pass
        self._timers(out)
        self._settle(out)
        return out

    # -- internals ---------------------------------------------------------------------------
    def _grace_ms(self, c: ContainerState) -> int:
        s = c.spec.stop_timeout_s
        return s * 1000 if s is not None else stop_timeout_ms_default

    def _dependency(self, c: ContainerState) -> Literal["met", "wait", "never"]:
        verdict: Literal["met", "wait", "never"] = "met"
        for d in c.spec.depends_on:
            t = self.containers[d.container]
            if d.condition == "START":
                ok = t.status == "RUNNING" or (t.finished and t.started_ms is not None)
                never = t.finished and t.started_ms is None
            elif d.condition == "COMPLETE":
                ok, never = t.finished, False
            elif d.condition == "SUCCESS":
                ok, never = t.exited_ok, t.finished and not t.exited_ok
            else:  # HEALTHY
                ok, never = t.health == "HEALTHY", t.finished
            if never:
                return "never"
            if not ok:
                verdict = "wait"
        return verdict

    def _start_ready(self, out: list[Instruction]) -> None:
        if self.last_status not in ("PENDING", "RUNNING") or self.desired_status != "RUNNING":
            return
        for c in self.containers.values():
            if c.status != "PENDING" or c.starting or c.finished or c.restart_at_ms is not None:
                continue
            dep = self._dependency(c)
            if dep == "met":
                c.starting = True
                out.append(StartContainer(c.spec.name))
            elif dep == "never":
                c.status, c.finished = "STOPPED", True
                c.reason = "DependencyNotMet: a container it depends on cannot satisfy its " \
                           "condition"
                if c.spec.essential:
                    self._fail("TaskFailedToStart",
                               f"Container {c.spec.name}: {c.reason}", out)
                    return

    def _exited(self, c: ContainerState, code: int | None, reason: str,
                out: list[Instruction]) -> None:
        ran_ms = self.now_ms - c.started_ms if c.started_ms is not None else 0
        c.status, c.starting, c.exit_code, c.probing = "STOPPED", False, code, False
        c.reason = reason or (f"exit code {code}" if code is not None else "killed")
        c.next_probe_ms = None
        if self.desired_status == "STOPPED":
            c.finished = True
            return
        policy = self.restart_policy
        if policy == "always" and c.spec.name in self._awaited_to_finish():
            policy = "on-failure"  # a Pod's init container: restarted only until it succeeds
        restart = policy == "always" or (policy == "on-failure" and code != 0)
        if restart:
            c.crashes = 1 if ran_ms >= crash_backoff_reset_ms else c.crashes + 1
            c.restart_at_ms = self.now_ms + crash_backoff_ms(c.crashes)
            c.status, c.reason = "PENDING", f"CrashLoopBackOff: {c.reason}; restarting in " \
                f"{crash_backoff_ms(c.crashes) // 1000} s"
            c.health = "UNKNOWN"
            return
        c.finished = True
        if c.spec.essential:
            self._stop("EssentialContainerExited",
                       f"Essential container in task exited ({c.spec.name}: {c.reason})", out)
        else:
            self._start_ready(out)  # dependents on COMPLETE / SUCCESS

    def _awaited_to_finish(self) -> set[str]:
        """Containers another waits on to COMPLETE or SUCCEED (a Pod's init containers)."""
        return {d.container for c in self.containers.values() for d in c.spec.depends_on
                if d.condition in ("COMPLETE", "SUCCESS")}

    def _health(self, c: ContainerState, ok: bool) -> None:
        hc = c.spec.health_check
        if hc is None or c.status != "RUNNING":
            return
        c.probing = False
        c.next_probe_ms = self.now_ms + hc.interval_s * 1000
        if ok:
            c.health, c.failures = "HEALTHY", 0
            return
        in_start_period = (c.started_ms is not None
                           and self.now_ms - c.started_ms < hc.start_period_s * 1000)
        if in_start_period:
            return
        c.failures += 1
        if c.failures >= hc.retries:
            c.health = "UNHEALTHY"

    def _timers(self, out: list[Instruction]) -> None:
        if self.last_status in ("STOPPING", "STOPPED"):
            return
        for c in self.containers.values():
            hc = c.spec.health_check
            if (hc is not None and c.status == "RUNNING" and not c.probing
                    and c.next_probe_ms is not None and self.now_ms >= c.next_probe_ms):
                c.probing = True
                out.append(RunHealthCheck(c.spec.name, hc.command, hc.timeout_s * 1000))
            if (c.restart_at_ms is not None and self.now_ms >= c.restart_at_ms
                    and self.desired_status == "RUNNING"):
                c.restart_at_ms = None
                c.starting = True
                out.append(StartContainer(c.spec.name))
            timeout = c.spec.start_timeout_s
            if (timeout is not None and c.status == "PENDING" and not c.starting
                    and not c.finished and c.restart_at_ms is None
                    and c.waiting_since_ms is not None
                    and self.now_ms - c.waiting_since_ms >= timeout * 1000):
                c.status, c.finished = "STOPPED", True
                c.reason = f"its dependencies were not met within startTimeout ({timeout} s)"
                if c.spec.essential:
                    self._fail("TaskFailedToStart", f"Container {c.spec.name}: {c.reason}",
                               out)
                    return
        self._start_ready(out)

    def _fail(self, code: str, reason: str, out: list[Instruction]) -> None:
        self._stop(code, reason, out)

    def _stop(self, code: str, reason: str, out: list[Instruction]) -> None:
        if self.desired_status == "STOPPED":
            return  # the first reason stands
        self.desired_status = "STOPPED"
        self.stop_code, self.stopped_reason = code, reason
        if self.last_status == "PROVISIONING":
            return  # stopped once provisioning answers (Provisioned or ProvisionFailed)
        self.last_status, self.stopping_ms = "STOPPING", self.now_ms
        # Dependents first: the reverse of the start order.
        for c in reversed(list(self.containers.values())):
            c.restart_at_ms = None
            if c.status == "RUNNING" or c.starting:
                out.append(StopContainer(c.spec.name, self._grace_ms(c)))
            elif c.status == "PENDING":
                c.status, c.finished = "STOPPED", True

    def _settle(self, out: list[Instruction]) -> None:
        if self.last_status == "PENDING" and all(
                c.status == "RUNNING" or c.finished for c in self.containers.values()) \
                and any(c.status == "RUNNING" for c in self.containers.values()):
            self.last_status, self.started_ms = "RUNNING", self.now_ms
        if self.last_status == "STOPPING" and all(
                c.status == "STOPPED" and not c.starting for c in self.containers.values()):
            self._finish(out)

    def _finish(self, out: list[Instruction]) -> None:
        self.last_status, self.stopped_ms = "STOPPED", self.now_ms
        out.append(Release())

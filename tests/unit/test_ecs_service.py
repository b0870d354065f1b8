"""An ECS service's deployment controller (core/ecs_service.py), driven by a small fake
cluster: rolling updates within minimumHealthyPercent/maximumPercent, replacement of failed and
unhealthy tasks with backoff, the circuit breaker with rollback, placement failures, scaling."""

from __future__ import annotations

import json
import math
from collections import deque
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cellcloud.core import ecs_service as s
from cellcloud.core.ecs_taskdef import EcsError


class Cluster:
    """Runs the controller's instructions: a started task becomes RUNNING (and HEALTHY or
    UNHEALTHY, or fails to start) as its task definition's behaviour says; a stop stops it.
    Checks the rolling-update bounds after every step while desiredCount stays put."""

    def __init__(self, svc: s.Service, behaviour: dict[str, str] | None = None) -> None:
        self.svc = svc
        self.behaviour = behaviour or {}
        self.now = 0
        self.queue: deque[s.Stimulus] = deque()
        self.started: list[s.StartTask] = []
        self.stopped: list[s.StopTask] = []
        self.capacity: int | None = None  # tasks the cluster can place at once
        self.placed: set[str] = set()
        self.max_tasks = 0
        self.min_healthy_seen: int | None = None

    def feed(self, stim: s.Stimulus, dt: int = 1) -> None:
        self.now += dt
        healthy_before = self._healthy()
        for ins in self.svc.handle(stim, self.now):
            if isinstance(ins, s.StartTask):
                self.started.append(ins)
                if self.capacity is not None and len(self.placed) >= self.capacity:
                    self.queue.append(s.PlacementFailed(ins.task_id, "no room in the cell"))
                    continue
                self.placed.add(ins.task_id)
                kind = self.behaviour.get(ins.task_def, "ok")
                if kind == "fail":
                    self.placed.discard(ins.task_id)
                    self.queue.append(s.TaskStopped(ins.task_id, "TaskFailedToStart",
                                                    "CannotStartContainerError"))
                else:
                    self.queue.append(s.TaskReport(ins.task_id, "RUNNING", "HEALTHY"
                                                   if kind == "ok" else "UNHEALTHY"))
            else:
                self.stopped.append(ins)
                self.placed.discard(ins.task_id)
                self.queue.append(s.TaskStopped(ins.task_id, "ServiceSchedulerInitiated",
                                                ins.reason))
        self.max_tasks = max(self.max_tasks, len(self.svc.tasks))
        after = self._healthy()
        lower = math.ceil(self.svc.desired_count
                          * self.svc.config.minimum_healthy_percent / 100)
        if healthy_before >= lower and not isinstance(stim, s.TaskReport | s.TaskStopped):
            # the controller itself never takes the healthy count under the floor
            assert after >= lower, (healthy_before, after, lower)

    def _healthy(self) -> int:
        return sum(1 for t in self.svc.tasks.values() if self.svc._healthy(t))

    def run(self, steps: int = 500, tick_ms: int = 1000) -> None:
        for _ in range(steps):
            if self.queue:
                self.feed(self.queue.popleft())
            else:
                self.feed(s.Tick(), tick_ms)


def _svc(desired: int, mn: int = 100, mx: int = 200, breaker: s.CircuitBreaker | None = None
         ) -> s.Service:
    return s.Service("web", desired, s.DeploymentConfig(mn, mx, breaker or s.CircuitBreaker()))


def test_a_new_service_reaches_a_steady_state() -> None:
    c = Cluster(_svc(3))
    c.feed(s.Deploy("td:1", health_checked=True))
    c.run(20)
    p = c.svc.primary
    assert p is not None and p.rollout == "COMPLETED" and c.svc.running_count() == 3
    assert any("steady state" in m for _, m in c.svc.events)


@pytest.mark.parametrize("mn,mx,desired", [(100, 200, 4), (50, 100, 4), (50, 150, 5),
                                           (0, 100, 3), (100, 125, 8)])
def test_rolling_update_stays_within_its_bounds(mn: int, mx: int, desired: int) -> None:
    c = Cluster(_svc(desired, mn, mx))
    c.feed(s.Deploy("td:1", True))
    c.run(50)
    c.max_tasks = 0
    c.feed(s.Deploy("td:2", True))
    c.run(200)
    p = c.svc.primary
    assert p is not None and p.task_def == "td:2" and p.rollout == "COMPLETED"
    assert len(c.svc.deployments) == 1 and c.svc.running_count() == desired
    assert all(t.deployment_id == p.id for t in c.svc.tasks.values())
    assert c.max_tasks <= math.floor(desired * mx / 100)


def test_a_failed_task_is_replaced_after_a_growing_backoff() -> None:
    c = Cluster(_svc(1))
    c.feed(s.Deploy("td:1", True))
    c.run(10)
    (task_id,) = c.svc.tasks
    c.feed(s.TaskStopped(task_id, "EssentialContainerExited", "exit 1"))
    assert not c.svc.tasks  # not at once: 10 s of backoff
    c.feed(s.Tick(), 9_998)
    assert not c.svc.tasks
    c.feed(s.Tick(), 2)
    assert len(c.svc.tasks) == 1
    assert c.svc.primary is not None and c.svc.primary.failed_tasks == 1


def test_an_unhealthy_task_is_stopped_and_replaced() -> None:
    c = Cluster(_svc(2))
    c.feed(s.Deploy("td:1", True))
    c.run(10)
    victim = sorted(c.svc.tasks)[0]
    c.feed(s.TaskReport(victim, "RUNNING", "UNHEALTHY"))
    assert c.stopped[-1] == s.StopTask(victim, "Task failed container health checks")
    c.run(40, tick_ms=1000)
    assert c.svc.running_count() == 2 and victim not in c.svc.tasks


def test_circuit_breaker_rolls_back_to_the_last_completed_deployment() -> None:
    c = Cluster(_svc(4, breaker=s.CircuitBreaker(enable=True, rollback=True)),
                behaviour={"td:bad": "fail"})
    c.feed(s.Deploy("td:good", True))
    c.run(30)
    c.feed(s.Deploy("td:bad", True))
    c.run(1500, tick_ms=1000)
    p = c.svc.primary
    assert p is not None and p.task_def == "td:good" and p.rollout == "COMPLETED"
    assert c.svc.running_count() == 4
    assert any("rolling back" in m for _, m in c.svc.events)
    # The bad deployment failed after the breaker's threshold (min 3), never more.
    bad = [st for st in c.started if st.task_def == "td:bad"]
    assert 3 <= len(bad) <= 4 + 3


def test_circuit_breaker_without_rollback_stops_launching_and_keeps_the_old_tasks() -> None:
    c = Cluster(_svc(2, breaker=s.CircuitBreaker(enable=True)), behaviour={"td:bad": "fail"})
    c.feed(s.Deploy("td:good", True))
    c.run(30)
    c.feed(s.Deploy("td:bad", True))
    c.run(2000, tick_ms=1000)
    p = c.svc.primary
    assert p is not None and p.rollout == "FAILED" and "circuit breaker" in p.rollout_reason
    # the threshold (3), plus what was already in flight when it was reached (desired - 1)
    assert 3 <= len([st for st in c.started if st.task_def == "td:bad"]) <= 3 + 1
    assert c.svc.running_count() == 2  # the old deployment's tasks still serve


def test_a_task_that_cannot_be_placed_leaves_a_reason_not_a_failure() -> None:
    c = Cluster(_svc(3, breaker=s.CircuitBreaker(enable=True)))
    c.capacity = 2
    c.feed(s.Deploy("td:1", True))
    c.run(100, tick_ms=1000)
    assert c.svc.running_count() == 2
    assert "no room" in c.svc.pending_reason
    p = c.svc.primary
    assert p is not None and p.failed_tasks == 0 and p.rollout == "IN_PROGRESS"
    tries = len(c.started)
    assert tries < 20  # backing off, not a hot loop
    c.capacity = None
    c.run(400, tick_ms=1000)
    assert c.svc.running_count() == 3 and p.rollout == "COMPLETED"


def test_scale_out_and_in() -> None:
    c = Cluster(_svc(2))
    c.feed(s.Deploy("td:1", True))
    c.run(10)
    c.feed(s.SetDesiredCount(5))
    c.run(20)
    assert c.svc.running_count() == 5
    c.feed(s.SetDesiredCount(1))
    c.run(20)
    assert c.svc.running_count() == 1 and len(c.svc.tasks) == 1
    assert c.svc.primary is not None and c.svc.primary.rollout == "COMPLETED"


@pytest.mark.parametrize("mn,mx,why", [(101, 200, "minimumHealthyPercent"),
                                       (50, 90, "maximumPercent"), (100, 100, "neither")])
def test_bad_deployment_configurations(mn: int, mx: int, why: str) -> None:
    with pytest.raises(EcsError, match=why):
        s.check_config(s.DeploymentConfig(mn, mx))


def test_breaker_threshold() -> None:
    assert [s.breaker_threshold(n) for n in (1, 6, 7, 100, 1000)] == [3, 3, 4, 50, 200]


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 100), st.integers(100, 200), st.integers(1, 8),
       st.lists(st.tuples(st.integers(0, 3), st.integers(0, 30)), max_size=30))
def test_random_failures_never_break_the_bounds(mn: int, mx: int, desired: int,
                                                 chaos: list[tuple[int, int]]) -> None:
    if mn == 100 and mx == 100:
        mx = 101
    c = Cluster(_svc(desired, mn, mx))
    c.feed(s.Deploy("td:1", True))
    c.run(20)
    c.feed(s.Deploy("td:2", True))
    for kind, pick in chaos:
        c.run(3)
        ids = sorted(c.svc.tasks)
        if not ids:
            continue
        victim = ids[pick % len(ids)]
        stim: Any = [s.TaskStopped(victim, "EssentialContainerExited", "x"),
                     s.TaskReport(victim, "RUNNING", "UNHEALTHY"),
                     s.TaskStopped(victim, "UserInitiated", "x"), s.Tick()][kind]
        c.feed(stim)
        upper = math.floor(desired * mx / 100)
        assert len([t for t in c.svc.tasks.values()]) <= max(upper, desired)
    c.run(2000, tick_ms=5000)
    p = c.svc.primary
    assert p is not None and p.task_def == "td:2" and c.svc.running_count() == desired


def test_a_snapshot_restores_the_same_controller() -> None:
    """The cell keeps each service as its snapshot (frontend/services.py): a restored
    controller answers the next stimuli as the original does."""
    c = Cluster(_svc(3, 50, 150, s.CircuitBreaker(True, True)))
    c.feed(s.Deploy("td:1", True))
    c.run(20)
    c.feed(s.Deploy("td:2", True))
    c.run(3)
    snap = json.loads(json.dumps(c.svc.snapshot()))
    copy = s.Service.restored(snap)
    assert copy.snapshot() == snap
    now = c.now + 1000
    assert copy.handle(s.Tick(), now) == c.svc.handle(s.Tick(), now)
    assert copy.snapshot() == c.svc.snapshot()


def test_placement_failures_of_one_batch_back_off_once() -> None:
    """The starts the controller asks for at once fail to be placed together (the cell has
    no room for any): one failure's backoff (10 s), not one doubling per task of the batch."""
    svc = _svc(6)
    starts = svc.handle(s.Deploy("td:1", True), 0)
    assert len(starts) == 6
    for ins in starts:
        assert svc.handle(s.PlacementFailed(ins.task_id, "RESOURCE:MEMORY"), 1) == []
    assert svc.handle(s.Tick(), 10_000) == []
    assert len(svc.handle(s.Tick(), 10_001)) == 6  # tried again after 10 s, not 5 min
    assert sum("unable to place" in m for _, m in svc.events) == 1

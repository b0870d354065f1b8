"""One ECS task's lifecycle (core/ecs_tasks.py): stimuli in, instructions out, time passed in."""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from cellcloud.core import ecs_tasks as t
from cellcloud.core.ecs_taskdef import validate_task_definition


def _def(*containers: dict[str, Any]) -> Any:
    return validate_task_definition({"family": "f", "cpu": "256", "memory": "512",
                                     "containerDefinitions": list(containers)})


WEB = {"name": "web", "image": "i",
       "healthCheck": {"command": ["CMD", "check"], "interval": 5, "retries": 2,
                       "startPeriod": 10}}
SIDE = {"name": "side", "image": "i", "dependsOn": [{"containerName": "web",
                                                      "condition": "HEALTHY"}]}


def _started(task: t.Task, now: int = 0) -> list[t.Instruction]:
    out = task.handle(t.Provisioned(), now)
    i = 0
    while i < len(out):  # every container the core starts, starts (and may start more)
        if isinstance(out[i], t.StartContainer):
            out += task.handle(t.ContainerStarted(out[i].name), now)  # type: ignore[union-attr]
        i += 1
    return out


def test_provisioning_pending_running_stopped_with_a_user_stop() -> None:
    task = t.Task(_def({"name": "a", "image": "i"}), 0)
    assert task.last_status == "PROVISIONING"
    assert task.handle(t.Provisioned(), 10) == [t.StartContainer("a")]
    assert task.last_status == "PENDING"
    assert task.handle(t.ContainerStarted("a"), 20) == []
    assert task.last_status == "RUNNING" and task.started_ms == 20
    assert task.handle(t.StopRequested("done"), 30) == [t.StopContainer("a", 30_000)]
    assert task.last_status == "STOPPING" and task.desired_status == "STOPPED"
    assert task.handle(t.ContainerExited("a", 143), 40) == [t.Release()]
    assert (task.last_status, task.stop_code, task.stopped_reason) == \
        ("STOPPED", "UserInitiated", "done")
    assert task.containers["a"].exit_code == 143
    assert task.handle(t.ContainerExited("a", 0), 50) == []  # late: nothing changes


def test_dependencies_start_in_order_healthy_waits_for_the_check() -> None:
    task = t.Task(_def(SIDE, WEB), 0)
    assert task.handle(t.Provisioned(), 0) == [t.StartContainer("web")]
    assert task.handle(t.ContainerStarted("web"), 100) == [
        t.RunHealthCheck("web", ("CMD", "check"), 5000)]
    assert task.last_status == "PENDING"
    assert task.handle(t.HealthResult("web", False), 200) == []  # in the start period
    assert task.handle(t.Tick(), 5_199) == []
    assert task.handle(t.Tick(), 5_200) == [t.RunHealthCheck("web", ("CMD", "check"), 5000)]
    assert task.handle(t.HealthResult("web", True), 5_300) == [t.StartContainer("side")]
    assert task.handle(t.ContainerStarted("side"), 5_400) == []
    assert task.last_status == "RUNNING" and task.health_status == "HEALTHY"


def test_health_turns_unhealthy_after_retries_outside_the_start_period() -> None:
    task = t.Task(_def(WEB), 0)
    _started(task)
    task.handle(t.HealthResult("web", True), 0)
    assert task.health_status == "HEALTHY"
    task.handle(t.HealthResult("web", False), 11_000)
    assert task.health_status == "HEALTHY"  # one failure of two
    task.handle(t.HealthResult("web", False), 16_000)
    assert task.health_status == "UNHEALTHY"
    assert task.last_status == "RUNNING"  # a service replaces it; the task does not stop


def test_success_and_complete_conditions() -> None:
    init = {"name": "init", "image": "i", "essential": False}
    app = {"name": "app", "image": "i", "dependsOn": [{"containerName": "init",
                                                       "condition": "SUCCESS"}]}
    task = t.Task(_def(app, init), 0)
    assert _started(task) == [t.StartContainer("init")]
    assert task.handle(t.ContainerExited("init", 0), 5) == [t.StartContainer("app")]
    task.handle(t.ContainerStarted("app"), 6)
    assert task.last_status == "RUNNING"

    failed = t.Task(_def(app, init), 0)
    _started(failed)
    out = failed.handle(t.ContainerExited("init", 1), 5)
    assert out == [t.Release()]
    assert failed.last_status == "STOPPED" and failed.stop_code == "TaskFailedToStart"
    assert "app" in failed.stopped_reason

    complete = {**app, "dependsOn": [{"containerName": "init", "condition": "COMPLETE"}]}
    task = t.Task(_def(complete, init), 0)
    _started(task)
    assert task.handle(t.ContainerExited("init", 1), 5) == [t.StartContainer("app")]


def test_an_essential_container_exit_stops_the_task_dependents_first() -> None:
    db = {"name": "db", "image": "i", "stopTimeout": 10}
    web = {"name": "web", "image": "i",
           "dependsOn": [{"containerName": "db", "condition": "START"}]}
    logger = {"name": "logger", "image": "i", "essential": False}
    task = t.Task(_def(db, web, logger), 0)
    out = _started(task)
    assert [i for i in out if isinstance(i, t.StartContainer)] == [
        t.StartContainer("db"), t.StartContainer("logger"), t.StartContainer("web")]
    assert task.last_status == "RUNNING"
    out = task.handle(t.ContainerExited("web", 2), 100)
    assert out == [t.StopContainer("logger", 30_000), t.StopContainer("db", 10_000)]
    assert task.stop_code == "EssentialContainerExited"
    assert "web" in task.stopped_reason and "exit code 2" in task.stopped_reason
    task.handle(t.ContainerExited("db", 0), 200)
    assert task.handle(t.ContainerExited("logger", 0), 300) == [t.Release()]
    assert task.stopped_ms == 300


def test_a_non_essential_exit_changes_nothing_else() -> None:
    task = t.Task(_def({"name": "a", "image": "i"},
                       {"name": "b", "image": "i", "essential": False}), 0)
    _started(task)
    assert task.handle(t.ContainerExited("b", 3), 10) == []
    assert task.last_status == "RUNNING" and task.containers["b"].exit_code == 3


def test_a_container_that_cannot_start_fails_the_task() -> None:
    task = t.Task(_def({"name": "a", "image": "i"}), 0)
    task.handle(t.Provisioned(), 0)
    out = task.handle(t.ContainerStartFailed("a", "CannotPullContainerError: no image"), 1)
    assert out == [t.Release()]
    assert task.stop_code == "TaskFailedToStart" and "CannotPull" in task.stopped_reason


def test_provisioning_failure_and_a_stop_while_provisioning() -> None:
    task = t.Task(_def({"name": "a", "image": "i"}), 0)
    assert task.handle(t.ProvisionFailed("no capacity"), 5) == [t.Release()]
    assert (task.last_status, task.stop_code) == ("STOPPED", "TaskFailedToStart")
    task = t.Task(_def({"name": "a", "image": "i"}), 0)
    assert task.handle(t.StopRequested("changed my mind"), 1) == []
    assert task.last_status == "PROVISIONING"
    assert task.handle(t.Provisioned(), 2) == [t.Release()]
    assert (task.last_status, task.stop_code) == ("STOPPED", "UserInitiated")


def test_start_timeout_fails_a_container_waiting_on_its_dependency() -> None:
    side = {**SIDE, "startTimeout": 20}
    task = t.Task(_def(side, WEB), 0)
    _started(task)
    task.handle(t.Tick(), 19_999)
    assert task.desired_status == "RUNNING"
    out = task.handle(t.Tick(), 20_000)
    assert t.StopContainer("web", 30_000) in out
    assert task.stop_code == "TaskFailedToStart" and "startTimeout" in task.stopped_reason


def test_crash_loop_backs_off_and_never_hot_loops() -> None:
    task = t.Task(_def({"name": "a", "image": "i"}), 0, restart_policy="always")
    _started(task)
    now, starts = 0, []
    for _ in range(8):  # crashes at once every time
        now += 1
        assert task.handle(t.ContainerExited("a", 1), now) == []
        assert "CrashLoopBackOff" in task.containers["a"].reason
        restart_at = task.containers["a"].restart_at_ms
        assert restart_at is not None
        assert task.handle(t.Tick(), restart_at - 1) == []
        assert task.handle(t.Tick(), restart_at) == [t.StartContainer("a")]
        starts.append(restart_at - now)
        now = restart_at
        task.handle(t.ContainerStarted("a"), now)
    assert starts == [10_000, 20_000, 40_000, 80_000, 160_000, 300_000, 300_000, 300_000]
    # A run of 10 minutes resets the backoff.
    assert task.handle(t.ContainerExited("a", 1), now + 600_000) == []
    assert task.containers["a"].restart_at_ms == now + 600_000 + 10_000
    assert task.last_status == "RUNNING" and task.desired_status == "RUNNING"


def test_on_failure_restarts_only_failures() -> None:
    task = t.Task(_def({"name": "a", "image": "i"}), 0, restart_policy="on-failure")
    _started(task)
    assert task.handle(t.ContainerExited("a", 0), 1) == [t.Release()]
    assert task.stop_code == "EssentialContainerExited"


_events = st.lists(st.tuples(
    st.sampled_from(["prov", "provfail", "started", "startfail", "exited", "health", "stop",
                     "tick"]),
    st.sampled_from(["web", "side", "init"]), st.booleans(), st.integers(0, 20_000)),
    max_size=40)


@settings(max_examples=200)
@given(_events, st.sampled_from(["never", "always", "on-failure"]))
def test_any_history_keeps_the_invariants(events: list[Any], policy: Any) -> None:
    init = {"name": "init", "image": "i", "essential": False}
    web = {**WEB, "dependsOn": [{"containerName": "init", "condition": "COMPLETE"}]}
    task = t.Task(_def(SIDE, web, init), 0, restart_policy=policy)
    now, released = 0, 0
    order = ["PROVISIONING", "PENDING", "RUNNING", "STOPPING", "STOPPED"]
    for kind, name, flag, dt in events:
        now += dt
        before = order.index(task.last_status)
        stim: Any = {"prov": t.Provisioned(), "provfail": t.ProvisionFailed("x"),
                     "started": t.ContainerStarted(name),
                     "startfail": t.ContainerStartFailed(name, "x"),
                     "exited": t.ContainerExited(name, 0 if flag else 1),
                     "health": t.HealthResult(name, flag), "stop": t.StopRequested("x"),
                     "tick": t.Tick()}[kind]
        out = task.handle(stim, now)
        released += sum(isinstance(i, t.Release) for i in out)
        assert order.index(task.last_status) >= before or (
            before == 1 and task.last_status == "STOPPED"), "status never goes back"
        if task.last_status == "STOPPED":
            assert task.desired_status == "STOPPED" and task.stop_code
        if task.desired_status == "STOPPED":
            assert not any(isinstance(i, t.StartContainer) for i in out)
    assert released == (1 if task.last_status == "STOPPED" else 0)


def test_always_restarts_an_init_container_only_until_it_succeeds() -> None:
    # A Pod's init container (core/pod.py): others wait on its SUCCESS. Under "always" it is
    # restarted after a failure, but its success is final and releases the containers after it
    # (restarting it after exit 0 held them back forever).
    init = {"name": "init", "image": "i", "essential": False}
    app = {"name": "app", "image": "i",
           "dependsOn": [{"containerName": "init", "condition": "SUCCESS"}]}
    task = t.Task(_def(init, app), 0, restart_policy="always")
    assert task.handle(t.Provisioned(), 0) == [t.StartContainer("init")]
    task.handle(t.ContainerStarted("init"), 1)
    assert task.handle(t.ContainerExited("init", 1), 2) == []  # failed: restarted later
    assert task.containers["init"].restart_at_ms == 10_002
    assert task.handle(t.Tick(), 10_002) == [t.StartContainer("init")]
    task.handle(t.ContainerStarted("init"), 10_003)
    assert task.handle(t.ContainerExited("init", 0), 10_004) == [t.StartContainer("app")]
    assert task.containers["init"].finished and task.containers["init"].restart_at_ms is None
    task.handle(t.ContainerStarted("app"), 10_005)
    assert task.last_status == "RUNNING"
    # The app itself is restarted under "always", even after exit 0.
    assert task.handle(t.ContainerExited("app", 0), 10_006) == []
    assert task.containers["app"].restart_at_ms == 10_006 + 10_000


def test_a_snapshot_restores_the_task_and_resume_asks_again_what_was_in_flight() -> None:
    """A restarted shell (frontend/tasks.py) rebuilds the task from its durable snapshot."""
    d = _def(WEB, SIDE)
    task = t.Task(d, 0)
    _started(task)
    assert task.handle(t.HealthResult("web", True), 10) == [t.StartContainer("side")]
    assert task.handle(t.ContainerStarted("side"), 10) == []
    assert task.last_status == "RUNNING"
    snap = task.snapshot()
    again = t.Task.restored(d, snap, 20)
    assert again.snapshot() == snap and again.health_status == task.health_status
    # due health checks run again at once (a probe in flight was lost with the process)
    assert again.resume(20) == [t.RunHealthCheck("web", ("CMD", "check"), 5000)]
    # a STOPPING task: its stops are asked again, dependents first
    task.handle(t.StopRequested("bye"), 30)
    stopping = t.Task.restored(d, task.snapshot(), 40)
    assert stopping.resume(40) == [t.StopContainer("side", 30_000),
                                   t.StopContainer("web", 30_000)]
    stopping.handle(t.ContainerExited("side", 143), 50)
    assert stopping.handle(t.ContainerExited("web", 143), 60) == [t.Release()]
    assert (stopping.last_status, stopping.stop_code) == ("STOPPED", "UserInitiated")
